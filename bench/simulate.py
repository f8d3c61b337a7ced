"""Simulated speedups of every K policy over plain decoding, per preset, acceptance level and batch size.

Usage: python -m bench.simulate [--presets ...] [--seeds 5] [--jobs 2] [--quick]
       python -m bench.simulate --paper moesd [--fit]
Prints one table per preset and acceptance level (seed 0), the policy table (per cell, the minimum over
seeds of auto / max(off, best static K), and of cascade / off), and the static-K batch curve of MoE and
dense presets; writes speedups.json and PNG plots under bench/results/simulator/. `--paper moesd` prints
MoESD's Tables 1-2 beside the simulator (see bench/paper_moesd.py) and writes moesd.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from policy.presets import MEASURED_PRESETS, PRESETS
from policy.simulator import POLICIES, iterations_for, speedups
from policy.workload import ACCEPTANCE_LEVELS, WorkloadConfig

# Any preset by name: the spec-sheet ones and those measured (`MEASURED_PRESETS`: the demo pair's CPU, an H200).
ALL_PRESETS = {**PRESETS, **MEASURED_PRESETS}
OUT_DIR = Path(__file__).resolve().parent / "results" / "simulator"
CURVE_PRESETS = ("mixtral-8x7b-h100", "qwen2-57b-a14b-h100", "llama-70b-h100")
CURVE_BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128)

Task = tuple[str, str, int, int, int]  # (preset, level, batch size, request-iterations, seed)


def policy_table(results: dict[int, dict[str, dict[str, dict[int, dict[str, float]]]]]) -> tuple[str, dict]:
    """Per preset, level and batch, the minimum over seeds of: the batch-aware chooser / max(off, best static
    K), the same inside the measured guard (what a router serves, "auto"), and cascade / off; + where the
    chooser beat the best static K on every seed."""
    lines = [
        f"policy table, min over {len(results)} seeds: batch-aware / max(off, best static K) "
        "(+: above the best static K on every seed) [auto = batch-aware in the guard] {cascade / off}"
    ]
    table: dict = {}
    seeds = sorted(results)
    for preset, levels in results[seeds[0]].items():
        for level, rows in levels.items():
            cells = []
            for batch in sorted(rows):
                per_seed = [results[s][preset][level][batch] for s in seeds]
                statics = [max(v for p, v in r.items() if p.startswith("static")) for r in per_seed]
                cell: dict[str, float | bool] = {
                    name: min(r[name] / max(1.0, b) for r, b in zip(per_seed, statics, strict=True))
                    for name in ("batch-aware", "auto")
                }
                cell["cascade_over_off"] = min(r["cascade"] for r in per_seed)
                cell["beats_static"] = all(
                    r["batch-aware"] > b for r, b in zip(per_seed, statics, strict=True)
                )
                table.setdefault(preset, {}).setdefault(level, {})[batch] = cell
                cells.append(
                    f"{batch:>3}: {cell['batch-aware']:.3f}{'+' if cell['beats_static'] else ' '}"
                    f"[{cell['auto']:.3f}]{{{cell['cascade_over_off']:.2f}}}"
                )
            lines.append(f"{preset:>20} {level:>6} " + "  ".join(cells))
    return "\n".join(lines), table


def load_speedups(path: Path) -> dict[int, dict[str, dict[str, dict[int, dict[str, float]]]]]:
    """The per-seed speedups of a speedups.json (or its .partial), with integer seeds and batch sizes."""
    raw = json.loads(path.read_text())
    raw = raw.get("speedups", raw)
    return {
        int(seed): {
            preset: {level: {int(b): row for b, row in rows.items()} for level, rows in levels.items()}
            for preset, levels in presets.items()
        }
        for seed, presets in raw.items()
    }


def run_task(task: Task) -> tuple[Task, dict[str, float]]:
    preset, level, batch_size, request_iterations, seed = task
    workload = WorkloadConfig(
        batch_size,
        ACCEPTANCE_LEVELS[level],
        num_iterations=iterations_for(batch_size, request_iterations),
        seed=seed,
    )
    return task, speedups(ALL_PRESETS[preset], workload, POLICIES)


def run_curve(task: tuple[str, int, int]) -> tuple[tuple[str, int, int], float]:
    """Static K = 3 at acceptance 0.8, no timing noise: the shape of speedup against batch size."""
    preset, batch_size, seed = task
    workload = WorkloadConfig(
        batch_size, (0.8,), num_iterations=max(200, 4000 // batch_size), seed=seed, time_noise=0
    )
    return task, speedups(PRESETS[preset], workload, ("off", "static-3"))["static-3"]


def format_table(preset: str, level: str, rows: dict[int, dict[str, float]]) -> str:
    rates = "/".join(f"{a:g}" for a in ACCEPTANCE_LEVELS[level])
    lines = [f"{preset}, acceptance {level} ({rates}): speedup over plain decoding (tokens/s)"]
    lines.append(f"{'batch':>5} " + " ".join(f"{p:>11}" for p in POLICIES))
    for batch_size, speedup in sorted(rows.items()):
        best_static = max(v for p, v in speedup.items() if p.startswith("static"))
        cells = [
            f"{speedup[p]:10.2f}{'*' if p.startswith('static') and speedup[p] == best_static else ' '}"
            for p in POLICIES
        ]
        lines.append(f"{batch_size:>5} " + " ".join(cells))
    return "\n".join(lines)


def plot(
    results: dict[str, dict[str, dict[int, dict[str, float]]]], curves: dict[str, list[float]], out_dir: Path
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for preset, levels in results.items():
        fig, axes = plt.subplots(1, len(levels), figsize=(4.2 * len(levels), 3.6), sharey=True, squeeze=False)
        for ax, (level, rows) in zip(axes[0], levels.items(), strict=True):
            batch_sizes = sorted(rows)
            for policy in POLICIES:
                style = "-" if policy in ("cascade", "batch-aware") else ":"
                ax.plot(
                    batch_sizes, [rows[b][policy] for b in batch_sizes], style, marker="o", ms=3, label=policy
                )
            ax.set(xscale="log", xlabel="batch size", title=f"{level} acceptance")
            ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
            ax.axhline(1.0, color="grey", lw=0.5)
        axes[0][0].set_ylabel("speedup over plain decoding")
        axes[0][-1].legend(fontsize=7)
        fig.suptitle(preset)
        fig.tight_layout()
        fig.savefig(out_dir / f"{preset}.png", dpi=120)
        plt.close(fig)
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for preset, curve in curves.items():
        ax.plot(CURVE_BATCH_SIZES, curve, marker="o", label=preset)
    ax.set(xscale="log", xlabel="batch size", ylabel="speedup of static K = 3 (a = 0.8)")
    ax.set_xticks(CURVE_BATCH_SIZES, [str(b) for b in CURVE_BATCH_SIZES])
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out_dir / "batch_curve.png", dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--presets", default="mixtral-8x7b-h100,qwen2-57b-a14b-h100")
    parser.add_argument("--levels", default=",".join(ACCEPTANCE_LEVELS))
    parser.add_argument("--batch-sizes", default="1,2,4,8,16,32,64")
    parser.add_argument(
        "--request-iterations", type=int, default=8000, help="per run: iterations x batch size"
    )
    parser.add_argument("--seeds", type=int, default=1, help="seeds 0..n-1 (the policy table takes the min)")
    parser.add_argument("--paper", choices=("moesd",), help="print a paper's tables beside the simulator")
    parser.add_argument("--fit", action="store_true", help="with --paper moesd: refit the engine on Table 1")
    parser.add_argument("--table-from", type=Path, help="print the policy table of a speedups.json and stop")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument(
        "--quick", action="store_true", help="batch sizes 1,4,16,64 and 3000 request-iterations"
    )
    parser.add_argument("--no-plots", action="store_true")
    args = parser.parse_args(argv)
    unknown = set(args.presets.split(",")) - set(ALL_PRESETS)
    if unknown:
        parser.error(f"unknown presets {sorted(unknown)}; choose from {sorted(ALL_PRESETS)}")
    if args.quick:
        args.batch_sizes, args.request_iterations = "1,4,16,64", 3000
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out_dir = args.out_dir
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.paper == "moesd":
        from bench.paper_moesd import main as paper_main

        paper_main(args.fit, args.jobs, out_dir / "moesd.json")
        return
    if args.table_from:
        print(policy_table(load_speedups(args.table_from))[0])
        return
    tasks = [  # cell by cell, so that an interrupted run leaves whole cells (every seed) behind
        (preset, level, int(batch), args.request_iterations, seed)
        for preset in args.presets.split(",")
        for level in args.levels.split(",")
        for batch in args.batch_sizes.split(",")
        for seed in range(args.seeds)
    ]
    started = time.perf_counter()
    by_seed: dict[int, dict[str, dict[str, dict[int, dict[str, float]]]]] = {}
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        for done, ((preset, level, batch_size, _, seed), speedup) in enumerate(pool.map(run_task, tasks), 1):
            by_seed.setdefault(seed, {}).setdefault(preset, {}).setdefault(level, {})[batch_size] = speedup
            best = max(v for p, v in speedup.items() if p.startswith("static"))
            print(f"[{done}/{len(tasks)}] {preset} {level} batch {batch_size} seed {seed}: auto "
                  f"{speedup['auto']:.3f} cascade {speedup['cascade']:.3f} best static {best:.3f}", flush=True)  # fmt: skip
            (out_dir / "speedups.partial.json").write_text(json.dumps(by_seed))
        curve_outcomes = dict(
            pool.map(run_curve, [(p, b, 0) for p in CURVE_PRESETS for b in CURVE_BATCH_SIZES])
        )
    results = by_seed[0]
    curves = {p: [curve_outcomes[(p, b, 0)] for b in CURVE_BATCH_SIZES] for p in CURVE_PRESETS}
    for preset, by_level in results.items():
        for level, rows in by_level.items():
            print(format_table(preset, level, rows), end="\n\n")
    text, table = policy_table(by_seed)
    print(text, end="\n\n")
    print(
        "static K = 3 at acceptance 0.8, speedup by batch size "
        + " ".join(f"{b:>5}" for b in CURVE_BATCH_SIZES)
    )
    for preset, curve in curves.items():
        print(f"{preset:>52} " + " ".join(f"{s:5.2f}" for s in curve))
    print(f"\n* best static K in the row. {len(tasks)} workloads in {time.perf_counter() - started:.0f} s")
    payload = {"seeds": args.seeds, "speedups": by_seed, "policy_table": table, "static_k3_curves": curves}
    (out_dir / "speedups.json").write_text(json.dumps(payload, indent=1))
    (out_dir / "speedups.partial.json").unlink(missing_ok=True)
    if not args.no_plots:
        plot(results, curves, out_dir)
        print(f"wrote {out_dir}/speedups.json and PNG plots")


if __name__ == "__main__":
    main()
