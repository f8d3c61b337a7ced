"""Utility tracking and acceptance estimation on synthetic traces."""

from __future__ import annotations

import numpy as np
import pytest

from policy.utility import AcceptanceConfig, AcceptanceEstimator, UtilityTracker, expected_etr


def sample_accepted(rng: np.random.Generator, rate: float, num_spec_tokens: int) -> int:
    """Draft tokens accepted before the first rejection, at most K."""
    rejected = rng.random(num_spec_tokens) >= rate
    return int(np.argmax(rejected)) if rejected.any() else num_spec_tokens


@pytest.mark.parametrize("rate", [0.0, 0.3, 0.8])
@pytest.mark.parametrize("num_spec_tokens", [0, 1, 4])
def test_expected_etr_matches_closed_form_and_sampling(rate: float, num_spec_tokens: int) -> None:
    closed_form = (1 - rate ** (num_spec_tokens + 1)) / (1 - rate)
    assert expected_etr(rate, num_spec_tokens) == pytest.approx(closed_form)
    rng = np.random.default_rng(0)
    sampled = np.mean([sample_accepted(rng, rate, num_spec_tokens) + 1 for _ in range(4000)])
    assert sampled == pytest.approx(closed_form, rel=0.03)


def test_tracker_averages_a_window_per_k() -> None:
    tracker = UtilityTracker(window=2)
    for etr, cost in [(9.0, 9.0), (2.0, 1.0), (4.0, 2.0)]:
        tracker.record(3, etr, cost)
    assert tracker.num_samples(3) == 2
    assert tracker.utility(3) == pytest.approx(6.0 / 3.0)
    assert tracker.utility(0) == 1.0
    assert tracker.utility(2) is None
    tracker.clear(3)
    assert tracker.etr(3) is None
    with pytest.raises(ValueError, match="cost=0"):
        tracker.record(1, 1.0, 0.0)


@pytest.mark.parametrize("rate", [0.2, 0.6, 0.9])
def test_acceptance_estimate_converges_at_any_k(rate: float) -> None:
    rng = np.random.default_rng(1)
    estimator = AcceptanceEstimator(AcceptanceConfig(decay=0.995, fast_decay=0.9))
    for i in range(2000):
        num_spec_tokens = 1 + i % 5
        estimator.record(num_spec_tokens, sample_accepted(rng, rate, num_spec_tokens))
    assert estimator.rate == pytest.approx(rate, abs=0.05)


def test_acceptance_estimate_follows_a_phase_change() -> None:
    rng = np.random.default_rng(2)
    estimator = AcceptanceEstimator(AcceptanceConfig())
    for _ in range(200):
        estimator.record(3, sample_accepted(rng, 0.9, 3))
    assert estimator.rate > 0.8
    for _ in range(15):
        estimator.record(3, sample_accepted(rng, 0.2, 3))
    assert estimator.rate < 0.4
    assert estimator.num_changes >= 1


def test_acceptance_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="fast_decay=0.99"):
        AcceptanceConfig(decay=0.9, fast_decay=0.99)
    with pytest.raises(ValueError, match="max_rate=1.0"):
        AcceptanceConfig(max_rate=1.0)
