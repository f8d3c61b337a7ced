"""The K vector search's pieces (`policy.k_search`) against plain restatements of what they compute."""

from __future__ import annotations

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from policy.k_search import StepTimes, expected_etrs, with_hysteresis

MAX_K = 3


def table(batch: int, per_step: float, per_draft: float) -> np.ndarray:
    """Seconds by (max K, sum K): a step of 1 s, `per_step` per draft step, `per_draft` per verified draft."""
    m, total = np.meshgrid(np.arange(MAX_K + 1), np.arange(batch * MAX_K + 1), indexing="ij")
    return 1.0 + per_step * m + per_draft * total


@settings(max_examples=150, deadline=None)
@given(
    rates=st.lists(st.floats(0.0, 0.97), min_size=1, max_size=6),
    best=st.lists(st.integers(0, MAX_K), min_size=6, max_size=6),
    previous=st.lists(st.integers(0, MAX_K), min_size=6, max_size=6),
    per_step=st.sampled_from([0.0, 0.05, 0.3]),
    per_draft=st.sampled_from([0.0, 0.01, 0.1]),
    hysteresis=st.sampled_from([0.0, 0.02, 0.1]),
    pad_s=st.sampled_from([0.0, 0.05]),
)
def test_hysteresis_moves_a_request_where_moving_it_alone_pays(
    rates: list[float],
    best: list[int],
    previous: list[int],
    per_step: float,
    per_draft: float,
    hysteresis: float,
    pad_s: float,
) -> None:
    """The previous vector stays unless the best gains more than `hysteresis`; then each request moves from its
    previous K to the best vector's where that, with the others at best, gains more than its share of it. With
    padded drafts (`pad_s` for each draft beyond its request's K, max K for every request that drafts)."""
    num = len(rates)
    rate_array, best_array, previous_array = np.array(rates), np.array(best[:num]), np.array(previous[:num])
    grid = table(num, per_step, per_draft)

    def per_second(ks: np.ndarray) -> float:
        padded = sum(ks.max() - k for k in ks if k > 0)
        return float(expected_etrs(rate_array, ks).sum()) / (float(grid[ks.max(), ks.sum()]) + pad_s * padded)

    got = with_hysteresis(rate_array, best_array, previous_array, StepTimes(grid, pad_s), hysteresis)
    margin = per_second(best_array) / per_second(previous_array) - (1.0 + hysteresis)
    assume(abs(margin) > 1e-9)  # a tie within rounding may go either way
    if margin < 0.0:
        assert got == [int(k) for k in previous_array]
        return
    for r in range(num):
        alone = best_array.copy()
        alone[r] = previous_array[r]
        gain = per_second(best_array) / per_second(alone) - 1.0
        if abs(gain - hysteresis / num) > 1e-9:
            assert got[r] == (previous_array[r] if gain <= hysteresis / num else best_array[r]), r
        else:
            assert got[r] in (previous_array[r], best_array[r]), r
