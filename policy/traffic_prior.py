"""How much a request's acceptance estimate should lean on the traffic's: empirical Bayes over requests.

A new request's estimate starts from the traffic's acceptance (`policy.batch_aware`). How far its own first
drafts should move it depends on how alike the traffic's requests accept. Where every request of the traffic
accepts alike, a request's first few drafts are noise around the traffic's figure; where they differ (code
beside prose), they are the request's own.

`TrafficSpread` keeps each recent request's counts over its first test (accepted and rejected drafts) and
reads from them, by the method of moments for a beta prior over requests, the strength of that prior in
pseudo-counts: m = mu (1 - mu) / tau^2 - 1, where mu is the pooled acceptance and tau^2 the spread of the
requests' own rates beyond what their counts' sampling noise explains. A request's estimate for choosing
its K is then (m' mu' + accepted) / (m' + accepted + rejected): mu' the traffic's acceptance when it came,
moved by the batch's other requests' counts (the traffic now), and m' = m times the share of mu' those counts
make (`TrafficPrior`), so that a mean from the traffic's past alone, which a shift leaves stale,
does not hold a request (alone in the batch, it is estimated as without this prior).

Measured on served records of the regime pair (vLLM backend, session 42; 8 drafting iterations per request):
within a cell of one workload the requests' rates spread no more than their noise, or a little more (m of
20-100 on synthetic and code, more on prose), and on mixed m was 4-6 (code beside prose). The estimator's own
prior is 2 pseudo-counts, so on synthetic at batch 32 a request's K followed its first two or three
verifications: K of 1-4 within the same wave during the tests, where the requests accepted alike.

A request whose own counts disagree with its prior beyond `change_z` standard errors is unlike the traffic
(a shift of workload, an outlier) and is estimated from its counts alone, as before
(`TrafficPrior.rates`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from policy.batch_aware_config import BatchAwareConfig
from policy.test_phase import RequestState

Array = NDArray[np.float64]
# Requests whose first tests the traffic's spread needs before its prior strength is read.
SPREAD_MIN_REQUESTS = 8


class TrafficSpread:
    """The last `window` requests' first-test counts, and the prior strength they imply."""

    def __init__(self, window: int, min_requests: int, min_strength: float, max_strength: float) -> None:
        if window < min_requests or min_requests < 2:
            raise ValueError(f"window={window} must be >= min_requests={min_requests} >= 2")
        if not 0.0 < min_strength <= max_strength:
            raise ValueError(f"strengths {min_strength}, {max_strength} need 0 < min <= max")
        self.min_requests = min_requests
        self.min_strength = min_strength
        self.max_strength = max_strength
        self._counts: deque[tuple[float, float]] = deque(maxlen=window)

    def record(self, accepted: float, rejected: float) -> None:
        """A request's counts over its first test (none recorded without a draft verified)."""
        if accepted + rejected > 0.0:
            self._counts.append((accepted, rejected))

    def strength(self) -> float | None:
        """The prior's pseudo-counts, in [min_strength, max_strength]; None below `min_requests` requests."""
        if len(self._counts) < self.min_requests:
            return None
        total_accepted = sum(a for a, _ in self._counts)
        total = total_accepted + sum(r for _, r in self._counts)
        mean = total_accepted / total
        variance = mean * (1.0 - mean)
        if variance <= 0.0:
            return self.max_strength
        observed = sum((a / (a + r) - mean) ** 2 for a, r in self._counts) / len(self._counts)
        noise = sum(variance / (a + r) for a, r in self._counts) / len(self._counts)
        spread = observed - noise
        if spread <= variance / (self.max_strength + 1.0):
            return self.max_strength
        return max(self.min_strength, variance / spread - 1.0)


