"""MoESD's tables against the simulator's truth: the engine fitted on Table 1 reproduces it and predicts
Table 2 (expected peak speedups, the fast analytic form of what `bench.simulate --paper moesd` simulates)."""

from __future__ import annotations

import numpy as np
import pytest

from bench.paper_moesd import BATCH_SIZES, TABLE_1, TABLE_2, Cell, acceptance_rate, expected_curve
from policy.presets import PAPER_PRESETS


def peak(cell: Cell) -> tuple[float, int]:
    curve = expected_curve(PAPER_PRESETS[cell.preset], cell)
    best = int(np.argmax(curve))
    return curve[best], BATCH_SIZES[best]


def test_table_1_which_the_engine_was_fitted_on_is_within_15_percent_everywhere() -> None:
    errors = [peak(cell)[0] / cell.speedup - 1.0 for cell in TABLE_1]
    assert max(abs(e) for e in errors) < 0.15, errors


def test_table_2_is_predicted_within_15_percent_but_for_two_h800_rows() -> None:
    """The known misses: 2 x H800, HumanEval, temperature 1, gamma 2 and 3 (about +20%: the simulator's H800
    verification is cheaper than the paper measured there; the same setup at temperature 0 is within 11%)."""
    misses = []
    for cell in TABLE_2:
        error = peak(cell)[0] / cell.speedup - 1.0
        assert abs(error) < 0.25, (cell, error)
        if abs(error) >= 0.15:
            misses.append((cell.preset, cell.dataset, cell.temperature, cell.gamma))
    assert set(misses) <= {
        ("qwen2-57b-a14b-2xh800", "humaneval", 1.0, 2),
        ("qwen2-57b-a14b-2xh800", "humaneval", 1.0, 3),
    }, misses


def test_humaneval_greedy_rows_peak_at_a_medium_batch_size() -> None:
    for cell in TABLE_1 + TABLE_2:
        if cell.dataset == "humaneval" and cell.temperature == 0.0:
            assert peak(cell)[1] >= 8, cell


@pytest.mark.parametrize(("sigma", "gamma"), [(0.94, 2), (0.55, 4), (0.35, 4)])
def test_acceptance_rate_inverts_the_expected_tokens_per_round(sigma: float, gamma: int) -> None:
    rate = acceptance_rate(sigma, gamma)
    assert sum(rate**j for j in range(gamma + 1)) == pytest.approx(sigma * (gamma + 1), rel=1e-6)
