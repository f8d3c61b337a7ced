"""`engine.loop: target_host`: the engine loop runs in the target's host actor (`EngineHost`), which owns the
drafter. Served greedy text equals the engine's own; streams, metrics and KV slots come through the Router;
and a killed host fails its in-flight streams with a clear error, is replaced (a fresh drafter with it), and
leaves no KV slot held."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from cluster.config import AppConfig
from tests.cluster.serving_app import (
    app_args,
    host_actors,
    make_models,
    metric_value,
    running_app,
    used_slots,
)

openai = pytest.importorskip("openai")
pytestmark = pytest.mark.timeout(420)
APP = "moespec-engine-host"
PROMPT = "def f(x):"


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return make_models(Path(tmp_path_factory.mktemp("engine-host")))


@pytest.fixture(scope="module")
def server(serve_url: str, models: tuple[Path, Path]) -> Iterator[str]:
    args = app_args(*models, engine={"loop": "target_host"}, server={"stream_interval": 2})
    with running_app(serve_url, args, APP, timeout_s=240) as base:
        yield base


def _expected(models: tuple[Path, Path], max_tokens: int) -> str:
    """The engine's own greedy text for PROMPT (in this process, without speculation)."""
    from cluster.engine_builder import build_engine, local_backends
    from policy.baselines import OffChooser
    from workers.sampling import SamplingParams
    from workers.tokenizer import Tokenizer

    args = app_args(*models, engine={"loop": "target_host"})
    args["model"]["draft"] = None
    config = AppConfig.from_args(args)
    tokenizer = Tokenizer(models[0])
    target, _ = local_backends(config)
    engine = build_engine(config, target, None, OffChooser(), tokenizer)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    (ids,) = engine.generate([tokenizer.encode(PROMPT)], params)
    return tokenizer.decode(ids)


def _client(server: str) -> Any:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0, timeout=300)


def test_the_loop_in_the_target_host_serves_the_engines_text(server: str, models: tuple[Path, Path]) -> None:
    assert set(host_actors(APP, "TargetHost")) == set()  # no target host of the other placement
    assert len(host_actors(APP, "EngineHost")) == 1 and len(host_actors(APP, "DrafterHost")) == 1
    client = _client(server)
    text = (
        client.completions.create(
            model="demo-moe", prompt=PROMPT, max_tokens=20, temperature=0, extra_body={"ignore_eos": True}
        )
        .choices[0]
        .text
    )

    def stream(i: int) -> tuple[str, int]:
        chunks = client.completions.create(
            model="demo-moe",
            prompt=PROMPT,
            max_tokens=20,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True, "num_spec_tokens": 2 if i % 2 else "auto"},
        )
        parts, usage = [], 0
        for chunk in chunks:
            parts += [c.text for c in chunk.choices]
            usage = chunk.usage.completion_tokens if chunk.usage else usage
        return "".join(parts), usage

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        streamed = list(pool.map(stream, range(6)))
    expected = _expected(models, 20)
    assert text == expected
    assert streamed == [(expected, 20)] * 6  # speculation (K = 2, or auto) is lossless
    metrics = httpx.get(f"{server}/metrics").text  # the host's iterations reach the Router's metrics
    assert metric_value(metrics, "iterations_total") > 0
    assert metric_value(metrics, "generation_tokens_total") == 7 * 19  # the first token comes from prefill
    assert metric_value(metrics, "num_requests_outstanding") == 0
    assert used_slots(APP) and all(s == (0, 0) for s in used_slots(APP).values())


def test_a_killed_engine_host_fails_its_streams_and_is_replaced_with_no_slot_held(server: str) -> None:
    import ray

    client = _client(server)
    (old_host,) = host_actors(APP, "EngineHost").values()
    (old_drafter,) = host_actors(APP, "DrafterHost").values()

    def stream(i: int) -> str:
        try:
            chunks = client.completions.create(
                model="demo-moe",
                prompt=f"kill {i}:",
                max_tokens=200,
                temperature=0,
                stream=True,
                extra_body={"ignore_eos": True, "num_spec_tokens": 2},
            )
            return "".join(c.choices[0].text for c in chunks if c.choices)
        except openai.APIError as error:
            return f"error: {error}"

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(stream, i) for i in range(4)]
        deadline = time.monotonic() + 60
        while sum(used_slots(APP).get(r, (0, 0))[0] for r in used_slots(APP)) < 4:
            assert time.monotonic() < deadline, "the streams never ran"
            time.sleep(0.1)
        ray.kill(old_host)
        results = [f.result() for f in futures]
    assert all(r.startswith("error:") and "failed" in r for r in results), results
    deadline = time.monotonic() + 180
    while (
        httpx.get(f"{server}/health", timeout=30).status_code != 200  # the replacement has loaded
        or list(host_actors(APP, "EngineHost").values()) in ([], [old_host])
    ):
        assert time.monotonic() < deadline, "the engine host was never replaced"
        time.sleep(0.5)
    (new_host,) = host_actors(APP, "EngineHost").values()
    (new_drafter,) = host_actors(APP, "DrafterHost").values()
    assert new_host != old_host and new_drafter != old_drafter  # the drafter died with its owner
    done = client.completions.create(
        model="demo-moe", prompt="after", max_tokens=16, temperature=0, extra_body={"ignore_eos": True}
    )
    assert done.usage.completion_tokens == 16
    assert all(s == (0, 0) for s in used_slots(APP).values()), used_slots(APP)


def test_an_engine_failure_crosses_processes_with_its_cause() -> None:
    """The host's errors reach the Router pickled: a full cache must still read as one (503 and /health)."""
    import pickle

    from cluster.engine_loop import EngineFailure
    from cluster.router import _as_api_error
    from workers.kv_cache import CacheCapacityError

    failure = pickle.loads(pickle.dumps(EngineFailure(CacheCapacityError("no free slot"))))
    assert isinstance(failure.error, CacheCapacityError)
    assert str(failure) == "CacheCapacityError: no free slot"
    assert "no free KV-cache slot" in _as_api_error(failure).message