class TrafficPrior:
    """Each request's acceptance for choosing its K under the traffic's prior (`BatchAwareChooser`), and the
    counts it rests on. `strength`: the prior's pseudo-counts (None: not known yet, or the traffic's prior is
    off, `traffic_prior_requests` < 2; each request's estimator alone then)."""

    def __init__(self, config: BatchAwareConfig) -> None:
        self._config = config
        acceptance = config.acceptance
        self._spread = (
            TrafficSpread(
                config.traffic_prior_requests,
                min(SPREAD_MIN_REQUESTS, config.traffic_prior_requests),
                acceptance.prior_accepted + acceptance.prior_rejected,
                config.traffic_prior_max_strength,
            )
            if config.traffic_prior_requests >= 2
            else None
        )
        self.strength: float | None = None

    def means(self, states: Sequence[RequestState]) -> Array:
        """Each request's prior mean (`_prior`)."""
        return self._prior(states, *self._own_counts(states))[0]

    def rates(self, states: Sequence[RequestState]) -> Array:
        """Each request's acceptance for choosing its K: its counts under the traffic's prior (`_prior`); its
        estimator's where the prior's strength is not known, falls below the estimator's own prior, or the
        request proved unlike the traffic."""
        rates = np.fromiter((s.estimator.rate for s in states), np.float64, len(states))
        if self.strength is None:
            return rates
        accepted, total = self._own_counts(states)
        means, strengths = self._prior(states, accepted, total)
        pseudo = strengths + total  # 0 where neither prior nor counts (weak: the estimator's rate is used)
        leaning = np.divide(
            strengths * means + accepted, pseudo, out=np.zeros(len(states)), where=pseudo > 0.0
        )
        acceptance = self._config.acceptance
        unlike = np.fromiter((s.is_unlike_traffic for s in states), np.bool_, len(states))
        weak = strengths < acceptance.prior_accepted + acceptance.prior_rejected
        max_rate = acceptance.max_rate
        return np.where(unlike | weak, rates, np.clip(leaning, 1.0 - max_rate, max_rate))

    @staticmethod
    def _own_counts(states: Sequence[RequestState]) -> tuple[Array, Array]:
        """Each request's own accepted counts and all its counts (decayed), for `_prior`."""
        accepted = np.fromiter((s.own_accepted for s in states), np.float64, len(states))
        return accepted, accepted + np.fromiter((s.own_rejected for s in states), np.float64, len(states))

    def _prior(self, states: Sequence[RequestState], accepted: Array, total: Array) -> tuple[Array, Array]:
        """Each request's prior: its mean and its strength in pseudo-counts (`accepted`, `total`: `_own_counts`).

        The mean is the traffic's acceptance when the request came, moved by the other requests of the
        batch's own counts, the traffic now (`traffic_prior_weight` pseudo-counts for the former). Without
        the batch's, after a shift a strong prior held a wave to the old traffic's figure: served on the regime
        pair, synthetic at batch 16 after prose drafted its first wave at K = 1 for 10 iterations and reached
        K = 4 after 20, where its requests accepted 0.9 from the first.

        The strength is the traffic's spread's (`policy.traffic_prior`) times the share of the mean that the
        batch's counts make: a mean from the traffic's figure alone may be stale. Alone in the batch, served
        on the regime pair at synthetic 1 after prose, requests tested at K = 1 for 9-10 iterations before
        drafting at K = 4 (3-4 with the estimator's prior), two of 17 ended their tests at K = 0, and the cell
        ran 0.92-0.98x the version before."""
        priors = np.fromiter((s.prior_rate for s in states), np.float64, len(states))
        weight = self._config.traffic_prior_weight
        others_accepted, others = accepted.sum() - accepted, total.sum() - total
        means = (weight * priors + others_accepted) / (weight + others)
        return means, (self.strength or 0.0) * others / (weight + others)

    def count(self, state: RequestState, accepted: int, rejected: float, prior_mean: float) -> None:
        """Add a drafting iteration to the request's counts for `rates` and, within its first test, to the
        traffic's spread; mark it unlike the traffic where its counts disagree with its prior mean by more
        than `change_z` standard errors (binomial at that mean, over 4 counts at least)."""
        acceptance = self._config.acceptance
        state.own_accepted = acceptance.decay * state.own_accepted + accepted
        state.own_rejected = acceptance.decay * state.own_rejected + rejected
        if state.num_drafting_iterations <= self._config.test_iterations and self._spread is not None:
            state.first_accepted += accepted
            state.first_rejected += rejected
            if state.num_drafting_iterations == self._config.test_iterations:
                self._spread.record(state.first_accepted, state.first_rejected)
                self.strength = self._spread.strength()
        total = state.own_accepted + state.own_rejected
        if total >= 4.0 and not state.is_unlike_traffic:
            error = abs(state.own_accepted / total - prior_mean)
            bound = acceptance.change_z * (prior_mean * (1.0 - prior_mean) / total) ** 0.5
            state.is_unlike_traffic = error > bound
