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
import random
import statistics
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.process_cpu import CPU_ROLES, ProcessCpu

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = Path(__file__).resolve().parent / "prompts"
REPO = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO / "cluster" / "configs" / "bench-cpu.yaml"  # the benchmark pair (bench.regime_pair)


@dataclass
class RequestResult:
    ttft_s: float
    latency_s: float
    num_tokens: int

    @property
    def tpot_s(self) -> float:
        return (self.latency_s - self.ttft_s) / max(1, self.num_tokens - 1)


@dataclass
class PhaseResult:
    concurrency: int
    mode: str
    throughput: float  # output tokens/s over the phase
    ttft_p50: float
    ttft_p99: float
    tpot_p50: float
    tpot_p99: float
    acceptance: float  # accepted / proposed draft tokens in the phase
    overhead_share: float  # iteration time outside the forwards / iteration time
    num_errors: int
    elapsed_s: float = 0.0  # wall time of the phase
    latency_p50: float = 0.0  # request latency (first byte sent to last token received)
    latency_p99: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)  # counter increases over the phase (/metrics)
    # CPU milliseconds per engine iteration by process role (--cpu; an app this run started)
    cpu_ms_per_iteration: dict[str, float] = field(default_factory=dict)


def load_prompts(workload: str, limit: int) -> list[str]:
    lines = (PROMPTS / f"{workload}.jsonl").read_text().splitlines()
    return [json.loads(line)["prompt"] for line in lines[:limit]]


