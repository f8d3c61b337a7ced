"""A request's opening verification (its first decode step's drafts, generated positions 1 to K) is counted
apart from its own acceptance (`BatchAwareConfig.opening_apart`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest

from policy.batch_aware import BatchAwareChooser, BatchAwareConfig
from policy.cost_model import CostModel
from policy.cost_model_config import CostModelConfig
from policy.routing import RoutingConfig
from policy.stats import IterationStats, RequestIterationStats
from tests.policy.regime_loop import REGIME_BATCH_1, regime_batch_1_seconds


def _chooser(**overrides: object) -> BatchAwareChooser:
    model = CostModel(CostModelConfig(RoutingConfig(0, 0), draft_padding="batch"), REGIME_BATCH_1)
    return BatchAwareChooser(BatchAwareConfig(max_spec_tokens=4, **overrides), model)  # type: ignore[arg-type]


def _observe(chooser: BatchAwareChooser, iteration: int, request_id: str, k: int, accepted: int) -> None:
    draft_s, verify_s = regime_batch_1_seconds(k)
    requests = [RequestIterationStats(request_id, k, accepted, accepted + 1, 100 + iteration)]
    chooser.observe(IterationStats(iteration, 1, requests, 1 + k, draft_s, verify_s, 0.0))


def _serve(
    chooser: BatchAwareChooser,
    seed: int,
    num_requests: int = 24,
    length: int = 48,
    opening: Callable[[int], float] = lambda r: 0.05,
    first_choices: list[int] | None = None,
) -> float:
    """Requests alone in the batch, each `length` tokens, whose first generated token after the prompt's
    (position 1) the draft guesses `opening(r)` of the time (5%) and every later one 85% (the regime pair's
    code prompts, teacher-forced: 17% at position 1, 92-96% at 2-4). Returns the tokens per second, at
    `regime_batch_1_seconds` (at 0.85 a draft K = 4 runs 1.28x plain decoding; at 0.57 every K loses), and
    appends each request's first K to `first_choices`."""
    rng = np.random.default_rng(seed)
    tokens, seconds, iteration = 0, 0.0, 0
    for r in range(num_requests):
        request_id, generated = f"r{r}", 1  # the prompt's step committed position 0
        while generated < length:
            k = chooser.choose([request_id])[request_id]
            if first_choices is not None and generated == 1:
                first_choices.append(k)
            accepted = 0
            while accepted < k and rng.random() < (opening(r) if generated + accepted == 1 else 0.85):
                accepted += 1
            _observe(chooser, iteration, request_id, k, accepted)
            iteration += 1
            generated += accepted + 1
            tokens += accepted + 1
            seconds += sum(regime_batch_1_seconds(k))
        chooser.release(request_id)
    return tokens / seconds


def _open(chooser: BatchAwareChooser, num_requests: int, opening: int, later: int) -> None:
    """Requests alone in the batch, each verifying K = 2 five times: its opening accepting `opening` drafts,
    then `later` each."""
    for i in range(num_requests):
        for step, accepted in enumerate([opening] + [later] * 4):
            _observe(chooser, 5 * i + step, f"old{i}", 2, accepted)
        chooser.release(f"old{i}")


def test_openings_unlike_the_traffic_feed_their_own_figure_not_the_request() -> None:
    """After 6 requests whose openings accepted nothing and whose later drafts all, a request's rejected
    opening leaves its estimate and the traffic's where they were; where the openings accepted as later
    drafts, or without the setting, it counts as its own."""
    chooser = _chooser()
    _open(chooser, 6, 0, 2)
    traffic, opening = chooser.gauges()["policy_acceptance"], chooser.gauges()["policy_opening_acceptance"]
    assert opening < 0.3 < 0.8 < traffic  # the premise
    state = chooser._state("r")
    before = state.estimator.rate
    _observe(chooser, 100, "r", 4, 0)  # its opening: every draft rejected
    assert (state.estimator.rate, chooser.gauges()["policy_acceptance"]) == (before, traffic)
    assert chooser.gauges()["policy_opening_acceptance"] < opening
    _observe(chooser, 101, "r", 4, 0)  # a later verification: its own
    assert state.estimator.rate < before
    for alike, setting in ((True, True), (False, False)):
        other = _chooser(opening_apart=setting)
        _open(other, 6, 2 if alike else 0, 2)
        other_state = other._state("r")
        other_before = other_state.estimator.rate
        _observe(other, 100, "r", 4, 0)
        assert other_state.estimator.rate < other_before, (alike, setting)


def test_a_request_first_choice_is_made_at_the_openings_figure_and_its_test_starts_after() -> None:
    """Where openings accept nothing and later drafts 0.6, a new request (alone: tested at once) opens plain,
    and tests from its second choice on; without the setting, its test drafts its opening."""
    choices = {}
    for is_apart in (True, False):
        chooser = _chooser(
            opening_apart=is_apart, opening_sample_every=0
        )  # (no request opens at the traffic's)
        for i in range(8):  # openings rejected; later drafts 3 of 5 (at K = 1)
            for step, accepted in enumerate([0, 1, 0, 1, 1, 0]):
                _observe(chooser, 6 * i + step, f"old{i}", 1, accepted)
            chooser.release(f"old{i}")
        first = chooser.choose(["new"])["new"]
        _observe(chooser, 100, "new", first, 0)
        choices[is_apart] = (first, chooser.choose(["new"])["new"])
    assert choices[True][0] == 0 and choices[True][1] >= 1, choices
    assert choices[False][0] >= 1, choices


@pytest.mark.parametrize("seed", range(3))
def test_openings_that_accept_little_do_not_set_requests_at_k_0(seed: int) -> None:
    """Alone in the batch, each request's estimate is its own; counted there, a rejected opening takes it
    from the traffic's 0.85 toward break-even, and drafting stops where it pays 1.28x (the regime pair's
    code 1: auto 0.89x of static K = 3). Apart, the batch drafts on: more tokens per second."""
    apart = _serve(_chooser(), seed)
    counted = _serve(_chooser(opening_apart=False), seed)
    assert apart > 1.05 * counted, (apart, counted)


def test_openings_that_come_to_accept_well_are_learnt_again() -> None:
    """Openings accept 5% for 16 requests, then as later drafts do (85%): one request in
    `opening_sample_every` (8) opens at the traffic's figure all the same, the openings' figure learns the change
    and the last requests open drafting. Without the samples, an opening chosen at the low figure is plain,
    verifies nothing, and every later opening stays plain."""
    firsts: dict[int, list[int]] = {}
    figures = {}
    for every in (8, 0):
        chooser = _chooser(opening_sample_every=every)
        firsts[every] = []
        _serve(
            chooser,
            0,
            num_requests=64,
            opening=lambda r: 0.05 if r < 16 else 0.85,
            first_choices=firsts[every],
        )
        figures[every] = chooser.gauges()["policy_opening_acceptance"]
    assert sum(k == 0 for k in firsts[0][8:16]) >= 7, firsts[0]  # the premise: openings apart and plain
    assert all(k == 0 for k in firsts[0][16:]) and figures[0] < 0.2, (firsts[0], figures[0])
    assert all(k > 0 for k in firsts[8][-8:]) and figures[8] > 0.6, (firsts[8], figures[8])
