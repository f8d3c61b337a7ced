"""The MoESD cost curves of the benchmark pair on this machine: our runtime, and vLLM's CPU build.

    python -m bench.cost_curves [--quick] [--batch-sizes 1 2 4 ...] [--repeats 5] [--no-vllm]

What, for the wide target (bench.regime_pair, built on first use) and the demo draft:
- the plain decode step (1 token per sequence) against batch size B = 1..64;
- T_target(B, K+1 tokens per sequence) / T_target(B, 1) for K = 1..4: 1 / MoESD's target efficiency;
- distinct experts per layer touched by the B*(K+1) tokens of a verification, against the uniform N(t);
- the draft step over the target step (plain, 1 token per sequence) at every B; the aim is <= 0.1 at B = 1.

How, ours: one ModelRunner per model in this process (the Serve config's dtype, one thread per model as
its deployments have unless --threads). Each of B sequences is prefilled with a real prompt
(bench/prompts/mixed.jsonl) minus its last 5 tokens; a timed forward then appends the next 1 or K+1 of those
5 real tokens per sequence, so routing follows real text, and is rolled back. The plain step and K = 1..4
alternate in a rotating order over repeats; medians per (B, K).
How, vLLM (bench/vllm_offline.py in vLLM's own environment): `LLM.generate` with prefix caching; every
prompt's first 32 tokens are cached first, then a batch of B prompts of 32 + (K+1) tokens is generated with
max_tokens=1: one forward of K+1 new tokens per sequence over a cached prefix, the shape of a verification
(K = 0 is the plain step). Its times include vLLM's scheduling and sampling of one step.
Writes bench/results/cost_curves.json and bench/results/cost_curves/*.png.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from bench.common import RESULTS_DIR, log, machine_info, median, reexec_with_passive_omp, write_json
from bench.regime_pair import REPO, regime_pair, weight_bytes
from policy.routing import expected_experts, saturation_tokens
from workers.kv_cache import CacheConfig
from workers.runner import ModelRunner
from workers.tokenizer import Tokenizer

NUM_HELD = 5  # real tokens held back from each prompt: the plain token, or the K+1 verified ones (K <= 4)
PROMPTS = REPO / "bench" / "prompts" / "mixed.jsonl"


@dataclass(frozen=True)
class RunConfig:
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    num_spec_tokens: tuple[int, ...] = (1, 2, 3, 4)  # K; the plain step (K = 0) always runs
    repeats: int = 5
    dtype: str = "float32"  # the demo Serve config's
    num_threads: int = 1  # per model, as in the Serve config
    with_vllm: bool = True

    @property
    def systems(self) -> tuple[int, ...]:
        return (0, *self.num_spec_tokens)


QUICK = RunConfig(batch_sizes=(1, 4, 16), repeats=2, with_vllm=False)


def load_prompts(path: Path, num: int) -> list[list[int]]:
    tokenizer = Tokenizer(path)
    texts = [json.loads(line)["prompt"] for line in PROMPTS.read_text().splitlines() if line.strip()]
    prompts = [tokenizer.encode(texts[i % len(texts)]) for i in range(num)]
    short = [len(p) for p in prompts if len(p) <= NUM_HELD + 1]
    if short:
        raise ValueError(f"prompts of {short} tokens in {PROMPTS}: need more than {NUM_HELD + 1}")
    return prompts


def timed_forward(runner: ModelRunner, seq_ids: list[int], token_ids: list[list[int]]) -> tuple[float, float]:
    """(seconds, mean distinct experts per MoE layer) of one forward, which is then rolled back."""
    start = time.perf_counter()
    out = runner.forward(seq_ids, token_ids, logits_for="all")
    out.logits.argmax(dim=-1).tolist()  # as verification would
    seconds = time.perf_counter() - start
    for seq_id, tokens in zip(seq_ids, token_ids, strict=True):
        runner.rollback(seq_id, len(tokens))
    touched = out.experts_touched
    return seconds, sum(touched) / len(touched) if touched else 0.0


def measure_ours(
    target: ModelRunner, draft: ModelRunner, prompts: list[list[int]], config: RunConfig
) -> list[dict[str, Any]]:
    rows = []
    for batch_size in config.batch_sizes:
        seq_ids = list(range(batch_size))
        for runner in (target, draft):
            for seq_id in seq_ids:
                runner.add_sequence(seq_id)
            runner.forward(seq_ids, [p[:-NUM_HELD] for p in prompts[:batch_size]], logits_for="last")
        held = [p[-NUM_HELD:] for p in prompts[:batch_size]]
        times: dict[int, list[float]] = {k: [] for k in config.systems}
        experts: dict[int, list[float]] = {k: [] for k in config.systems}
        draft_times: list[float] = []
        systems = list(config.systems)
        timed_forward(target, seq_ids, [h[:1] for h in held])  # warm-up at this shape
        for repeat in range(config.repeats):
            shift = repeat % len(systems)
            for k in systems[shift:] + systems[:shift]:
                seconds, touched = timed_forward(target, seq_ids, [h[: k + 1] for h in held])
                times[k].append(seconds)
                experts[k].append(touched)
            draft_times.append(timed_forward(draft, seq_ids, [h[:1] for h in held])[0])
        for runner in (target, draft):
            for seq_id in seq_ids:
                runner.free(seq_id)
        plain = median(times[0])
        for k in config.systems:
            rows.append(
                {
                    "system": "ours",
                    "batch_size": batch_size,
                    "num_spec_tokens": k,
                    "num_tokens": batch_size * (k + 1),
                    "step_ms": 1e3 * median(times[k]),
                    "ratio_to_plain": median(times[k]) / plain,
                    # The fastest repeats' ratio: what other processes' preemptions on a shared machine
                    # leave least distorted.
                    "fastest_ratio_to_plain": min(times[k]) / min(times[0]),
                    "experts_per_layer": median(experts[k]),
                    "draft_step_ms": 1e3 * median(draft_times) if k == 0 else None,
                    "times_s": times[k],
                }
            )
        log(
            f"ours B={batch_size}: plain {1e3 * plain:.1f} ms, "
            + ", ".join(f"K={k} {median(times[k]) / plain:.2f}x" for k in config.num_spec_tokens)
            + f"; draft/target {median(draft_times) / plain:.3f}"
        )
    return rows


def measure_vllm(
    python: Path, target: Path, draft: Path, config: RunConfig, raw: Path, is_eager: bool
) -> list[dict[str, Any]]:
    """bench/vllm_offline.py steps in vLLM's environment: the target at every K, then the draft's plain step
    (one engine start each, a few minutes on 2 cores)."""

    def steps(model: Path, max_spec_tokens: int) -> list[dict[str, Any]]:
        out = raw / f"vllm_steps_{model.name}.json"
        command = [str(python), "-m", "bench.vllm_offline", "steps", "--model", str(model)]
        command += ["--dtype", config.dtype, "--batch-sizes", *map(str, config.batch_sizes)]
        command += [
            "--max-spec-tokens",
            str(max_spec_tokens),
            "--repeats",
            str(config.repeats),
            "--out",
            str(out),
        ]
        log(f"vLLM steps of {model.name} (an engine start takes minutes)")
        subprocess.run(command, check=True, cwd=REPO, env=vllm_env(config.num_threads))
        return list(json.loads(out.read_text())["rows"])

    rows = steps(target, max(config.num_spec_tokens))
    draft_ms = {r["batch_size"]: r["step_ms"] for r in steps(draft, 0)}
    for row in rows:
        if row["num_spec_tokens"] == 0:
            row["draft_step_ms"] = draft_ms[row["batch_size"]]
    return rows


def vllm_env(num_threads: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return {
        **env,
        "PYTHONPATH": str(REPO),
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "OMP_NUM_THREADS": str(num_threads),
        "VLLM_NO_USAGE_STATS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }


# -- plots ---------------------------------------------------------------------------------------------------


def plot(rows: list[dict[str, Any]], config: RunConfig, num_experts: int, top_k: int, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    systems = sorted({r["system"] for r in rows})

    def series(system: str, k: int, key: str) -> tuple[list[int], list[float]]:
        points = [r for r in rows if r["system"] == system and r["num_spec_tokens"] == k]
        return [r["batch_size"] for r in points], [r[key] for r in points]

    fig, ax = plt.subplots(figsize=(5, 3.8))
    for system in systems:
        ax.plot(*series(system, 0, "step_ms"), marker="o", label=f"{system}: target plain step")
        b, draft = series(system, 0, "draft_step_ms")
        if any(d is not None for d in draft):
            ax.plot(b, draft, marker="x", linestyle="--", label=f"{system}: draft step")
    _axes(ax, "batch size", "ms per step", "Plain decode step")
    fig.savefig(out / "plain_step.png", dpi=120, bbox_inches="tight")

    fig, axes = plt.subplots(1, len(systems), figsize=(5 * len(systems), 3.8), squeeze=False)
    for ax, system in zip(axes[0], systems, strict=True):
        for k in config.num_spec_tokens:
            (line,) = ax.plot(*series(system, k, "ratio_to_plain"), marker="o", label=f"K = {k} (median)")
            if all("fastest_ratio_to_plain" in r for r in rows if r["system"] == system):
                fastest = series(system, k, "fastest_ratio_to_plain")
                ax.plot(*fastest, linestyle=":", color=line.get_color(), label=f"K = {k} (fastest runs)")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        _axes(ax, "batch size", "T(B, K+1) / T(B, 1)", f"{system}: verification / plain step")
    fig.savefig(out / "verify_ratio.png", dpi=120, bbox_inches="tight")

    fig, ax = plt.subplots(figsize=(5, 3.8))
    ours = [r for r in rows if r["system"] == "ours"]
    tokens = sorted({r["num_tokens"] for r in ours})
    ax.plot(
        tokens, expected_experts(tokens, num_experts, top_k), color="black", label="N(t), uniform routing"
    )
    ax.scatter(
        [r["num_tokens"] for r in ours], [r["experts_per_layer"] for r in ours], s=14, label="measured"
    )
    ax.axvline(saturation_tokens(num_experts, top_k), color="grey", linestyle=":", label="N(t) = 0.95 E")
    _axes(ax, "tokens in the forward, t = B (K+1)", "distinct experts per layer", "Experts touched")
    fig.savefig(out / "experts_touched.png", dpi=120, bbox_inches="tight")
    plt.close("all")


def _axes(ax: Any, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


# -- the run -------------------------------------------------------------------------------------------------


def parse_args() -> tuple[RunConfig, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="ours only, B = 1, 4, 16, 2 repeats")
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"))
    parser.add_argument("--threads", type=int, help="torch threads per model (default 1, as served)")
    parser.add_argument("--no-vllm", action="store_true")
    parser.add_argument("--vllm-python", type=Path, help="vLLM's python (default: bench.peers creates one)")
    parser.add_argument("--vllm-eager", action="store_true", help="vLLM without torch.compile (faster start)")
    parser.add_argument("--vllm-only", action="store_true", help="keep ours from --out, measure vLLM again")
    parser.add_argument("--replot", action="store_true", help="only redraw the plots and table from --out")
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "cost_curves.json")
    args = parser.parse_args()
    base = QUICK if args.quick else RunConfig()
    config = RunConfig(
        batch_sizes=tuple(args.batch_sizes or base.batch_sizes),
        repeats=args.repeats or base.repeats,
        dtype=args.dtype or base.dtype,
        num_threads=args.threads or base.num_threads,
        with_vllm=base.with_vllm and not args.no_vllm,
    )
    return config, args


def main() -> None:
    reexec_with_passive_omp("bench.cost_curves")
    config, args = parse_args()
    torch.set_num_threads(config.num_threads)
    target_path, draft_path = regime_pair()
    hf = json.loads((target_path / "config.json").read_text())
    report = {
        "benchmark": "cost_curves",
        "config": asdict(config),
        "target": target_path.name,
        "draft": draft_path.name,
        "target_bytes": asdict(weight_bytes({**hf, "dtype": config.dtype})),
        "saturation_tokens": saturation_tokens(hf["num_local_experts"], hf["num_experts_per_tok"]),
        "machine": machine_info(),
    }
    if args.replot:
        rows = with_fastest_ratios(json.loads(args.out.read_text())["rows"])
        plot(rows, config, hf["num_local_experts"], hf["num_experts_per_tok"], args.out.with_suffix(""))
        print_rows(rows, hf["num_local_experts"], hf["num_experts_per_tok"])
        return
    if args.vllm_only:  # keep our rows from an earlier run, replace vLLM's
        rows = [r for r in json.loads(args.out.read_text())["rows"] if r["system"] == "ours"]
    else:
        rows = measure_ours_pair(target_path, draft_path, config)
        write_json(args.out, {**report, "rows": rows})  # ours is kept even if vLLM fails below
    if config.with_vllm or args.vllm_only:
        from bench.peers import ensure_vllm_venv

        python = args.vllm_python or ensure_vllm_venv(RESULTS_DIR / "raw" / "vllm-venv")
        raw = RESULTS_DIR / "raw"
        rows += measure_vllm(python, target_path, draft_path, config, raw, args.vllm_eager)
        report["vllm_eager"] = args.vllm_eager
    write_json(args.out, {**report, "rows": rows})
    plot(rows, config, hf["num_local_experts"], hf["num_experts_per_tok"], args.out.with_suffix(""))
    print_rows(rows, hf["num_local_experts"], hf["num_experts_per_tok"])


def measure_ours_pair(target_path: Path, draft_path: Path, config: RunConfig) -> list[dict[str, Any]]:
    prompts = load_prompts(target_path, max(config.batch_sizes))
    cache = CacheConfig(max_seqs=max(config.batch_sizes), max_seq_len=max(map(len, prompts)) + 8)
    dtype = getattr(torch, config.dtype)
    target = ModelRunner.from_checkpoint(target_path, cache, dtype)
    draft = ModelRunner.from_checkpoint(draft_path, cache, dtype)
    log(f"ours: {target_path.name} + {draft_path.name}, {config.dtype}, {config.num_threads} thread(s)")
    return measure_ours(target, draft, prompts, config)


def with_fastest_ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows with `fastest_ratio_to_plain` computed from their `times_s` (for runs that predate it)."""
    plain = {(r["system"], r["batch_size"]): min(r["times_s"]) for r in rows if r["num_spec_tokens"] == 0}
    return [
        {**r, "fastest_ratio_to_plain": min(r["times_s"]) / plain[(r["system"], r["batch_size"])]}
        for r in rows
    ]


def print_rows(rows: list[dict[str, Any]], num_experts: int, top_k: int) -> None:
    for r in rows:
        if r["num_spec_tokens"] == 0:
            draft = (
                ""
                if r["draft_step_ms"] is None
                else f", draft/target {r['draft_step_ms'] / r['step_ms']:.3f}"
            )
            print(f"{r['system']:5} B={r['batch_size']:3} plain {r['step_ms']:8.1f} ms{draft}")
            continue
        uniform = float(expected_experts(r["num_tokens"], num_experts, top_k))
        experts = "" if r["experts_per_layer"] is None else f", {r['experts_per_layer']:.2f} experts/layer"
        print(
            f"{r['system']:5} B={r['batch_size']:3} K={r['num_spec_tokens']} {r['ratio_to_plain']:.2f}x plain "
            f"(fastest runs {r['fastest_ratio_to_plain']:.2f}x){experts} (uniform N = {uniform:.2f})"
        )


if __name__ == "__main__":
    main()
