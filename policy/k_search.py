"""The batch's K vector search (`policy.batch_aware`): the exact maximizer of expected committed tokens per
second, and the hysteresis that keeps a flat optimum from flipping. Pure functions of the requests' acceptance
rates and a table of predicted iteration times by (max K, sum K, requests at K > 0).
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

Array = NDArray[np.float64]
MAX_EXACT_COUNTS = 32  # `allowed_counts`


def charge(times: Array, max_k: ArrayLike, total: ArrayLike, num_drafting: ArrayLike) -> Array:
    """`times[m, S, n]`: the predicted (or charged) seconds of an iteration at max K = m, sum K = S and n
    requests at K > 0, shape (max_k + 1, R * max_k + 1, R + 1). A table of one column along n holds every n
    (a drafter whose time does not depend on which requests draft)."""
    n = np.minimum(num_drafting, times.shape[2] - 1)
    return np.asarray(times[np.asarray(max_k), np.asarray(total), n])


def charge_of(times: Array, num_spec_tokens: NDArray[np.int_]) -> float:
    """`charge` of one K vector."""
    ks = num_spec_tokens
    return float(charge(times, int(ks.max()), int(ks.sum()), int(np.count_nonzero(ks))))


def best_k_vector(rates: Array, forced: NDArray[np.int_], times: Array, max_k: int) -> list[int]:
    """Exact maximizer of tokens per second; `forced[r] >= 0` fixes K_r, -1 leaves it free; `times` as in
    `charge`.

    The iteration time depends on the K vector only through m = max K_r, S = sum K_r and n, the requests at
    K_r > 0. The j-th token of request r adds a_r^j to E[ETR_r], which grows with a_r at every j, so the free
    requests that draft are the most accepting ones (a swap of a K with a more accepting request's 0 keeps m,
    S and n). For a given (m, S) and the n' most accepting free requests allowed to draft, the expected ETR is
    largest when the S free draft tokens go to their largest marginal gains with j <= m. Charging the n'
    allowed where fewer draft overcharges only vectors that also come at their own (m, n), so scanning every
    (n', m, S) is exact (up to `MAX_EXACT_COUNTS` free requests, `allowed_counts`).
    """
    is_free = forced < 0
    positions = np.arange(1, max_k + 1)
    gains = rates[:, None] ** positions  # (R, max_k): gain of the j-th token
    forced_k = np.where(is_free, 0, forced)
    forced_total = int(forced_k.sum())
    forced_drafting = int(np.count_nonzero(forced_k))
    base_etr = len(rates) + float(gains[positions <= forced_k[:, None]].sum())
    # Free gains in descending order; a gain of token j of free request f is available when m >= j and f is
    # among the n' most accepting free requests.
    free_rates = rates[is_free]
    free_gains = gains[is_free].ravel()
    order = np.argsort(-free_gains, kind="stable")  # (L,) into the (F, max_k) block
    rank = np.empty(len(free_rates), dtype=np.int64)
    rank[np.argsort(-free_rates, kind="stable")] = np.arange(len(free_rates))
    num_allowed = allowed_counts(len(free_rates), times.shape[2] > 1)
    m_values = np.arange(max_k + 1)
    available = ((order % max_k)[None, None, :] < m_values[None, :, None]) & (
        rank[order // max_k][None, None, :] < num_allowed[:, None, None]
    )  # (N', M, L)
    # Column 0 is S = 0 (no free tokens); column i + 1 takes the sorted free gains up to position i.
    shape = (*available.shape[:2], len(order) + 1)
    etr = np.empty(shape)
    etr[..., 0] = base_etr
    np.cumsum(np.where(available, free_gains[order], 0.0), axis=2, out=etr[..., 1:])
    etr[..., 1:] += base_etr
    total = np.empty(shape, dtype=np.int64)
    total[..., 0] = forced_total
    np.cumsum(available, axis=2, out=total[..., 1:])
    total[..., 1:] += forced_total
    rate = etr / charge(times, m_values[None, :, None], total, forced_drafting + num_allowed[:, None, None])
    rate[:, : int(forced_k.max(initial=0))] = -np.inf  # m must cover the forced K
    best_n, best_m, best_pos = np.unravel_index(int(np.argmax(rate)), rate.shape)
    chosen = order[:best_pos][available[best_n, best_m, :best_pos]]
    result = forced_k.copy()
    result[is_free] = np.bincount(chosen // max_k, minlength=int(is_free.sum()))
    return [int(k) for k in result]


def allowed_counts(num_free: int, is_charged_by_drafting: bool) -> NDArray[np.int64]:
    """The numbers n' of most accepting free requests that `best_k_vector` lets draft: num_free alone where the
    charge does not depend on n; else 0..num_free, and past `MAX_EXACT_COUNTS` of them an even grid of that
    many. The search's arrays grow as n' times the free tokens: on these cores, at K <= 4, a search took
    0.05 ms at batch 32 with one n', 0.2-0.4 ms with 33, and at batch 256 2.5 ms with the grid's 33 (every
    n' would take 10 ms); the charge of a few requests more or less among hundreds changes little."""
    if not is_charged_by_drafting:
        return np.array([num_free])
    if num_free <= MAX_EXACT_COUNTS:
        return np.arange(num_free + 1)
    return np.unique(np.linspace(0, num_free, MAX_EXACT_COUNTS + 1).round().astype(np.int64))


def with_hysteresis(
    rates: Array, best: NDArray[np.int_], previous: NDArray[np.int_], times: Array, hysteresis: float
) -> list[int]:
    """Keep the previous K vector if the best one gains no more than `hysteresis` over it (a flat optimum
    must not flip the whole batch back and forth); otherwise keep K_r = previous_r unless moving r alone
    from it to best_r gains more than `hysteresis` of r's share (1 / batch size) of the batch's tokens per
    second. `times` as in `charge`."""
    etr = expected_etrs(rates, best)
    best_total, best_etr = int(best.sum()), float(etr.sum())
    best_rate = best_etr / charge_of(times, best)
    previous_rate = float(expected_etrs(rates, previous).sum()) / charge_of(times, previous)
    if best_rate <= (1.0 + hysteresis) * previous_rate:
        return [int(k) for k in previous]
    alt_etr = best_etr - etr + expected_etrs(rates, previous)  # (R,): r at previous, others at best
    alt_drafting = np.count_nonzero(best) - (best > 0) + (previous > 0)
    alt_time = charge(
        times, np.maximum(max_of_others(best), previous), best_total - best + previous, alt_drafting
    )
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
