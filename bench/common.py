"""Helpers shared by the benchmarks: random checkpoints, memory bandwidth, interleaved timing, tables, JSON.

Absolute times on the shared 2-core machines are noisy, so every benchmark measures the systems it compares
side by side in one run, interleaved over repeats, and reports medians and ratios.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

RESULTS_DIR = Path(__file__).resolve().parent / "results"
RAW_DIR = RESULTS_DIR / "raw"  # git-ignored: checkpoints and other large files
NUM_THREADS = 2

_START = time.perf_counter()


def reexec_with_passive_omp(module: str) -> None:
    """Restart `python -m module` with OMP_WAIT_POLICY=PASSIVE unless the caller chose a policy.

    With the default (spinning) policy, every parallel op waits for both OpenMP threads to be scheduled; on
    these shared cores, with a training job and test runs beside us, that made single ops of a few
    microseconds take up to 100 ms, and the benchmarks measured the scheduler instead of the code.
    """
    if "OMP_WAIT_POLICY" in os.environ:
        return
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE"}
    os.execve(sys.executable, [sys.executable, "-m", module, *sys.argv[1:]], env)


def setup_torch(num_threads: int = NUM_THREADS) -> None:
    torch.set_num_threads(num_threads)
    torch.manual_seed(0)


def log(message: str) -> None:
    """Progress on stderr, stamped with seconds since the benchmark started."""
    print(f"[{time.perf_counter() - _START:7.1f}s] {message}", file=sys.stderr, flush=True)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


# -- random checkpoints --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MoEShape:
    """A random MixtralForCausalLM; the defaults make about 460 MB of bf16 weights, 88% of them experts."""

    vocab_size: int = 8192
    hidden_size: int = 1024
    num_layers: int = 4
    num_heads: int = 16
    num_kv_heads: int = 4
    num_experts: int = 8
    top_k: int = 2  # experts per token
    expert_intermediate_size: int = 2048
    max_positions: int = 2048
    embedding_std: float = 1.0  # larger than the layers' 0.02 so the residual stream keeps the token
    seed: int = 0

    @property
    def name(self) -> str:
        return (
            f"mixtral-v{self.vocab_size}-h{self.hidden_size}-l{self.num_layers}-e{self.num_experts}"
            f"k{self.top_k}-i{self.expert_intermediate_size}-s{self.seed}"
        )


@dataclass(frozen=True)
class DraftShape:
    """A random dense LlamaForCausalLM that starts from the target's embeddings, final norm and LM head."""

    num_layers: int = 1
    intermediate_size: int = 1024
    layer_std: float = 0.02  # scale of its own random layer: smaller drafts agree more with the target
    seed: int = 1

    def name(self, target: MoEShape) -> str:
        return (
            f"llama-draft-of-{target.name}-l{self.num_layers}-i{self.intermediate_size}-std{self.layer_std}"
        )


def make_moe_checkpoint(shape: MoEShape, root: Path = RAW_DIR / "checkpoints") -> Path:
    """Save a random bf16 Mixtral with `shape` under `root` (reused when it already exists)."""
    from transformers import MixtralConfig, MixtralForCausalLM

    path = root / shape.name
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    log(f"creating random checkpoint {path}")
    config = MixtralConfig(
        vocab_size=shape.vocab_size,
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        head_dim=shape.hidden_size // shape.num_heads,
        num_local_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        intermediate_size=shape.expert_intermediate_size,
        max_position_embeddings=shape.max_positions,
        sliding_window=None,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(shape.seed)
    model = MixtralForCausalLM(config).eval()
    with torch.no_grad():
        model.model.embed_tokens.weight.normal_(0.0, shape.embedding_std)
    model.to(torch.bfloat16).save_pretrained(path)
    return path


def make_draft_checkpoint(
    target_path: Path, target: MoEShape, shape: DraftShape, root: Path = RAW_DIR / "checkpoints"
) -> Path:
    """Save a random bf16 Llama draft sharing the target's vocabulary, embeddings, final norm and LM head."""
    from safetensors import safe_open
    from transformers import LlamaConfig, LlamaForCausalLM

    path = root / shape.name(target)
    if (path / "config.json").is_file() and (path / "model.safetensors").is_file():
        return path
    log(f"creating random draft checkpoint {path}")
    config = LlamaConfig(
        vocab_size=target.vocab_size,
        hidden_size=target.hidden_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=target.num_heads,
        num_key_value_heads=target.num_kv_heads,
        head_dim=target.hidden_size // target.num_heads,
        intermediate_size=shape.intermediate_size,
        max_position_embeddings=target.max_positions,
        initializer_range=shape.layer_std,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=1,
    )
    torch.manual_seed(shape.seed)
    model = LlamaForCausalLM(config).eval()
    shared = {
        "model.embed_tokens.weight": model.model.embed_tokens.weight,
        "model.norm.weight": model.model.norm.weight,
        "lm_head.weight": model.lm_head.weight,
    }
    with safe_open(str(target_path / "model.safetensors"), framework="pt") as f, torch.no_grad():
        for name, param in shared.items():
            param.copy_(f.get_tensor(name))
    model.to(torch.bfloat16).save_pretrained(path)
    return path


# -- memory bandwidth ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Bandwidth:
    """Measured rates in GB/s. The bound uses `copy_gbps` (the machine); `matvec_gbps` shows torch's kernel."""

    copy_gbps: float  # numpy copy of a 256 MB array: bytes read + bytes written per second
    matvec_gbps: float  # weight bytes per second of a bf16 F.linear([1, 8192], [16384, 8192]) (256 MB)


def measure_bandwidth(num_bytes: int = 256 * 2**20, repeats: int = 5) -> Bandwidth:
    src = np.ones(num_bytes // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # fault the pages in
    copy_times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        copy_times.append(time.perf_counter() - start)
    del src, dst

    cols = 8192
    weight = torch.randn(num_bytes // 2 // cols, cols, dtype=torch.bfloat16)  # [rows, cols], num_bytes
    x = torch.randn(1, cols, dtype=torch.bfloat16)
    F.linear(x, weight)
    matvec_times = []
    with torch.inference_mode():
        for _ in range(repeats):
            start = time.perf_counter()
            F.linear(x, weight)
            matvec_times.append(time.perf_counter() - start)
    return Bandwidth(
        copy_gbps=2 * num_bytes / min(copy_times) / 1e9,
        matvec_gbps=num_bytes / min(matvec_times) / 1e9,
    )


# -- output --------------------------------------------------------------------------------------------------


def format_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in rows]
    return "\n".join(lines)


def machine_info() -> dict[str, Any]:
    import platform

    return {
        "torch": torch.__version__,
        "num_threads": torch.get_num_threads(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", ""),
        "python": platform.python_version(),
        "num_cpus": os.cpu_count(),
        "load_average_1m": os.getloadavg()[0],
    }


def write_json(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_jsonable) + "\n")
    log(f"wrote {path}")


def _jsonable(value: object) -> object:
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"cannot write {type(value).__name__} to JSON")
