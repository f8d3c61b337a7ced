"""Decode tokens/s of our runtime against transformers on one random MoE checkpoint, and the memory bound.

    python -m bench.runtime [--quick] [--profile]

What: a random bf16 MixtralForCausalLM (default 4 layers, 8 experts top-2, hidden 1024, about 460 MB, so
that reading weights dominates), batches of 1, 8 and 32 sequences with 32-token prompts, then N decode
steps of one token per sequence. Ours is `ModelRunner.forward(..., logits_for="last")`; transformers is
`AutoModelForCausalLM` (its default experts and attention implementations, which are printed) called as
`model(input_ids=next_ids, past_key_values=cache)` with the DynamicCache its prefill returned. Both take the
same pre-drawn random token per sequence and step (so routing does not depend on either's numerics) and
both take the argmax of the logits, as greedy decoding would. Prefill and two warm-up steps are not timed.

How: the two systems alternate (A, B, B, A, ...) over repeats in one process. Tokens/s = batch size over
the median step time pooled over repeats (a median step ignores the steps another process preempted); the
ratio ours / transformers is the median over repeats of the ratio of the two adjacent runs (range
printed). The bound per step is the bytes of weights the step must read (attention, norms, routers, LM
head, one embedding row per token, and the experts it touched: distinct experts per layer from our
`tokens_per_expert`) divided by the memory bandwidth measured in the same run (numpy copy, read + write);
the bound at torch's bf16 matrix-vector rate is printed beside it. Writes bench/results/runtime.json.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    RESULTS_DIR,
    Bandwidth,
    MoEShape,
    format_table,
    log,
    machine_info,
    make_moe_checkpoint,
    measure_bandwidth,
    median,
    reexec_with_passive_omp,
    setup_torch,
    write_json,
)
from workers.experts import MoEBlock
from workers.kv_cache import CacheConfig
from workers.model import Transformer
from workers.runner import ModelRunner


@dataclass(frozen=True)
class RunConfig:
    batch_sizes: tuple[int, ...] = (1, 8, 32)
    num_steps: int = 24  # timed decode steps per run
    num_warmup: int = 2  # untimed decode steps after the prefill
    repeats: int = 7  # runs of each system at each batch size, interleaved
    prompt_len: int = 32
    num_threads: int = 2

    @property
    def max_seq_len(self) -> int:
        return self.prompt_len + self.num_warmup + self.num_steps + 1


QUICK = RunConfig(batch_sizes=(1, 8), num_steps=6, repeats=2)


# -- the bound -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightBytes:
    dense: int  # read by every decode step: attention, norms, routers, LM head
    embedding_row: int  # one row of the embedding table (one per token)
    expert: int  # one routed expert of one layer (gate, up and down)
    num_moe_layers: int
    total: int  # every weight of the checkpoint

    def per_step(self, batch_size: int, num_experts_touched: float) -> float:
        """Bytes one decode step reads; num_experts_touched = distinct experts summed over MoE layers."""
        return self.dense + batch_size * self.embedding_row + num_experts_touched * self.expert


def count_weight_bytes(model: Transformer) -> WeightBytes:
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.model.embed_tokens.weight
    stacks = [layer.mlp.experts for layer in model.model.layers if isinstance(layer.mlp, MoEBlock)]
    experts = sum(p.numel() * p.element_size() for stack in stacks for p in stack.parameters())
    num_local = sum(stack.gate_up_proj.shape[0] for stack in stacks)
    embedding_bytes = embedding.numel() * embedding.element_size()
    # A tied LM head reads the whole embedding table every step (parameters() counts it once).
    lm_head_bytes = embedding_bytes if model.config.tie_word_embeddings else 0
    return WeightBytes(
        dense=total - experts - embedding_bytes + lm_head_bytes,
        embedding_row=embedding_bytes // embedding.shape[0],
        expert=experts // max(1, num_local),
        num_moe_layers=len(stacks),
        total=total,
    )


# -- the two systems -----------------------------------------------------------------------------------------


def time_ours(
    runner: ModelRunner, prompts: torch.Tensor, decode_ids: torch.Tensor, num_warmup: int
) -> tuple[list[float], list[int]]:
    """prompts [B, P], decode_ids [W + N, B] -> (seconds of each timed step, experts touched per step)."""
    seq_ids = list(range(prompts.shape[0]))
    for seq_id in seq_ids:
        runner.add_sequence(seq_id)
    try:
        runner.forward(seq_ids, prompts.tolist(), logits_for="last")
        step_s, num_touched = [], []
        for token_ids in decode_ids.tolist():
            start = time.perf_counter()
            out = runner.forward(seq_ids, [[t] for t in token_ids], logits_for="last")
            out.logits.argmax(dim=-1).tolist()
            step_s.append(time.perf_counter() - start)
            num_touched.append(sum(out.experts_touched))
    finally:
        for seq_id in seq_ids:
            runner.free(seq_id)
    return step_s[num_warmup:], num_touched[num_warmup:]


@torch.inference_mode()
def time_transformers(
    model: Any, prompts: torch.Tensor, decode_ids: torch.Tensor, num_warmup: int
) -> list[float]:
    """The same loop with transformers' forward and its DynamicCache; returns seconds of each timed step."""
    cache = model(input_ids=prompts, use_cache=True, logits_to_keep=1).past_key_values
    step_s = []
    for token_ids in decode_ids:
        start = time.perf_counter()
        out = model(input_ids=token_ids[:, None], past_key_values=cache, use_cache=True)
        out.logits[:, -1].argmax(dim=-1).tolist()
        step_s.append(time.perf_counter() - start)
    return step_s[num_warmup:]


