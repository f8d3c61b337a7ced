"""The comparison's report: adds the analysis to the run's dict and writes it as JSON, Markdown and PNG
plots (out.json, out.md, out/*.png).
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from bench import plots
from bench.analysis import ADAPTIVE, Key, cost_summary, merged, profile, system_order, table_rows, targets
from bench.bound import ELEMENT_SIZE, WeightParams, bound_gbps, bound_tokens_per_s


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
    plots.plot(report, cells, out)
    out.with_suffix(".md").write_text(markdown(report, out))
    return report


def markdown(report: dict[str, Any], out: Path) -> str:
    a, config = report["analysis"], report["config"]
    bw = report["bandwidth"]
    lines = [
        f"# Peer comparison on {report['machine']['serve_args']['model']['target']} + "
        f"{report['machine']['serve_args']['model']['draft']}",
        "",
        f"`python -m bench.compare{' --quick' if 'quick' in out.name else ''}`: one run on one machine "
        f"({report['machine']['num_cpus']} cores, shared; load average {report['machine']['load_average_1m_at_end']:.1f} "
        f"at the end), {report['elapsed_s'] / 60:.1f} min. vLLM: {report['machine']['vllm'] or 'not run'}. "
        f"dtype {report['dtype']} everywhere. {config['max_tokens']} output tokens per request (greedy, "
        f"ignore_eos); requests per phase max({config['min_requests']}, {config['requests_per_client']} x "
        "concurrency); closed-loop clients with Poisson think times (bench/http_load.py).",
        "",
        "Ratios (x) are against our policy-off run at the same workload and concurrency: for our systems, the "
        "off run on the same server launch (minutes apart, so launch-to-launch drift cancels); for vLLM and "
        "`generate`, the mean of our two off runs. TPOT ratios below 1 are better. TPOT is measured by the "
        "client from streamed chunks: when a server's HTTP process falls behind, tokens arrive in bursts, which "
        "lowers TPOT and raises TTFT (latency p50 is the robust latency figure). `hf-*` rows are offline `generate` at batch = "
        "concurrency (assisted: batch 1 only), TPOT there = wall time per output token of one sequence.",
        "",
        f"Servers, one at a time: ours = `{config['serve_config']}` (Router replicas, each with its drafter and target hosts, "
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
    systems = sorted({r["system"] for r in rows} - {"ours-off"}, key=system_order)
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
