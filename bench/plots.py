"""The comparison's report: ratios against our policy-off run, the targets, the weight-reading bound, the
profile where vLLM is ahead, the cost model's errors; written as JSON, Markdown and PNG plots.

Input: the dict `bench.compare.run` returns (phases of bench/load.py, `generate` results, bandwidth,
offline iterations with the cost model's predictions). Everything here is derived from it, so a report can
be rewritten from compare.json (`python -m bench.compare --report-only`).
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policy.routing import expected_experts

SYSTEM_ORDER = ["ours-off", "ours-K1", "ours-K2", "ours-K3", "ours-K4", "ours-cascade", "ours-batch-aware"]
SYSTEM_ORDER += ["vllm-off", "vllm-K1", "vllm-K2", "vllm-K3", "vllm-K4", "hf-generate", "hf-assisted"]
ADAPTIVE = ("ours-batch-aware", "ours-cascade")
PLAIN = ("ours-off", "vllm-off", "hf-generate")  # plain decoding: these get the weight-reading bound
ELEMENT_SIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
Key = tuple[str, int]  # (workload, concurrency)


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


# -- analysis ------------------------------------------------------------------------------------------------


RATIO_FIELDS = ("throughput", "tpot_p50", "tpot_p99")


def merged(report: dict[str, Any]) -> dict[Key, dict[str, dict[str, float]]]:
    """Per (workload, concurrency) and system: the mean over its phases (ours-off runs twice), and the
    ratios to our policy-off run (`x_*`).

    Our systems are divided by the off run of their own server launch (same server, minutes apart), so
    that drift between launches cancels; vLLM and `generate` by the mean of our off runs.
    """
    groups: dict[tuple[str, int, str], list[dict[str, Any]]] = defaultdict(list)
    own_off: dict[tuple[str, int, str], dict[str, Any]] = {}
    for p in report["phases"]:
        groups[(p["workload"], p["concurrency"], p["system"])].append(p)
        if p["system"] == "ours-off":
            own_off[(p["workload"], p["concurrency"], p["launch"])] = p
    cells: dict[Key, dict[str, dict[str, float]]] = defaultdict(dict)
    fields = ("throughput", "tpot_p50", "tpot_p99", "ttft_p50", "latency_p50", "acceptance", "elapsed_s")
    for (workload, concurrency, system), runs in groups.items():
        cell = {f: statistics.fmean(r.get(f, math.nan) for r in runs) for f in fields}
        offs = [own_off.get((workload, concurrency, r["launch"])) for r in runs]
        if system.startswith("ours") and all(offs):
            for f in RATIO_FIELDS:
                cell[f"x_{f}"] = statistics.fmean(r[f] / o[f] for r, o in zip(runs, offs, strict=True))  # type: ignore[index]
        cell["num_runs"] = len(runs)
        cell["spread"] = (
            max(r["throughput"] for r in runs) / max(1e-9, min(r["throughput"] for r in runs)) - 1
        )
        cells[(workload, concurrency)][system] = cell
    for g in report["generate"]:  # offline: time per output token of one sequence, prefill included
        tpot = g["seconds"] / (g["num_tokens"] / g["batch_size"])
        cell = {"throughput": g["throughput"], "tpot_p50": tpot, "tpot_p99": tpot, "ttft_p50": math.nan}
        cell["latency_p50"] = g["seconds"]  # the whole batch's generate call
        cells[(g["workload"], g["batch_size"])][g["system"]] = {**cell, "acceptance": float("nan")}
    for systems in cells.values():
        off = systems.get("ours-off")
        for cell in systems.values():
            for f in RATIO_FIELDS:
                cell.setdefault(f"x_{f}", cell[f] / off[f] if off else math.nan)
    return cells


def bound_gbps(report: dict[str, Any]) -> float:
    """The fastest this machine moved bytes in the run: the bound assumes weights stream at that rate."""
    return max(v for run in report["bandwidth"].values() for v in run.values())


def bound_tokens_per_s(report: dict[str, Any], concurrency: int) -> float:
    weights = WeightParams(**report["weights"])
    step_bytes = weights.bytes_per_step(concurrency, ELEMENT_SIZE[report["dtype"]])
    return concurrency * bound_gbps(report) * 1e9 / step_bytes


def table_rows(report: dict[str, Any], cells: dict[Key, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    rows = []
    for (workload, concurrency), systems in sorted(cells.items(), key=lambda kv: _key_order(report, kv[0])):
        off = systems.get("ours-off")
        if off is None:
            continue
        bound = bound_tokens_per_s(report, concurrency)
        for system in sorted(systems, key=_system_order):
            s = systems[system]
            rows.append(
                {
                    "workload": workload,
                    "concurrency": concurrency,
                    "system": system,
                    "throughput": s["throughput"],
                    "throughput_x": s["x_throughput"],
                    "tpot_p50_ms": s["tpot_p50"] * 1e3,
                    "tpot_p50_x": s["x_tpot_p50"],
                    "tpot_p99_ms": s["tpot_p99"] * 1e3,
                    "tpot_p99_x": s["x_tpot_p99"],
                    "ttft_p50_ms": s["ttft_p50"] * 1e3,
                    "latency_p50_ms": s["latency_p50"] * 1e3,
                    "acceptance": s["acceptance"],
                    "bound_fraction": s["throughput"] / bound if system in PLAIN else None,
                }
            )
    return rows


def targets(cells: dict[Key, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """The issue's three targets, one check per (workload, concurrency) and adaptive policy."""
    checks: list[dict[str, Any]] = []
    for (workload, concurrency), s in sorted(cells.items()):
        # Served phases only, as ratios to ours-off (ours: to the off run of the same server launch).
        tput = {name: v["x_throughput"] for name, v in s.items() if "num_runs" in v}
        statics = [v for name, v in tput.items() if name.startswith("ours-K")]
        vllm = {name: v for name, v in tput.items() if name.startswith("vllm-")}
        if "ours-off" not in tput or not statics:
            continue
        best_static, base = max(statics), max(max(statics), tput["ours-off"])
        for policy in (p for p in ADAPTIVE if p in tput):
            where = {"workload": workload, "concurrency": concurrency, "policy": policy}
            checks.append({**where, "target": ">= 0.95 x max(off, best K)", "value": tput[policy] / base})
            if workload == "mixed":
                checks.append(
                    {**where, "target": "> best static K (mixed)", "value": tput[policy] / best_static}
                )
            if vllm:
                best = max(vllm, key=vllm.__getitem__)
                checks.append(
                    {**where, "target": f"> best vLLM ({best})", "value": tput[policy] / vllm[best]}
                )
    for c in checks:
        c["ok"] = c["value"] >= 0.95 if c["target"].startswith(">=") else c["value"] > 1.0
    return checks


