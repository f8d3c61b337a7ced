"""GPU calibration: our runtime's MoE forward beside transformers on real model shapes, and the cost model's
GPU terms fitted on part of the measurements and checked on the rest.

    python -m bench.gpu_calibrate [--shapes mixtral-8x7b,qwen2-57b-a14b] [--num-layers 4] [--device cuda]
    python -m bench.gpu_calibrate --shapes tiny --device cpu --batch-sizes 1,2 --max-spec-tokens 1   # a check

What: a stack of `--num-layers` MoE blocks (router, routed experts, Qwen2's shared expert; residual between
blocks, no attention) with random bf16 weights, shaped like Mixtral-8x7B (hidden 4096, 8 experts of FFN
14336, top-2) or Qwen2-57B-A14B (hidden 3584, 64 experts of FFN 2560, top-8, shared FFN 20480). Ours is
`workers.experts.MoEBlock`; transformers' is its `MixtralSparseMoeBlock` / `Qwen2MoeSparseMoeBlock` holding
the same weights (outputs compared). Every batch size B and K = 0..max gives B * (K + 1) tokens, as one
verification forward would; each point is the median of `--repeats` timed forwards after warm-up.

Fit: the verify terms of `policy.cost_model.CostParams` for this stack, time = fixed + per_expert * N + per_token
* t (N: distinct experts touched per layer, measured; t: tokens), by non-negative least squares on the points
with even batch-size index, checked on the others (relative errors printed). Also: the achieved weight-read
bandwidth of each point. Writes bench/results/gpu_calibration.json (or --out). Needs torch and transformers
only (no Ray, no vLLM, no network).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch import nn

from workers.config import ModelConfig
from workers.experts import MoEBlock

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_calibration.json"


@dataclass(frozen=True)
class Shape:
    architecture: str
    hidden_size: int
    moe_intermediate_size: int
    num_experts: int
    top_k: int
    shared_expert_intermediate_size: int = 0

    def model_config(self) -> ModelConfig:
        return ModelConfig(
            architecture=self.architecture,
            vocab_size=32,
            hidden_size=self.hidden_size,
            num_layers=1,
            num_heads=1,
            num_kv_heads=1,
            head_dim=self.hidden_size,
            intermediate_size=self.moe_intermediate_size,
            num_experts=self.num_experts,
            top_k=self.top_k,
            moe_intermediate_size=self.moe_intermediate_size,
            norm_topk_prob=self.architecture == "MixtralForCausalLM",
            shared_expert_intermediate_size=self.shared_expert_intermediate_size,
        )

    @property
    def expert_params(self) -> int:
        return 3 * self.hidden_size * self.moe_intermediate_size


SHAPES = {
    # Mixtral-8x7B's config.json: hidden 4096, intermediate 14336, 8 local experts, top-2.
    "mixtral-8x7b": Shape("MixtralForCausalLM", 4096, 14336, 8, 2),
    # Qwen2-57B-A14B's config.json: hidden 3584, moe_intermediate 2560, 64 experts, top-8, shared 20480.
    "qwen2-57b-a14b": Shape("Qwen2MoeForCausalLM", 3584, 2560, 64, 8, 20480),
    "tiny": Shape("Qwen2MoeForCausalLM", 64, 32, 8, 2, 48),  # for the CPU check in CI
}


class OursStack(nn.Module):
    def __init__(self, blocks: list[MoEBlock]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """x: [T, hidden] -> (output, distinct experts touched per layer)."""
        touched = []
        for block in self.blocks:
            out, tokens_per_expert = block(x)
            x = x + out
            touched.append(tokens_per_expert)
        return x, [int((t > 0).sum()) for t in touched]


class ReferenceStack(nn.Module):
    def __init__(self, blocks: list[nn.Module]) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            out = block(x[None])  # transformers blocks take [batch, seq, hidden]
            x = x + (out[0] if isinstance(out, tuple) else out)[0]
        return x


def build_stacks(
    shape: Shape, num_layers: int, device: str, dtype: torch.dtype, experts_impl: str
) -> tuple[OursStack, ReferenceStack, str]:
    """Ours with random weights, and transformers' blocks loaded with the same weights."""
    from transformers import MixtralConfig, Qwen2MoeConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    torch.manual_seed(0)
    ours = []
    for _ in range(num_layers):
        with torch.device(device):  # built and filled where it runs: billions of parameters at real shapes
            block = MoEBlock(shape.model_config()).to(dtype)
        for param in block.parameters():
            nn.init.normal_(param, std=0.02)
        ours.append(block)
    if shape.architecture == "MixtralForCausalLM":
        config: Any = MixtralConfig(
            hidden_size=shape.hidden_size,
            intermediate_size=shape.moe_intermediate_size,
            num_local_experts=shape.num_experts,
            num_experts_per_tok=shape.top_k,
        )
        make: Any = MixtralSparseMoeBlock
    else:
        config = Qwen2MoeConfig(
            hidden_size=shape.hidden_size,
            moe_intermediate_size=shape.moe_intermediate_size,
            shared_expert_intermediate_size=shape.shared_expert_intermediate_size,
            num_experts=shape.num_experts,
            num_experts_per_tok=shape.top_k,
            norm_topk_prob=False,
        )
        make = Qwen2MoeSparseMoeBlock
    config._experts_implementation = experts_impl
    reference = []
    for block in ours:
        with torch.device("meta"):
            theirs = make(config)
        theirs.load_state_dict(block.state_dict(), strict=True, assign=True)
        reference.append(theirs)
    return OursStack(ours).eval(), ReferenceStack(reference).eval(), experts_impl


