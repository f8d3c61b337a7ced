import dataclasses

import numpy as np
import pytest

from policy.cost_fit import CostFit
from policy.cost_model import CostParams

TRUTH = CostParams(
    fixed_s=2e-3,
    per_expert_s=5e-5,
    per_token_s=1e-4,
    draft_fixed_s=1e-3,
    draft_per_token_s=2e-5,
    other_s=3e-4,
    other_per_token_s=1e-5,
    per_seq_s=4e-5,
    draft_call_s=5e-4,
    draft_prefill_per_token_s=1e-5,
)


def experts(tokens: np.ndarray) -> np.ndarray:
    return 64.0 * (1.0 - (1.0 - 2.0 / 64.0) ** tokens)  # uniform routing, top-2 of 64, one layer


def rows_of(params: CostParams, shapes: list[tuple[int, int, int]]) -> np.ndarray:
    """Rows as `CostModel._record` makes them, timed exactly by the parametric form."""
    rows = []
    for n, (batch, steps, prefill) in enumerate(shapes):
        spec = batch * steps
        tokens = batch + spec
        draft = steps * params.draft_fixed_s + spec * params.draft_per_token_s
        draft += params.draft_prefill_per_token_s * prefill if steps else 0.0
        verify = (
            params.fixed_s
            + params.per_seq_s * batch
            + params.per_expert_s * float(experts(np.array(tokens, dtype=np.float64)))
            + params.per_token_s * tokens
        )
        other = params.other_s + params.draft_call_s * (steps > 0) + params.other_per_token_s * tokens
        rows.append((batch, steps, spec, np.nan, prefill, draft, verify, other, n, batch * (steps > 0)))
    return np.array(rows, dtype=np.float64)


def test_fit_recovers_the_params_that_timed_the_rows() -> None:
    shapes = [(b, k, p) for b in (1, 2, 4, 8, 16, 32) for k in range(5) for p in (0, 100 * (k > 0))]
    start = dataclasses.replace(
        TRUTH, **{f.name: 2 * getattr(TRUTH, f.name) for f in dataclasses.fields(TRUTH)}
    )
    fit = CostFit(draft_padding="none", min_samples=8, prior_weight=1e-4)
    fitted = fit.fit(rows_of(TRUTH, shapes), start, start, experts)
    for name, value in fitted.items():
        assert value == pytest.approx(getattr(TRUTH, name), rel=0.03), name


def test_a_group_without_enough_rows_keeps_its_current_values() -> None:
    plain_only = rows_of(TRUTH, [(b, 0, 0) for b in (1, 2, 4, 8, 16, 32) for _ in range(3)])
    current = dataclasses.replace(TRUTH, draft_fixed_s=7e-3, draft_per_token_s=9e-4, fixed_s=1e-2)
    fitted = CostFit(draft_padding="none", min_samples=8, prior_weight=1e-4).fit(
        plain_only, current, current, experts
    )
    assert (fitted["draft_fixed_s"], fitted["draft_per_token_s"]) == (7e-3, 9e-4)  # no drafting rows
    assert fitted["fixed_s"] == pytest.approx(TRUTH.fixed_s, rel=0.1)  # the verify group had 18