def load_transformers(path: Path, experts_implementation: str | None) -> Any:
    from transformers import AutoModelForCausalLM

    kwargs = {} if experts_implementation is None else {"experts_implementation": experts_implementation}
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, **kwargs).eval()


# -- the run -------------------------------------------------------------------------------------------------


@dataclass
class Samples:
    """Per repeat, the seconds of every timed decode step of each system."""

    ours_s: list[list[float]]
    theirs_s: list[list[float]]
    num_touched: list[int]  # distinct experts summed over layers, per timed step of ours

    def tokens_per_s(self, batch_size: int) -> tuple[float, float]:
        """(ours, theirs): batch size over the median step time, pooled over repeats."""
        ours = median([t for run in self.ours_s for t in run])
        theirs = median([t for run in self.theirs_s for t in run])
        return batch_size / ours, batch_size / theirs

    def ratios(self) -> list[float]:
        """Ours over theirs in tokens/s, per repeat (each from the two runs' median steps, side by side)."""
        return [median(b) / median(a) for a, b in zip(self.ours_s, self.theirs_s, strict=True)]


def make_inputs(batch_size: int, config: RunConfig, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(batch_size)
    prompts = torch.randint(0, vocab_size, (batch_size, config.prompt_len), generator=generator)
    decode_ids = torch.randint(
        0, vocab_size, (config.num_warmup + config.num_steps, batch_size), generator=generator
    )
    return prompts, decode_ids


def run(runner: ModelRunner, hf_model: Any, config: RunConfig) -> tuple[dict[int, Samples], list[Bandwidth]]:
    samples = {b: Samples([], [], []) for b in config.batch_sizes}
    bandwidths = []
    for repeat in range(config.repeats):
        bandwidths.append(measure_bandwidth())
        log(f"repeat {repeat + 1}/{config.repeats}: copy {bandwidths[-1].copy_gbps:.1f} GB/s")
        for i, batch_size in enumerate(config.batch_sizes):
            prompts, decode_ids = make_inputs(batch_size, config, runner.config.vocab_size)
            ours_first = (repeat + i) % 2 == 0
            for system in ("ours", "theirs") if ours_first else ("theirs", "ours"):
                if system == "ours":
                    step_s, touched = time_ours(runner, prompts, decode_ids, config.num_warmup)
                    samples[batch_size].ours_s.append(step_s)
                    samples[batch_size].num_touched += touched
                else:
                    step_s = time_transformers(hf_model, prompts, decode_ids, config.num_warmup)
                    samples[batch_size].theirs_s.append(step_s)
            s = samples[batch_size]
            log(
                f"  batch {batch_size:3d}: median step ours {1e3 * median(s.ours_s[-1]):.0f} ms, "
                f"transformers {1e3 * median(s.theirs_s[-1]):.0f} ms"
            )
    return samples, bandwidths


def summarise(
    samples: dict[int, Samples], bandwidth: Bandwidth, weights: WeightBytes
) -> list[dict[str, Any]]:
    rows = []
    for batch_size, s in samples.items():
        ours, theirs = s.tokens_per_s(batch_size)
        ratios = s.ratios()
        num_touched = sum(s.num_touched) / len(s.num_touched)
        step_bytes = weights.per_step(batch_size, num_touched)
        bound = batch_size * bandwidth.copy_gbps * 1e9 / step_bytes
        kernel_bound = batch_size * bandwidth.matvec_gbps * 1e9 / step_bytes
        rows.append(
            {
                "batch_size": batch_size,
                "ours_tokens_per_s": ours,
                "transformers_tokens_per_s": theirs,
                "ratio": median(ratios),
                "ratio_min": min(ratios),
                "ratio_max": max(ratios),
                "experts_touched_per_layer": num_touched / weights.num_moe_layers,
                "weight_bytes_per_step": step_bytes,
                "bound_tokens_per_s": bound,
                "ours_fraction_of_bound": ours / bound,
                "transformers_fraction_of_bound": theirs / bound,
                "matvec_bound_tokens_per_s": kernel_bound,
                "ours_step_s": s.ours_s,
                "transformers_step_s": s.theirs_s,
            }
        )
    return rows


def print_report(rows: list[dict[str, Any]], bandwidth: Bandwidth, weights: WeightBytes) -> None:
    print(
        f"memory bandwidth (numpy copy, read + write): {bandwidth.copy_gbps:.1f} GB/s; "
        f"torch bf16 matrix-vector: {bandwidth.matvec_gbps:.1f} GB/s (medians over repeats)"
    )
    print(
        f"weights: {weights.total / 1e6:.0f} MB; read by every step {weights.dense / 1e6:.1f} MB; "
        f"one expert {weights.expert / 1e6:.1f} MB"
    )
    headers = [
        "batch",
        "ours tok/s",
        "hf tok/s",
        "ours/hf (range)",
        "experts/layer",
        "MB/step",
        "bound tok/s",
        "ours %bound",
        "hf %bound",
        "matvec-bound tok/s",
    ]
    table = [
        [
            str(r["batch_size"]),
            f"{r['ours_tokens_per_s']:.1f}",
            f"{r['transformers_tokens_per_s']:.1f}",
            f"{r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f})",
            f"{r['experts_touched_per_layer']:.2f}",
            f"{r['weight_bytes_per_step'] / 1e6:.0f}",
            f"{r['bound_tokens_per_s']:.0f}",
            f"{100 * r['ours_fraction_of_bound']:.0f}%",
            f"{100 * r['transformers_fraction_of_bound']:.0f}%",
            f"{r['matvec_bound_tokens_per_s']:.0f}",
        ]
        for r in rows
    ]
    print(format_table(headers, table))


def profile_ours(runner: ModelRunner, config: RunConfig, batch_size: int = 8) -> None:
    """torch.profiler over our decode steps at one batch size: the ops that take the time."""
    from torch.profiler import ProfilerActivity, profile

    prompts, decode_ids = make_inputs(batch_size, config, runner.config.vocab_size)
    time_ours(runner, prompts, decode_ids, config.num_warmup)  # warm up
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        time_ours(runner, prompts, decode_ids, config.num_warmup)
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    print(prof.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=15))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 1-2 minute smoke run")
    parser.add_argument("--checkpoint", type=Path, help="an MoE checkpoint (default: a random one)")
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--num-steps", type=int, help="timed decode steps per run")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--transformers-experts", help="transformers' experts_implementation (default: its own, grouped_mm)"
    )
    parser.add_argument("--profile", action="store_true", help="profile our decode at batch 8 and exit")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "runtime.json")
    return parser.parse_args()


