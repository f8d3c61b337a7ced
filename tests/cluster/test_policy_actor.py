"""The router-side PolicyClient against the policy actor's body run in-process (no Ray): central decisions
are used while they last, the local chooser is asked only as the fallback and still sees every iteration.
Last, the real actor on Ray with the served factory answers every report."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from cluster.policy_actor import PolicyClient, SpecPolicy
from policy.baselines import StaticChooser
from policy.guard import MeasuredGuard
from policy.stats import IterationStats, RequestIterationStats


class CountingChooser(StaticChooser):
    """A static chooser that records what it was asked and shown."""

    def __init__(self, num_spec_tokens: int) -> None:
        super().__init__(num_spec_tokens)
        self.asked: list[list[str]] = []
        self.num_observed = 0
        self.released: list[str] = []

    def choose(self, request_ids: Sequence[str]) -> dict[str, int]:
        self.asked.append(list(request_ids))
        return super().choose(request_ids)

    def observe(self, stats: IterationStats) -> None:
        self.num_observed += 1

    def release(self, request_id: str) -> None:
        self.released.append(request_id)

    def gauges(self) -> dict[str, float]:
        return {}


class InlineActor:
    """The actor handle's surface (`report.remote`) over a SpecPolicy in this process: the reply is the value."""

    def __init__(self, policy: SpecPolicy) -> None:
        self.report = type("Method", (), {"remote": staticmethod(policy.report)})


def client_with(local: CountingChooser, window: int = 4, delay: int = 0) -> tuple[PolicyClient, SpecPolicy]:
    """A client whose central policy answers K = 3 for everything, `delay` polls after each report."""
    policy = SpecPolicy(window, lambda: StaticChooser(3))
    polls = {"left": delay}

    def reply(pending: Any) -> bytes | None:
        if polls["left"] > 0:
            polls["left"] -= 1
            return None
        polls["left"] = delay
        return bytes(pending)

    return PolicyClient("router-test", local, lambda: InlineActor(policy), reply=reply), policy


def run(
    client: PolicyClient, ids_at: Callable[[int], list[str]], num_iterations: int
) -> list[dict[str, int]]:
    chosen = []
    for i in range(num_iterations):
        ks = client.choose(ids_at(i))
        chosen.append(ks)
        requests = [RequestIterationStats(r, k, k, k + 1, 10) for r, k in ks.items()]
        client.observe(IterationStats(i, len(ks), requests, len(ks) + sum(ks.values()), 0.01, 0.03, 0.01))
    return chosen


def test_local_chooser_is_not_asked_while_a_central_decision_covers_the_batch() -> None:
    local = CountingChooser(1)
    client, _ = client_with(local)
    chosen = run(client, lambda i: ["a", "b"], num_iterations=40)
    # Only the first iteration, before any answer, is decided locally; the next window's decision is
    # requested one iteration early, so windows follow each other without a local gap.
    assert local.asked == [["a", "b"]]
    assert chosen[0] == {"a": 1, "b": 1}
    assert all(ks == {"a": 3, "b": 3} for ks in chosen[1:])
    assert local.num_observed == 40  # the fallback stays warm
    assert client.num_central_decisions >= 40 // 4


def test_local_chooser_decides_only_the_requests_a_decision_lacks() -> None:
    local = CountingChooser(1)
    client, _ = client_with(local, window=8, delay=1)  # answers arrive one poll late
    chosen = run(client, lambda i: ["a", "b"] if i < 4 else ["a", "b", "c"], num_iterations=8)
    assert chosen[2] == {"a": 3, "b": 3}
    assert chosen[4] == {"a": 3, "b": 3, "c": 1}  # c is new: the local chooser decides c alone
    assert ["c"] in local.asked and all("a" not in asked for asked in local.asked[2:])
    assert chosen[6] == {"a": 3, "b": 3, "c": 3}  # the central policy has answered for c
    client.release("c")
    assert local.released == ["c"]


def test_an_unreachable_actor_leaves_the_local_chooser_in_charge() -> None:
    local = CountingChooser(2)

    def unreachable() -> Any:
        raise ConnectionError("no actor")

    client = PolicyClient("router-test", local, unreachable, retry_s=3600.0)
    assert client.num_failures == 1  # tried at construction
    chosen = run(client, lambda i: ["a"], num_iterations=5)
    assert chosen == [{"a": 2}] * 5 and len(local.asked) == 5
    assert client.num_failures == 1 and not client.is_connected
    # The stack reports its counters through gauges(), each layer adding its own to those below it.
    guard = MeasuredGuard(client)
    guard.num_holds, guard.num_plain_restarts = 3, 2
    gauges = guard.gauges()
    assert gauges == {
        "policy_guard_holds": 3,
        "policy_guard_plain_restarts": 2,
        "policy_central_decisions": 0,
        "policy_actor_failures": 1,
    }


def test_iterations_without_auto_requests_do_not_pile_up() -> None:
    local = CountingChooser(1)
    client, _ = client_with(local)
    for i in range(2000):  # static-K traffic only: choose() is never called, nothing is reported
        requests = [RequestIterationStats("s", 3, 3, 4, 10)]
        client.observe(IterationStats(i, 1, requests, 4, 0.01, 0.03, 0.01))
    assert len(client._stats) <= 512
    assert client.choose(["a"]) == {"a": 1} and not client._stats  # the first report carries them


def test_the_real_actor_with_the_served_factory_answers_every_report(ray_session: Any) -> None:
    import msgspec
    import ray

    from cluster.choosers import shared_chooser_factory
    from cluster.config import PolicySettings
    from cluster.policy_actor import policy_actor_handle
    from policy.stats import Decision
    from workers.target import TargetInfo

    info = TargetInfo(vocab_size=100, eos_token_ids=[1], num_experts=8, top_k=2, max_seqs=8, max_seq_len=256)
    actor = policy_actor_handle("test-policy", 4, shared_chooser_factory(PolicySettings(), info, 4))
    encoder = msgspec.msgpack.Encoder()
    try:
        for i in range(40):  # past the cost model's first refits
            requests = [RequestIterationStats("r1", 2, 1, 2, 10 + 2 * i)]
            stats = IterationStats(i, 1, requests, 3, 0.01, 0.02, 0.003, [4, 4], 8)
            reply = ray.get(actor.report.remote("router", encoder.encode([stats]), [], ["r1"], i + 1))
            decision = msgspec.msgpack.decode(reply, type=Decision)
            assert decision.source == "router" and 0 <= decision.num_spec_tokens["r1"] <= 4
    finally:
        ray.kill(actor)