def profile(report: dict[str, Any], cells: dict[Key, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    """Where the best vLLM beats our batch-aware policy: our wall time per output token, by where it went."""
    phases = {(p["workload"], p["concurrency"], p["system"]): p for p in report["phases"]}
    out = []
    for (workload, concurrency), s in sorted(cells.items()):
        vllm = {n: v for n, v in s.items() if n.startswith("vllm-") and "num_runs" in v}
        ours = phases.get((workload, concurrency, "ours-batch-aware"))
        if not vllm or ours is None:
            continue
        best = max(vllm, key=lambda n: vllm[n]["throughput"])
        if vllm[best]["throughput"] <= ours["throughput"]:
            continue
        m = ours["metrics"]
        tokens = max(1.0, m.get("generation_tokens_total", 0.0))
        busy = sum(m.get(f"{part}_seconds_total", 0.0) for part in ("draft", "verify", "other"))
        out.append(
            {
                "workload": workload,
                "concurrency": concurrency,
                "vllm": best,
                "vllm_ms_per_token": 1e3 / vllm[best]["throughput"],
                "ours_ms_per_token": 1e3 / max(1e-9, ours["throughput"]),
                "draft_ms_per_token": 1e3 * m.get("draft_seconds_total", 0.0) / tokens,
                "verify_ms_per_token": 1e3 * m.get("verify_seconds_total", 0.0) / tokens,
                "other_ms_per_token": 1e3 * m.get("other_seconds_total", 0.0) / tokens,
                "outside_ms_per_token": 1e3 * max(0.0, ours["elapsed_s"] - busy) / tokens,
                "tokens_per_iteration": tokens / max(1.0, m.get("iterations_total", 0.0)),
                "ms_per_iteration": 1e3 * busy / max(1.0, m.get("iterations_total", 0.0)),
            }
        )
    return out


def cost_summary(cost: dict[str, Any]) -> dict[str, Any]:
    """Relative errors of predicted iteration times: per iteration, and per (batch, K) cell of medians."""
    summary: dict[str, Any] = {"params": cost["params"]}
    for part, is_fit in (("held_out", False), ("fit", True)):
        points = [p for p in cost["points"] if p["is_fit"] == is_fit]
        per_iteration = [abs(p["predicted_s"] / p["measured_s"] - 1) for p in points]
        groups: dict[tuple[int, int], list[dict[str, Any]]] = defaultdict(list)
        for p in points:
            groups[(p["batch_size"], p["num_spec_tokens"])].append(p)
        per_cell = {
            f"B={b} K={k}": statistics.median(q["predicted_s"] for q in g)
            / statistics.median(q["measured_s"] for q in g)
            - 1
            for (b, k), g in sorted(groups.items())
        }
        summary[part] = {
            "num_iterations": len(points),
            "iteration_median_error": statistics.median(per_iteration) if points else None,
            "iteration_worst_error": max(per_iteration, default=None),
            "cell_median_error": statistics.median(abs(e) for e in per_cell.values()) if per_cell else None,
            "cell_worst_error": max((abs(e) for e in per_cell.values()), default=None),
            "cells": per_cell,
        }
    return summary


def _key_order(report: dict[str, Any], key: Key) -> tuple[int, int]:
    workloads = list(report["config"]["workloads"])
    return (workloads.index(key[0]) if key[0] in workloads else len(workloads), key[1])


def _system_order(system: str) -> int:
    return SYSTEM_ORDER.index(system) if system in SYSTEM_ORDER else len(SYSTEM_ORDER)


# -- output --------------------------------------------------------------------------------------------------


def write_report(report: dict[str, Any], out: Path) -> dict[str, Any]:
    """Adds `analysis` to the report and writes out.json, out.md and out/*.png."""
    cells = merged(report)
    report["analysis"] = {
        "rows": table_rows(report, cells),
        "targets": targets(cells),
        "profile": profile(report, cells),
        "cost_model": cost_summary(report["cost_model"]),
        "bound_gbps": bound_gbps(report),
        "bound_tokens_per_s": {c: bound_tokens_per_s(report, c) for c in report["config"]["concurrencies"]},
    }
    out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str) + "\n")
    out.mkdir(parents=True, exist_ok=True)
    plot(report, cells, out)
    out.with_suffix(".md").write_text(markdown(report, out))
    return report


