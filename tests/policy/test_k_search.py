"""The K vector search's pieces (`policy.k_search`) against plain restatements of what they compute."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from policy.k_search import (
    MAX_EXACT_COUNTS,
    allowed_counts,
    best_k_vector,
    charge_of,
    expected_etrs,
    with_hysteresis,
)

MAX_K = 3


def table(batch: int, per_drafting: float, per_step: float = 0.05, per_draft: float = 0.01) -> np.ndarray:
    """Seconds by (max K, sum K, requests at K > 0): a step of 1 s, `per_step` per draft step, `per_draft` per
    verified draft, and `per_drafting` per draft step and drafting request."""
    m, total, n = np.meshgrid(
        np.arange(MAX_K + 1), np.arange(batch * MAX_K + 1), np.arange(batch + 1), indexing="ij"
    )
    return 1.0 + per_step * m + per_draft * total + per_drafting * m * n


@settings(max_examples=150, deadline=None)
@given(
    rates=st.lists(st.floats(0.0, 0.97), min_size=1, max_size=6),
    best=st.lists(st.integers(0, MAX_K), min_size=6, max_size=6),
    previous=st.lists(st.integers(0, MAX_K), min_size=6, max_size=6),
    per_drafting=st.sampled_from([0.0, 0.02, 0.2]),
    hysteresis=st.sampled_from([0.0, 0.02, 0.1]),
)
def test_hysteresis_moves_a_request_where_moving_it_alone_pays(
    rates: list[float], best: list[int], previous: list[int], per_drafting: float, hysteresis: float
) -> None:
    """Each request's move from its previous K to the best vector's is weighed with the others at best, its
    step charged for the requests then at K > 0."""
    num = len(rates)
    rate_array, best_array, previous_array = np.array(rates), np.array(best[:num]), np.array(previous[:num])
    times = table(num, per_drafting)

    def per_second(ks: np.ndarray) -> float:
        return float(expected_etrs(rate_array, ks).sum()) / charge_of(times, ks)

    expected = list(previous_array)
    if per_second(best_array) > (1.0 + hysteresis) * per_second(previous_array):
        for r in range(num):
            alone = best_array.copy()
            alone[r] = previous_array[r]
            gain = per_second(best_array) / per_second(alone) - 1.0
            expected[r] = previous_array[r] if gain <= hysteresis / num else best_array[r]
    got = with_hysteresis(rate_array, best_array, previous_array, times, hysteresis)
    assert got == [int(k) for k in expected]


def test_past_the_exact_counts_the_search_scans_an_even_grid_of_drafting_requests() -> None:
    assert list(allowed_counts(5, is_charged_by_drafting=False)) == [5]
    assert list(allowed_counts(5, is_charged_by_drafting=True)) == [0, 1, 2, 3, 4, 5]
    grid = allowed_counts(200, is_charged_by_drafting=True)
    assert grid[0] == 0 and grid[-1] == 200 and len(grid) == MAX_EXACT_COUNTS + 1
    assert np.diff(grid).max() <= -(-200 // MAX_EXACT_COUNTS)
    assert list(allowed_counts(MAX_EXACT_COUNTS, True)) == list(range(MAX_EXACT_COUNTS + 1))


def test_at_a_large_batch_the_most_accepting_requests_draft() -> None:
    """200 requests, 20 of them accepting 0.9 and the rest 0.1, a drafter charged per drafting request: the
    grid's search drafts for the 20 (a count on the grid) and leaves the rest at 0."""
    rates = np.array([0.9] * 20 + [0.1] * 180)
    rng = np.random.default_rng(0)
    order = rng.permutation(len(rates))
    times = table(len(rates), per_drafting=5e-4, per_step=0.01, per_draft=5e-4)
    chosen = np.array(best_k_vector(rates[order], np.full(len(rates), -1), times, MAX_K))
    assert set(chosen[rates[order] == 0.1]) == {0}
    assert chosen[rates[order] == 0.9].min() > 0