async def one_request(
    client: httpx.AsyncClient,
    url: str,
    prompt: str,
    mode: str,
    max_tokens: int,
    model: str,
    extra_body: dict[str, Any] | None = None,
) -> RequestResult:
    """One streamed completion. `mode` goes in `num_spec_tokens` (an empty mode sends no such field)."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "ignore_eos": True,
    }
    if mode:
        body["num_spec_tokens"] = int(mode) if mode.isdigit() else mode
    body.update(extra_body or {})
    start = time.perf_counter()
    first: float | None = None
    num_tokens = 0
    async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {(await response.aread())[:200]!r}")
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("choices") and event["choices"][0]["text"] and first is None:
                first = time.perf_counter()
            if event.get("usage"):
                num_tokens = event["usage"]["completion_tokens"]
    end = time.perf_counter()
    return RequestResult((first or end) - start, end - start, num_tokens)


def scrape(url: str, prefix: str = "moespec:") -> dict[str, float]:
    """Metrics named `prefix*` summed over labels; empty for a server without them (or without /metrics)."""
    try:
        response = httpx.get(f"{url}/metrics", timeout=30)
    except httpx.HTTPError:
        return {}
    if response.status_code != 200:
        return {}
    values: dict[str, float] = {}
    for line in response.text.splitlines():
        if line.startswith(prefix) and "position=" not in line:
            name = line.split("{", 1)[0].split(" ", 1)[0][len(prefix) :]
            try:
                value = float(line.rsplit(" ", 1)[1])
            except (IndexError, ValueError):
                continue
            values[name] = values.get(name, 0.0) + value
    return values


async def run_phase(
    url: str,
    prompts: list[str],
    mode: str,
    concurrency: int,
    num_requests: int,
    max_tokens: int,
    model: str,
    seed: int,
    *,
    label: str | None = None,
    extra_body: dict[str, Any] | None = None,
    metrics_prefix: str = "moespec:",
    mean_gap_s: float = 0.05,
) -> PhaseResult:
    """One phase; `label` names it in the result (default: `mode`), `extra_body` joins every request's body.

    Each of the `concurrency` clients waits an exponential gap (mean `mean_gap_s`: Poisson arrivals) before
    each of its requests; `mean_gap_s=0` makes the clients closed-loop (the next request is sent as soon as
    the last one finished), so the server's batch stays at the concurrency until the queue runs out.

    Another OpenAI server (no `num_spec_tokens`, no moespec metrics): mode="", label="...", and
    metrics_prefix="vllm:" to read its speculative-decoding counters, which carry the same names.
    """
    rng = random.Random(seed)
    queue = list(prompts[:num_requests])
    results: list[RequestResult] = []
    errors = 0
    before = scrape(url, metrics_prefix)

    async def worker(client: httpx.AsyncClient) -> None:
        nonlocal errors
        while queue:
            prompt = queue.pop()
            if mean_gap_s > 0:
                await asyncio.sleep(rng.expovariate(1 / mean_gap_s))  # Poisson arrivals, per client
            try:
                results.append(await one_request(client, url, prompt, mode, max_tokens, model, extra_body))
            except Exception as error:  # noqa: BLE001 (counted and reported, the run goes on)
                errors += 1
                print(f"    error: {error}", flush=True)

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    after = scrape(url, metrics_prefix)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    forward = delta.get("draft_seconds_total", 0) + delta.get("verify_seconds_total", 0)
    other = delta.get("other_seconds_total", 0)
    ttft = [r.ttft_s for r in results] or [0.0]
    tpot = [r.tpot_s for r in results] or [0.0]
    return PhaseResult(
        concurrency=concurrency,
        mode=mode if label is None else label,
        throughput=sum(r.num_tokens for r in results) / elapsed,
        ttft_p50=_pct(ttft, 50),
        ttft_p99=_pct(ttft, 99),
        tpot_p50=_pct(tpot, 50),
        tpot_p99=_pct(tpot, 99),
        acceptance=delta.get("spec_decode_num_accepted_tokens_total", 0)
        / max(1.0, delta.get("spec_decode_num_draft_tokens_total", 0)),
        overhead_share=other / max(1e-9, forward + other),
        num_errors=errors,
        elapsed_s=elapsed,
        latency_p50=_pct([r.latency_s for r in results] or [0.0], 50),
        latency_p99=_pct([r.latency_s for r in results] or [0.0], 99),
        metrics=delta,
    )


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def num_spec_tokens_run(metrics: dict[str, float]) -> tuple[float, float]:
    """(share of request-iterations that speculated, mean K over all request-iterations) from /metrics."""
    request_iterations = metrics.get("generation_tokens_total", 0.0) - metrics.get(
        "spec_decode_num_accepted_tokens_total", 0.0
    )  # each request-iteration commits accepted + 1 tokens
    if request_iterations <= 0:
        return 0.0, 0.0
    return (
        metrics.get("spec_decode_num_drafts_total", 0.0) / request_iterations,
        metrics.get("spec_decode_num_draft_tokens_total", 0.0) / request_iterations,
    )


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


def median_phase(phases: list[PhaseResult]) -> PhaseResult:
    """One cell from its repeated phases: the median of every figure, the counters summed."""
    metrics: dict[str, float] = {}
    for phase in phases:
        for name, value in phase.metrics.items():
            metrics[name] = metrics.get(name, 0.0) + value
    return PhaseResult(
        concurrency=phases[0].concurrency,
        mode=phases[0].mode,
        throughput=statistics.median(p.throughput for p in phases),
        ttft_p50=statistics.median(p.ttft_p50 for p in phases),
        ttft_p99=statistics.median(p.ttft_p99 for p in phases),
        tpot_p50=statistics.median(p.tpot_p50 for p in phases),
        tpot_p99=statistics.median(p.tpot_p99 for p in phases),
        acceptance=metrics.get("spec_decode_num_accepted_tokens_total", 0)
        / max(1.0, metrics.get("spec_decode_num_draft_tokens_total", 0)),
        overhead_share=statistics.median(p.overhead_share for p in phases),
        num_errors=sum(p.num_errors for p in phases),
        elapsed_s=sum(p.elapsed_s for p in phases),
        latency_p50=statistics.median(p.latency_p50 for p in phases),
        latency_p99=statistics.median(p.latency_p99 for p in phases),
        metrics=metrics,
        cpu_ms_per_iteration={
            role: statistics.median(p.cpu_ms_per_iteration.get(role, 0.0) for p in phases)
            for role in phases[0].cpu_ms_per_iteration
        },
    )


if __name__ == "__main__":
    main()