def markdown(report: dict[str, Any], out: Path) -> str:
    a, config = report["analysis"], report["config"]
    bw = report["bandwidth"]
    lines = [
        "# Peer comparison on the demo pair",
        "",
        f"`python -m bench.compare{' --quick' if 'quick' in out.name else ''}`: one run on one machine "
        f"({report['machine']['num_cpus']} cores, shared; load average {report['machine']['load_average_1m_at_end']:.1f} "
        f"at the end), {report['elapsed_s'] / 60:.1f} min. vLLM: {report['machine']['vllm'] or 'not run'}. "
        f"dtype {report['dtype']} everywhere. {config['max_tokens']} output tokens per request (greedy, "
        f"ignore_eos); requests per phase max({config['min_requests']}, {config['requests_per_client']} x "
        "concurrency); closed-loop clients with Poisson think times (bench/load.py).",
        "",
        "Ratios (x) are against our policy-off run at the same workload and concurrency: for our systems, the "
        "off run on the same server launch (minutes apart, so launch-to-launch drift cancels); for vLLM and "
        "`generate`, the mean of our two off runs. TPOT ratios below 1 are better. TPOT is measured by the "
        "client from streamed chunks: when a server's HTTP process falls behind, tokens arrive in bursts, which "
        "lowers TPOT and raises TTFT (latency p50 is the robust latency figure). `hf-*` rows are offline `generate` at batch = "
        "concurrency (assisted: batch 1 only), TPOT there = wall time per output token of one sequence.",
        "",
        f"Servers, one at a time: ours = `{config['serve_config']}` (Router, Drafter and MoETarget deployments, "
        "one torch thread each) with `policy.kind` auto (batch-aware; its phases: off, static K, auto) or cascade "
        "(off, auto), K per request in `num_spec_tokens`; vLLM = its OpenAI server with the same dtype, "
        "max_model_len and max_num_seqs, 2 OpenMP threads, "
        + ("eager (`--enforce-eager`)" if config.get("vllm_eager") else "torch.compile on (its default)")
        + ", one launch per speculative_config (draft_model, K). "
        + _noise_md(report),
        "",
        "## Summary: throughput / TPOT p50 / TPOT p99, each as a ratio to ours-off",
        "",
        "Throughput above 1 and TPOT below 1 are better; `off tok/s` is the reference's throughput.",
        "",
        *_matrix_md(report),
        "",
        "## Targets",
        "",
        *_targets_md(a["targets"]),
        "",
        "## Throughput and TPOT",
        "",
    ]
    for workload in config["workloads"]:
        lines += [f"### {workload}", "", *_table_md([r for r in a["rows"] if r["workload"] == workload]), ""]
    lines += ["## Where vLLM is ahead: the profile", "", *_profile_md(a["profile"]), ""]
    lines += [
        "## The limit",
        "",
        "Bandwidth measured at the start / end of the run (GB/s): "
        + " / ".join(", ".join(f"{k} {v:.1f}" for k, v in bw[run].items()) for run in ("start", "end"))
        + f". The bound uses the highest, {a['bound_gbps']:.1f} GB/s. A plain decode step at batch B reads the "
        "dense weights and the distinct experts B tokens route to (uniform top-k; all of them from B of about "
        f"11): {_weights_md(report)}. Bound in tokens/s = B x bandwidth / bytes per step: "
        + ", ".join(f"B={c}: {v:.0f}" for c, v in a["bound_tokens_per_s"].items())
        + ". The `of bound` column is each plain-decoding system's throughput over that bound (an upper bound: "
        "it ignores the KV cache, activations, prefill and the clients' think time).",
        "",
        *_cost_md(a["cost_model"], config),
        "",
        "Plots: " + ", ".join(f"`{p.relative_to(out.parent)}`" for p in sorted(out.glob("*.png"))),
        "",
    ]
    return "\n".join(lines)


