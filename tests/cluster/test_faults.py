"""Faults in a served app with an expert-parallel target: a rank process dies mid-stream."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import time
from collections.abc import Iterator

import pytest

from cluster.config import DEMO_DRAFT, DEMO_TARGET
from tests.cluster.serving_app import app_args, running_app

openai = pytest.importorskip("openai")
pytestmark = [pytest.mark.timeout(420), pytest.mark.slow]
APP = "moespec-ep"


@pytest.fixture(scope="module")
def ep_server(serve_url: str) -> Iterator[str]:
    args = app_args(
        DEMO_TARGET,
        DEMO_DRAFT,
        expert_parallel={"num_ranks": 2},
        resources={"target_num_cpus": 0.5},
        engine={"target_recovery_s": 180.0, "loop": "router"},  # ranks are their own actors
    )
    with running_app(serve_url, args, APP, timeout_s=240) as base:
        yield base


def _rank_pids() -> list[int]:
    """Processes of the live expert-parallel ranks (from the GCS: the tests run Ray without a dashboard)."""
    import ray._private.state as ray_state

    actors = ray_state.actors().values()
    return [a["Pid"] for a in actors if a["ActorClassName"] == "_Rank" and a["State"] == "ALIVE"]


def test_killing_an_expert_parallel_rank_mid_stream(ep_server: str) -> None:
    client = openai.OpenAI(base_url=f"{ep_server}/v1", api_key="unused", max_retries=0, timeout=300)
    prompts = ["def parse(text):\n", "import json\n", "class Cache:\n"]

    def run(prompt: str) -> str:
        stream = client.completions.create(
            model="demo-moe",
            prompt=prompt,
            max_tokens=48,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        return "".join(c.choices[0].text for c in stream if c.choices)

    expected = [run(p) for p in prompts]
    pids = _rank_pids()
    assert len(pids) == 2
    start = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        futures = [pool.submit(run, p) for p in prompts]
        time.sleep(1.0)
        os.kill(pids[1], signal.SIGKILL)  # a crash, not a polite shutdown
        outcomes: list[str | Exception] = []
        for future in futures:
            try:
                outcomes.append(future.result(timeout=360))
            except Exception as error:  # noqa: BLE001 (a clear error is an accepted outcome)
                outcomes.append(error)
    assert time.monotonic() - start < 360
    for outcome, want in zip(outcomes, expected, strict=True):
        assert outcome == want or (isinstance(outcome, Exception) and str(outcome)), outcome
    assert set(_rank_pids()).isdisjoint(pids[1:])  # the group was rebuilt with new processes
    assert run(prompts[0]) == expected[0]  # and serves new requests
