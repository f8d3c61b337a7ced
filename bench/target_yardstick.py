"""The yardstick for issue #15's per-cell target: in how many cells a policy that is, in truth, exactly as
fast as the best of off and vLLM's static K would meet "auto at 0.95 of max(off, best static K)" on this
benchmark, given how much a server's throughput moves from run to run.

The target is read from medians over rounds of each mode's throughput over off's in the same run
(`bench.vllm_policy_report.paired_ratios`), and compared with the largest of five such medians (off's is 1).
Both sides are noisy, and the largest of five noisy figures is biased upward, so even a perfect policy
misses some cells. This measures the noise and the bias instead of guessing them:
- the noise, from twins: one run holding two servers of the same configuration (`--modes off,off-sync` on
  the CPU build, where vLLM never schedules asynchronously, so the two are the same server; and
  `auto,auto-base` with `--base-checkout` at the same commit). Each run's twin ratio carries both servers'
  noise, so a server's own noise per run is its standard deviation (of the log) over sqrt(2);
- the twins' own verdicts: in how many cells one twin's median falls below 0.95 of the other's, with no
  model at all;
- the oracle: per cell, the full matrix's medians are taken as the truth for off and K = 1..4, and an
  oracle as fast as the best of them is drawn with every mode, round by round, with independent normal
  noise of that size on the log throughput; the share of draws in which its median ratio reaches 0.95 of
  the largest of the static modes' and 1 is its chance in that cell. The truth is itself a noisy estimate
  (it makes modes look further apart than they are where noise separated them, which flatters the oracle).

    python -m bench.target_yardstick bench/results/vllm_policy_s33_regime_full_side_by_side.json \\
        --twins bench/results/vllm_policy_s34_regime_twins_side_by_side.json

So one matrix of two or three rounds cannot tell a policy that meets the target from one that misses it by a
little. `--pool` reads the target off every run on record instead: per cell, each mode's geometric mean over
all runs of its ratio to off in the same run, pooled over the result files given, with its standard error;
auto meets the target where its mean is at 0.95 of the largest of off's (1) and the static modes'. The runs
span sessions, machines and versions of auto: that verdict is auto's as it has been, not one commit's.

    python -m bench.target_yardstick --pool bench/results/vllm_policy_s*_regime_*side_by_side.json
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.vllm_policy_report import paired_ratios

TARGET = 0.95  # auto at this share of max(off, best static K)
Cell = tuple[str, int]  # (workload, concurrency)


def twin_log_ratios(rows: list[dict[str, Any]], twin: str, original: str) -> dict[Cell, list[float]]:
    """Per cell, log(twin / original) in each run (launch and round) that holds one row of each."""
    return {
        (workload, concurrency): [math.log(x) for x in ratios]
        for (workload, concurrency, mode), ratios in paired_ratios(rows, reference=original).items()
        if mode == twin
    }


def server_sd(logs: dict[Cell, list[float]]) -> float:
    """One server's noise per run (sd of its log throughput), from twin ratios pooled over cells, about 0
    (twins are the same server in truth). It takes a lasting difference between two launches as run-to-run
    noise, which the median over rounds then shrinks: that flatters the oracle, never the other way."""
    values = [x for xs in logs.values() for x in xs]
    if len(values) < 2:
        raise ValueError("the twins need at least two runs")
    return math.sqrt(sum(x * x for x in values) / len(values) / 2.0)


def sd_by_concurrency(logs: dict[Cell, list[float]], min_runs: int = 6) -> dict[int, float]:
    """`server_sd` per concurrency, where the twins ran it at least `min_runs` times (a lone request's steps
    and a full batch's need not be equally noisy); the pooled figure elsewhere."""
    pooled = server_sd(logs)
    out = {}
    for concurrency in sorted({c for _, c in logs}):
        runs = {cell: xs for cell, xs in logs.items() if cell[1] == concurrency}
        out[concurrency] = server_sd(runs) if sum(map(len, runs.values())) >= min_runs else pooled
    return out


def twin_misses(logs: dict[Cell, list[float]]) -> list[Cell]:
    """The cells where either twin's median ratio to the other is below the target (no model)."""
    return [cell for cell, xs in logs.items() if abs(statistics.median(xs)) > -math.log(TARGET)]


def truth(rows: list[dict[str, Any]]) -> dict[Cell, dict[str, float]]:
    """Per cell: off and vLLM's static modes (named by a number), the log of their median paired ratio to off."""
    out: dict[Cell, dict[str, float]] = {}
    for (workload, concurrency, mode), ratios in paired_ratios(rows).items():
        if mode == "off" or mode.isdigit():
            out.setdefault((workload, concurrency), {})[mode] = math.log(statistics.median(ratios))
    return {cell: modes for cell, modes in out.items() if len(modes) > 1}


def oracle_chance(
    modes: dict[str, float], sd: float, num_rounds: int, num_draws: int, rng: random.Random
) -> float:
    """The share of draws in which an oracle as fast as the best of `modes` (log ratios to off, off's 0)
    measures at the target's share of the largest measured median or above."""
    best = max(modes.values())
    statics = [mu for mode, mu in modes.items() if mode != "off"]
    hits = 0
    for _ in range(num_draws):
        off = [rng.gauss(0.0, sd) for _ in range(num_rounds)]

        def measured(mu: float, off: list[float] = off) -> float:
            return statistics.median(mu + rng.gauss(0.0, sd) - o for o in off)

        largest = max([0.0, *(measured(mu) for mu in statics)])
        hits += measured(best) >= math.log(TARGET) + largest
    return hits / num_draws


@dataclass(frozen=True)
class Pooled:
    """One mode in one cell over every run on record: the mean of log(throughput / off's), its standard error
    (0 with one run) and the number of runs."""

    mean: float
    se: float
    num_runs: int


def pooled(results: list[list[dict[str, Any]]]) -> dict[Cell, dict[str, Pooled]]:
    """Per cell and mode (the static modes and auto; off is the reference), its log ratios to off in the same
    run, over every file's runs."""
    logs: dict[tuple[str, int, str], list[float]] = {}
    for rows in results:
        for key, ratios in paired_ratios(rows).items():
            if key[2] == "auto" or key[2].isdigit():
                logs.setdefault(key, []).extend(math.log(x) for x in ratios)
    out: dict[Cell, dict[str, Pooled]] = {}
    for (workload, concurrency, mode), xs in logs.items():
        se = statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else 0.0
        out.setdefault((workload, concurrency), {})[mode] = Pooled(statistics.fmean(xs), se, len(xs))
    return out


def pooled_verdicts(cells: dict[Cell, dict[str, Pooled]]) -> list[tuple[Cell, str, float, float]]:
    """Per cell with auto and a static mode: (cell, the best of off and the static modes, auto over it, the
    standard error of that ratio's log)."""
    out = []
    for cell, modes in sorted(cells.items()):
        statics = {m: p for m, p in modes.items() if m != "auto"}
        if "auto" not in modes or not statics:
            continue
        best = max(statics, key=lambda m: statics[m].mean)
        auto, top = modes["auto"], statics[best]
        if top.mean < 0.0:
            best, top = "off", Pooled(0.0, 0.0, 0)
        out.append((cell, best, math.exp(auto.mean - top.mean), math.hypot(auto.se, top.se)))
    return out


def is_closed_loop(result: dict[str, Any]) -> bool:
    """Whether a result's cells sent every request at once (no `--request-rate`, or inf)."""
    return float(result.get("args", {}).get("request_rate", "inf")) == math.inf


def print_pooled(paths: list[Path]) -> None:
    """The issue's target is the closed loop's (all requests at once): results run at a finite request rate
    (Poisson arrivals, `bench.vllm_policy --request-rate`) are left out, and named."""
    results = {path: json.loads(path.read_text()) for path in paths}
    closed = [path for path, result in results.items() if is_closed_loop(result)]
    for path in sorted(set(paths) - set(closed)):
        print(f"left out (arrivals at a finite request rate): {path.name}")
    cells = pooled([results[path]["rows"] for path in closed])
    verdicts = pooled_verdicts(cells)
    print(f"pooled over {len(closed)} result files: each mode's geometric mean over off, per cell (runs)")
    for cell, best, ratio, se in verdicts:
        modes = " ".join(f"{m} {math.exp(p.mean):.3f} ({p.num_runs})" for m, p in sorted(cells[cell].items()))
        verdict = "meets" if ratio >= TARGET else "misses"
        print(f"  {cell[0]} {cell[1]}: {modes}; auto / {best} {ratio:.3f} +- {ratio * se:.3f}: {verdict}")
    met = sum(ratio >= TARGET for _, _, ratio, _ in verdicts)
    print(f"auto at {TARGET} of max(off, best static K): {met} of {len(verdicts)} cells")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "full", type=Path, nargs="?", help="a bench.vllm_policy result with off and static K 1..4"
    )
    parser.add_argument("--twins", type=Path, help="a result with twin modes (off,off-sync)")
    parser.add_argument("--pool", type=Path, nargs="+", help="results to pool per cell instead (see above)")
    parser.add_argument("--twin", default="off-sync", help="the twin mode of --original in --twins")
    parser.add_argument("--original", default="off")
    parser.add_argument("--rounds", type=int, default=0, help="rounds per cell (default: as in the full run)")
    parser.add_argument("--draws", type=int, default=4000)
    args = parser.parse_args()
    if args.pool:
        print_pooled(args.pool)
        return
    if args.full is None or args.twins is None:
        parser.error("give a full matrix and --twins, or --pool")
    full = json.loads(args.full.read_text())["rows"]
    twins = json.loads(args.twins.read_text())["rows"]
    logs = twin_log_ratios(twins, args.twin, args.original)
    if not logs:
        raise SystemExit(f"{args.twins} has no run with one row of {args.twin} and one of {args.original}")
    sd = server_sd(logs)
    sds = sd_by_concurrency(logs)
    misses = twin_misses(logs)
    print(f"{args.twin} / {args.original}: {sum(map(len, logs.values()))} runs in {len(logs)} cells")
    for cell, xs in sorted(logs.items()):
        ratios = " ".join(f"{math.exp(x):.2f}" for x in xs)
        print(f"  {cell[0]} {cell[1]}: median {math.exp(statistics.median(xs)):.2f} ({ratios})")
    by_concurrency = ", ".join(f"{c}: {v:.3f}" for c, v in sds.items())
    print(f"one server's noise per run: sd of log throughput {sd:.3f} (by concurrency: {by_concurrency})")
    print(f"cells where one twin's median is below {TARGET} of the other's: {len(misses)} of {len(logs)}")
    num_rounds = args.rounds or len({r.get("round", 0) for r in full})
    rng = random.Random(0)
    expected, all_met = 0.0, 1.0
    cells = truth(full)
    for cell, modes in sorted(cells.items()):
        chance = oracle_chance(modes, sds.get(cell[1], sd), num_rounds, args.draws, rng)
        expected, all_met = expected + chance, all_met * chance
        best = max(modes, key=modes.__getitem__)
        print(
            f"  {cell[0]} {cell[1]}: best {best} ({math.exp(modes[best]):.2f}x off), oracle meets {chance:.2f}"
        )
    print(
        f"an oracle, {num_rounds} rounds: expected cells met {expected:.1f} of {len(cells)}, "
        f"chance of all {all_met:.3f}"
    )


if __name__ == "__main__":
    main()