def _noise_md(report: dict[str, Any]) -> str:
    spreads = [
        c["ours-off"]["spread"] for c in merged(report).values() if c.get("ours-off", {}).get("num_runs") == 2
    ]
    if not spreads:
        return ""
    return (
        f"Noise floor: our two off runs of a cell (one per server launch) differ in throughput by "
        f"{statistics.median(spreads):.0%} (median) and {max(spreads):.0%} (worst) over {len(spreads)} cells."
    )


def _weights_md(report: dict[str, Any]) -> str:
    w = WeightParams(**report["weights"])
    size = ELEMENT_SIZE[report["dtype"]]
    return (
        f"{w.dense / 1e6:.2f} M dense parameters, {w.per_expert / 1e6:.2f} M per expert x {w.num_experts} experts "
        f"(top-{w.top_k}) x {w.num_moe_layers} layers, {report['dtype']}: "
        f"{w.bytes_per_step(1, size) / 1e6:.1f} MB per step at B = 1, "
        f"{w.bytes_per_step(1000, size) / 1e6:.1f} MB with every expert"
    )


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None or value != value else format(value, spec)


def _table_md(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| conc | system | tok/s | x off | TPOT p50 ms | x off | TPOT p99 ms | x off | TTFT p50 ms | latency p50 ms | accept | of bound |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['concurrency']} | {r['system']} | {r['throughput']:.1f} | {r['throughput_x']:.2f} | "
            f"{r['tpot_p50_ms']:.1f} | {r['tpot_p50_x']:.2f} | {r['tpot_p99_ms']:.1f} | {r['tpot_p99_x']:.2f} | "
            f"{_fmt(r['ttft_p50_ms'], '.0f')} | {_fmt(r['latency_p50_ms'], '.0f')} | {_fmt(r['acceptance'] if r['system'][-2:-1] == 'K' or r['system'] in ADAPTIVE else None, '.2f')} | "
            f"{_fmt(r['bound_fraction'], '.1%')} |"
        )
    return lines


