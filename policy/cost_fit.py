"""The cost model's fit (`policy.cost_model`): measured iterations as rows, and the params that explain their
times, group by group (the drafter's, the verify forward's, the rest), by non-negative least squares on
relative residuals pulled weakly toward a prior. A group without enough rows keeps its current values.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike, NDArray

from policy.cost_model_config import DraftPadding

if TYPE_CHECKING:
    from policy.cost_model import CostParams

Array = NDArray[np.float64]
# A measured iteration's row: (batch, max K, sum K, mean experts touched or nan, drafter prefill tokens,
# draft s, verify s, other s, the number of rows recorded before it, requests at K > 0). `CostModel._record`
# makes them.
ROW_SIZE = 10
Nnls = Callable[[Array, Array], tuple[Array, float]]


def padded_drafts(
    padding: DraftPadding, batch: ArrayLike, max_k: ArrayLike, total: ArrayLike, num_drafting: ArrayLike
) -> Array:
    """Drafts the drafter runs beyond the requests' own K (their sum `total`), elementwise (`CostModelConfig.
    draft_padding`): none, max K for every sequence of the batch, or for every sequence that drafts."""
    steps, spec = np.asarray(max_k, dtype=np.float64), np.asarray(total, dtype=np.float64)
    if padding == "batch":
        return steps * np.asarray(batch, dtype=np.float64) - spec
    if padding == "drafting":
        return steps * np.asarray(num_drafting, dtype=np.float64) - spec
    return np.zeros_like(spec)


class CostFit:
    """Fits `CostParams` to rows. `predict_experts(tokens)` stands in for rows without measured expert
    counts; `draft_padding` as in `CostModelConfig`."""

    def __init__(self, *, draft_padding: DraftPadding, min_samples: int, prior_weight: float) -> None:
        self.draft_padding = draft_padding
        self.min_samples = min_samples
        self.prior_weight = prior_weight
        # Imported here, not at module level (`workers` imports `policy` and scipy.optimize takes a while to
        # import), and not at the first fit, which would stall a serving iteration.
        from scipy.optimize import nnls

        self._nnls: Nnls = nnls

    def fit(
        self,
        rows: Sequence[tuple[float, ...]] | Array,
        current: CostParams,
        prior: CostParams,
        predict_experts: Callable[[Array], Array],
    ) -> dict[str, float]:
        """Every param's fitted value, starting from `current` and pulled toward `prior`."""
        table = np.array(rows, dtype=np.float64).reshape(-1, ROW_SIZE).T
        batch, steps, spec, experts, prefill, draft, verify, other, _, drafting = table
        tokens = batch + spec
        experts = np.where(np.isnan(experts), predict_experts(tokens), experts)
        ones = np.ones_like(tokens)
        has_draft = steps > 0
        # An engine that times only the drafter apart (vLLM: verify = the step less the drafter) reports no
        # other time, and its verify times carry what an iteration that verifies drafts costs beyond its
        # tokens (the rejection sampler, the drafts' bookkeeping): the drafter-call term is fitted there.
        # Without it, on a served demo-pair record, the fit put a batch-1 step verifying one draft at 4.8 ms
        # (measured: 5.35 ms, plain 4.6 ms), and drafting looked cheaper than it is.
        verify_terms: tuple[str, ...] = ("fixed_s", "per_seq_s", "per_expert_s", "per_token_s")
        other_terms: tuple[str, ...] = ("other_s", "other_per_token_s", "draft_call_s")
        verify_columns: list[Array] = [ones, batch, experts, tokens]
        other_columns: list[Array] = [ones, tokens, has_draft.astype(np.float64)]
        if not np.any(other > 0.0):
            verify_terms, verify_columns = (
                (*verify_terms, "draft_call_s"),
                [*verify_columns, other_columns[2]],
            )
            other_terms, other_columns = other_terms[:2], other_columns[:2]
        drafted = spec + padded_drafts(self.draft_padding, batch, steps, spec, drafting)
        groups = [  # (design, measured times, parameter names)
            (np.column_stack(verify_columns), verify, verify_terms),
            (
                np.column_stack([steps, drafted, prefill, ones])[has_draft],
                draft[has_draft],
                ("draft_fixed_s", "draft_per_token_s", "draft_prefill_per_token_s", "draft_first_pass_s"),
            ),
            (np.column_stack(other_columns), other, other_terms),
        ]
        fitted: dict[str, float] = {}
        for design, times, names in groups:
            start = tuple(getattr(current, n) for n in names)
            pulled_to = tuple(getattr(prior, n) for n in names)
            fitted.update(zip(names, self._fit_group(design, times, start, pulled_to), strict=True))
        return fitted

    def _fit_group(
        self, design: Array, times: Array, start: tuple[float, ...], prior: tuple[float, ...]
    ) -> tuple[float, ...]:
        """Non-negative least squares on relative residuals, pulled weakly toward `prior`.

        Columns that are zero in every row (no experts on a dense target) keep their start value. The
        residuals are linear in the params, so the bounded problem is solved exactly, in scaled units.
        """
        keep = times > 0.0
        design, times = design[keep], times[keep]
        x = np.array(start, dtype=np.float64)
        active = np.any(design != 0.0, axis=0)
        if len(times) < max(self.min_samples, design.shape[1]) or not active.any():
            return start
        design, target = design[:, active], np.array(prior)[active]
        # Scale of each parameter: its prior, or 1% of what would explain the mean time alone.
        scale = np.where(target > 0.0, target, 1e-2 * float(times.mean()) / np.abs(design).mean(axis=0))
        weight = self.prior_weight
        # Unknowns q = params / scale: rows (design / times) q = 1, and weight * q = weight * target / scale.
        matrix = np.vstack([design * (scale / times[:, None]), weight * np.eye(len(scale))])
        rhs = np.concatenate([np.ones(len(times)), weight * target / scale])
        solution, _ = self._nnls(matrix, rhs)
        x[active] = solution * scale
        return tuple(float(v) for v in x)
