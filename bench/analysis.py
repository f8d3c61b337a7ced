"""The comparison's analysis: per (workload, concurrency) and system, the mean over its phases and the
ratios to our policy-off run; the table rows, the targets, the profile where vLLM is ahead, the cost model's
errors.

Input: the dict `bench.compare.run` returns (phases of bench/http_load.py, `generate` results, bandwidth,
offline iterations with the cost model's predictions). Everything here is derived from it, so a report can
be rewritten from compare.json (`python -m bench.compare --report-only`).
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from bench.bound import bound_tokens_per_s

SYSTEM_ORDER = ["ours-off", "ours-K1", "ours-K2", "ours-K3", "ours-K4", "ours-cascade", "ours-batch-aware"]
SYSTEM_ORDER += ["vllm-off", "vllm-K1", "vllm-K2", "vllm-K3", "vllm-K4", "hf-generate", "hf-assisted"]
ADAPTIVE = ("ours-batch-aware", "ours-cascade")
PLAIN = ("ours-off", "vllm-off", "hf-generate")  # plain decoding: these get the weight-reading bound
Key = tuple[str, int]  # (workload, concurrency)
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


def table_rows(report: dict[str, Any], cells: dict[Key, dict[str, dict[str, float]]]) -> list[dict[str, Any]]:
    rows = []
    for (workload, concurrency), systems in sorted(cells.items(), key=lambda kv: _key_order(report, kv[0])):
        off = systems.get("ours-off")
        if off is None:
            continue
        bound = bound_tokens_per_s(report, concurrency)
        for system in sorted(systems, key=system_order):
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


def system_order(system: str) -> int:
    return SYSTEM_ORDER.index(system) if system in SYSTEM_ORDER else len(SYSTEM_ORDER)
