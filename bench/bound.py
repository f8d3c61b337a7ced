"""The limit of plain decoding on this machine: how fast it moves bytes, and the weight bytes a decode step
reads (dense weights, and the distinct experts a batch routes to). Bound in tokens/s = B x bandwidth / bytes
per step: an upper bound, it ignores the KV cache, activations and prefill.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policy.routing import expected_experts

ELEMENT_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class WeightParams:
    """Parameters a plain decode step reads: dense ones always, experts as many as the batch touches."""

    dense: int  # attention, norms, routers, LM head (embedding rows: only B of them, not counted)
    per_expert: int  # one expert of one layer
    num_moe_layers: int
    num_experts: int
    top_k: int

    def bytes_per_step(self, batch_size: int, element_size: int) -> float:
        touched = float(expected_experts(batch_size, self.num_experts, self.top_k))  # uniform routing
        return element_size * (self.dense + self.per_expert * self.num_moe_layers * touched)


def bandwidth(
    model_bytes: int, dtype: str, num_bytes: int = 256 * 2**20, repeats: int = 5
) -> dict[str, float]:
    """GB/s: a torch copy of 256 MB (bytes read + written: memory), weight bytes read by matrix-vector
    products of 256 MB (memory) and of `model_bytes` in the serving dtype (the model's size: on a machine
    whose last-level cache holds the model, this is the rate its weights can stream at)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(2)

    def best(fn: Any) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    def matvec(size: int, torch_dtype: torch.dtype) -> float:
        cols = 1024
        weight = torch.full(
            (size // torch_dtype.itemsize // cols, cols), 0.01, dtype=torch_dtype
        )  # [rows, cols]
        x = torch.ones(1, cols, dtype=torch_dtype)
        with torch.inference_mode():
            return size / best(lambda: F.linear(x, weight)) / 1e9

    buffers = [torch.ones(num_bytes // 4, dtype=torch.float32), torch.empty(num_bytes // 4)]
    rates = {"copy_gbps": 2 * num_bytes / best(lambda: buffers[1].copy_(buffers[0])) / 1e9}
    buffers.clear()
    rates["matvec_bfloat16_gbps"] = matvec(num_bytes, torch.bfloat16)
    rates["matvec_float32_gbps"] = matvec(num_bytes, torch.float32)
    rates[f"matvec_{dtype}_model_size_gbps"] = matvec(model_bytes, getattr(torch, dtype))
    return rates


def weight_params(target: Path) -> WeightParams:
    """Parameters a plain decode step reads, from the safetensors header (nothing is loaded)."""
    config = json.loads((target / "config.json").read_text())
    header: dict[str, Any] = {}
    for file in sorted(target.glob("*.safetensors")):
        with file.open("rb") as f:
            header |= json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    sizes = {name: _numel(info["shape"]) for name, info in header.items()}
    experts = {n: v for n, v in sizes.items() if ".experts." in n}
    embeddings = sum(v for n, v in sizes.items() if "embed_tokens" in n)  # a decode step reads B rows
    dense = sum(sizes.values()) - sum(experts.values()) - embeddings
    if config.get("tie_word_embeddings") and not any("lm_head" in n for n in sizes):
        dense += embeddings  # the LM head is the embedding matrix, read whole every step
    num_layers = config["num_hidden_layers"]
    num_experts = config.get("num_local_experts") or config.get("num_experts")
    return WeightParams(
        dense=dense,
        per_expert=sum(experts.values()) // (num_layers * num_experts),
        num_moe_layers=num_layers,
        num_experts=num_experts,
        top_k=config["num_experts_per_tok"],
    )


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def bound_gbps(report: dict[str, Any]) -> float:
    """The fastest this machine moved bytes in the run: the bound assumes weights stream at that rate."""
    return max(v for run in report["bandwidth"].values() for v in run.values())


def bound_tokens_per_s(report: dict[str, Any], concurrency: int) -> float:
    weights = WeightParams(**report["weights"])
    step_bytes = weights.bytes_per_step(concurrency, ELEMENT_SIZE[report["dtype"]])
    return concurrency * bound_gbps(report) * 1e9 / step_bytes