def _matrix_md(report: dict[str, Any]) -> list[str]:
    rows = report["analysis"]["rows"]
    systems = sorted({r["system"] for r in rows} - {"ours-off"}, key=_system_order)
    lines = [
        "| workload | conc | off tok/s | " + " | ".join(systems) + " |",
        "|---|---:|---:|" + "---:|" * len(systems),
    ]
    cells: dict[Key, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        cells[(r["workload"], r["concurrency"])][r["system"]] = r
    for (workload, concurrency), by_system in cells.items():
        entries = [
            f"{r['throughput_x']:.2f} / {r['tpot_p50_x']:.2f} / {r['tpot_p99_x']:.2f}"
            if (r := by_system.get(s))
            else ""
            for s in systems
        ]
        off = by_system["ours-off"]["throughput"]
        lines.append(f"| {workload} | {concurrency} | {off:.0f} | " + " | ".join(entries) + " |")
    return lines


def _targets_md(checks: list[dict[str, Any]]) -> list[str]:
    if not checks:
        return ["(no adaptive and static runs to check)"]
    groups: dict[tuple[str, str], list[float]] = defaultdict(list)
    for c in checks:
        groups[(c["target"].split(" (")[0] if "vLLM" in c["target"] else c["target"], c["policy"])].append(
            c["value"]
        )
    lines = [
        f"{sum(c['ok'] for c in checks)} of {len(checks)} checks pass. Per target and policy (ratio: adaptive "
        "over the reference; the reference is per workload and concurrency):",
        "",
        "| target | policy | pass | median ratio | worst ratio |",
        "|---|---|---:|---:|---:|",
    ]
    for (target, policy), values in sorted(groups.items()):
        ok = sum(v >= 0.95 if target.startswith(">=") else v > 1.0 for v in values)
        lines.append(
            f"| {target} | {policy} | {ok}/{len(values)} | {statistics.median(values):.2f} | {min(values):.2f} |"
        )
    lines += [
        "",
        "Every check:",
        "",
        "| target | policy | workload | conc | ratio | ok |",
        "|---|---|---|---:|---:|---|",
    ]
    for c in sorted(checks, key=lambda c: (c["target"], c["policy"], c["workload"], c["concurrency"])):
        lines.append(
            f"| {c['target']} | {c['policy']} | {c['workload']} | {c['concurrency']} | {c['value']:.2f} | "
            f"{'yes' if c['ok'] else '**no**'} |"
        )
    return lines


def _profile_md(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return ["Our batch-aware policy is ahead of every vLLM configuration in every cell."]
    lines = [
        "Wall time per output token of our batch-aware phase, split by where it went (from our /metrics "
        "counters: draft and verify forwards, `other` = the engine loop outside the forwards: Serve handle "
        "calls, scheduling, bookkeeping; `outside` = wall time with no iteration running: prefill, HTTP and "
        "streaming, clients' think time), against the best vLLM configuration's wall time per output token.",
        "",
        "| workload | conc | best vLLM | vLLM ms/tok | ours ms/tok | draft | verify | other | outside | tok/iter | ms/iter |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['workload']} | {r['concurrency']} | {r['vllm']} | {r['vllm_ms_per_token']:.2f} | "
            f"{r['ours_ms_per_token']:.2f} | {r['draft_ms_per_token']:.2f} | {r['verify_ms_per_token']:.2f} | "
            f"{r['other_ms_per_token']:.2f} | {r['outside_ms_per_token']:.2f} | {r['tokens_per_iteration']:.1f} | "
            f"{r['ms_per_iteration']:.1f} |"
        )
    return lines


def _cost_md(cost: dict[str, Any], config: dict[str, Any]) -> list[str]:
    held, fit = cost["held_out"], cost["fit"]
    params = ", ".join(f"{k} {v * 1e3:.3g} ms" for k, v in cost["params"].items())
    return [
        "## The cost model against measured iterations",
        "",
        f"Our offline engine (SpecEngine, one thread per model as in the Serve config) at batch "
        f"{config['cost_batch_sizes']} x K 0..{max(config['static_num_spec_tokens'])}; the MoESD-form model "
        f"(`policy.cost_model.CostModel.calibrate` from the server's analytic prior) fitted on batch {config['cost_fit_batch_sizes']}, "
        f"predicting the rest. Fitted: {params}.",
        "",
        "| | iterations | median error (iteration) | worst (iteration) | median error (cell medians) | worst (cell) |",
        "|---|---:|---:|---:|---:|---:|",
        *(
            f"| {name} | {part['num_iterations']} | {_fmt(part['iteration_median_error'], '.1%')} | "
            f"{_fmt(part['iteration_worst_error'], '.1%')} | {_fmt(part['cell_median_error'], '.1%')} | "
            f"{_fmt(part['cell_worst_error'], '.1%')} |"
            for name, part in (("held out", held), ("fitted", fit))
        ),
        "",
        "Held-out cells (predicted / measured - 1): "
        + ", ".join(f"{cell} {err:+.0%}" for cell, err in held["cells"].items()),
    ]


def plot(report: dict[str, Any], cells: dict[Key, dict[str, dict[str, float]]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    workloads = report["config"]["workloads"]
    for metric, ylabel in (("throughput", "throughput / ours-off"), ("tpot_p50", "TPOT p50 / ours-off")):
        fig, axes = plt.subplots(1, len(workloads), figsize=(4.2 * len(workloads), 3.8), squeeze=False)
        for ax, workload in zip(axes[0], workloads, strict=True):
            keys = sorted(c for w, c in cells if w == workload)
            systems = sorted({s for c in keys for s in cells[(workload, c)]}, key=_system_order)
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