def time_forward(fn: Any, x: torch.Tensor, repeats: int, warmup: int) -> float:
    """Median seconds of fn(x) over `repeats` runs, synchronizing the device around each."""
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    for i in range(warmup + repeats):
        sync()
        start = time.perf_counter()
        fn(x)
        sync()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(args: argparse.Namespace, name: str) -> dict[str, Any]:
    shape, dtype = SHAPES[name], getattr(torch, args.dtype)
    ours, reference, impl = build_stacks(shape, args.num_layers, args.device, dtype, args.hf_experts)
    points = []
    with torch.inference_mode():
        probe = torch.randn(8, shape.hidden_size, device=args.device, dtype=dtype)
        ours_out, _ = ours(probe)
        diff = float((ours_out - reference(probe)).abs().max() / ours_out.abs().max())
        for batch in args.batch_sizes:
            for k in range(args.max_spec_tokens + 1):
                tokens = batch * (k + 1)
                x = torch.randn(tokens, shape.hidden_size, device=args.device, dtype=dtype)
                _, touched = ours(x)
                ours_s = time_forward(ours, x, args.repeats, args.warmup)
                reference_s = time_forward(reference, x, args.repeats, args.warmup)
                experts = statistics.fmean(touched)
                weight_bytes = args.num_layers * (
                    experts * shape.expert_params + 3 * shape.hidden_size * shape.shared_expert_intermediate_size
                ) * torch.finfo(dtype).bits / 8  # fmt: skip
                points.append(
                    {
                        "batch_size": batch,
                        "num_spec_tokens": k,
                        "num_tokens": tokens,
                        "experts_touched": experts,
                        "ours_s": ours_s,
                        "transformers_s": reference_s,
                        "ours_over_transformers": ours_s / reference_s,
                        "ours_read_bytes_per_s": weight_bytes / ours_s,
                    }
                )
                print(
                    f"{name} B={batch:>3} K={k} t={tokens:>4} N={experts:5.1f} ours {ours_s * 1e3:8.3f} ms "
                    f"transformers {reference_s * 1e3:8.3f} ms ({ours_s / reference_s:.2f}x)",
                    flush=True,
                )
    result = {"shape": asdict(shape), "transformers_experts": impl, "max_relative_output_diff": diff,
              "points": points}  # fmt: skip
    analyse(result, args.num_layers, args.batch_sizes)
    return result


def truth_times(shape: Shape, num_layers: int, points: list[dict[str, Any]]) -> list[float]:
    """The simulator's truth (`policy.truth.ServerTruth`, H200 and the engine constants fitted on MoESD's
    Table 1) for this stack at each point's tokens: the router and the shared expert as its dense weights,
    no attention, no context."""
    from policy.presets import H200, VLLM_ENGINE
    from policy.truth import ModelSpec, ServerTruth

    dense = num_layers * (
        shape.hidden_size * shape.num_experts + 3 * shape.hidden_size * shape.shared_expert_intermediate_size
    )
    stack = ModelSpec(
        f"{shape.architecture} x{num_layers}",
        dense_params=float(dense),
        num_layers=num_layers,
        expert_params=float(shape.expert_params),
        num_experts=shape.num_experts,
        top_k=shape.top_k,
        hidden_size=shape.hidden_size,
    )
    truth = ServerTruth(stack, stack, H200, 1, VLLM_ENGINE)
    return [truth.target_forward(p["num_tokens"], []) for p in points]


