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
make (`BatchAwareChooser._prior`), so that a mean from the traffic's past alone, which a shift leaves stale,
does not hold a request (alone in the batch, it is estimated as without this prior).

Measured on served records of the regime pair (vLLM backend, session 42; 8 drafting iterations per request):
within a cell of one workload the requests' rates spread no more than their noise, or a little more (m of
20-100 on synthetic and code, more on prose), and on mixed m was 4-6 (code beside prose). The estimator's own
prior is 2 pseudo-counts, so on synthetic at batch 32 a request's K followed its first two or three
verifications: K of 1-4 within the same wave during the tests, where the requests accepted alike.

A request whose own counts disagree with its prior beyond `change_z` standard errors is unlike the traffic
(a shift of workload, an outlier) and is estimated from its counts alone, as before
(`BatchAwareChooser._rate`).
"""

from __future__ import annotations

from collections import deque


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
