"""`bench.compare --served-speed`'s served side: closed-loop clients and what a phase's counters say per
iteration (no server needed)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest

from bench import http_load
from bench.compare import parse_placement
from bench.served_speed import cpu_table, served_row, speed_table


def _run_phase_with_fake_server(monkeypatch: pytest.MonkeyPatch, mean_gap_s: float) -> tuple[int, int]:
    """(most requests in flight at once, sleeps the clients took) for 4 clients x 3 requests."""
    in_flight, peak, sleeps = 0, 0, 0
    real_sleep = asyncio.sleep

    async def fake_request(*args: Any, **kwargs: Any) -> http_load.RequestResult:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await real_sleep(0.01)
        in_flight -= 1
        return http_load.RequestResult(0.001, 0.01, 8)

    async def counting_sleep(delay: float) -> None:
        nonlocal sleeps
        sleeps += 1
        await real_sleep(delay)

    monkeypatch.setattr(http_load, "one_request", fake_request)
    monkeypatch.setattr(http_load, "scrape", lambda url, prefix="": {})
    monkeypatch.setattr(http_load.asyncio, "sleep", counting_sleep)
    phase = http_load.run_phase(
        "http://x", ["p"] * 12, "off", 4, 12, 8, "m", seed=0, mean_gap_s=mean_gap_s
    )  # fmt: skip
    result = asyncio.run(phase)
    assert result.num_errors == 0 and result.throughput > 0
    return peak, sleeps  # the fake server sleeps with the real asyncio.sleep: not counted


def test_closed_loop_clients_send_at_once_and_keep_the_batch_at_the_concurrency(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    peak, client_sleeps = _run_phase_with_fake_server(monkeypatch, mean_gap_s=0.0)
    assert (peak, client_sleeps) == (4, 0)


def test_the_default_clients_wait_a_poisson_gap_before_every_request(monkeypatch: pytest.MonkeyPatch) -> None:
    _, client_sleeps = _run_phase_with_fake_server(monkeypatch, mean_gap_s=0.001)
    assert client_sleeps == 12


def _phase(metrics: dict[str, float]) -> http_load.PhaseResult:
    return http_load.PhaseResult(4, "off", 100.0, 0, 0, 0, 0, 0.0, 0.1, 0, metrics=metrics)


def test_a_served_row_counts_the_running_requests_per_iteration() -> None:
    # 10 iterations: 35 request-iterations committed 35 + 5 accepted tokens.
    metrics = {
        "iterations_total": 10,
        "generation_tokens_total": 40,
        "spec_decode_num_accepted_tokens_total": 5,
        "verify_seconds_total": 0.8,
        "draft_seconds_total": 0.1,
        "other_seconds_total": 0.1,
    }
    row = served_row(_phase(metrics))
    assert row["mean_batch"] == pytest.approx(3.5)
    assert (row["iteration_ms"], row["verify_ms"], row["outside_ms"]) == pytest.approx((100, 80, 10))


def test_the_table_gives_medians_and_ratio_ranges_per_placement_and_batch() -> None:
    rows = [
        {
            "batch": 4,
            "loop": "beside_target",
            **served_row(_phase({"iterations_total": 1, "generation_tokens_total": 4})),
            "served": served,
            "offline": 100.0,
            "offline_iteration_ms": 20.0,
            "offline_verify_ms": 19.0,
            "transformers": 50.0,
        }
        for served in (80.0, 90.0, 120.0)
    ]
    table = speed_table({"rows": rows}).splitlines()
    assert len(table) == 3
    assert table[2].startswith(
        "| router process | 4 | 4.0 | 90.0 | 100.0 | 50.0 | 0.90 (0.80-1.20) | 1.80 (1.60-2.40)"
    )


def test_placements_take_a_stream_interval_and_nostream() -> None:
    assert parse_placement("target_host") == ("target_host", 1, True)
    assert parse_placement("target_host:4") == ("target_host", 4, True)
    assert parse_placement("target_host:4:nostream") == ("target_host", 4, False)
    assert parse_placement("beside_target:nostream") == ("beside_target", 1, False)
    for bad in ("nowhere", "target_host:0", "target_host:fast", "target_host:2:4"):
        with pytest.raises(ValueError, match="is not one of"):
            parse_placement(bad)


def test_a_non_streaming_request_asks_for_one_response_and_counts_its_tokens() -> None:
    bodies: list[dict[str, Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        bodies.append(json.loads(request.content))
        return httpx.Response(200, json={"choices": [{"text": "abc"}], "usage": {"completion_tokens": 7}})

    async def one() -> http_load.RequestResult:
        async with httpx.AsyncClient(transport=httpx.MockTransport(answer)) as client:
            return await http_load.one_request(client, "http://x", "p", "off", 7, "m", stream=False)

    result = asyncio.run(one())
    assert result.num_tokens == 7 and result.ttft_s == result.latency_s > 0
    assert bodies[0]["stream"] is False and "stream_options" not in bodies[0]
    assert bodies[0]["num_spec_tokens"] == "off"


def test_the_cpu_table_gives_the_serving_roles_median_cpu_per_iteration_and_the_rest_as_other() -> None:
    phases = [_phase({"iterations_total": 10}) for _ in range(2)]
    for phase, router_ms in zip(phases, (20.0, 30.0), strict=True):
        phase.cpu_ms_per_iteration = {
            "Router": router_ms,
            "ProxyActor": 10.0,
            "Ray raylet": 1.0,
            "SpecPolicy": 2.0,
        }
    rows = [
        {"batch": 32, "loop": "target_host", "stream_interval": 1, "stream": False, **served_row(phase)}
        for phase in phases
    ]
    table = cpu_table({"rows": rows}).splitlines()
    assert table[0].startswith("| target | batch | Router | ProxyActor | HAProxy | load generator |")
    assert table[0].endswith("| other | decode iteration ms |")
    assert table[2] == "| loop in host, not streamed | 32 | 25.0 | 10.0 | 0.0 | 0.0 | 0.0 | 0.0 | 3.0 | 0.0 |"
