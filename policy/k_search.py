"""The batch's K vector search (`policy.batch_aware`): the maximizer of expected committed tokens per second,
and the hysteresis that keeps a flat optimum from flipping. Pure functions of the requests' acceptance rates and
the predicted iteration times (`StepTimes`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

Array = NDArray[np.float64]


@dataclass(frozen=True)
class StepTimes:
    """A batch's predicted (or charged) iteration seconds: `grid[m, S]` at max K = m and sum K = S, shape
    (max_k + 1, R * max_k + 1), plus `pad_s` for each draft the drafter runs beyond its request's K where it
    drafts max K for every request that drafts (our vLLM worker drafting alone, `CostModel.padded_draft_s`):
    m * n - S of them with n requests at K > 0, which (m, S) alone does not hold."""

    grid: Array
    pad_s: float = 0.0

    def at(self, max_k: ArrayLike, total: ArrayLike, num_drafting: ArrayLike) -> Array:
        """Seconds at max K, sum K and requests at K > 0 (elementwise)."""
        steps, spec = np.asarray(max_k, dtype=np.int64), np.asarray(total, dtype=np.int64)
        return self.grid[steps, spec] + self.pad_s * (steps * np.asarray(num_drafting) - spec)

    def of(self, num_spec_tokens: ArrayLike) -> float:
        """Seconds at this K vector (one entry per request)."""
        k = np.asarray(num_spec_tokens)
        return float(self.at(int(k.max()), int(k.sum()), int(np.count_nonzero(k))))


def best_k_vector(rates: Array, forced: NDArray[np.int_], times: StepTimes, max_k: int) -> list[int]:
    """Maximizer of tokens per second; `forced[r] >= 0` fixes K_r, -1 leaves it free.

    Without padding (`times.pad_s` 0) the iteration time depends on the K vector only through m = max K_r and
    S = sum K_r. For a given (m, S) the expected ETR is largest when the S free draft tokens go to the largest
    marginal gains a_r^j with j <= m (the j-th token of request r adds a_r^j to E[ETR_r]). Scanning every
    (m, S) is exact. With padding, each cell is priced at its own vector's requests at K > 0 (a request's first
    token comes before its later ones in the order), and the vectors whose drafting requests all draft max K
    (no padding; `_whole_requests`) are scanned too. Not exact: at a given (m, S), some requests at max K and
    one below may pay more than either. Against brute force over the cost model's vectors (batch 3-6, K up to
    4, the drafter at 1-100x a preset's; scratch, session 69), the search came within 0.6% of the optimum where
    the largest gains alone came within 1.7%; `tests/policy/test_batch_aware.py` holds it within 1%.
    """
    is_free = forced < 0
    positions = np.arange(1, max_k + 1)
    gains = rates[:, None] ** positions  # (R, max_k): gain of the j-th token
    forced_k = np.where(is_free, 0, forced)
    forced_total = int(forced_k.sum())
    base_etr = len(rates) + float(gains[positions <= forced_k[:, None]].sum())
    # Free gains in descending order; a gain of token j is available when m >= j.
    free_gains = gains[is_free].ravel()
    order = np.argsort(-free_gains, kind="stable")  # (L,) into the (F, max_k) block
    m_values = np.arange(max_k + 1)[:, None]  # (M, 1)
    available = (order % max_k) < m_values  # (M, L)
    # Column 0 is S = 0 (no free tokens); column i + 1 takes the sorted free gains up to position i.
    etr = np.empty((max_k + 1, len(order) + 1))
    etr[:, 0] = base_etr
    np.cumsum(np.where(available, free_gains[order], 0.0), axis=1, out=etr[:, 1:])
    etr[:, 1:] += base_etr
    total = np.empty(etr.shape, dtype=np.int64)
    total[:, 0] = forced_total
    np.cumsum(available, axis=1, out=total[:, 1:])
    total[:, 1:] += forced_total
    if times.pad_s:
        drafting = np.empty(etr.shape, dtype=np.int64)
        drafting[:, 0] = int(np.count_nonzero(forced_k))
        np.cumsum(available & (order % max_k == 0), axis=1, out=drafting[:, 1:])  # first tokens: new requests
        drafting[:, 1:] += drafting[:, :1]
        rate = etr / times.at(m_values, total, drafting)
    else:
        rate = etr / times.grid[m_values, total]
    rate[: int(forced_k.max(initial=0))] = -np.inf  # m must cover the forced K
    best_m, best_pos = divmod(int(np.argmax(rate)), rate.shape[1])
    chosen = order[:best_pos][available[best_m, :best_pos]]
    free_k = np.bincount(chosen // max_k, minlength=int(is_free.sum()))
    if times.pad_s:
        whole_rate, whole = _whole_requests(gains[is_free], forced_k, base_etr, times)
        if whole_rate > rate[best_m, best_pos]:
            free_k = whole
    result = forced_k.copy()
    result[is_free] = free_k
    return [int(k) for k in result]


def _whole_requests(
    free_gains: Array, forced_k: NDArray[np.int_], base_etr: float, times: StepTimes
) -> tuple[float, NDArray[np.int_]]:
    """`best_k_vector`'s vectors in which every free request that drafts drafts max K = m (no padded drafts
    among them): per m, the free requests of most expected tokens over m positions first. The best one's rate
    and its free K."""
    num_free, max_k = free_gains.shape
    forced_total, forced_drafting = int(forced_k.sum()), int(np.count_nonzero(forced_k))
    m_values = np.arange(1, max_k + 1)[:, None]  # (M, 1)
    per_request = np.cumsum(free_gains, axis=1).T  # (M, F): a request's expected tokens at K = m
    order = np.argsort(-per_request, axis=1, kind="stable")
    etr = np.full((max_k, num_free + 1), base_etr)
    etr[:, 1:] += np.cumsum(np.take_along_axis(per_request, order, axis=1), axis=1)
    count = np.arange(num_free + 1)[None, :]
    rate = etr / times.at(m_values, forced_total + m_values * count, forced_drafting + count)
    rate[m_values[:, 0] < int(forced_k.max(initial=0))] = -np.inf  # m must cover the forced K
    best_m, best_count = divmod(int(np.argmax(rate)), rate.shape[1])
    free_k = np.zeros(num_free, dtype=np.int64)
    free_k[order[best_m, :best_count]] = best_m + 1
    return float(rate[best_m, best_count]), free_k


def could_beat_plain(times: StepTimes, batch_size: int, num_drafting: int, acceptance: float) -> bool:
    """Whether some K vector of a batch of `batch_size` in which at most `num_drafting` requests draft could
    commit more expected tokens a second than plain decoding in `times` (`best_k_vector`'s table) were each of
    their drafts accepted at `acceptance` (1: every draft accepted). An upper bound of `best_k_vector`'s
    objective where no rate exceeds `acceptance`: where it is False, the search drafts nothing.

    At max K = m and sum K = S the most expected tokens come from filling the drafting requests' positions
    level by level, position j adding acceptance^j for each: S = q * J + r (J = `num_drafting`) adds
    J * (a + ... + a^q) + r * a^(q + 1). Every cell the search reads is bounded (1 <= S <= J * m, m >= 1; a
    rounding's worth above plain counts as beating it; padded drafts, which only add time, are not charged).
    One table's arithmetic: a search at batch 32 took several times that, replayed."""
    grid = times.grid
    sums = np.arange(grid.shape[1])
    levels, rest = np.divmod(sums, num_drafting)
    if acceptance >= 1.0:
        gains = sums.astype(np.float64)
    else:
        gains = num_drafting * acceptance * (1.0 - acceptance**levels) / (1.0 - acceptance)
        gains += rest * acceptance ** (levels + 1)
    max_k = np.arange(grid.shape[0])[:, None]
    feasible = (max_k >= 1) & (sums >= 1) & (sums <= num_drafting * max_k)
    per_second = np.where(feasible, (batch_size + gains) / grid, 0.0)
    return bool(per_second.max() * (1.0 + 1e-12) > batch_size / grid[0, 0])


def with_hysteresis(
    rates: Array, best: NDArray[np.int_], previous: NDArray[np.int_], times: StepTimes, hysteresis: float
) -> list[int]:
    """Keep the previous K vector if the best one gains no more than `hysteresis` over it (a flat optimum
    must not flip the whole batch back and forth); otherwise keep K_r = previous_r unless moving r alone
    from it to best_r gains more than `hysteresis` of r's share (1 / batch size) of the batch's tokens per
    second. `times` as in `best_k_vector`."""
    etr = expected_etrs(rates, best)
    best_total, best_etr = int(best.sum()), float(etr.sum())
    previous_rate = float(expected_etrs(rates, previous).sum()) / times.of(previous)
    best_rate = best_etr / times.of(best)
    if best_rate <= (1.0 + hysteresis) * previous_rate:
        return [int(k) for k in previous]
    alt_etr = best_etr - etr + expected_etrs(rates, previous)  # (R,): r at previous, others at best
    alt_drafting = np.count_nonzero(best) - (best > 0) + (previous > 0)
    alt_time = times.at(np.maximum(max_of_others(best), previous), best_total - best + previous, alt_drafting)
    gain = best_rate / (alt_etr / alt_time) - 1.0
    keep = gain <= hysteresis / len(rates)
    return [int(k) for k in np.where(keep, previous, best)]


def expected_etrs(rates: Array, num_spec_tokens: NDArray[np.int_]) -> Array:
    """E[ETR] = (1 - a^(K+1)) / (1 - a), elementwise (`policy.utility.expected_etr`; rates are below 1)."""
    return (1.0 - rates ** (num_spec_tokens + 1)) / (1.0 - rates)


def max_of_others(values: NDArray[np.int_]) -> NDArray[np.int_]:
    """For each r, the max over the other entries (0 for a batch of one)."""
    if len(values) == 1:
        return np.zeros_like(values)
    top_two = np.sort(values)[-2:]
    return np.where(values == top_two[1], top_two[0], top_two[1])
