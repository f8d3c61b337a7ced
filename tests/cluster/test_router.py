"""HTTP behaviour of the Router under hostile input, overload and missing credentials (no Ray needed)."""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cluster.engine_loop import EngineLoop
from cluster.router import Router
from tests.cluster.router_harness import asgi, local_router
from tests.cluster.serving_app import make_models

pytestmark = pytest.mark.timeout(300)
KEY = "test-key-123"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def router(models: tuple[Path, Path]) -> Iterator[Router]:
    router = local_router(*models, api_key=KEY, model={"max_seqs": 2}, engine={"max_waiting": 2})
    yield router
    router.loop.stop()


# One event loop for the module: the router's engine loop delivers outputs to the loop it started with.
EVENT_LOOP = asyncio.new_event_loop()


def _call(router: Router, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def go() -> httpx.Response:
        transport = httpx.ASGITransport(app=asgi(router))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            return await client.request(method, path, **kwargs)

    return EVENT_LOOP.run_until_complete(go())


AUTH = {"Authorization": f"Bearer {KEY}"}


def test_every_endpoint_but_health_needs_the_key(router: Router) -> None:
    assert _call(router, "GET", "/health").status_code == 200
    for method, path in [
        ("GET", "/v1/models"),
        ("GET", "/metrics"),
        ("POST", "/v1/completions"),
        ("POST", "/v1/chat/completions"),
    ]:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = _call(router, method, path, headers=headers, json={"prompt": "x"})
            assert response.status_code == 401, (path, headers)
            assert "API key" in response.json()["error"]["message"]
    assert _call(router, "GET", "/v1/models", headers=AUTH).status_code == 200


def test_body_size_is_limited(router: Router) -> None:
    response = _call(
        router, "POST", "/v1/completions", headers=AUTH, content=b'{"prompt": "' + b"x" * (2 << 20) + b'"}'
    )
    assert response.status_code == 413


def test_a_burst_above_capacity_gets_429_and_the_rest_completes(router: Router) -> None:
    async def burst() -> list[httpx.Response]:
        transport = httpx.ASGITransport(app=asgi(router))
        async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
            body = {"prompt": "burst", "max_tokens": 24, "ignore_eos": True}
            return list(
                await asyncio.gather(
                    *(client.post("/v1/completions", json=body, headers=AUTH) for _ in range(12))
                )
            )

    responses = EVENT_LOOP.run_until_complete(burst())
    codes = sorted(r.status_code for r in responses)
    assert codes.count(200) >= 4 and codes.count(429) >= 1 and set(codes) <= {200, 429}, codes
    assert all(r.headers.get("retry-after") == "1" for r in responses if r.status_code == 429)
    assert all(r.json()["usage"]["completion_tokens"] == 24 for r in responses if r.status_code == 200)
    assert isinstance(router.loop, EngineLoop)
    engine = router.loop.engine
    assert not engine.has_unfinished and router.loop.num_outstanding == 0
    assert engine.target.runner.cache.num_used_slots == 0  # type: ignore[attr-defined]
    assert engine.proposer.drafter.runner.cache.num_used_slots == 0  # type: ignore[union-attr]


FIELDS = [
    "prompt",
    "max_tokens",
    "temperature",
    "top_p",
    "top_k",
    "n",
    "stream",
    "stop",
    "seed",
    "model",
    "num_spec_tokens",
    "stop_token_ids",
    "ignore_eos",
    "messages",
    "stream_options",
    "logprobs",
]
values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
bodies = st.dictionaries(st.sampled_from(FIELDS) | st.text(max_size=10), values, max_size=6)


# A longer fuzzing run: MOESPEC_FUZZ_EXAMPLES=5000 .venv/bin/python -m pytest tests/cluster/test_router.py -k fuzz
FUZZ_EXAMPLES = int(os.environ.get("MOESPEC_FUZZ_EXAMPLES", "150"))


@settings(
    max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(body=bodies, path=st.sampled_from(["/v1/completions", "/v1/chat/completions"]))
def test_fuzzed_json_bodies_never_cause_a_500(router: Router, body: dict[str, Any], path: str) -> None:
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 8:
        body["max_tokens"] = 8  # keep the valid ones quick
    payload = json.dumps(body, allow_nan=True).encode()
    response = _call(
        router, "POST", path, headers={**AUTH, "content-type": "application/json"}, content=payload
    )
    assert response.status_code in (200, 400, 404, 429), (body, response.text)
    if response.status_code != 200:
        assert response.json()["error"]["message"]


@settings(
    max_examples=max(60, FUZZ_EXAMPLES // 3),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(raw=st.binary(max_size=200))
def test_fuzzed_raw_bytes_never_cause_a_500(router: Router, raw: bytes) -> None:
    response = _call(router, "POST", "/v1/completions", headers=AUTH, content=raw)
    assert response.status_code in (200, 400), response.text


def test_the_server_still_answers_after_the_fuzzing(router: Router) -> None:
    response = _call(router, "POST", "/v1/completions", headers=AUTH, json={"prompt": "ok?", "max_tokens": 3})
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1


def test_the_configured_context_length_is_served_exactly(tmp_path: Path) -> None:
    """max_seq_len 2048 on models with 2048 positions: /v1/models says 2048, and a request of exactly 2048
    tokens (prompt + max_tokens) runs to its end while speculating (the caches need no padding past it)."""
    models = make_models(tmp_path, max_position_embeddings=2048)
    router = local_router(*models, model={"max_seq_len": 2048, "max_seqs": 2})
    try:
        listed = _call(router, "GET", "/v1/models").json()["data"][0]
        assert listed["max_model_len"] == 2048
        request = {"prompt": [5] * 2040, "max_tokens": 8, "ignore_eos": True, "num_spec_tokens": 4}
        response = _call(router, "POST", "/v1/completions", json=request)
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["total_tokens"] == 2048
        too_long = _call(router, "POST", "/v1/completions", json={**request, "prompt": [5] * 2041})
        assert too_long.status_code == 400 and "exceeds the context length 2048" in too_long.text
    finally:
        router.loop.stop()


def test_a_stream_interval_sends_the_same_tokens_in_fewer_chunks(models: tuple[Path, Path]) -> None:
    """server.stream_interval 4: the first token at once, then chunks of at least 4 tokens (the last may be
    shorter), and the same text and usage as token-by-token streaming."""
    body = {"prompt": "def f(x):", "max_tokens": 11, "temperature": 0, "ignore_eos": True, "stream": True}
    body |= {"stream_options": {"include_usage": True}, "num_spec_tokens": 0}

    def stream(interval: int) -> tuple[list[str], int]:
        router = local_router(*models, server={"stream_interval": interval})
        try:
            response = _call(router, "POST", "/v1/completions", json=body)
        finally:
            router.loop.stop()
        assert response.status_code == 200, response.text
        events = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
        texts = [e["choices"][0]["text"] for e in events if e["choices"]]
        (usage,) = [e["usage"]["completion_tokens"] for e in events if e.get("usage")]
        return texts, usage

    every_token, every_usage = stream(1)
    chunked, chunked_usage = stream(4)
    assert "".join(chunked) == "".join(every_token) and chunked_usage == every_usage == 11
    assert len(every_token) == 11 and [len(t) for t in chunked] == [1, 4, 4, 2]  # one character per token
    with pytest.raises(ValueError, match="stream_interval must be >= 1"):
        local_router(*models, server={"stream_interval": 0})
