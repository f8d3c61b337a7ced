"""The vllm backend served on Ray: the official openai client (completions and chat, streaming or not),
`num_spec_tokens` honoured, penalties and logprobs as `transformers` computes them, our gauges beside vLLM's on /metrics, two replicas each with its own engine,
and the central SpecPolicy actor receiving the engines' reports."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import torch

from cluster.config import DEMO_DRAFT, DEMO_TARGET
from cluster.policy_actor import POLICY_NAMESPACE
from tests.cluster.reference import NO_PENALTIES, OPENAI_PENALTIES, PENALTIES, reference_greedy
from tests.cluster.serving_app import app_args, metric_value, running_app
from tests.cluster.vllm_backend.conftest import needs_vllm

openai = pytest.importorskip("openai")
pytestmark = [needs_vllm, pytest.mark.timeout(1500)]  # the first test waits for two engines to start
APP = "moespec-vllm-test"
ACTOR = "moespec-vllm-test-policy"


@pytest.fixture(scope="module")
def server(serve_url: str) -> Iterator[str]:
    args = app_args(
        DEMO_TARGET,
        DEMO_DRAFT,
        engine={"backend": "vllm", "max_spec_tokens": 4},
        policy={"kind": "auto", "actor_name": ACTOR, "window_iterations": 4},
        replicas={"num_replicas": 2},
        vllm={"enforce_eager": True, "cpu_kv_cache_gib": 1},
        resources={"target_num_cpus": 0.5},
    )
    with running_app(serve_url, args, APP, timeout_s=1200) as base:
        yield base


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def test_completions_and_chat_streaming_or_not(client: Any) -> None:
    done = client.completions.create(
        model="demo-moe",
        prompt="def add(a, b):",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert done.usage.completion_tokens == 12 and done.choices[0].finish_reason == "length"
    chunks = list(
        client.completions.create(
            model="demo-moe",
            prompt="def add(a, b):",
            max_tokens=12,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    chat = client.chat.completions.create(
        model="demo-moe", messages=[{"role": "user", "content": "Write a loop."}], max_tokens=8, temperature=0
    )
    assert chat.choices[0].message.content
    streamed = client.chat.completions.create(
        model="demo-moe",
        messages=[{"role": "user", "content": "Write a loop."}],
        max_tokens=8,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == chat.choices[0].message.content


def test_num_spec_tokens_is_honoured_and_greedy_text_does_not_depend_on_it(server: str, client: Any) -> None:
    texts = {}
    for setting in ("off", 3, "auto"):
        out = client.completions.create(
            model="demo-moe",
            prompt="import os\n",
            max_tokens=24,
            temperature=0,
            extra_body={"ignore_eos": True, "num_spec_tokens": setting},
        )
        texts[setting] = out.choices[0].text
    assert texts["off"] == texts[3] == texts["auto"]
    bad = httpx.post(f"{server}/v1/completions", json={"prompt": "x", "num_spec_tokens": -1})
    assert bad.status_code == 400


def test_penalties_and_logprobs_match_transformers_with_and_without_speculation(client: Any) -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO_TARGET)
    model = transformers.AutoModelForCausalLM.from_pretrained(DEMO_TARGET, dtype=torch.float32).eval()
    prompt_ids = tokenizer("def fib(n):\n")["input_ids"]
    expected_ids, expected_logprobs, expected_tops = reference_greedy(model, prompt_ids, 12, 2, PENALTIES)
    assert expected_ids != reference_greedy(model, prompt_ids, 12, 1, NO_PENALTIES)[0]  # they take effect
    extra = {"ignore_eos": True, "repetition_penalty": PENALTIES["repetition_penalty"]}
    common: dict[str, Any] = dict(
        model="demo-moe", prompt=prompt_ids, max_tokens=12, temperature=0, logprobs=2, **OPENAI_PENALTIES
    )
    for setting in ("off", 3, "auto"):
        done = client.completions.create(**common, extra_body={**extra, "num_spec_tokens": setting})
        choice = done.choices[0]
        assert choice.text == tokenizer.decode(expected_ids, skip_special_tokens=True), setting
        assert choice.logprobs.token_logprobs == pytest.approx(expected_logprobs, abs=1e-3), setting
        top_texts = [sorted(tokenizer.decode([t]) for t in top) for top in expected_tops]
        assert [sorted(top) for top in choice.logprobs.top_logprobs] == top_texts, setting
    chunks = list(
        client.completions.create(**common, stream=True, extra_body={**extra, "num_spec_tokens": 2})
    )
    streamed = [
        lp
        for c in chunks
        if c.choices and c.choices[0].logprobs
        for lp in c.choices[0].logprobs.token_logprobs
    ]
    assert streamed == pytest.approx(expected_logprobs, abs=1e-3)


def test_metrics_have_our_gauges_beside_vllms(server: str, client: Any) -> None:
    for _ in range(4):  # both replicas see traffic (Serve routes by load)
        client.completions.create(
            model="demo-moe",
            prompt="for i in range(",
            max_tokens=16,
            temperature=0,
            extra_body={"ignore_eos": True, "num_spec_tokens": 4},
        )
    # The scheduler writes its counters once a second, and /metrics answers from whichever replica Serve
    # picks: read until a replica that drafted has published, with a deadline rather than a fixed count
    # (six reads all reaching the other replica failed CI once).
    seen_drafts = seen_accepted = seen_draft_seconds = 0.0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (seen_drafts and seen_accepted and seen_draft_seconds):
        text = httpx.get(f"{server}/metrics").text
        assert "vllm:" in text  # vLLM's own metrics
        seen_drafts = max(seen_drafts, metric_value(text, "spec_decode_num_draft_tokens_total"))
        # The drafts reach the engine core with the step's output, pickled from the worker's process.
        seen_accepted = max(seen_accepted, metric_value(text, "spec_decode_num_accepted_tokens_total"))
        # Measured in the worker process and carried to the scheduler with the step's output.
        seen_draft_seconds = max(seen_draft_seconds, metric_value(text, "draft_seconds_total"))
        assert metric_value(text, "requests_total") >= 1
        assert "moespec:policy_central_decisions" in text
        time.sleep(0.25)
    assert seen_drafts > 0 and seen_accepted > 0 and seen_draft_seconds > 0, (
        seen_drafts,
        seen_accepted,
        seen_draft_seconds,
    )


def test_every_replica_reports_to_the_central_policy(client: Any) -> None:
    import ray

    for _ in range(6):
        client.completions.create(
            model="demo-moe", prompt="class A:", max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
        )
    actor = ray.get_actor(ACTOR, namespace=POLICY_NAMESPACE)
    deadline = time.monotonic() + 60
    while len(ray.get(actor.source_names.remote())) < 2:  # one engine per replica, each its own source
        assert time.monotonic() < deadline, f"reports from {ray.get(actor.source_names.remote())} only"
        client.completions.create(model="demo-moe", prompt="def f(x):", max_tokens=16, temperature=0)
    assert all(name.startswith("vllm-") for name in ray.get(actor.source_names.remote()))
    assert ray.get(actor.num_decisions.remote()) > 0
