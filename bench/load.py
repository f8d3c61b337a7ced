"""Serving load generator: the OpenAI API over HTTP, Poisson arrivals, the workload prompt sets.

For each concurrency level it runs every speculation mode (off, static K, auto) against the same server in
an interleaved order, one phase per mode, and reports output throughput, TTFT and TPOT (p50, p99) as ratios
against `off`, with the acceptance rate and the share of iteration time outside the model forwards
(read from /metrics). The mode is the per-request `num_spec_tokens` field, so one server serves every mode.

    python -m bench.load                      # the benchmark pair's app (bench.regime_pair) on a local Ray
    python -m bench.load --url http://127.0.0.1:8000 --concurrency 1,4 --modes off,2,auto --quick
"""

from __future__ import annotations

import argparse
import asyncio
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.http_load import (
    PROMPTS,
    PhaseResult,
    load_prompts,
    median_phase,
    num_spec_tokens_run,
    run_phase,
)
from bench.process_cpu import CPU_ROLES, ProcessCpu

RESULTS = Path(__file__).resolve().parent / "results"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "cluster" / "configs" / "bench-cpu.yaml"  # the benchmark pair (bench.regime_pair)


def print_table(results: list[PhaseResult]) -> str:
    lines = [
        "| conc | mode | tok/s | x off | TTFT p50 | TTFT p99 | TPOT p50 (x off) | TPOT p99 | accept | overhead "
        "| K>0 share | mean K |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    with_cpu = any(r.cpu_ms_per_iteration for r in results)
    if with_cpu:
        lines[0] += " CPU ms / iteration: all (" + ", ".join(CPU_ROLES) + ") |"
        lines[1] += "---:|"
    for r in results:
        off = next(o for o in results if o.concurrency == r.concurrency and o.mode == "off")
        share, mean_k = num_spec_tokens_run(r.metrics)
        line = (
            f"| {r.concurrency} | {r.mode} | {r.throughput:.1f} | {r.throughput / off.throughput:.2f} | "
            f"{r.ttft_p50 * 1e3:.0f} ms | {r.ttft_p99 * 1e3:.0f} ms | {r.tpot_p50 * 1e3:.1f} ms "
            f"({r.tpot_p50 / off.tpot_p50:.2f}) | {r.tpot_p99 * 1e3:.1f} ms | {r.acceptance:.2f} | "
            f"{r.overhead_share:.1%} | {share:.2f} | {mean_k:.2f} |"
        )
        if with_cpu:
            cpu = r.cpu_ms_per_iteration
            roles = ", ".join(f"{cpu.get(role, 0.0):.1f}" for role in CPU_ROLES)
            line += f" {sum(cpu.values()):.1f} ({roles}) |"
        lines.append(line)
    table = "\n".join(lines)
    print(table, flush=True)
    return table


def load_serve_config_args(path: Path) -> dict[str, Any]:
    from cluster.cli import load_serve_config

    args: dict[str, Any] = load_serve_config(path)["applications"][0]["args"]
    return args


def start_local_app(config_path: str) -> str:
    import ray
    from ray import serve

    from bench.regime_pair import ensure_checkpoint
    from cluster.app import build_app
    from cluster.cli import load_serve_config, wait_healthy
    from tests.cluster.serving_app import free_port

    app = load_serve_config(Path(config_path))["applications"][0]
    ensure_checkpoint(REPO / app["args"]["model"]["target"])  # the wide target is built on first use
    port = free_port()
    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    print("[bench] starting the app (loading models)", flush=True)
    serve.run(build_app(app.get("args")), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(f"{url}/health", 600)
    return url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", default=None, help="a running server; default: start --config's app here")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="default: the benchmark pair's")
    parser.add_argument("--concurrency", default="1,4,16,32")
    parser.add_argument("--modes", default="off,1,2,3,4,auto")
    parser.add_argument(
        "--workloads",
        "--workload",
        default="mixed",
        help="comma-separated prompt sets (bench/prompts), one server",
    )
    parser.add_argument(
        "--cpu",
        action="store_true",
        help="also CPU ms per iteration by process (the app this run starts; not with --url)",
    )
    parser.add_argument(
        "--repeats", type=int, default=1, help="phases per cell; the table gives their median"
    )
    parser.add_argument(
        "--num-requests", type=int, default=0, help="per phase; default 2 x concurrency, >= 8"
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--model", default=None, help="served model name; default: --config's")
    parser.add_argument("--quick", action="store_true", help="concurrency 1,4; 16 tokens; a smoke run")
    parser.add_argument("--out", default=str(RESULTS / "serving.json"))
    parser.add_argument(
        "--no-warmup",
        action="store_true",
        help="skip the unmeasured warm-up (2 requests per mode, concurrency 2) that starts the policy actor",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.concurrency, args.max_tokens = "1,4", 16
    workloads = args.workloads.split(",")
    unknown = [w for w in workloads if not (PROMPTS / f"{w}.jsonl").exists()]
    if args.cpu and args.url:
        parser.error("--cpu measures the processes of an app this run starts; drop --url")
    if unknown or args.repeats < 1:
        known = sorted(p.stem for p in PROMPTS.glob("*.jsonl"))
        parser.error(f"unknown workload {unknown} (known: {known})" if unknown else "--repeats must be >= 1")
    if args.model is None:
        args.model = load_serve_config_args(Path(args.config))["model"]["served_name"]
    url = args.url or start_local_app(args.config)
    modes = args.modes.split(",")
    if "off" not in modes:
        modes.insert(0, "off")
    if not args.no_warmup:  # one-off costs (the policy actor's process, first fits) outside the phases
        print("[bench] warm-up (not measured)", flush=True)
        for mode in modes:
            prompts = load_prompts(workloads[0], 2)
            asyncio.run(run_phase(url, prompts, mode, 2, 2, args.max_tokens, args.model, seed=0))
    report: dict[str, Any] = {}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for workload in workloads:
        phases = run_workload(url, workload, modes, args, ProcessCpu() if args.cpu else None)
        results = [
            median_phase(phases[key]) for key in sorted(phases, key=lambda k: (k[0], modes.index(k[1])))
        ]
        print(f"[bench] workload {workload} (median of {args.repeats} phases per cell)", flush=True)
        table = print_table(results)
        report[workload] = {
            "results": [asdict(r) for r in results],
            "phases": [asdict(p) for key in sorted(phases) for p in phases[key]],
            "table": table,
        }
        summary = {
            "config": args.config if args.url is None else args.url,
            "max_tokens": args.max_tokens,
            "repeats": args.repeats,
            "workloads": report,
        }
        # Written after every workload: a run cut short keeps what it measured.
        out.write_text(json.dumps(summary, indent=1))
    print(f"[bench] wrote {out}")


def run_workload(
    url: str, workload: str, modes: list[str], args: argparse.Namespace, cpu: ProcessCpu | None = None
) -> dict[tuple[int, str], list[PhaseResult]]:
    """Every mode at every concurrency, `args.repeats` times; the order alternates against drift."""
    phases: dict[tuple[int, str], list[PhaseResult]] = {}
    for repeat in range(args.repeats):
        for concurrency in [int(c) for c in args.concurrency.split(",")]:
            num_requests = args.num_requests or max(8, 2 * concurrency)
            prompts = load_prompts(workload, num_requests)
            order = modes if (concurrency + repeat) % 2 else list(reversed(modes))
            for mode in order:
                print(
                    f"[bench] {workload}, repeat {repeat + 1}/{args.repeats}, concurrency {concurrency}, "
                    f"mode {mode}: {num_requests} requests",
                    flush=True,
                )
                cpu_before = cpu.snapshot() if cpu else {}
                result = asyncio.run(
                    run_phase(
                        url,
                        prompts,
                        mode,
                        concurrency,
                        num_requests,
                        args.max_tokens,
                        args.model,
                        seed=concurrency,
                    )
                )
                if cpu:
                    iterations = result.metrics.get("iterations_total", 0.0)
                    result.cpu_ms_per_iteration = cpu.per_iteration_ms(cpu_before, cpu.snapshot(), iterations)
                phases.setdefault((concurrency, mode), []).append(result)
    return phases


if __name__ == "__main__":
    main()