def run_config(args: argparse.Namespace) -> RunConfig:
    base = QUICK if args.quick else RunConfig()
    return RunConfig(
        batch_sizes=tuple(args.batch_sizes or base.batch_sizes),
        num_steps=args.num_steps or base.num_steps,
        num_warmup=base.num_warmup,
        repeats=args.repeats or base.repeats,
        prompt_len=base.prompt_len,
        num_threads=args.threads,
    )


def main() -> None:
    reexec_with_passive_omp("bench.runtime")
    args = parse_args()
    config = run_config(args)
    setup_torch(config.num_threads)
    shape = MoEShape()
    path = args.checkpoint or make_moe_checkpoint(shape)
    log(f"checkpoint {path}")
    runner = ModelRunner.from_checkpoint(
        path, CacheConfig(max(config.batch_sizes), config.max_seq_len), torch.bfloat16
    )
    if args.profile:
        profile_ours(runner, config)
        return
    hf_model = load_transformers(path, args.transformers_experts)
    hf_impl = {
        "experts": hf_model.config._experts_implementation,
        "attention": hf_model.config._attn_implementation,
    }
    log(f"transformers implementations: {hf_impl}")
    weights = count_weight_bytes(runner.model)
    samples, bandwidths = run(runner, hf_model, config)
    bandwidth = Bandwidth(
        copy_gbps=median([b.copy_gbps for b in bandwidths]),
        matvec_gbps=median([b.matvec_gbps for b in bandwidths]),
    )
    rows = summarise(samples, bandwidth, weights)
    print(f"checkpoint: {path} ({'random ' + shape.name if args.checkpoint is None else 'given'})")
    print(
        f"transformers {hf_impl}; {config.num_steps} timed decode steps x {config.repeats} repeats, medians"
    )
    print_report(rows, bandwidth, weights)
    write_json(
        args.out,
        {
            "benchmark": "runtime",
            "config": config,
            "checkpoint": path,
            "shape": shape if args.checkpoint is None else None,
            "transformers_implementation": hf_impl,
            "machine": machine_info(),
            "bandwidth_median": bandwidth,
            "bandwidth_samples": bandwidths,
            "weight_bytes": weights,
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
