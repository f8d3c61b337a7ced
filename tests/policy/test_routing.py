"""N(t) against a Monte Carlo of uniform top-k routing, saturation counts, measured corrections."""

from __future__ import annotations

import numpy as np
import pytest

from policy.routing import ExpertCounts, RoutingConfig, expected_experts, saturation_tokens


def monte_carlo_experts(num_tokens: int, num_experts: int, top_k: int, num_trials: int, seed: int) -> float:
    """Mean distinct experts when each token picks top_k distinct experts uniformly at random."""
    rng = np.random.default_rng(seed)
    picks = rng.random((num_trials, num_tokens, num_experts)).argsort(axis=-1)[..., :top_k]
    touched = np.zeros((num_trials, num_experts), dtype=bool)
    np.put_along_axis(touched, picks.reshape(num_trials, -1), True, axis=1)
    return float(touched.sum(axis=1).mean())


@pytest.mark.parametrize(("num_experts", "top_k"), [(8, 2), (64, 8), (60, 4)])
@pytest.mark.parametrize("num_tokens", [1, 2, 5, 16, 40])
def test_expected_experts_matches_monte_carlo(num_experts: int, top_k: int, num_tokens: int) -> None:
    simulated = monte_carlo_experts(num_tokens, num_experts, top_k, num_trials=2000, seed=num_tokens)
    formula = float(expected_experts(num_tokens, num_experts, top_k))
    assert formula == pytest.approx(simulated, rel=0.02)


def test_one_token_touches_top_k_and_dense_touches_none() -> None:
    assert float(expected_experts(1, 8, 2)) == pytest.approx(2.0)
    assert np.all(expected_experts([1, 10, 100], 0, 0) == 0.0)


def test_saturation_tokens_match_the_design_numbers() -> None:
    assert saturation_tokens(8, 2, tau=0.95) == 11
    assert saturation_tokens(64, 8, tau=0.95) == 23
    with pytest.raises(ValueError, match="tau"):
        saturation_tokens(8, 2, tau=1.0)


def test_measured_counts_replace_and_correct_the_formula() -> None:
    counts = ExpertCounts(RoutingConfig(num_experts=8, top_k=2, min_samples=2))
    uniform_at_4 = float(expected_experts(4, 8, 2))
    for _ in range(2):
        counts.record(4, 0.8 * uniform_at_4)  # correlated routing: fewer distinct experts
    assert float(counts.predict(4)) == pytest.approx(0.8 * uniform_at_4)
    # Elsewhere the formula is scaled by the nearest measured ratio.
    assert float(counts.predict(16)) == pytest.approx(0.8 * float(expected_experts(16, 8, 2)))


def test_routing_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="top_k=3"):
        RoutingConfig(num_experts=2, top_k=3)
    with pytest.raises(ValueError, match="num_experts=-1"):
        RoutingConfig(num_experts=-1, top_k=1)
