"""What a new user's OpenAI client meets, on the running app (the shipped demo pair): /health while starting
and after a replica died, /metrics read by Prometheus' own parser before any request, and every request
option clients send, penalties and logprobs checked against `transformers` on the demo target."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import torch

from cluster.config import DEMO_DRAFT, DEMO_TARGET
from cluster.metrics import COUNTERS, GAUGES, PER_POSITION
from policy.batch_aware import POPULATION_ACCEPTANCE
from policy.utility import AcceptanceEstimator
from tests.cluster.reference import NO_PENALTIES, OPENAI_PENALTIES, PENALTIES, reference_greedy
from tests.cluster.serving_app import app_args, host_actors

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(600)
APP = "moespec-compat"
MODEL = "demo-moe"
HEALTH_LIMIT_S = 2.0
EXTRA = {"ignore_eos": True, "repetition_penalty": 1.3}


@dataclass
class Startup:
    base: str
    health: list[tuple[float, int, Any]] = field(default_factory=list)  # (seconds, status, body)
    metrics_before_requests: str = ""


def _health(base: str) -> tuple[float, int, Any]:
    start = time.monotonic()
    response = httpx.get(f"{base}/health", timeout=HEALTH_LIMIT_S + 3)
    elapsed = time.monotonic() - start
    try:
        body = response.json()
    except ValueError:
        body = response.text
    return elapsed, response.status_code, body


def _router_replica_is_up() -> bool:
    from ray import serve

    app = serve.status().applications.get(APP)
    router = app.deployments.get("Router") if app else None
    return router is not None and router.status == "HEALTHY"


@pytest.fixture(scope="module")
def startup(serve_url: str) -> Iterator[Startup]:
    """Deploy without waiting; from the moment the Router replica runs (before it, Serve's proxy holds
    requests), poll /health until it answers 200."""
    from ray import serve
    from ray.serve.api import _run

    from cluster.app import build_app

    # The target in its own host actor (not the demo config's loop in the target host): the last test kills it.
    args = app_args(DEMO_TARGET, DEMO_DRAFT, engine={"loop": "router"})
    _run(build_app(args), name=APP, route_prefix="/", _blocking=False)
    seen = Startup(serve_url)
    deadline = time.monotonic() + 240
    try:
        while not _router_replica_is_up():
            assert time.monotonic() < deadline, "the Router replica never started"
            time.sleep(0.1)
        while not seen.health or seen.health[-1][1] != 200:
            assert time.monotonic() < deadline, f"never healthy: {seen.health[-3:]}"
            seen.health.append(_health(serve_url))
            time.sleep(0.2)
        seen.metrics_before_requests = httpx.get(f"{serve_url}/metrics").text
        yield seen
    finally:
        serve.delete(APP)


@pytest.fixture(scope="module")
def client(startup: Startup) -> Any:
    return openai.OpenAI(base_url=f"{startup.base}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def reference_model() -> Any:
    return transformers.AutoModelForCausalLM.from_pretrained(DEMO_TARGET, dtype=torch.float32).eval()


# -- start-up: these run first, on what the fixture saw -----------------------------------------------------


def test_health_answers_within_2_s_while_starting_in_the_openai_error_format(startup: Startup) -> None:
    assert all(elapsed < HEALTH_LIMIT_S for elapsed, _, _ in startup.health), startup.health
    ours = [body for _, status, body in startup.health if status == 503 and isinstance(body, dict)]
    assert ours, f"no 503 from the router while it started: {startup.health}"
    for body in ours:
        assert body["error"]["code"] == 503 and body["error"]["message"], body
    assert startup.health[-1][2] == {"status": "ok"}


def test_prometheus_parser_reads_every_documented_series_before_the_first_request(startup: Startup) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    families = {f.name: f for f in text_string_to_metric_families(startup.metrics_before_requests)}
    # Zero before any request, except the chooser's estimates: the acceptance it starts from (its prior)
    # and no gain predicted.
    starts = {
        "policy_acceptance": AcceptanceEstimator(POPULATION_ACCEPTANCE).rate,
        "policy_opening_acceptance": AcceptanceEstimator(POPULATION_ACCEPTANCE).rate,
        "policy_predicted_speedup": 1.0,
    }
    for name in [*COUNTERS, *GAUGES]:
        family = families[f"moespec:{name.removesuffix('_total')}"]
        assert family.documentation, name
        assert [s.value for s in family.samples] == [starts.get(name, 0.0)], name
    per_pos = families[f"moespec:{PER_POSITION[0].removesuffix('_total')}"]
    positions = sorted(int(s.labels["position"]) for s in per_pos.samples)
    assert positions == list(range(4)) and all(s.value == 0 for s in per_pos.samples)  # max_spec_tokens 4


# -- requests ------------------------------------------------------------------------------------------------


def test_completions_penalties_and_logprobs_match_transformers(client: Any, reference_model: Any) -> None:
    prompt_ids = transformers.AutoTokenizer.from_pretrained(DEMO_TARGET)("def fib(n):\n")["input_ids"]
    expected_ids, expected_logprobs, expected_tops = reference_greedy(
        reference_model, prompt_ids, 16, 3, PENALTIES
    )
    plain_ids, _, _ = reference_greedy(reference_model, prompt_ids, 16, 1, NO_PENALTIES)
    assert plain_ids != expected_ids  # the penalties change this output
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO_TARGET)
    common: dict[str, Any] = dict(
        model=MODEL,
        prompt=prompt_ids,
        max_tokens=16,
        temperature=0,
        logprobs=3,
        user="someone",
        **OPENAI_PENALTIES,
    )
    for mode in ("off", 3, "auto"):  # greedy with penalties does not depend on speculation
        done = client.completions.create(**common, extra_body={**EXTRA, "num_spec_tokens": mode})
        choice = done.choices[0]
        assert choice.text == tokenizer.decode(expected_ids, skip_special_tokens=True), mode
        assert choice.logprobs.token_logprobs == pytest.approx(expected_logprobs, abs=1e-3)
        top_texts = [[tokenizer.decode([t]) for t in top] for top in expected_tops]
        assert [sorted(t) for t in choice.logprobs.top_logprobs] == [sorted(t) for t in top_texts]
        assert done.created > 0
    chunks = list(
        client.completions.create(**common, stream=True, extra_body={**EXTRA, "num_spec_tokens": 2})
    )
    assert "".join(c.choices[0].text for c in chunks) == choice.text
    streamed = [lp for c in chunks if c.choices[0].logprobs for lp in c.choices[0].logprobs.token_logprobs]
    assert streamed == pytest.approx(expected_logprobs, abs=1e-3)
    assert all(c.created == chunks[0].created > 0 for c in chunks)


def test_echo_nulls_and_vllm_bench_fields(startup: Startup, client: Any) -> None:
    echoed = client.completions.create(model=MODEL, prompt="import os", max_tokens=4, echo=True)
    assert echoed.choices[0].text.startswith("import os")
    streamed = client.completions.create(
        model=MODEL, prompt="import os", max_tokens=4, echo=True, stream=True
    )
    assert next(iter(streamed)).choices[0].text == "import os"
    nulls = {
        "model": None, "max_tokens": None, "temperature": None, "top_p": None, "top_k": None, "n": None,
        "stream": None, "stream_options": None, "stop": None, "seed": None, "user": None, "echo": None,
        "logprobs": None, "presence_penalty": None, "frequency_penalty": None, "repetition_penalty": None,
        "logit_bias": None, "suffix": None, "best_of": None, "num_spec_tokens": None, "ignore_eos": None,
    }  # fmt: skip
    response = httpx.post(f"{startup.base}/v1/completions", json={"prompt": "x", **nulls}, timeout=60)
    assert response.status_code == 200, response.text
    # What `vllm bench serve --backend openai` sends with every request.
    bench = {"model": MODEL, "prompt": "x", "repetition_penalty": 1.0, "max_tokens": 4, "logprobs": None,
             "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", f"{startup.base}/v1/completions", json=bench, timeout=60) as response:
        assert response.status_code == 200
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)
    assert '"usage"' in events[-2]


def test_chat_text_parts_logprobs_and_penalties(client: Any, reference_model: Any) -> None:
    tokenizer = transformers.AutoTokenizer.from_pretrained(DEMO_TARGET)
    messages: list[dict[str, Any]] = [
        {"role": "developer", "content": "Write code."},
        {"role": "user", "content": [{"type": "text", "text": "def "}, {"type": "text", "text": "add"}]},
    ]
    as_strings = [{"role": "system", "content": "Write code."}, {"role": "user", "content": "def add"}]
    prompt_ids = tokenizer.apply_chat_template(
        as_strings, add_generation_prompt=True, tokenize=True, return_dict=False
    )
    expected_ids, expected_logprobs, expected_tops = reference_greedy(
        reference_model, prompt_ids, 10, 2, PENALTIES
    )
    common: dict[str, Any] = dict(
        model=MODEL, max_tokens=10, temperature=0, logprobs=True, top_logprobs=2, user="u", **OPENAI_PENALTIES
    )
    chat = client.chat.completions.create(messages=messages, extra_body=EXTRA, **common)
    assert chat.usage.prompt_tokens == len(prompt_ids)
    assert chat.choices[0].message.content == tokenizer.decode(expected_ids, skip_special_tokens=True)
    content = chat.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(expected_logprobs, abs=1e-3)
    assert [len(c.top_logprobs) for c in content] == [2] * 10
    assert [c.top_logprobs[0].token for c in content] == [tokenizer.decode([t[0]]) for t in expected_tops]
    stream = client.chat.completions.create(
        messages=messages, stream=True, extra_body={**EXTRA, "num_spec_tokens": 3}, **common
    )
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    streamed = [e.logprob for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert streamed == pytest.approx(expected_logprobs, abs=1e-3)


def test_what_is_still_refused_names_the_field(startup: Startup, client: Any) -> None:
    refused: list[tuple[str, dict[str, Any], str]] = [
        ("completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
        ("completions", {"prompt": "x", "bogus_field": 1}, "bogus_field"),
        ("completions", {"prompt": "x", "logit_bias": {"5": 1.0}}, "logit_bias"),
        ("completions", {"prompt": "x", "presence_penalty": 3}, "presence_penalty"),
        ("completions", {"prompt": "x", "repetition_penalty": 0}, "repetition_penalty"),
        ("completions", {"prompt": "x", "logprobs": 50}, "logprobs"),
        ("completions", {"prompt": "x", "echo": True, "logprobs": 1}, "echo"),
        ("completions", {"max_tokens": 3}, "prompt"),
        ("chat/completions", {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
        ("chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{}]}, "tools"),
        (
            "chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
            "messages[0].content[0].type",
        ),
    ]
    for path, body, param in refused:
        response = httpx.post(f"{startup.base}/v1/{path}", json=body, timeout=30)
        assert response.status_code == 400, (body, response.text)
        assert response.json()["error"]["param"] == param, response.text
    models = client.models.list().data
    assert models[0].created > 0
    assert models[0].model_extra["max_model_len"] == 256  # as configured (app_args), not the padded cache


# -- a replica fails: runs last (it kills the model hosts) ---------------------------------------------------


def test_health_answers_within_2_s_after_a_replica_failed(startup: Startup, client: Any) -> None:
    """Kill the drafter's host, then the target's, each with a request in flight; poll /health meanwhile."""
    import ray

    slow_client = client.with_options(timeout=180)
    for deployment in ("DrafterHost", "TargetHost"):
        (host,) = host_actors(APP, deployment).values()
        ray.kill(host, no_restart=True)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            request = pool.submit(
                slow_client.completions.create, model=MODEL, prompt="after", max_tokens=8, temperature=0
            )
            answers, polled_until = [], time.monotonic() + 10
            while time.monotonic() < polled_until or not request.done():
                answers.append(_health(startup.base))
                time.sleep(0.3)
            try:
                assert request.result().usage.completion_tokens >= 1
            except openai.APIStatusError as error:  # losing the target may fail the request in flight
                assert error.status_code in (503, 504) and error.body["message"], error.body
        assert all(elapsed < HEALTH_LIMIT_S for elapsed, _, _ in answers), (deployment, answers)
        for _, status, body in answers:
            assert status == 200 or (status == 503 and body["error"]["code"] == 503), body
