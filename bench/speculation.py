"""Speculative decoding at static K = 1..4 against plain decoding, at batch 1, 4, 16 and 32, from one run.

    python -m bench.speculation [--quick] [--pair regime|demo|random | --target DIR --draft DIR]
                                [--workload mixed] [--dtype float32]

What: the SpecEngine on the benchmark pair by default (`regime`: models/demo-moe-wide, the demo target's
function at the cost of a memory-bound MoE, built on first use by bench.regime_pair, + models/demo-draft),
the shipped demo pair (`demo`, whose 31 MB target sits in the CPU's cache), or a random pair (`random`: a
random 460 MB Mixtral target and a one-layer Llama draft that starts from the target's embeddings, final
norm and LM head, so that the two agree on some tokens); the output says which. Prompts come from
bench/prompts/<workload>.jsonl when the target has a tokenizer, else are random tokens. Every request is
greedy with a fixed number of output tokens (ignore_eos): 64 on the demo pair, 24 on the others (their
decode steps are several times slower). Weights in --dtype (default float32, the demo Serve config's).

How: for each batch size, `off` (OffChooser, no drafter) and K = 1..4 (StaticChooser) run on the same
prompts with one shared target and draft runner, in an order that rotates over repeats. Reported per
(batch, K), as medians over repeats of per-repeat ratios to `off`: output tokens/s over the wall time of
the whole step loop (prefill included), and without prefill (the iterations' own times); acceptance =
accepted / proposed drafts from `last_stats` of every iteration; the verification cost = verify time of an
iteration at K over that of a plain decode iteration at the same batch size (the same for the draft
time), over iterations where the whole batch ran at K; and whether greedy outputs equal `off`'s.
Writes bench/results/speculation.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from bench.common import (
    RESULTS_DIR,
    DraftShape,
    MoEShape,
    format_table,
    log,
    machine_info,
    make_draft_checkpoint,
    make_moe_checkpoint,
    median,
    reexec_with_passive_omp,
    setup_torch,
    write_json,
)
from bench.regime_pair import DEMO_DRAFT, DEMO_TARGET, regime_pair
from policy.baselines import OffChooser, StaticChooser
from policy.stats import IterationStats
from workers.drafter import Drafter
from workers.engine import EngineConfig, SpecEngine
from workers.kv_cache import CacheConfig
from workers.runner import ModelRunner
from workers.sampling import SamplingParams
from workers.target import Target
from workers.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parent.parent
PROMPTS_DIR = REPO / "bench" / "prompts"


@dataclass(frozen=True)
class RunConfig:
    batch_sizes: tuple[int, ...] = (1, 4, 16, 32)
    num_spec_tokens: tuple[int, ...] = (1, 2, 3, 4)  # K; 0 (off) always runs too
    max_tokens: int = 64
    repeats: int = 4
    num_threads: int = 2
    dtype: str = "float32"

    @property
    def systems(self) -> tuple[int, ...]:
        return (0, *self.num_spec_tokens)


QUICK = RunConfig(batch_sizes=(1, 16), max_tokens=16, repeats=1)
LARGE_PAIR = RunConfig(max_tokens=24, repeats=3)  # hundreds of MB of target: decodes several times slower


# -- inputs --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pair:
    target: Path
    draft: Path
    description: str
    is_random: bool = False


def resolve_pair(target: Path | None, draft: Path | None, kind: str = "regime") -> Pair:
    if (target is None) != (draft is None):
        raise ValueError("give both --target and --draft, or neither")
    if target is not None and draft is not None:
        return Pair(target, draft, "given")
    if kind == "regime":
        wide, demo_draft = regime_pair()
        return Pair(wide, demo_draft, "the benchmark pair (demo-moe-wide + demo-draft)")
    if kind == "demo":
        return Pair(DEMO_TARGET, DEMO_DRAFT, "the demo pair")
    if kind != "random":
        raise ValueError(f"unknown pair {kind!r}: regime, demo or random")
    shape, draft_shape = MoEShape(), DraftShape()
    target_path = make_moe_checkpoint(shape)
    draft_path = make_draft_checkpoint(target_path, shape, draft_shape)
    return Pair(
        target_path, draft_path, f"RANDOM pair: {shape.name} + {draft_shape.name(shape)}", is_random=True
    )


def load_prompts(target: Path, workload: str, vocab_size: int, num: int) -> tuple[list[list[int]], str]:
    """`num` prompts: from bench/prompts/<workload>.jsonl if the target has a tokenizer, else random."""
    file = PROMPTS_DIR / f"{workload}.jsonl"
    if file.is_file() and (target / "tokenizer.json").is_file():
        tokenizer = Tokenizer(target)
        texts = [json.loads(line)["prompt"] for line in file.read_text().splitlines() if line.strip()]
        prompts = [tokenizer.encode(texts[i % len(texts)]) for i in range(num)]
        if any(t >= vocab_size for p in prompts for t in p):
            raise ValueError(f"the tokenizer of {target} produces ids >= the vocabulary size {vocab_size}")
        return prompts, f"{file.relative_to(REPO)} (tokenized with {target.name})"
    generator = torch.Generator().manual_seed(0)
    lengths = torch.randint(16, 65, (num,), generator=generator).tolist()
    prompts = [torch.randint(0, vocab_size, (n,), generator=generator).tolist() for n in lengths]
    return prompts, "random tokens, 16 to 64 per prompt (no tokenizer.json in the target)"


# -- one run -------------------------------------------------------------------------------------------------


@dataclass
class RunResult:
    wall_s: float
    num_output_tokens: int
    output_ids: list[list[int]]
    iterations: list[IterationStats]


def make_engine(target: Target, drafter: Drafter, num_spec_tokens: int, batch_size: int) -> SpecEngine:
    if num_spec_tokens == 0:  # plain decoding: no drafter at all
        return SpecEngine(
            target, None, OffChooser(), EngineConfig(max_batch_size=batch_size, max_spec_tokens=0)
        )
    config = EngineConfig(max_batch_size=batch_size, max_spec_tokens=num_spec_tokens)
    return SpecEngine(target, drafter, StaticChooser(num_spec_tokens), config)


def run_once(engine: SpecEngine, prompts: list[list[int]], params: SamplingParams) -> RunResult:
    ids = [f"request-{i}" for i in range(len(prompts))]
    for request_id, prompt in zip(ids, prompts, strict=True):
        engine.add_request(request_id, prompt, params)
    outputs: dict[str, list[int]] = {i: [] for i in ids}
    iterations = []
    start = time.perf_counter()
    while engine.has_unfinished:
        before = engine.iteration
        for out in engine.step():
            outputs[out.request_id].extend(out.new_token_ids)
        if engine.iteration != before and engine.last_stats is not None:
            iterations.append(engine.last_stats)
    wall = time.perf_counter() - start
    return RunResult(wall, sum(len(o) for o in outputs.values()), [outputs[i] for i in ids], iterations)


# -- metrics -------------------------------------------------------------------------------------------------


@dataclass
class RunMetrics:
    tokens_per_s: float  # all output tokens over the wall time of the step loop
    decode_tokens_per_s: float  # output tokens after the first over the iterations' time (no prefill)
    num_proposed: int
    num_accepted: int
    tokens_per_iteration: float  # committed tokens per request per iteration
    verify_s: float  # mean over iterations where the whole batch ran at this K
    draft_s: float
    experts_touched: float  # distinct experts per MoE layer in those iterations
    num_full_iterations: int


def run_metrics(result: RunResult, batch_size: int, num_spec_tokens: int) -> RunMetrics:
    requests = [r for it in result.iterations for r in it.requests]
    full = [
        it
        for it in result.iterations
        if it.batch_size == batch_size and all(r.num_spec_tokens == num_spec_tokens for r in it.requests)
    ]
    touched = [sum(it.experts_touched) / len(it.experts_touched) for it in full if it.experts_touched]
    decode_s = sum(it.iteration_time_s for it in result.iterations)
    return RunMetrics(
        tokens_per_s=result.num_output_tokens / result.wall_s,
        decode_tokens_per_s=(result.num_output_tokens - batch_size) / decode_s,
        num_proposed=sum(r.num_spec_tokens for r in requests),
        num_accepted=sum(r.num_accepted_tokens for r in requests),
        tokens_per_iteration=sum(r.num_committed_tokens for r in requests) / max(1, len(requests)),
        verify_s=sum(it.verify_time_s for it in full) / max(1, len(full)),
        draft_s=sum(it.draft_time_s for it in full) / max(1, len(full)),
        experts_touched=sum(touched) / max(1, len(touched)),
        num_full_iterations=len(full),
    )


@dataclass
class Cell:
    """One (batch size, K) over repeats; ratios are to `off` in the same repeat."""

    runs: list[RunMetrics] = field(default_factory=list)
    speedups: list[float] = field(default_factory=list)
    decode_speedups: list[float] = field(default_factory=list)
    verify_ratios: list[float] = field(default_factory=list)
    draft_ratios: list[float] = field(default_factory=list)
    num_same_outputs: list[int] = field(default_factory=list)  # requests whose output equals off's


def record(cells: dict[int, Cell], results: dict[int, RunResult], batch_size: int) -> None:
    metrics = {k: run_metrics(r, batch_size, k) for k, r in results.items()}
    off, off_result = metrics[0], results[0]
    for k, m in metrics.items():
        cell = cells[k]
        cell.runs.append(m)
        cell.speedups.append(m.tokens_per_s / off.tokens_per_s)
        cell.decode_speedups.append(m.decode_tokens_per_s / off.decode_tokens_per_s)
        cell.verify_ratios.append(m.verify_s / off.verify_s)
        cell.draft_ratios.append(m.draft_s / off.verify_s)
        same = sum(a == b for a, b in zip(results[k].output_ids, off_result.output_ids, strict=True))
        cell.num_same_outputs.append(same)


# -- the benchmark -------------------------------------------------------------------------------------------


def warm_up(target: Target, drafter: Drafter, prompts: list[list[int]], config: RunConfig) -> None:
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    for k in config.systems:
        run_once(make_engine(target, drafter, k, 4), prompts[:4], params)


def run(
    target: Target, drafter: Drafter, prompts: list[list[int]], config: RunConfig
) -> dict[int, dict[int, Cell]]:
    params = SamplingParams(temperature=0.0, max_tokens=config.max_tokens, ignore_eos=True)
    cells = {b: {k: Cell() for k in config.systems} for b in config.batch_sizes}
    systems = list(config.systems)
    for repeat in range(config.repeats):
        for batch_size in config.batch_sizes:
            shift = repeat % len(systems)
            results = {}
            for k in systems[shift:] + systems[:shift]:
                engine = make_engine(target, drafter, k, batch_size)
                results[k] = run_once(engine, prompts[:batch_size], params)
            record(cells[batch_size], results, batch_size)
            speedups = ", ".join(f"K={k} {cells[batch_size][k].speedups[-1]:.2f}" for k in systems[1:])
            log(f"repeat {repeat + 1}/{config.repeats} batch {batch_size}: {speedups} (x off)")
    return cells


def summarise(cells: dict[int, dict[int, Cell]], config: RunConfig) -> list[dict[str, Any]]:
    rows = []
    for batch_size, by_k in cells.items():
        for k, cell in by_k.items():
            proposed = sum(m.num_proposed for m in cell.runs)
            rows.append(
                {
                    "batch_size": batch_size,
                    "num_spec_tokens": k,
                    "tokens_per_s": median([m.tokens_per_s for m in cell.runs]),
                    "speedup_vs_off": median(cell.speedups),
                    "decode_speedup_vs_off": median(cell.decode_speedups),
                    "acceptance_rate": sum(m.num_accepted for m in cell.runs) / proposed
                    if proposed
                    else None,
                    "tokens_per_iteration": median([m.tokens_per_iteration for m in cell.runs]),
                    "verify_cost_ratio": median(cell.verify_ratios),
                    "draft_cost_ratio": median(cell.draft_ratios),
                    "verify_ms": 1e3 * median([m.verify_s for m in cell.runs]),
                    "experts_touched_per_layer": median([m.experts_touched for m in cell.runs]),
                    "num_same_outputs_as_off": min(cell.num_same_outputs),
                    "runs": cell.runs,
                    "speedups": cell.speedups,
                }
            )
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    headers = ["batch", "K", "tok/s", "x off", "decode x off", "accept", "tok/iter", "verify x", "draft x"]
    headers += ["verify ms", "experts/layer", "same as off"]
    table = []
    for r in rows:
        k, accept = r["num_spec_tokens"], r["acceptance_rate"]
        table.append(
            [
                str(r["batch_size"]),
                str(k) if k else "off",
                f"{r['tokens_per_s']:.1f}",
                f"{r['speedup_vs_off']:.2f}",
                f"{r['decode_speedup_vs_off']:.2f}",
                "-" if accept is None else f"{accept:.2f}",
                f"{r['tokens_per_iteration']:.2f}",
                f"{r['verify_cost_ratio']:.2f}",
                f"{r['draft_cost_ratio']:.2f}",
                f"{r['verify_ms']:.1f}",
                f"{r['experts_touched_per_layer']:.2f}",
                f"{r['num_same_outputs_as_off']}/{r['batch_size']}",
            ]
        )
    print(format_table(headers, table))


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a 1-2 minute smoke run")
    parser.add_argument(
        "--pair",
        choices=("regime", "demo", "random"),
        default="regime",
        help="regime: demo-moe-wide + demo-draft (default); demo: the shipped pair; random: a random 460 MB pair",
    )
    parser.add_argument("--target", type=Path, help="a target checkpoint instead of --pair (with --draft)")
    parser.add_argument("--draft", type=Path, help="a draft checkpoint instead of --pair (with --target)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--workload", default="mixed", help="bench/prompts/<workload>.jsonl")
    parser.add_argument("--batch-sizes", type=int, nargs="+")
    parser.add_argument("--max-tokens", type=int)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "speculation.json")
    return parser.parse_args()


def run_config(args: argparse.Namespace, pair: Pair) -> RunConfig:
    is_large = pair.is_random or pair.target != DEMO_TARGET
    base = QUICK if args.quick else LARGE_PAIR if is_large else RunConfig()
    return RunConfig(
        batch_sizes=tuple(args.batch_sizes or base.batch_sizes),
        num_spec_tokens=base.num_spec_tokens,
        max_tokens=args.max_tokens or base.max_tokens,
        repeats=args.repeats or base.repeats,
        num_threads=args.threads,
        dtype=args.dtype,
    )


def load_runners(pair: Pair, prompts_len: int, config: RunConfig) -> tuple[Target, Drafter]:
    max_seq_len = prompts_len + config.max_tokens + max(config.num_spec_tokens) + 1
    cache = CacheConfig(max_seqs=max(config.batch_sizes), max_seq_len=max_seq_len)
    dtype = getattr(torch, config.dtype)
    target = ModelRunner.from_checkpoint(pair.target, cache, dtype)
    draft = ModelRunner.from_checkpoint(pair.draft, cache, dtype)
    return Target(target), Drafter(draft)


def main() -> None:
    reexec_with_passive_omp("bench.speculation")
    args = parse_args()
    pair = resolve_pair(args.target, args.draft, args.pair)
    config = run_config(args, pair)
    setup_torch(config.num_threads)
    vocab_size = json.loads((pair.target / "config.json").read_text())["vocab_size"]
    prompts, prompt_source = load_prompts(pair.target, args.workload, vocab_size, max(config.batch_sizes))
    log(f"pair: {pair.description}; prompts: {prompt_source}")
    target, drafter = load_runners(pair, max(len(p) for p in prompts), config)
    warm_up(target, drafter, prompts, config)
    cells = run(target, drafter, prompts, config)
    rows = summarise(cells, config)
    print(f"pair: {pair.description}")
    print(f"target {pair.target}\ndraft  {pair.draft}")
    print(
        f"prompts: {prompt_source}; greedy, {config.max_tokens} output tokens each; {config.repeats} repeats;"
        f" {config.dtype}, {config.num_threads} threads"
    )
    print("x off: output tokens/s (wall time of the step loop, prefill included) over plain decoding;")
    print("decode x off: the same without prefill (tokens after the first over the iterations' time);")
    print("verify x / draft x: time per iteration over a plain decode iteration at the same batch size;")
    print("all ratios are medians of per-repeat ratios; same as off: greedy outputs equal to off's")
    print_table(rows)
    write_json(
        args.out,
        {
            "benchmark": "speculation",
            "config": config,
            "pair": pair,
            "prompts": prompt_source,
            "machine": machine_info(),
            "rows": rows,
        },
    )


if __name__ == "__main__":
    main()
