"""The comparison's figures: throughput and TPOT p50 as ratios to ours-off per workload, the cost model's
predicted iteration times against measured ones, and plain decoding's fraction of the weight-reading
bound.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench.analysis import ADAPTIVE, PLAIN, Key, system_order


def plot(report: dict[str, Any], cells: dict[Key, dict[str, dict[str, float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = report["config"]["workloads"]
    for metric, ylabel in (("throughput", "throughput / ours-off"), ("tpot_p50", "TPOT p50 / ours-off")):
        fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 3.8), squeeze=False)
        for ax, workload in zip(axes[0], workloads, strict=True):
            keys = sorted(c for w, c in cells if w == workload)
            systems = sorted({s for c in keys for s in cells[(workload, c)]}, key=system_order)
            for system in systems:
                points = [
                    (c, cells[(workload, c)][system][f"x_{metric}"])
                    for c in keys
                    if system in cells[(workload, c)] and "ours-off" in cells[(workload, c)]
                ]
                style = "-" if system.startswith("ours") else "--" if system.startswith("vllm") else ":"
                width = 2.5 if system in ADAPTIVE else 1.2
                if points:
                    ax.plot(*zip(*points, strict=True), style, marker="o", lw=width, ms=3, label=system)
            ax.set_xscale("log", base=2)
            ax.set_xticks(keys, [str(c) for c in keys])
            ax.set_title(workload)
            ax.set_xlabel("concurrency")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(ylabel)
        axes[0][-1].legend(fontsize=7, loc="best")
        fig.tight_layout()
        fig.savefig(out / f"{metric}.png", dpi=110)
        plt.close(fig)
    _plot_cost(report["cost_model"]["points"], out, plt)
    _plot_bound(report, out, plt)


def _plot_cost(points: list[dict[str, Any]], out: Path, plt: Any) -> None:
    fig, ax = plt.subplots(figsize=(5, 5))
    for is_fit, label in ((True, "fitted on"), (False, "held out")):
        chosen = [p for p in points if p["is_fit"] == is_fit]
        ax.scatter(
            [p["measured_s"] * 1e3 for p in chosen],
            [p["predicted_s"] * 1e3 for p in chosen],
            s=8,
            label=label,
        )
    top = max(max(p["measured_s"], p["predicted_s"]) for p in points) * 1e3
    ax.plot([0, top], [0, top], "k--", lw=1)
    ax.set_xlabel("measured iteration time (ms)")
    ax.set_ylabel("cost model (ms)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "cost_model.png", dpi=110)
    plt.close(fig)


def _plot_bound(report: dict[str, Any], out: Path, plt: Any) -> None:
    rows = [r for r in report["analysis"]["rows"] if r["bound_fraction"] is not None]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for system in PLAIN:
        by_conc: dict[int, list[float]] = defaultdict(list)
        for r in rows:
            if r["system"] == system:
                by_conc[r["concurrency"]].append(r["bound_fraction"])
        if by_conc:
            keys = sorted(by_conc)
            ax.plot(keys, [statistics.fmean(by_conc[c]) for c in keys], marker="o", label=system)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("concurrency (batch for generate)")
    ax.set_ylabel("fraction of the weight-reading bound")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "bound.png", dpi=110)
    plt.close(fig)
