"""The batch-aware chooser: exact optimum, off at low acceptance, back-off, stability, bounds."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.batch_aware import BatchAwareChooser, BatchAwareConfig
from policy.cost_model import CostModel, CostParams, batch_bucket
from policy.cost_model_config import CostModelConfig, DraftPadding
from policy.k_search import best_k_vector, could_beat_plain
from policy.presets import MEASURED_PRESETS, PRESETS
from policy.routing import RoutingConfig
from policy.simulator import _measure, simulate
from policy.stats import IterationStats, KChooser, RequestIterationStats, RequestOutlook
from policy.test_phase import RequestState, TestPhases
from policy.workload import WorkloadConfig
from tests.policy.test_cost_model import _with_prompt_steps

MIXTRAL = PRESETS["mixtral-8x7b-h100"]
# The test budget's back-off alone: not waived however long the batch runs plain (the floor has its own test).
NO_FLOOR = 10**9


def chooser_for(
    preset_name: str, draft_padding: DraftPadding = "none", draft_scale: float = 1.0, **overrides: Any
) -> BatchAwareChooser:
    """`draft_padding` as in `CostModelConfig` (vLLM's drafter: "batch"); `draft_scale` on the preset's
    drafter time per sequence."""
    preset = PRESETS[preset_name]
    params = preset.cost_params()
    params = dataclasses.replace(params, draft_per_token_s=draft_scale * params.draft_per_token_s)
    model = CostModel(CostModelConfig(preset.routing, draft_padding=draft_padding), params)
    return BatchAwareChooser(BatchAwareConfig(**overrides), model)


@settings(max_examples=120, deadline=None)
@given(
    rates=st.lists(st.floats(0.0, 0.97), min_size=1, max_size=4),
    forced=st.lists(st.integers(-1, 3), min_size=4, max_size=4),
    preset=st.sampled_from(sorted(PRESETS)),
    bar=st.sampled_from([0.0, 0.1]),
    padding=st.sampled_from(["none", "batch", "drafting"]),
    draft_scale=st.sampled_from([1.0, 30.0]),
)
def test_best_spec_tokens_is_the_brute_force_optimum(
    rates: list[float], forced: list[int], preset: str, bar: float, padding: DraftPadding, draft_scale: float
) -> None:
    """However the drafter's time counts the sequences (sum K, max K for every request, or for every request
    that drafts), and where it is a large share of a step (30x the preset's). Where it drafts max K for each
    request that drafts, the search is not exact (`policy.k_search.best_k_vector`): within 1% of the optimum."""
    chooser = chooser_for(preset, padding, draft_scale, max_spec_tokens=3, min_predicted_gain=bar)
    rate_array, forced_array = np.array(rates), np.array(forced[: len(rates)])

    def objective(ks: Sequence[int]) -> float:  # the model's tokens per second, drafting charged its bar
        return chooser.tokens_per_second(rate_array, ks) / (1.0 + bar if max(ks) else 1.0)

    best = chooser.best_spec_tokens(rate_array, forced_array)
    options = [range(4) if f < 0 else [f] for f in forced_array]
    brute = max(objective(ks) for ks in itertools.product(*options))
    if padding == "drafting":
        assert brute * 0.99 <= objective(best) <= brute * (1.0 + 1e-9)
    else:
        assert objective(best) == pytest.approx(brute, rel=1e-9)
    assert all(k == f for k, f in zip(best, forced_array, strict=True) if f >= 0)


@settings(max_examples=60, deadline=None)
@given(
    ks=st.lists(st.integers(0, 4), min_size=1, max_size=8),
    padding=st.sampled_from(["none", "batch", "drafting"]),
    bar=st.sampled_from([0.0, 0.1]),
)
def test_the_search_prices_a_k_vector_as_the_cost_model_does(
    ks: list[int], padding: DraftPadding, bar: float
) -> None:
    """The search's table (`_time_table`, its padded drafts included) gives every K vector the cost model's
    time, drafting charged its bar."""
    chooser = chooser_for("mixtral-8x7b-h100", padding, 30.0, max_spec_tokens=4, min_predicted_gain=bar)
    charged = chooser.cost_model.iteration_time(ks) * (1.0 + bar if max(ks) else 1.0)
    assert chooser._time_table(len(ks)).of(ks) == pytest.approx(charged, rel=1e-9)


def test_a_batch_leaves_plain_decoding_only_for_a_predicted_gain_above_the_bar() -> None:
    # The bar moves the choice between plain decoding and drafting, never the choice among drafting vectors.
    unbarred = chooser_for("mixtral-8x7b-h100", min_predicted_gain=0.0)
    barred = chooser_for("mixtral-8x7b-h100", min_predicted_gain=0.1)
    no_force = np.full(16, -1)
    gains = []
    for acceptance in np.linspace(0.05, 0.95, 91):
        rates = np.full(16, acceptance)
        free = unbarred.best_spec_tokens(rates, no_force)
        gain = unbarred.tokens_per_second(rates, free) / unbarred.tokens_per_second(rates, [0] * 16)
        gains.append(gain)
        expected = free if gain > 1.1 + 1e-9 else [0] * 16
        assert barred.best_spec_tokens(rates, no_force) == expected, (acceptance, gain)
    assert any(1.0 < g < 1.1 for g in gains) and any(g > 1.1 for g in gains)  # both sides of the bar


def test_optimum_follows_batch_size_and_acceptance() -> None:
    chooser = chooser_for("mixtral-8x7b-h100")
    no_force = np.full(16, -1)
    assert chooser.best_spec_tokens(np.array([0.3]), no_force[:1]) == [0]  # batch 1, MoE: too costly
    assert min(chooser.best_spec_tokens(np.full(16, 0.8), no_force)) >= 3  # experts saturated: cheap
    mixed = chooser.best_spec_tokens(np.array([0.9, 0.1] * 8), no_force)
    assert min(mixed[0::2]) > max(mixed[1::2])  # more tokens for the request that accepts more


class Recorder:
    """A KChooser wrapper that keeps every decision."""

    def __init__(self, inner: KChooser) -> None:
        self.inner = inner
        self.decisions: list[dict[str, int]] = []

    def choose(self, request_ids: Sequence[str]) -> dict[str, int]:
        self.decisions.append(self.inner.choose(request_ids))
        return self.decisions[-1]

    def observe(self, stats: IterationStats) -> None:
        self.inner.observe(stats)

    def release(self, request_id: str) -> None:
        self.inner.release(request_id)

    def gauges(self) -> dict[str, float]:
        return self.inner.gauges()


def test_low_acceptance_turns_off_after_the_first_test_and_backs_off() -> None:
    chooser = chooser_for(  # no test budget: the back-off alone (the budget has its own test)
        "mixtral-8x7b-h100",
        set_iterations=16,
        max_set_iterations=1024,
        new_request_zero_verdicts=1,
        test_budget=1.0,
    )
    recorder = Recorder(chooser)
    workload = WorkloadConfig(1, (0.2,), mean_output_tokens=4000, num_iterations=600, time_noise=0.0)
    simulate(MIXTRAL, recorder, workload)
    ks = [d["req-0"] for d in recorder.decisions]
    num_test = chooser.config.test_iterations
    # Speculation does not pay at batch 1 even at an uninformed 0.5 in the model, but no drafting has been
    # measured at batch 1: the request is tested at once (alone in the batch, it has nobody to wait for),
    # and backs off from there as if tested once before (new_request_zero_verdicts).
    assert ks[:num_test] == [1] * num_test and ks[num_test] == 0
    test_starts = [0] + [i for i in range(1, len(ks)) if ks[i] > 0 and ks[i - 1] == 0]
    gaps = np.diff(test_starts) - num_test  # iterations at K = 0 after each test
    assert list(gaps[:3]) == [64, 128, 256]


def test_pending_tests_wait_for_a_drafting_iteration_and_probe_together() -> None:
    chooser = chooser_for("mixtral-8x7b-h100", set_iterations=16, test_budget=1.0)  # no budget: the wait
    truth, rng = MIXTRAL.truth(), np.random.default_rng(0)
    ids = [f"r{i}" for i in range(4)]
    num_together = 0
    for i in range(100):
        ks = chooser.choose(ids)
        requests = [RequestIterationStats(r, k, 0, 1, 10) for r, k in ks.items()]  # acceptance 0
        chooser.observe(_measure(truth, MIXTRAL, i, requests, rng, noise=0.0))
        probing = {r for r, k in ks.items() if k > 0}
        assert probing in (set(), set(ids)) or probing == {"r4"}
        num_together += probing == {"r0", "r1", "r2", "r3"}
        if i == 60:  # r3 is replaced by a new request, which will test alone
            chooser.release("r3")
            ids[3] = "r4"
    assert num_together == 2 * chooser.config.test_iterations  # two tests of the four, at the same iterations


def test_no_oscillation_when_conditions_are_stationary() -> None:
    recorder = Recorder(chooser_for("qwen2-57b-a14b-h100"))
    workload = WorkloadConfig(8, (0.7,), mean_output_tokens=4000, num_iterations=400, time_noise=0.02)
    simulate(PRESETS["qwen2-57b-a14b-h100"], recorder, workload)
    settled = recorder.decisions[100:]
    changes = sum(a[r] != b[r] for a, b in itertools.pairwise(settled) for r in a if r in b)
    assert changes <= 0.02 * len(settled) * 8  # under 2% of request-iterations change K


@settings(max_examples=40, deadline=None)
@given(
    max_spec_tokens=st.integers(1, 8),
    trace=st.lists(
        st.tuples(st.integers(1, 6), st.floats(0.0, 1.0), st.floats(0.001, 0.2)), min_size=1, max_size=30
    ),
)
def test_k_stays_within_bounds(max_spec_tokens: int, trace: list[tuple[int, float, float]]) -> None:
    chooser = chooser_for("mixtral-8x7b-h100", max_spec_tokens=max_spec_tokens, probe_num_spec_tokens=1)
    for i, (batch, rate, seconds) in enumerate(trace):
        ids = [f"r{(i // 3 + j) % 7}" for j in range(batch)]
        ks = chooser.choose(ids)
        assert all(0 <= k <= max_spec_tokens for k in ks.values())
        requests = [RequestIterationStats(r, k, int(rate * k), int(rate * k) + 1, 50) for r, k in ks.items()]
        num_tokens = batch + sum(ks.values())
        chooser.observe(IterationStats(i, batch, requests, num_tokens, seconds / 4, seconds / 2, seconds / 4))
        chooser.release(f"r{i % 7}")


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="probe_num_spec_tokens=5"):
        BatchAwareConfig(max_spec_tokens=4, probe_num_spec_tokens=5)
    with pytest.raises(ValueError, match="hysteresis=-0.1"):
        BatchAwareConfig(hysteresis=-0.1)
    with pytest.raises(ValueError, match="new_request_test_every=0"):
        BatchAwareConfig(new_request_test_every=0)


def test_new_requests_start_uninformed_until_enough_requests_have_drafted() -> None:
    """One low-acceptance request must not start every later one at K = 0, untested for its whole life."""
    chooser = chooser_for("mixtral-8x7b-h100", min_population_requests=2)
    for i in range(3):
        request_id = f"r{i}"
        chooser.choose([request_id])
        start = chooser._states[request_id].estimator.rate
        assert start >= 0.5 if i < 2 else start < 0.3, (i, start)
        requests = [RequestIterationStats(request_id, 2, 0, 1, 10)] * 1
        for step in range(20):  # every draft rejected
            chooser.observe(IterationStats(step, 1, requests, 3, 0.01, 0.02, 0.0))
        chooser.release(request_id)


def test_gauges_say_why_it_drafts_or_not() -> None:
    # Batch 16 of a saturated MoE: drafting pays, and the gauge predicts a gain over plain decoding.
    chooser = chooser_for("mixtral-8x7b-h100")
    chosen = chooser.choose([f"r{i}" for i in range(16)])
    assert max(chosen.values()) > 0
    gauges = chooser.gauges()
    assert gauges["policy_predicted_speedup"] > 1.05
    assert 0.0 < gauges["policy_acceptance"] < 1.0
    # Batch 2 of the same MoE, traffic whose drafts were all rejected: K = 0 and no gain predicted (the new
    # requests' tests wait for a drafting iteration; at batch 1 a test would start at once).
    lone = chooser_for("mixtral-8x7b-h100", min_population_requests=0)
    lone._population.record_counts(0, 50)
    assert lone.choose(["a", "b"]) == {"a": 0, "b": 0}
    assert lone.gauges()["policy_predicted_speedup"] == pytest.approx(1.0)
    assert lone.gauges()["policy_acceptance"] < 0.1


def test_a_new_request_is_tested_where_drafting_was_never_measured_at_its_batch_size() -> None:
    """Where the model puts a new request at K = 0 on its prior alone (no drafting measured at this batch
    size: plain iterations cannot tell a fixed per-iteration cost from a token's), the request is tested;
    once drafting was measured there, a new request at K = 0 starts untested, as if tested before (the
    vLLM backend at concurrency 1: auto never drafted, 0 of 520 steps, where static K = 1 paid 1.28x)."""
    chooser = chooser_for("mixtral-8x7b-h100", min_population_requests=0)
    truth, rng = MIXTRAL.truth(), np.random.default_rng(0)

    def run(name: str, num_iterations: int, start: int) -> list[int]:
        """Two new requests together (alone in the batch, a request is tested anyway); the largest K of each
        iteration."""
        ids, ks = [f"{name}0", f"{name}1"], []
        for i in range(start, start + num_iterations):
            chosen = chooser.choose(ids)
            ks.append(max(chosen.values()))
            requests = [RequestIterationStats(r, k, 0, 1, 10) for r, k in chosen.items()]  # drafts rejected
            chooser.observe(_measure(truth, MIXTRAL, i, requests, rng, noise=0.0))
        for request_id in ids:
            chooser.release(request_id)
        return ks

    assert chooser.best_spec_tokens(np.full(2, 0.5), np.full(2, -1)) == [0, 0]  # the model: K = 0 at batch 2
    first = run("a", 32, 0)
    num_test, wait = chooser.config.test_iterations, chooser.config.max_test_wait
    assert first[:wait] == [0] * wait and first[wait : wait + num_test] == [1] * num_test, first
    assert chooser.cost_model.num_drafting_iterations(2) == num_test
    assert chooser.cost_model.num_drafting_iterations(4) == 0  # counted per batch-size bucket
    # Measured now, and the traffic's acceptance (every draft rejected) is fresh: the next requests start at
    # K = 0 untested.
    assert run("b", 64, 32) == [0] * 64


def test_a_forced_test_waits_out_a_burst_of_prompts_for_up_to_twice_its_wait() -> None:
    """A pending forced test waits `max_test_wait` iterations for a drafting one, and up to twice that while the
    last iteration's prompt tokens would cost the drafter more than `max_test_prompt_share` of a plain
    iteration (a drafting step feeds the drafter every prompt token in it)."""
    truth, rng = MIXTRAL.truth(), np.random.default_rng(0)

    def first_drafting(prompt_tokens: list[int]) -> int:
        """Two new requests at K = 0 on the model's prior; iteration i's stats report prompt_tokens[i]."""
        chooser = chooser_for("mixtral-8x7b-h100", min_population_requests=0)
        assert chooser.best_spec_tokens(np.full(2, 0.5), np.full(2, -1)) == [0, 0]  # tests are forced
        for i, num_prompt_tokens in enumerate(prompt_tokens):
            chosen = chooser.choose(["a", "b"])
            if max(chosen.values()):
                return i
            requests = [RequestIterationStats(r, 0, 0, 1, 10) for r in chosen]
            stats = _measure(truth, MIXTRAL, i, requests, rng, noise=0.0)
            chooser.observe(msgspec.structs.replace(stats, num_prefill_tokens=num_prompt_tokens))
        return len(prompt_tokens)

    wait, burst = BatchAwareConfig().max_test_wait, 20_000  # 31 ms of drafter at 1.5 us a token
    assert first_drafting([0] * 40) == wait
    assert first_drafting([burst] * 12 + [0] * 28) == 13  # once the burst is over
    assert first_drafting([burst] * 40) == 2 * wait
    assert first_drafting([100] * 40) == wait  # a few prompt tokens are no burst


class _AfterLowTraffic:
    """New requests `batch` at a time (each group together for its life), where drafting K = 1 pays from
    about 0.5 (at batch 1, and for one request of two where the other does not draft), after traffic whose
    tests accepted 0.3 at K = 1 (the traffic's figure under the break-even)."""

    def __init__(self, chooser: BatchAwareChooser, batch: int = 1) -> None:
        self.chooser, self.step, self.batch = chooser, 0, batch
        for i in range(30):
            ids = [f"low{i}-{j}" for j in range(batch)]
            for j in range(8):  # (the openings too: `BatchAwareConfig.opening_apart`)
                accepted = int((8 * i + j + 1) * 0.3) - int((8 * i + j) * 0.3)
                self.observe({r: (1, accepted) for r in ids})
            for request_id in ids:
                chooser.release(request_id)

    def observe(self, drafts: dict[str, tuple[int, int]]) -> None:
        """An iteration in which each request drafted K and accepted this many."""
        requests = [RequestIterationStats(r, k, a, a + 1, 10) for r, (k, a) in drafts.items()]
        ks = [k for k, _ in drafts.values()]
        draft_s, verify_s = 0.003 * sum(ks), 0.01 * len(ks) + 0.002 * sum(ks)
        stats = IterationStats(self.step, len(ks), requests, len(ks) + sum(ks), draft_s, verify_s, 0.0)
        self.chooser.observe(stats)
        self.step += 1

    def run(self, name: str, num_iterations: int, accepts: bool) -> list[int]:
        """A new group's largest K in each of its iterations; its requests accept all drafts or none."""
        ids = [name] if self.batch == 1 else [f"{name}{j}" for j in range(self.batch)]
        ks = []
        for _ in range(num_iterations):
            chosen = self.chooser.choose(ids)
            ks.append(max(chosen.values()))
            self.observe({r: (k, k if accepts else 0) for r, k in chosen.items()})
        for request_id in ids:
            self.chooser.release(request_id)
        return ks


def test_a_test_that_ends_in_drafting_gets_the_next_new_request_tested() -> None:
    """The traffic's acceptance is fed by tests alone. Served on the regime pair, synthetic at batch 1 after
    prose started 15 of 16 requests untested at K = 0 (the traffic's figure under the break-even), while the
    one that a stale figure got tested drafted its life at 0.85 and static K = 4 paid 1.32x. Once a test ends
    in drafting, the next new request is tested (the test budget is out of the way here)."""
    chooser = chooser_for(  # at batch 2: alone in the batch, a new request is tested anyway
        "mixtral-8x7b-h100", min_population_requests=0, test_budget=1.0, new_request_test_every=1000
    )
    traffic = _AfterLowTraffic(chooser, batch=2)
    assert not any(traffic.run("b", 64, accepts=False)) and not any(traffic.run("c", 96, accepts=False))
    # The traffic's figure is stale now (no drafting for 128 iterations): the next one is tested.
    high = traffic.run("high", 64, accepts=True)
    assert all(high[-16:]), high  # ... and drafts on
    assert chooser.best_spec_tokens(np.array([chooser.gauges()["policy_acceptance"]]), np.array([-1])) == [0]
    assert any(traffic.run("next", 32, accepts=True))  # the traffic's figure says K = 0, the last test: draft


@pytest.mark.parametrize("is_away", [False, True])
def test_a_buckets_test_budget_back_off_is_forgotten_once_the_batch_has_been_away(is_away: bool) -> None:
    """Served on the regime pair, synthetic at batch 1 after prose (at batch 1, then 4 to 32) ran 983 of its
    1001 steps untested at K = 0, where static K = 3 paid 1.21x: batch 1's test budget read 0.6% spent,
    over a share that prose's failing tests had backed off to 0.5%, and over the budget every new request
    starts untested. A bucket the batch left for test_budget_backoff_away iterations has its whole share
    back; where the load stays, the back-off stays."""
    chooser = chooser_for("mixtral-8x7b-h100", min_population_requests=0, test_floor_iterations=NO_FLOOR)
    traffic = _AfterLowTraffic(chooser)
    budget = chooser.test_budget
    budget.add(1, 20.0, 0.25)  # batch 1's forced tests cost 1.25% of its window ...
    for _ in range(budget.max_backoff):
        budget.verdict(1, is_drafting=False)  # ... and ended at K = 0: the share is backed off to 0.5%
    assert not budget.allows(1)
    if is_away:  # at batch 4, plain, for longer than test_budget_backoff_away
        ids = [f"away{i}" for i in range(4)]
        for _ in range(chooser.config.test_budget_backoff_away + 1):
            chooser.choose(ids)
            requests = [RequestIterationStats(r, 0, 0, 1, 10) for r in ids]
            chooser.observe(IterationStats(traffic.step, 4, requests, 4, 0.0, 0.05, 0.0))
            traffic.step += 1
        for r in ids:
            chooser.release(r)
    assert budget.allows(1) == is_away
    drafted = [any(traffic.run(name, 48, accepts=True)) for name in "bcde"]
    assert any(drafted) == is_away, drafted


@pytest.mark.parametrize(
    ("counts_alike", "first_misses", "restores"),
    [(False, 0, False), (True, 0, True), (True, 1, False)],
)
def test_a_test_whose_request_would_pay_in_a_batch_like_it_restores_the_test_budget(
    counts_alike: bool, first_misses: int, restores: bool
) -> None:
    """Served on the regime pair (vLLM backend), synthetic at batch 16 after prose: the one request tested in
    the first wave accepted 0.91 and was set at K = 0, since among 15 requests at the traffic's 0.5 it alone
    could not repay the batch's draft step. Read as a failed test, it kept the test budget backed off, and the
    cell's 47 later requests started untested at K = 0 (auto 0.95x off where static K = 4 ran 1.28x). Its
    verdict for the traffic is that a batch of requests like it would draft: the budget is whole again and the
    next wave is tested. A request that missed one of its 8 drafts is estimated at 0.76, where a batch like it
    would draft, but not one standard error lower (0.63): no verdict for the traffic rests on that. (`counts_alike`
    False: the verdict as it was, K > 0 alone.)"""
    # A dense target at batch 16: a plain step 24.8 ms; one request drafting K = 1 adds 23% (5% more tokens),
    # all of them at K = 1 add 59% (76-86% more tokens at acceptance 0.76-0.86).
    params = CostParams(
        fixed_s=0.02, per_expert_s=0.0, per_token_s=0.0003, draft_fixed_s=0.005, draft_per_token_s=0.0003
    )
    truth = CostModel(CostModelConfig(RoutingConfig(0, 0)), params)
    chooser = BatchAwareChooser(
        BatchAwareConfig(min_population_requests=0, new_request_test_every=16),
        CostModel(CostModelConfig(RoutingConfig(0, 0)), params),
    )
    if not counts_alike:
        chooser._pays_alike = lambda estimator, batch_size, times: False  # type: ignore[method-assign]
    step = 0
    num_drafted: dict[str, int] = {}

    def observe(ks: dict[str, int], accepts: set[str], num_low: int) -> None:
        """Accepting requests take every draft after their first `first_misses` drafting iterations, the
        others 3 in 10."""
        nonlocal step
        requests = []
        for r, k in ks.items():
            if r in accepts:
                accepted = k if num_drafted.get(r, 0) >= first_misses else 0
            else:
                accepted = int((num_low + 1) * 0.3) - int(num_low * 0.3) if k else 0
            num_drafted[r] = num_drafted.get(r, 0) + (k > 0)
            requests.append(RequestIterationStats(r, k, accepted, accepted + 1, 10))
        draft_s, verify_s, other_s = truth.phase_times(len(ks), max(ks.values()), sum(ks.values()))
        chooser.observe(
            IterationStats(step, len(ks), requests, len(ks) + sum(ks.values()), draft_s, verify_s, other_s)
        )
        step += 1

    # Traffic at 0.3, drafting K = 1 (not through tests): the figure new requests start from.
    for wave_index in range(8):
        ids = [f"low{wave_index}-{j}" for j in range(16)]
        for i in range(8):
            observe(dict.fromkeys(ids, 1), set(), i)
        for request_id in ids:
            chooser.release(request_id)
    budget = chooser.test_budget
    budget.add(16, 10.0, 0.08)  # earlier forced tests spent 0.8% of the time ...
    budget.verdict(16, is_drafting=False)  # ... and one ended at K = 0: the share is backed off to 1%
    assert budget.allows(16)

    def wave(name: str) -> dict[str, int]:
        """A wave of requests that accept: each one's drafting iterations."""
        ids = [f"{name}{j}" for j in range(16)]
        drafted = dict.fromkeys(ids, 0)
        for i in range(40):
            chosen = chooser.choose(ids)
            observe(chosen, set(ids), i)
            for r, k in chosen.items():
                drafted[r] += k > 0
        for request_id in ids:
            chooser.release(request_id)
        return drafted

    first = wave("a")
    assert [r for r, n in first.items() if n] == ["a15"]  # the one sampled, tested and set at K = 0 ...
    assert first["a15"] == chooser.config.test_iterations
    assert budget.allows(16) == restores  # ... restores the budget only as a batch like it would draft
    second = wave("b")
    assert sum(n > 0 for n in second.values()) == (16 if restores else 0)


@pytest.mark.parametrize("test_every", [4, 1000])
def test_one_in_new_request_test_every_new_requests_is_tested_where_the_traffic_says_k_zero(
    test_every: int,
) -> None:
    """Served on the regime pair, synthetic at batch 4 after prose started its first 4 requests untested at
    K = 0 (the traffic's figure, 0.54, under the break-even) and ran about half its steps plain: the figure is
    fed by tests alone. Within the test budget, every new_request_test_every-th new request is tested."""
    chooser = chooser_for(
        "mixtral-8x7b-h100", min_population_requests=0, test_budget=1.0, new_request_test_every=test_every
    )
    traffic = _AfterLowTraffic(chooser, batch=2)  # alone in the batch, a new request is tested anyway
    # Short requests that accept nothing, two at a time, within 128 iterations: the traffic's figure stays
    # fresh. Every fourth new request is tested: the second of the second pair and of the fourth. (Had a
    # tested one accepted everything, the next new request would be tested too: a batch of requests like it
    # would draft, `test_a_test_whose_request_would_pay_in_a_batch_like_it_restores_the_test_budget`.)
    tested = [any(traffic.run(name, 24, accepts=False)) for name in "bcde"]
    assert tested == ([False, True, False, True] if test_every == 4 else [False] * 4)


def test_a_request_alone_in_the_batch_is_tested_at_once_where_the_traffic_says_k_zero() -> None:
    """Served on the regime pair (session 36), synthetic at batch 1 after prose ran its first three requests
    untested at K = 0 (a third of the cell's steps plain), and each request tested after them waited 8
    steps for others to probe with, plain, although alone in the batch nobody could join its draft steps.
    Alone, a new request is tested every time within the test budget (its life is all of the throughput),
    and at once."""
    chooser = chooser_for("mixtral-8x7b-h100", min_population_requests=0, test_budget=1.0)
    traffic = _AfterLowTraffic(chooser)
    figure = chooser.gauges()["policy_acceptance"]
    assert chooser.best_spec_tokens(np.array([figure]), np.array([-1])) == [0]  # the premise: K = 0
    num_test = chooser.config.test_iterations
    for name in "bcde":
        assert traffic.run(name, 24, accepts=False)[:num_test] == [1] * num_test


def test_the_traffic_acceptance_is_not_the_last_request_alone_at_batch_1() -> None:
    """At batch 1 each new request looked like a change of phase: one request at 0.3 after others at 0.85
    set the acceptance new requests start from to its own (0.26 in the vLLM backend's replay), and every
    later request started at K = 0, untested for its life."""
    chooser = chooser_for("mixtral-8x7b-h100", min_population_requests=0)
    for i, accepted in enumerate([4, 4, 4, 0]):  # three requests that accept every draft, then one none
        request_id = f"r{i}"
        chooser.choose([request_id])
        for step in range(30):
            requests = [RequestIterationStats(request_id, 4, accepted, accepted + 1, 10)]
            chooser.observe(IterationStats(step, 1, requests, 5, 0.01, 0.02, 0.0))
        chooser.release(request_id)
    assert chooser.gauges()["policy_acceptance"] > 0.8


def _closed_loop(
    chooser: BatchAwareChooser,
    num_iterations: int,
    *,
    batch: int,
    lifetime: int,
    lag: bool,
    accepts: bool = False,
    draft_s: float = 0.2,
) -> tuple[list[dict[str, int]], list[float]]:
    """A closed loop of `batch` requests of `lifetime` iterations each, every draft rejected (or with
    `accepts`, every draft accepted), where a drafting iteration costs 3x a plain one (`draft_s` beyond its
    0.1 s: the vLLM backend at concurrency 32, the drafter over the padded batch and its catch-up). With
    `lag`, each choice is verified an iteration later, as vLLM does. Returns the verified K of every
    iteration and its seconds."""
    ages = dict.fromkeys((f"r{i}" for i in range(batch)), 0)
    next_id, held = batch, dict.fromkeys(ages, 0)
    verified_ks: list[dict[str, int]] = []
    times: list[float] = []
    for i in range(num_iterations):
        chosen = chooser.choose(list(ages))
        ks = {r: held.get(r, 0) for r in ages} if lag else chosen
        held = chosen
        verified_ks.append(ks)
        seconds = draft_s if any(ks.values()) else 0.0
        times.append(0.1 + seconds)
        accepted = dict.fromkeys(ks, 0) if not accepts else ks
        requests = [
            RequestIterationStats(r, k, accepted[r], accepted[r] + 1, 100 + ages[r]) for r, k in ks.items()
        ]
        num_tokens = batch + sum(ks.values())
        chooser.observe(IterationStats(i, batch, requests, num_tokens, seconds, 0.1, 0.0))
        for r in list(ages):
            ages[r] += 1
            if ages[r] == lifetime:  # finished: a new request takes its slot
                chooser.release(r)
                del ages[r]
                ages[f"r{next_id}"], next_id = 0, next_id + 1
    return verified_ks, times


def test_forced_tests_spend_at_most_the_test_budget() -> None:
    """Where drafting does not pay and each test makes the whole batch draft at 3x a step's cost (the vLLM
    backend at prose concurrency 32), tests stay within the budget's share of the time; without the budget,
    every generation of new requests was tested once the traffic's last test was 128 iterations old."""
    budget, window = 0.02, 1000
    shares = {}
    for test_budget in (budget, 1.0):
        chooser = chooser_for(
            "mixtral-8x7b-h100",
            test_budget=test_budget,
            test_budget_iterations=window,
            min_population_requests=0,
        )
        _, times = _closed_loop(chooser, 3000, batch=32, lifetime=64, lag=True)
        settled = times[window:]  # after the start (the first tests and the cost model's learning)
        # A drafting iteration's net cost: 0.2 s beyond the plain step whose token it also commits.
        shares[test_budget] = sum(t - 0.1 for t in settled) / sum(settled)
    # A test starts while the cost is within the budget, so one test (9 iterations, with vLLM's lag) may
    # overshoot it by a test's cost over the budget's window.
    assert shares[budget] <= budget + 9 * 0.2 / (window * 0.1), shares
    assert shares[1.0] > 2 * shares[budget], shares


def test_the_test_budget_backs_off_while_forced_tests_find_nothing_and_recovers_when_one_does() -> None:
    """Where drafting never pays, the full budget was a standing cost (served on the demo pair at 16 / 32,
    auto's tests cost 1-5% of each cell); after forced tests in a row end at K = 0 it spends a quarter. When
    the traffic turns to drafts that pay, the next forced test finds it (here 73 iterations after the turn)
    and restores the budget."""
    budget, window = 0.02, 1000
    shares, choosers = {}, {}
    for backoff in (0, 2):
        chooser = chooser_for(
            "mixtral-8x7b-h100",
            test_budget=budget,
            test_budget_iterations=window,
            test_budget_backoff=backoff,
            min_population_requests=0,
            test_floor_iterations=NO_FLOOR,
        )
        _, times = _closed_loop(chooser, 4000, batch=32, lifetime=64, lag=True)
        settled = times[2 * window :]
        shares[backoff] = sum(t - 0.1 for t in settled) / sum(settled)
        choosers[backoff] = chooser
    assert choosers[2].test_budget.share_of(32) == budget / 4
    assert shares[2] <= budget / 4 + 9 * 0.2 / (window * 0.1), shares  # a test's overshoot, as above
    assert shares[0] > 2 * shares[2], shares
    # The traffic turns: every draft is accepted, and drafting pays even at 3x a plain step's cost.
    verified, _ = _closed_loop(choosers[2], 2000, batch=32, lifetime=64, lag=True, accepts=True)
    drafting = [i for i, ks in enumerate(verified) if sum(k > 0 for k in ks.values()) > 16]
    assert drafting and drafting[0] < 500, drafting[:1]
    assert choosers[2].test_budget.share_of(32) > budget / 4  # restored (a later verdict may halve it once)


@pytest.mark.parametrize("draft_scale", [1.0, 30.0, 300.0])
@pytest.mark.parametrize("preset", ["mixtral-8x7b-h100", "qwen2-57b-a14b-h100"])
def test_drafting_could_pay_where_the_search_drafts_a_batch_that_accepts_every_draft(
    preset: str, draft_scale: float
) -> None:
    """`_could_pay` reads the time table as `best_k_vector` does (itself checked against brute force): at
    acceptance just below 1, the search drafts exactly where drafting could pay."""
    verdicts = set()
    for batch in (1, 2, 4, 8, 16, 32):
        for bar in (0.0, 0.05, 0.5):
            chooser = chooser_for(preset, draft_scale=draft_scale, min_predicted_gain=bar)
            times = chooser._time_table(batch)
            best = chooser.best_spec_tokens(np.full(batch, 1.0 - 1e-9), np.full(batch, -1), times)
            could_pay = chooser._could_pay(batch, times)
            assert could_pay == (max(best) > 0), (batch, bar, best)
            verdicts.add(could_pay)
    if draft_scale == 300.0:
        assert verdicts == {True, False}  # the premise: both verdicts occur


def test_no_forced_test_starts_where_drafting_would_not_pay_even_were_every_draft_accepted() -> None:
    """Where a drafting iteration costs 6x a plain one (the demo pair at batch 16 / 32, where the draft costs
    half a target step: no static K paid there even at synthetic's acceptance), once drafting's cost is
    measured at the batch size no acceptance a test could find makes the batch draft at K_max = 4 (the
    served one), and tests stop. At 3x, where K = 4 at full acceptance would pay, forced tests go on within
    the test budget."""
    window = 1000
    drafting = {}
    for draft_s in (0.2, 0.5):
        chooser = chooser_for(
            "mixtral-8x7b-h100", max_spec_tokens=4, min_population_requests=0, test_budget_iterations=window
        )
        verified, _ = _closed_loop(chooser, 3000, batch=32, lifetime=64, lag=True, draft_s=draft_s)
        assert sum(any(ks.values()) for ks in verified[:window]) >= chooser.config.test_iterations  # measured
        drafting[draft_s] = sum(any(ks.values()) for ks in verified[window:])
        times = chooser._time_table(32)
        assert chooser._could_pay(32, times) == (draft_s == 0.2)  # the premise: the model learned the cost
    assert drafting[0.5] == 0, drafting
    assert drafting[0.2] > 0, drafting


@pytest.mark.parametrize("expiry", [512, 10**9])
def test_a_verdict_that_drafting_could_not_pay_expires(expiry: int) -> None:
    """Drafting measured at 21x a plain step at batch 1 (a contended stretch) leaves the model sure that no
    acceptance makes drafting pay there, and no test starts (`_could_pay`); with nothing drafting, nothing
    corrects the model. Once nothing has drafted for `could_not_pay_expiry_iterations`, a test runs again,
    measures drafting at 1.2x with every draft accepted, and the batch drafts; a verdict that never expires
    keeps it plain for good (served on the demo pair: batch 1 plain for a server's life, synthetic
    included)."""
    chooser = chooser_for(
        "mixtral-8x7b-h100",
        max_spec_tokens=4,
        min_population_requests=0,
        could_not_pay_expiry_iterations=expiry,
    )
    contended, _ = _closed_loop(chooser, 300, batch=1, lifetime=64, lag=True, draft_s=2.0)
    assert sum(any(ks.values()) for ks in contended) >= chooser.config.test_iterations  # measured
    assert not chooser._could_pay(1, chooser._time_table(1))  # the premise: the verdict
    verified, _ = _closed_loop(chooser, 4000, batch=1, lifetime=64, lag=True, draft_s=0.02, accepts=True)
    drafting = sum(any(ks.values()) for ks in verified)
    if expiry == 512:
        assert drafting > 1000 and chooser._could_pay(1, chooser._time_table(1)), drafting
    else:
        assert drafting == 0


def test_the_test_budget_of_a_large_batch_is_not_spent_at_batch_1() -> None:
    """Each test at batch 32 pays the whole batch's catch-up; with one budget for the server, served on the
    regime pair, prose at 32 spent it and synthetic at batch 1 after it ran untested at K = 0 (no request
    tested until the 8th of 16). Per batch-size bucket, a new request at batch 1 is tested at once."""
    chooser = chooser_for("mixtral-8x7b-h100", min_population_requests=0)
    verified, _ = _closed_loop(chooser, 600, batch=32, lifetime=64, lag=True)
    assert any(any(ks.values()) for ks in verified)  # the premise: batch 32 ran its tests
    assert chooser.gauges()["policy_test_cost_share"] > 0.5 * chooser.config.test_budget
    assert chooser.gauges()["policy_acceptance"] < 0.3  # K = 0 at the traffic's acceptance
    assert chooser.best_spec_tokens(np.array([chooser.gauges()["policy_acceptance"]]), np.array([-1])) == [0]
    # A forced test waits for others to draft with for up to max_test_wait iterations.
    first = [chooser.choose(["solo"])["solo"] for _ in range(chooser.config.max_test_wait + 1)]
    assert first[-1] > 0, first


def test_a_step_far_beyond_its_predicted_time_does_not_spend_the_test_budget() -> None:
    """One step of a forced test at 20x its time (served on the regime pair: 459 ms where 26 ms was
    predicted) counts at most `max_test_time_over_predicted` times the prediction. Charged whole, it spent
    the budget at batch 1 for longer than a request lives, and the next retest never came."""

    def retests(max_over: float, slow_at: int | None) -> list[int]:
        chooser = chooser_for(
            "mixtral-8x7b-h100", min_population_requests=0, max_test_time_over_predicted=max_over
        )
        drafting = []
        for i in range(1000):  # one long request: its first test (forced, rejected), then retests
            k = chooser.choose(["r"])["r"]
            seconds = chooser.cost_model.iteration_time([k]) * (20.0 if i == slow_at else 1.0)
            requests = [RequestIterationStats("r", k, 0, 1, 10)]
            chooser.observe(IterationStats(i, 1, requests, 1 + k, 0.0, seconds, 0.0))
            if k:
                drafting.append(i)
        assert drafting[:1] == [0]  # the premise: the first test is forced (alone, at once)
        assert slow_at is None or slow_at in drafting
        return drafting[chooser.config.test_iterations :]

    slow_at = 4  # in the first test
    assert retests(3.0, None)  # the premise: without the slow step, it is retested
    assert retests(3.0, slow_at)
    assert not retests(1e9, slow_at)


def test_tests_the_optimum_covers_do_not_spend_the_test_budget() -> None:
    """The budget bounds forced tests (the optimum would not draft): over it, a new request the model puts at
    K = 0 starts untested. Counting every test, served on the regime pair, the tests of new requests at
    batch 1 that the traffic's then high acceptance put at K >= 1, and that lost (prose), spent 12% of the
    time against a 2% budget, and synthetic at batch 1 after them ran 1040 steps untested at K = 0 where
    static K = 4 paid 1.32x. A test the optimum covers is the model's own choice, which the guard judges."""
    chooser = chooser_for("mixtral-8x7b-h100", min_population_requests=0)
    step = 0

    def run(request_id: str, num_iterations: int, accepts: bool) -> list[int]:
        nonlocal step
        ks: list[int] = []
        for _ in range(num_iterations):
            k = chooser.choose([request_id])[request_id]
            accepted = k if accepts else 0
            requests = [RequestIterationStats(request_id, k, accepted, accepted + 1, 10)]
            catch_up = 500 if k and not any(ks) and not accepts else 0  # the losing test's: long
            draft_s = 0.005 * k + 0.0008 * catch_up
            chooser.observe(
                IterationStats(
                    step,
                    1,
                    requests,
                    1 + k,
                    draft_s,
                    0.02 + 0.004 * k,
                    0.0,
                    num_draft_prefill_tokens=catch_up,
                )
            )
            ks.append(k)
            step += 1
        chooser.release(request_id)
        return ks

    for i in range(2):  # the traffic accepts every draft: a new request's test is covered by the optimum
        run(f"good{i}", 16, accepts=True)
    for i in range(4):
        assert run(f"bad{i}", 16, accepts=False)[0] > 0  # the premise: its test drafts at once, and loses
    # Counted, the losing tests' net cost would be 4% of the time, the winning ones' gains taken off.
    assert chooser.gauges()["policy_test_cost_share"] <= chooser.config.test_budget


def test_a_test_drafts_in_consecutive_iterations_when_verified_a_step_later() -> None:
    """vLLM verifies a choice one step later: a test counted from its verification left the batch plain in
    the step between and paid the drafter's catch-up twice."""
    chooser = chooser_for("mixtral-8x7b-h100", test_budget=1.0, min_population_requests=0)
    verified, _ = _closed_loop(chooser, 400, batch=32, lifetime=1000, lag=True)
    drafting = [any(ks.values()) for ks in verified]
    runs = [len(list(group)) for is_drafting, group in itertools.groupby(drafting) if is_drafting]
    assert runs and min(runs) >= chooser.config.test_iterations, runs


def test_a_steady_plain_batch_skips_the_search_and_decides_the_same() -> None:
    """Where every request is set at K = 0, the search runs every `steady_iterations` (and when a retest falls
    due or the batch changes): the decisions are those of a search every iteration, at a fraction of them.
    Without the plain optimum's shape probe (`BatchAwareChooser._plain_shape_probe`), which reads the cost
    model's fit: skipped, a probe that a refit makes cheap enough comes up to `steady_iterations` later."""
    workload = WorkloadConfig(4, (0.2,), mean_output_tokens=300, num_iterations=800, time_noise=0.0)
    runs = []
    for steady in (1, 8):
        chooser = chooser_for(
            "mixtral-8x7b-h100", steady_iterations=steady, test_budget=1.0, shape_probe_rows=0
        )
        recorder = Recorder(chooser)
        simulate(MIXTRAL, recorder, workload)
        runs.append((recorder.decisions, chooser.num_searches))
    (every, num_every), (steady_decisions, num_steady) = runs
    assert steady_decisions == every
    assert num_every == len(every)
    num_plain = sum(not any(d.values()) for d in every)
    assert num_plain > len(every) / 2  # mostly plain: acceptance 0.2 does not pay at batch 4
    # Searched: every drafting iteration, the iterations while a new request waits for its test, and one in 8
    # of the rest (278 of 800 here).
    assert num_steady < len(every) / 2
    assert any(d.values() for d in steady_decisions)  # retests still fall due and draft


class AlwaysSearches(BatchAwareChooser):
    """The chooser that never reuses its last optimum."""

    def choose(self, request_ids: Sequence[str]) -> dict[str, int]:
        self._optimum_key = None
        return super().choose(request_ids)


class WithoutExpertCounts(Recorder):
    """Observes as vLLM's scheduler reports: no expert counts (the cost model changes at refits alone)."""

    def observe(self, stats: IterationStats) -> None:
        super().observe(msgspec.structs.replace(stats, experts_touched=[]))


@pytest.mark.parametrize("acceptance", [(0.2,), (0.3, 0.9), (0.6,)])
def test_reusing_the_last_optimum_decides_as_searching_again(acceptance: tuple[float, ...]) -> None:
    """The last optimum is reused only while nothing it was computed from changed: the decisions of a closed
    loop on the demo pair's measured costs are those of a search at every call, and plain batches with a
    test pending reused it."""
    demo = MEASURED_PRESETS["demo-moe-cpu"]
    workload = WorkloadConfig(16, acceptance, mean_output_tokens=80, num_iterations=500, time_noise=0.0)
    runs = []
    for cls in (AlwaysSearches, BatchAwareChooser):
        chooser = cls(
            BatchAwareConfig(test_budget=1.0), CostModel(CostModelConfig(demo.routing), demo.measured)
        )
        recorder = WithoutExpertCounts(chooser)
        simulate(demo, recorder, workload)
        runs.append((recorder.decisions, chooser.num_reused_optima))
    (searched, num_never), (reused, num_reused) = runs
    assert reused == searched
    assert num_never == 0
    if acceptance == (0.2,):  # mostly plain; at 0.6 every iteration drafts, and rates change every time
        assert num_reused > 0


def test_requests_that_draft_on_do_not_set_the_traffic_acceptance_alone() -> None:
    """A request that keeps drafting is one that accepts well; counted per drafting iteration, one at 0.9
    for 200 iterations outweighed ten at 0.2 tested for 8 each, and new requests started drafting where most
    requests do not pay (the demo pair's prose served at batch 1)."""
    chooser = chooser_for("mixtral-8x7b-h100", min_population_requests=0)
    step = 0

    def draft(request_id: str, num_iterations: int, acceptance: float) -> None:
        nonlocal step
        for i in range(num_iterations):
            accepted = int((i + 1) * acceptance) - int(
                i * acceptance
            )  # 0 or 1 at K = 1, on average `acceptance`
            requests = [RequestIterationStats(request_id, 1, accepted, accepted + 1, 10)]
            chooser.observe(IterationStats(step, 1, requests, 2, 0.01, 0.02, 0.0))
            step += 1

    for i in range(10):
        draft(f"low{i}", 8, 0.2)
        draft("high", 20, 0.9)  # drafts on beside them
    # Per request, ten of eleven accept 0.2 (the high one's first iterations are the oldest, decayed most);
    # counted per iteration, the high one's 200 made it 0.69.
    assert 0.15 < chooser.gauges()["policy_acceptance"] < 0.3


def test_a_lagging_request_drafts_only_where_the_rest_of_its_life_repays_its_catch_up() -> None:
    ids = [f"r{i}" for i in range(16)]

    def first_choice(catch_up: int, remaining: int, **overrides: Any) -> set[int]:
        chooser = chooser_for("mixtral-8x7b-h100", **overrides)
        chooser.set_outlook({r: RequestOutlook(catch_up, remaining) for r in ids})
        ks = set(chooser.choose(ids).values())
        assert chooser.num_unrepaid == (ks == {0})  # only the catch-up kept it plain
        return ks

    # Batch 16 on an MoE target (H100) at the traffic's starting acceptance: drafting pays per iteration,
    # and the drafter's prefill costs 1.5 us a token.
    assert 0 not in first_choice(0, 4)  # caught up: nothing to repay, even with 4 tokens left
    assert 0 not in first_choice(1000, 100_000)  # a long life repays a 1000-token history
    assert first_choice(1000, 4) == {0}  # 4 tokens do not: the batch stays plain
    assert 0 not in first_choice(1000, 4, weighs_catch_up=False)  # (the ablation weighs one iteration)
    # The remainder that repays a catch-up grows with it.
    break_even = [
        next(n for n in (2**e for e in range(20)) if 0 not in first_choice(catch_up, n))
        for catch_up in (100, 1000, 10_000)
    ]
    assert break_even[0] < break_even[1] < break_even[2]


def test_a_request_that_joins_a_drafting_batch_near_its_end_waits_at_k_zero() -> None:
    chooser = chooser_for("mixtral-8x7b-h100")
    ids = [f"r{i}" for i in range(16)]
    outlook = {r: RequestOutlook(0, 1000) for r in ids[:15]}  # caught up, drafting
    outlook["r15"] = RequestOutlook(5000, 2)  # a 5000-token history, 2 tokens left
    chooser.set_outlook(outlook)
    ks = chooser.choose(ids)
    assert ks["r15"] == 0 and min(ks[r] for r in ids[:15]) > 0
    assert chooser.num_unrepaid == 1


def test_a_request_that_joins_after_the_choice_gets_the_optimum_with_the_others_kept() -> None:
    # vLLM's scheduler chooses a step's K while the step before runs; a request whose prompt completes in the
    # step joins after that choice and drafts at its end (`choose_joined`).
    chooser = chooser_for("mixtral-8x7b-h100")
    ids = [f"r{i}" for i in range(16)]
    chosen = chooser.choose(ids[:15])
    assert set(chosen.values()) == {3}  # batch 16 on an MoE target at the traffic's starting acceptance
    # The K it would have had in the choice of the whole batch.
    assert chooser.choose_joined(["r15"], chosen) == {"r15": 3}
    assert chooser_for("mixtral-8x7b-h100").choose(ids)["r15"] == 3
    # In a batch chosen plain, its drafts alone would make all 16 requests wait for the draft steps.
    assert chooser.choose_joined(["r16"], dict.fromkeys(ids[:15], 0)) == {"r16": 0}
    # The others' K are kept, not searched again: two joining a batch whose others were chosen K = 1 get
    # what pays beside them (each draft step is paid for the others already).
    beside_k1 = chooser.choose_joined(["r17", "r18"], dict.fromkeys(ids[:14], 1))
    assert set(beside_k1) == {"r17", "r18"} and min(beside_k1.values()) >= 1


def test_a_request_joins_drafting_only_where_the_whole_batch_would_draft_it() -> None:
    # On the demo pair's measured costs (the draft half a target step), a batch of 16 at the traffic's
    # starting acceptance decodes plain. Beside two others kept at K = 1 (chosen for a batch of 2, or tests),
    # the draft steps look paid and the joined requests' drafts pay for themselves; the next choice, the whole
    # batch's, would put them back at K = 0 after their prompts went through the drafter.
    demo = MEASURED_PRESETS["demo-moe-cpu"]
    chooser = BatchAwareChooser(BatchAwareConfig(), CostModel(CostModelConfig(demo.routing), demo.measured))
    ids = [f"r{i}" for i in range(16)]
    rates = np.full(16, 0.5)  # where a new request starts before any traffic (the acceptance prior's 1 : 1)
    assert set(chooser.best_spec_tokens(rates, np.full(16, -1))) == {0}
    assert min(chooser.best_spec_tokens(rates, np.array([1, 1] + [-1] * 14))[2:]) >= 1  # the search alone
    assert chooser.choose_joined(ids[2:], {"r0": 1, "r1": 1}) == dict.fromkeys(ids[2:], 0)


@settings(max_examples=150, deadline=None)
@given(
    batch=st.sampled_from([1, 2, 4, 8, 16, 32]),
    num_joined=st.integers(1, 4),
    rates=st.lists(st.floats(0.0, 0.999), min_size=36, max_size=36),
    preset=st.sampled_from(sorted(PRESETS) + ["demo-moe-cpu"]),
    draft_scale=st.sampled_from([1.0, 30.0, 300.0]),
)
def test_a_request_that_joins_a_plain_batch_gets_what_the_search_gives_it(
    batch: int, num_joined: int, rates: list[float], preset: str, draft_scale: float
) -> None:
    """Beside others all at K = 0, `choose_joined` skips the search where the joined requests' drafts could not
    pay even were every one accepted at the highest of their acceptances (`_could_pay`, capped at their
    number): what it gives them is what the search gives them."""
    num_others = max(batch - num_joined, 0)
    others = {f"r{i}": 0 for i in range(num_others)}
    joined = [f"j{i}" for i in range(num_joined)]
    rate_array = np.array(rates[: num_others + num_joined])

    def chooser_at_rates() -> BatchAwareChooser:
        if preset == "demo-moe-cpu":
            demo = MEASURED_PRESETS[preset]
            params = dataclasses.replace(
                demo.measured, draft_per_token_s=draft_scale * demo.measured.draft_per_token_s
            )
            chooser = BatchAwareChooser(BatchAwareConfig(), CostModel(CostModelConfig(demo.routing), params))
        else:
            chooser = chooser_for(preset, draft_scale=draft_scale)
        chooser._rates = lambda states: rate_array  # type: ignore[method-assign]
        return chooser

    def searched(chooser: BatchAwareChooser) -> tuple[dict[str, int], int]:
        """`choose_joined`'s answer and how many searches it ran."""
        calls = []
        search = chooser.best_spec_tokens
        chooser.best_spec_tokens = lambda *args: calls.append(1) or search(*args)  # type: ignore[method-assign]
        return chooser.choose_joined(joined, others), len(calls)

    skipping, unskipped = chooser_at_rates(), chooser_at_rates()
    unskipped._could_pay = lambda *args: True  # type: ignore[method-assign]
    (answer, num_searches), (search_answer, num_unskipped_searches) = searched(skipping), searched(unskipped)
    assert answer == search_answer and num_unskipped_searches > 0
    size = num_others + num_joined
    highest = float(rate_array[num_others:].max())
    could_pay = skipping._could_pay(size, skipping._time_table(size), num_joined, highest)
    assert (num_searches > 0) == could_pay
    if not could_pay:
        assert set(answer.values()) == {0}


@settings(max_examples=150, deadline=None)
@given(
    batch=st.sampled_from([1, 2, 3, 8, 16, 32]),
    num_drafting=st.integers(1, 32),
    rates=st.lists(st.floats(0.0, 0.999), min_size=32, max_size=32),
    preset=st.sampled_from(sorted(PRESETS)),
    bar=st.sampled_from([0.0, 0.05]),
    draft_scale=st.sampled_from([1.0, 30.0, 300.0]),
)
def test_the_bound_at_the_highest_acceptance_holds_the_search_to_plain_decoding(
    batch: int, num_drafting: int, rates: list[float], preset: str, bar: float, draft_scale: float
) -> None:
    """`could_beat_plain` bounds `best_k_vector` (itself checked against brute force above): where it says
    drafting could not pay at the highest of the drafting requests' acceptances, the search drafts none of them;
    at one acceptance for all it is the search's verdict itself, so it is no bound that always says yes."""
    chooser = chooser_for(preset, draft_scale=draft_scale, min_predicted_gain=bar)
    times = chooser._time_table(batch)
    num_drafting = min(num_drafting, batch)
    rate_array = np.array(rates[:batch])
    forced = np.array([0] * (batch - num_drafting) + [-1] * num_drafting)  # the others kept plain
    highest = float(rate_array[batch - num_drafting :].max())
    if not could_beat_plain(times, batch, num_drafting, highest):
        assert max(best_k_vector(rate_array, forced, times, 4)) == 0
    uniform = np.full(batch, highest)
    best = best_k_vector(uniform, np.full(batch, -1), times, 4)
    assert could_beat_plain(times, batch, batch, highest) == (max(best) > 0), (highest, best)


@settings(max_examples=60, deadline=None)
@given(
    set_ks=st.lists(st.sampled_from([None, 0, 0, 0, 1, 2]), min_size=32, max_size=32),
    rates=st.lists(st.floats(0.0, 0.999), min_size=32, max_size=32),
    batch=st.sampled_from([4, 16, 32]),
    draft_scale=st.sampled_from([1.0, 3.0, 30.0]),
)
def test_the_optimum_skips_its_search_only_where_the_search_would_answer_plain(
    set_ks: list[int | None], rates: list[float], batch: int, draft_scale: float
) -> None:
    """`_optimum_with_hysteresis` answers plain decoding without the search where no request is set above K = 0
    and drafting could not pay at the batch's highest acceptance: its answer is the search's, every time, and
    on the demo pair's measured costs the skip happens."""
    demo = MEASURED_PRESETS["demo-moe-cpu"]
    params = dataclasses.replace(
        demo.measured, draft_per_token_s=draft_scale * demo.measured.draft_per_token_s
    )
    skipping = BatchAwareChooser(BatchAwareConfig(), CostModel(CostModelConfig(demo.routing), params))
    searching = BatchAwareChooser(BatchAwareConfig(), CostModel(CostModelConfig(demo.routing), params))
    searching._could_pay = lambda *args, **kwargs: True  # type: ignore[method-assign]

    def searched(chooser: BatchAwareChooser) -> tuple[list[int], int]:
        """The optimum and how many searches it ran."""
        states = [RequestState(chooser.config, 0.5) for _ in range(batch)]
        for state, set_k in zip(states, set_ks, strict=False):
            state.set_k = set_k
        calls = []
        search = chooser.best_spec_tokens
        chooser.best_spec_tokens = lambda *args: calls.append(1) or search(*args)  # type: ignore[method-assign]
        times = chooser._time_table(batch)
        return chooser._optimum_with_hysteresis(states, np.array(rates[:batch]), times), len(calls)

    (answer, num_searches), (search_answer, _) = searched(skipping), searched(searching)
    assert answer == search_answer
    is_set = any(set_ks[:batch])
    could = skipping._could_pay(batch, skipping._time_table(batch), acceptance=max(rates[:batch]))
    assert (num_searches == 0) == (not is_set and not could)


@settings(max_examples=80, deadline=None)
@given(
    batch=st.sampled_from([1, 2, 4, 16, 32]),
    rates=st.lists(st.floats(0.0, 0.999), min_size=32, max_size=32),
    catch_up=st.lists(st.integers(0, 3000), min_size=32, max_size=32),
    preset=st.sampled_from(sorted(PRESETS)),
    draft_scale=st.sampled_from([1.0, 300.0, 3000.0]),
    margin=st.sampled_from([0.05, 0.3]),
)
def test_the_plain_probe_finds_nothing_at_any_rates_where_its_bound_says_none_could_be_cheap(
    batch: int, rates: list[float], catch_up: list[int], preset: str, draft_scale: float, margin: float
) -> None:
    """`_unmeasured_plain_shapes` bounds `_plain_shape_probe`: where it says no K it would probe could be cheap
    (every draft accepted, no request lagging), the probe without the bound finds none either, at any rates and
    catch-up, so `choose` need not read the rates; with the bound the probe is the same as without it. At the
    highest rate, caught up, the bound's verdict is the probe's, so it is no bound that always says no."""
    chooser = chooser_for(preset, draft_scale=draft_scale, shape_probe_margin=margin, max_spec_tokens=4)
    chooser.cost_model.num_shape_rows = lambda num, k: 100 if k == 0 else 0  # type: ignore[method-assign]
    ids = [f"r{i}" for i in range(batch)]
    times = chooser._time_table(batch)
    unmeasured, could_be_cheap = chooser._unmeasured_plain_shapes(batch, times)
    assert unmeasured == [1, 2, 3, 4]
    highest = np.full(batch, chooser.config.acceptance.max_rate)
    for outlook, rate_array in [
        ({r: RequestOutlook(c, 64) for r, c in zip(ids, catch_up, strict=False)}, np.array(rates[:batch])),
        ({}, highest),
    ]:
        chooser.set_outlook(outlook)
        chooser._unmeasured_shapes[batch] = (unmeasured, could_be_cheap)
        bounded = chooser._plain_shape_probe(ids, rate_array, times)
        chooser._unmeasured_shapes[batch] = (unmeasured, True)  # the probe without the bound
        unbounded = chooser._plain_shape_probe(ids, rate_array, times)
        assert bounded == unbounded
        if not could_be_cheap:
            assert unbounded == 0
    assert bool(unbounded) == could_be_cheap  # (at the highest rate, caught up)


def test_a_plain_choice_reads_no_rates_where_drafting_could_not_pay() -> None:
    """Where drafting could not pay at this batch size were every draft accepted, and no K of the plain probe
    could be cheap, `choose` answers plain without reading the requests' rates (the choice's CPU, on the step's
    time on 2 cores); where it could pay, it reads them and drafts."""
    ids = [f"r{i}" for i in range(32)]

    def choice(draft_scale: float) -> tuple[dict[str, int], int]:
        """The choice for a batch past its tests (only the optimum and the probe decide), and the rates read."""
        chooser = chooser_for("mixtral-8x7b-h100", draft_scale=draft_scale, test_budget=0.0)
        for r in ids:
            chooser._state(r).test_remaining = 0
        calls: list[int] = []
        rates = chooser._rates
        chooser._rates = lambda states: calls.append(1) or rates(states)  # type: ignore[method-assign]
        return chooser.choose(ids), len(calls)

    (plain, plain_reads), (drafting, drafting_reads) = choice(3000.0), choice(1.0)
    assert set(plain.values()) == {0} and plain_reads == 0
    assert max(drafting.values()) > 0 and drafting_reads > 0


def test_the_kept_bounds_answer_as_the_bound_does(monkeypatch: pytest.MonkeyPatch) -> None:
    """`_could_pay` keeps, per batch size and cost model version, the highest acceptance found not to pay and
    the lowest found to pay (the bound grows with the acceptance): its answers are the bound's, and most come
    without reading the table."""
    import policy.batch_aware

    chooser = chooser_for("mixtral-8x7b-h100", draft_scale=30.0)
    times = chooser._time_table(32)
    calls = []
    monkeypatch.setattr(
        policy.batch_aware,
        "could_beat_plain",
        lambda *args: calls.append(1) or could_beat_plain(*args),
    )
    verdicts = set()
    for acceptance in np.random.default_rng(0).uniform(0.0, 1.0, 200):
        could = chooser._could_pay(32, times, acceptance=acceptance)
        assert could == could_beat_plain(times, 32, 32, acceptance), acceptance
        verdicts.add(could)
    assert verdicts == {True, False} and len(calls) < 40, len(calls)
    num_calls = len(calls)
    chooser._could_pay(32, times, acceptance=0.5)
    assert len(calls) == num_calls  # kept
    chooser.cost_model.version += 1  # as a refit does: the bounds go with the tables
    chooser._could_pay(32, chooser._time_table(32), acceptance=0.5)
    assert len(calls) == num_calls + 1


def test_a_choice_builds_the_tables_a_joining_request_reads_in_the_next_step() -> None:
    """`choose` (made ahead, off the step's path, in vLLM) builds the time tables of the batch sizes that
    requests joining or leaving make of its batch in the next step, where `choose_joined` (on the step's path)
    reads them: a table is built once per version of the cost model."""
    demo = MEASURED_PRESETS["demo-moe-cpu"]
    model = CostModel(CostModelConfig(demo.routing), demo.measured)
    chooser = BatchAwareChooser(BatchAwareConfig(), model)
    ids = [f"r{i}" for i in range(30)]
    chosen = chooser.choose(ids)
    grids = []
    time_grid = model.time_grid
    model.time_grid = lambda *args: grids.append(args[0]) or time_grid(*args)  # type: ignore[method-assign]
    # Two requests finished and one joined; two joined; no table built.
    assert chooser.choose_joined(["j0"], {r: chosen[r] for r in ids[:28]}) == {"j0": 0}
    assert chooser.choose_joined(["j1", "j2"], chosen) == {"j1": 0, "j2": 0}
    assert grids == []
    chooser.choose_joined(["j3", "j4", "j5"], chosen)  # a size 3 above: built then
    assert grids == [33]


def test_a_choice_made_while_a_request_ends_drafts_as_the_steps_after_that_cue_pay() -> None:
    """The outlook's prompt cue (a request ending) picks the share of steps with prompts that the choice's step
    is priced at (`CostModel.phase_times`): where verification tokens cost a third as much in steps with
    prompts and prompts follow that cue alone, the batch drafts more after it, and at acceptances where it
    decodes plain otherwise."""
    plain_s = MIXTRAL.cost_params().per_token_s
    _, _, model = _with_prompt_steps(prompt_token_s=2 * plain_s, spec_token_s=-4 * plain_s, is_cued=True)
    chooser = BatchAwareChooser(BatchAwareConfig(min_predicted_gain=0.0), model)
    ids = [f"r{i}" for i in range(8)]
    drafts_after_cue_alone = []
    for acceptance in np.linspace(0.05, 0.95, 46):
        rates, chosen = np.full(8, acceptance), {}
        for cue, remaining in ((1, 1), (0, 40)):
            chooser.set_outlook({r: RequestOutlook(0, remaining if r == "r0" else 40) for r in ids})
            chosen[cue] = chooser.best_spec_tokens(rates, np.full(8, -1))
            free = chooser.tokens_per_second(rates, chosen[cue])
            assert free >= chooser.tokens_per_second(rates, [0] * 8) * (1 - 1e-9)
        assert sum(chosen[1]) >= sum(chosen[0]), acceptance
        drafts_after_cue_alone.append(max(chosen[1]) > 0 and max(chosen[0]) == 0)
    assert any(drafts_after_cue_alone)


def test_a_joined_request_s_bound_decides_both_ways_on_the_demo_pair() -> None:
    """The premise of the skip: on the demo pair's measured costs (the draft half a target step), one request
    drafting alone in a plain batch could not pay at batch 32 even were every draft accepted, and could at
    batch 1; a whole batch drafting could pay at 32 (so the whole batch's bound alone would not skip)."""
    demo = MEASURED_PRESETS["demo-moe-cpu"]
    chooser = BatchAwareChooser(BatchAwareConfig(), CostModel(CostModelConfig(demo.routing), demo.measured))
    assert not chooser._could_pay(32, chooser._time_table(32), 1)
    assert chooser._could_pay(1, chooser._time_table(1), 1)
    assert chooser._could_pay(32, chooser._time_table(32))


@pytest.mark.parametrize("floor", [32, 10_000])
def test_over_the_test_budget_a_test_starts_once_nothing_drafted_for_the_floor(floor: int) -> None:
    # Over a backed-off budget, once the traffic's acceptance says K = 0, every new request starts untested at
    # K = 0, and the traffic is measured again only as the budget's window forgets; the floor tests a new
    # request once the batch has run plain for `test_floor_iterations`, within the budget's whole share.
    # (Without the plain optimum's shape probe: at the traffic's first figure it probes K = 2, unmeasured at
    # batch 1, for one iteration of each new request, which restarts the floor's count.)
    chooser = chooser_for("mixtral-8x7b-h100", test_floor_iterations=floor, shape_probe_rows=0)
    budget = chooser.test_budget
    budget.add(1, 20.0, 0.25)  # batch 1's forced tests cost 1.25% of its window ...
    for _ in range(budget.max_backoff):
        budget.verdict(1, is_drafting=False)  # ... and ended at K = 0: the share is backed off to 0.5%
    assert not budget.allows(1) and budget.allows(1, is_backed_off=False)
    truth, rng = MIXTRAL.truth(), np.random.default_rng(0)
    drafted = []
    for i in range(400):
        request_id = f"r{i // 8}"  # a new request every 8 iterations, alone in the batch
        ks = chooser.choose([request_id])
        requests = [RequestIterationStats(r, k, 0, 1, 10) for r, k in ks.items()]  # accepts nothing
        chooser.observe(_measure(truth, MIXTRAL, i, requests, rng, noise=0.0))
        if i % 8 == 7:
            chooser.release(request_id)
        drafted.append(ks[request_id] > 0)
    starts = [i for i, d in enumerate(drafted) if d and (i == 0 or not drafted[i - 1])]
    if floor > len(drafted):
        assert not starts
    else:  # tests of new requests (alone: at once), each after `floor` plain iterations
        assert starts[:4] == [floor + i * (floor + 8) for i in range(4)], starts
        # The budget's whole share bounds them (the last test started within it may overrun it a little).
        assert budget.spent_by_bucket()[0] < 1.1 * chooser.config.test_budget


def test_a_retest_falls_due_only_where_the_request_has_the_life_left_to_use_it() -> None:
    """A retest informs only its own request. Served on the regime pair (prose at concurrency 16 after
    synthetic, 64-token requests), a wave set at K = 0 was retested for its last 5-6 tokens, and the batch
    drafted those iterations for nothing. Here a request that rejects every draft is retested after its
    back-off where it has tokens left for more than two tests, and not where it has fewer."""

    def test_starts(max_tokens: int) -> list[int]:
        chooser = chooser_for(
            "mixtral-8x7b-h100", set_iterations=16, new_request_zero_verdicts=0, test_budget=1.0
        )
        ks = []
        for i in range(max_tokens):  # one token committed an iteration (every draft rejected)
            chooser.set_outlook({"r": RequestOutlook(0, max_tokens - i)})
            k = chooser.choose(["r"])["r"]
            ks.append(k)
            seconds = chooser.cost_model.iteration_time([k])  # the model's own: it learns nothing new
            requests = [RequestIterationStats("r", k, 0, 1, 10)]
            chooser.observe(IterationStats(i, 1, requests, 1 + k, 0.0, seconds, 0.0))
        return [i for i in range(len(ks)) if ks[i] > 0 and (i == 0 or ks[i - 1] == 0)]

    # Tested at once (8 iterations), then K = 0 for its back-off after one K = 0 verdict: retested at 40.
    assert test_starts(400)[:2] == [0, 40]
    # With 56 tokens, 16 are left there: fewer than two tests commit (8 iterations at about 1.1 tokens each).
    assert test_starts(56) == [0]


@pytest.mark.parametrize(
    ("num_spec_tokens", "num_accepted", "num_iterations"),
    [(1, 1, 8), (1, 0, 8), (4, 0, 8), (4, 3, 2), (4, 4, 2), (2, 1, 4)],
)
def test_a_test_phase_lasts_its_acceptance_trials_not_its_iterations(
    num_spec_tokens: int, num_accepted: int, num_iterations: int
) -> None:
    """A test judges `test_iterations` acceptance trials: each accepted draft and the rejection that ends
    them. At the probe's K = 1 that is one an iteration; a test the optimum covers at K = 4 judges as much
    in fewer. Counted in iterations, such a test went on alone at K = 1 once the optimum let its batch go
    plain (served on the demo pair at mixed 4: 5-7 steps a wave at nearly twice a plain step's time)."""
    config = BatchAwareConfig()
    assert config.test_iterations == 8
    phases = TestPhases(config, chooser_for("mixtral-8x7b-h100").cost_model)
    state = RequestState(config, 0.5)
    ends = []
    for i in range(12):
        request = RequestIterationStats("r", num_spec_tokens, num_accepted, num_accepted + 1, 100 + i)
        phases.observe(IterationStats(i, 1, [request], 1 + num_spec_tokens, 0.01, 0.02, 0.0), [state])
        ends.append(state.test_remaining == 0)
    assert ends.index(True) + 1 == num_iterations
    # A pending test (its request not drafting yet) judges nothing.
    waiting = RequestState(config, 0.5)
    phases.observe(
        IterationStats(12, 1, [RequestIterationStats("w", 0, 0, 1, 100)], 1, 0.0, 0.02, 0.0), [waiting]
    )
    assert waiting.test_remaining == config.test_iterations


@pytest.mark.parametrize("has_prompts", [False, True])
@pytest.mark.parametrize("measured_over_model", [1.5, 4.0])
def test_the_test_budget_charges_a_tests_catch_up_and_its_steps_beside_prompts(
    has_prompts: bool, measured_over_model: float
) -> None:
    """vLLM's drafter catches a test's request up at the end of the step before its drafts are verified, where
    no request verifies drafts; and a step that carries other requests' prompts takes a time no model of
    decoding answers for. The budget charged neither: served on the demo pair at concurrency 16 / 32, the
    catch-up of tests of whole waves (2 000-3 000 tokens, steps of 130-500 ms against 16.5 ms plain) went
    uncharged. Now a starting test's catch-up counts, and beside prompts the cost model's time stands for the
    step's, whatever the step took; a test the optimum covers is still the guard's to answer for."""
    config = BatchAwareConfig()
    model = chooser_for("mixtral-8x7b-h100").cost_model
    plain_s = model.plain_time(2)
    for k, catch_up in [(0, 2000), (1, 0)]:  # a test's catch-up step, then its first drafts verified
        predicted_s = model.iteration_time([k, 0]) + model.params.draft_prefill_per_token_s * catch_up
        measured_s = measured_over_model * predicted_s
        requests = [RequestIterationStats("t", k, 0, 1, 100), RequestIterationStats("o", 0, 0, 1, 100)]
        stats = IterationStats(
            0,
            2,
            requests,
            2 + k,
            0.0,
            measured_s,
            0.0,
            num_draft_prefill_tokens=catch_up,
            num_prefill_tokens=300 if has_prompts else 0,
        )
        for is_forced in (True, False):
            phases = TestPhases(config, model)
            tester, other = RequestState(config, 0.5), RequestState(config, 0.5)
            tester.test_started, tester.is_forced_test = True, is_forced  # chosen to probe
            other.test_remaining, other.set_k = 0, 0
            phases.observe(stats, [tester, other])
            # (a fresh budget: its cost over its time is this iteration's charge over its counted seconds)
            counted_s = measured_s if has_prompts else min(measured_s, 3.0 * predicted_s)
            charged_s = phases.budget.spent_by_bucket()[batch_bucket(2)] * counted_s
            if not is_forced:
                assert charged_s == 0.0
            elif has_prompts:
                assert charged_s == pytest.approx(predicted_s - plain_s)
            else:  # at most max_test_time_over_predicted (3) times the model's
                assert charged_s == pytest.approx(min(measured_s, 3.0 * predicted_s) - plain_s)