def analyse(result: dict[str, Any], num_layers: int, batch_sizes: list[int]) -> None:
    """Fits of ours and transformers' times, and the truth's time at every point, added to a shape's result."""
    shape, points = Shape(**result["shape"]), result["points"]
    for point, truth_s in zip(points, truth_times(shape, num_layers, points), strict=True):
        point["truth_s"] = truth_s
    result["fit"] = fit_and_check(points, batch_sizes, "ours_s")
    result["fit_transformers"] = fit_and_check(points, batch_sizes, "transformers_s")


def fit_and_check(points: list[dict[str, Any]], batch_sizes: list[int], key: str) -> dict[str, Any]:
    """time = fixed + per_expert * N + per_token * t, fitted (NNLS, relative residuals) to the points' `key`
    times on the points of even batch-size index, checked on the rest."""
    from scipy.optimize import nnls

    fit_batches = set(batch_sizes[::2])
    is_fit = np.array([p["batch_size"] in fit_batches for p in points])
    design = np.array([[1.0, p["experts_touched"], p["num_tokens"]] for p in points])
    times = np.array([p[key] for p in points])
    scaled = design / times[:, None]  # relative residuals
    params, _ = nnls(scaled[is_fit], np.ones(int(is_fit.sum())))
    predicted = design @ params
    errors = predicted / times - 1.0
    held_out = errors[~is_fit] if (~is_fit).any() else errors
    return {
        "fixed_s": float(params[0]),
        "per_expert_s": float(params[1]),  # all layers of the stack together, as in CostParams
        "per_token_s": float(params[2]),
        "fit_batch_sizes": sorted(fit_batches),
        "fit_median_abs_error": float(np.median(np.abs(errors[is_fit]))),
        "check_median_abs_error": float(np.median(np.abs(held_out))),
        "check_max_abs_error": float(np.max(np.abs(held_out))),
    }


def report(name: str, result: dict[str, Any]) -> None:
    """The fits, and per batch size a verification forward's time at K = 1.. over a plain one's (ours |
    transformers' | the simulator's truth): what drafting K tokens costs the target, the quantity MoESD's
    target efficiency is built on; and measured (transformers') time over the truth's at K = 0."""
    for key in ("fit", "fit_transformers"):
        fit = result[key]
        print(
            f"{name} {key}: fixed {fit['fixed_s'] * 1e3:.3f} ms, per expert {fit['per_expert_s'] * 1e6:.1f} us, "
            f"per token {fit['per_token_s'] * 1e6:.2f} us; held-out error median "
            f"{fit['check_median_abs_error']:.1%}, max {fit['check_max_abs_error']:.1%}",
            flush=True,
        )
    points = result["points"]
    by_shape = {(p["batch_size"], p["num_spec_tokens"]): p for p in points}
    for batch in sorted({p["batch_size"] for p in points}):
        plain = by_shape[(batch, 0)]
        ks = sorted(k for b, k in by_shape if b == batch and k > 0)
        ratios = [
            " ".join(f"{by_shape[(batch, k)][key] / plain[key]:.2f}" for k in ks)
            for key in ("ours_s", "transformers_s", "truth_s")
        ]
        print(
            f"{name} B={batch:>3} time(K={ks[0]}..{ks[-1]}) / time(K=0): ours {ratios[0]} | transformers "
            f"{ratios[1]} | truth {ratios[2]}; transformers / truth at K=0 "
            f"{plain['transformers_s'] / plain['truth_s']:.2f}"
        )


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shapes", default="mixtral-8x7b,qwen2-57b-a14b")
    parser.add_argument("--num-layers", type=int, default=4)
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64,128")
    parser.add_argument("--max-spec-tokens", type=int, default=4)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--hf-experts", default="grouped_mm", help="transformers' experts implementation")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    parser.add_argument(
        "--refit", type=Path, help="measure nothing: redo the fits and the truth's times of this result file"
    )
    args = parser.parse_args(argv)
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    unknown = set(args.shapes.split(",")) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shapes {sorted(unknown)}; choose from {sorted(SHAPES)}")
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    if args.refit:
        results = json.loads(args.refit.read_text())
        num_layers = results.setdefault("num_layers", args.num_layers)
        for name, result in results["shapes"].items():
            analyse(result, num_layers, sorted({p["batch_size"] for p in result["points"]}))
            report(name, result)
        args.refit.write_text(json.dumps(results, indent=1))
        print(f"rewrote {args.refit}")
        return results
    if args.threads:
        torch.set_num_threads(args.threads)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    results = {"device": device_name, "torch": torch.__version__, "num_layers": args.num_layers, "shapes": {}}
    for name in args.shapes.split(","):
        results["shapes"][name] = measure(args, name)
        report(name, results["shapes"][name])
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=1))  # after each shape: a timeout keeps what ran
    print(f"wrote {args.out}")
    return results


if __name__ == "__main__":
    main()
