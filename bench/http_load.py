"""One load phase over HTTP: concurrent OpenAI clients asking for completions (streamed unless told
otherwise), and what they measured.

`run_phase` drives a server with the workload prompt sets (bench/prompts) and returns throughput, TTFT,
TPOT and latency percentiles plus the increase of the server's counters (/metrics) over the phase.
`median_phase` folds repeated phases into one cell. Used by bench.load, bench.launches and bench.served_speed.
"""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

PROMPTS = Path(__file__).resolve().parent / "prompts"


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
    stream: bool = True,
) -> RequestResult:
    """One completion, streamed (or, `stream=False`, answered in one response: its TTFT is its latency).
    `mode` goes in `num_spec_tokens` (an empty mode sends no such field)."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": stream,
        "ignore_eos": True,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    if mode:
        body["num_spec_tokens"] = int(mode) if mode.isdigit() else mode
    body.update(extra_body or {})
    start = time.perf_counter()
    if not stream:
        response = await client.post(f"{url}/v1/completions", json=body)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.content[:200]!r}")
        latency = time.perf_counter() - start
        return RequestResult(latency, latency, response.json()["usage"]["completion_tokens"])
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
    stream: bool = True,
) -> PhaseResult:
    """One phase; `label` names it in the result (default: `mode`), `extra_body` joins every request's body.

    Each of the `concurrency` clients waits an exponential gap (mean `mean_gap_s`: Poisson arrivals) before
    each of its requests; `mean_gap_s=0` makes the clients closed-loop (the next request is sent as soon as
    the last one finished), so the server's batch stays at the concurrency until the queue runs out.

    Another OpenAI server (no `num_spec_tokens`, no moespec metrics): mode="", label="...", and
    metrics_prefix="vllm:" to read its speculative-decoding counters, which carry the same names.
    `stream=False` sends non-streaming requests (one response each, the `openai` client's default).
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
                result = await one_request(client, url, prompt, mode, max_tokens, model, extra_body, stream)
                results.append(result)
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
