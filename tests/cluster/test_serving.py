"""The served application over real HTTP with the official openai client, on a real local Ray instance."""

from __future__ import annotations

import concurrent.futures
import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from cluster.config import DEMO_DRAFT, DEMO_TARGET
from cluster.policy_actor import POLICY_NAMESPACE
from tests.cluster.serving_app import app_args, metric_value, running_app, used_slots

openai = pytest.importorskip("openai")
transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.timeout(300)
APP = "moespec-test"


@pytest.fixture(scope="module")
def server(serve_url: str) -> Iterator[str]:
    # The shipped demo pair, as the CPU demo config serves it.
    with running_app(serve_url, app_args(DEMO_TARGET, DEMO_DRAFT), APP) as base:
        yield base


@pytest.fixture(scope="module")
def client(server: str) -> Any:
    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


def _used_slots() -> tuple[int, int]:
    (slots,) = used_slots(APP).values()  # one Router replica
    return slots


def test_completions_and_chat_with_the_openai_client(client: Any) -> None:
    done = client.completions.create(
        model="demo-moe",
        prompt="def add(a, b):",
        max_tokens=12,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    reference = transformers.AutoTokenizer.from_pretrained(DEMO_TARGET)
    assert done.usage.prompt_tokens == len(reference("def add(a, b):")["input_ids"])
    assert done.usage.completion_tokens == 12
    assert done.choices[0].finish_reason == "length"
    assert len(done.choices[0].text) > 0

    chunks = list(
        client.completions.create(
            model="demo-moe",
            prompt="def add(a, b):",
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == done.choices[0].text
    assert chunks[-1].usage.completion_tokens == 12

    # A seed reproduces a sample under the same speculation setting (off or a fixed K); under "auto" the K
    # sequence follows the policy's state, which changes the sample path (not the distribution).
    seeded: dict[str, Any] = {
        "model": "demo-moe",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 8,
        "temperature": 0.8,
        "seed": 3,
        "extra_body": {"num_spec_tokens": 2},
    }
    chat = client.chat.completions.create(**seeded)
    assert chat.choices[0].message.role == "assistant"
    chat_ids = reference.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True, return_dict=False
    )
    assert chat.usage.prompt_tokens == len(chat_ids)
    streamed = client.chat.completions.create(**seeded, stream=True)
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
        == chat.choices[0].message.content
    )
    assert [m.id for m in client.models.list().data] == ["demo-moe"]


def test_speculation_off_and_auto_give_identical_greedy_text(client: Any) -> None:
    prompts = ["import os\n", "class Foo:", "x = [1, 2,", "The quick brown"]
    texts = {}
    for mode in ("off", "auto", 3):
        texts[mode] = [
            client.completions.create(
                model="demo-moe",
                prompt=p,
                max_tokens=24,
                temperature=0,
                extra_body={"num_spec_tokens": mode},
            )
            .choices[0]
            .text
            for p in prompts
        ]
    assert texts["off"] == texts["auto"] == texts[3]


def test_sixteen_concurrent_streams_complete_and_free_their_slots(client: Any) -> None:
    def run(i: int) -> tuple[str, int]:
        stream = client.completions.create(
            model="demo-moe",
            prompt=f"request {i}:",
            max_tokens=20,
            temperature=0.7,
            seed=i,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks = list(stream)
        return "".join(c.choices[0].text for c in chunks if c.choices), chunks[-1].usage.completion_tokens

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        results = list(pool.map(run, range(16)))
    assert all(n == 20 for _, n in results)
    time.sleep(0.5)
    assert _used_slots() == (0, 0)


def test_bad_inputs_get_400_and_the_server_keeps_serving(server: str, client: Any) -> None:
    bad_bodies: list[tuple[bytes, str]] = [
        (b"{not json", "not valid JSON"),
        (json.dumps({"prompt": "x", "temperature": -1}).encode(), "temperature"),
        (json.dumps({"prompt": "x", "max_tokens": 0}).encode(), "max_tokens"),
        (json.dumps({"prompt": "x", "bogus_field": 1}).encode(), "bogus_field"),
        (json.dumps({"prompt": [5] * 300}).encode(), "context length"),
        (json.dumps({"prompt": [5, 99999]}).encode(), "outside the vocabulary"),
        (json.dumps({"prompt": "x", "num_spec_tokens": 99}).encode(), "num_spec_tokens"),
        (json.dumps({"max_tokens": 3}).encode(), "prompt"),
    ]
    for body, expected in bad_bodies:
        response = httpx.post(
            f"{server}/v1/completions", content=body, headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, (body, response.text)
        assert expected in response.json()["error"]["message"], response.text
    assert httpx.post(f"{server}/v1/nope", json={}).status_code == 404
    ok = client.completions.create(model="demo-moe", prompt="still here", max_tokens=4)
    assert ok.usage.completion_tokens >= 1


def test_a_disconnected_stream_is_aborted(server: str) -> None:
    body = {"prompt": "long one", "max_tokens": 200, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{server}/v1/completions", json=body, timeout=30) as response:
        for _ in response.iter_lines():
            break  # read one event, then hang up
    deadline = time.monotonic() + 10
    while _used_slots() != (0, 0):
        assert time.monotonic() < deadline, "the aborted request still holds KV slots"
        time.sleep(0.2)


def test_metrics_count_traffic_and_health_is_ok(server: str, client: Any) -> None:
    def counter(text: str, name: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(f"moespec:{name}{{")
        )

    before = httpx.get(f"{server}/metrics").text
    client.completions.create(
        model="demo-moe",
        prompt="count me",
        max_tokens=16,
        temperature=0,
        extra_body={"num_spec_tokens": 3, "ignore_eos": True},
    )
    after = httpx.get(f"{server}/metrics").text
    assert counter(after, "requests_total") == counter(before, "requests_total") + 1
    assert counter(after, "spec_decode_num_draft_tokens_total") > counter(
        before, "spec_decode_num_draft_tokens_total"
    )
    assert "moespec:spec_decode_num_accepted_tokens_per_pos_total" in after
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}


def test_the_central_policy_decides_and_serving_survives_its_death(server: str, client: Any) -> None:
    import ray

    def run(n: int) -> list[str]:
        return [
            client.completions.create(model="demo-moe", prompt=f"policy {i}", max_tokens=24, temperature=0)
            .choices[0]
            .text
            for i in range(n)
        ]

    def answered_actor(why: str) -> Any:
        """Serve until the named policy actor exists and has published a decision (it starts on demand)."""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            run(1)
            try:
                actor = ray.get_actor("moespec-spec-policy", namespace=POLICY_NAMESPACE)
                received = metric_value(httpx.get(f"{server}/metrics").text, "policy_central_decisions")
                if ray.get(actor.num_decisions.remote()) > 0 and received > decisions_before:
                    return actor
            except ValueError:  # not created yet
                pass
            time.sleep(0.5)
        raise AssertionError(why)

    first = run(3)
    decisions_before = 0.0
    actor = answered_actor("the router never got a decision from the policy actor")
    assert metric_value(httpx.get(f"{server}/metrics").text, "policy_actor_failures") == 0
    ray.kill(actor, no_restart=True)
    assert run(3) == first  # greedy output is the target's whatever the policy does
    decisions_before = metric_value(httpx.get(f"{server}/metrics").text, "policy_central_decisions")
    answered_actor("the router never re-registered with a new policy actor")  # after its retry delay
