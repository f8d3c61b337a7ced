"""Per-request speculation utility: ETR and cost per K over a window, and the acceptance rate they imply.

ETR = accepted + 1 tokens per iteration; cost = iteration time / plain-decode time for the same batch;
utility U = ETR / cost, the speedup over plain decoding (U < 1: speculation slows the request down).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


def expected_etr(acceptance_rate: float, num_spec_tokens: int) -> float:
    """E[ETR] = (1 - a^(K+1)) / (1 - a) for i.i.d. acceptance rate a: sum of a^j for j = 0..K."""
    return float(sum(acceptance_rate**j for j in range(num_spec_tokens + 1)))


class UtilityTracker:
    """ETR and cost of one request at each K, averaged over the last `window` iterations at that K."""

    def __init__(self, window: int) -> None:
        if window < 1:
            raise ValueError(f"window={window} must be >= 1")
        self.window = window
        self._samples: dict[int, deque[tuple[float, float]]] = {}

    def record(self, num_spec_tokens: int, etr: float, cost: float) -> None:
        if cost <= 0.0:
            raise ValueError(f"cost={cost} must be > 0 (iteration time over the plain-decode time)")
        samples = self._samples.setdefault(num_spec_tokens, deque(maxlen=self.window))
        samples.append((etr, cost))

    def clear(self, num_spec_tokens: int) -> None:
        """Forget the samples at one K (a test phase measures it afresh)."""
        self._samples.pop(num_spec_tokens, None)

    def num_samples(self, num_spec_tokens: int) -> int:
        return len(self._samples.get(num_spec_tokens, ()))

    def etr(self, num_spec_tokens: int) -> float | None:
        samples = self._samples.get(num_spec_tokens)
        return sum(e for e, _ in samples) / len(samples) if samples else None

    def cost(self, num_spec_tokens: int) -> float | None:
        samples = self._samples.get(num_spec_tokens)
        return sum(c for _, c in samples) / len(samples) if samples else None

    def utility(self, num_spec_tokens: int) -> float | None:
        """Mean ETR / mean cost at this K; exactly 1 at K = 0 (plain decoding is the baseline)."""
        if num_spec_tokens == 0:
            return 1.0
        etr, cost = self.etr(num_spec_tokens), self.cost(num_spec_tokens)
        return None if etr is None or cost is None else etr / cost


@dataclass(frozen=True)
class AcceptanceConfig:
    decay: float = 0.98  # slow estimate, per observed iteration: remembers about 1 / (1 - decay) iterations
    fast_decay: float = 0.8  # fast estimate, used to detect a change of phase
    change_z: float = 3.0  # a phase change: the estimates differ by this many standard errors of the fast one
    prior_accepted: float = 1.0  # pseudo-counts: the estimate starts at
    prior_rejected: float = 1.0  # prior_accepted / (prior_accepted + prior_rejected)
    max_rate: float = 0.98  # estimates are clipped to [1 - max_rate, max_rate]

    def __post_init__(self) -> None:
        if not 0.0 < self.fast_decay <= self.decay <= 1.0:
            raise ValueError(f"decay={self.decay}, fast_decay={self.fast_decay} need 0 < fast <= slow <= 1")
        if self.change_z <= 0.0:
            raise ValueError(f"change_z={self.change_z} must be > 0")
        if self.prior_accepted <= 0.0 or self.prior_rejected <= 0.0:
            raise ValueError(f"prior counts {self.prior_accepted}, {self.prior_rejected} must be > 0")
        if not 0.5 < self.max_rate < 1.0:
            raise ValueError(f"max_rate={self.max_rate} must be in (0.5, 1)")


def rejections(num_spec_tokens: int, num_accepted_tokens: int) -> float:
    """The failures an iteration's drafts give `AcceptanceEstimator`: one where a draft was rejected (fewer
    accepted than drafted), none where all were accepted."""
    return 1.0 if num_accepted_tokens < num_spec_tokens else 0.0


class AcceptanceEstimator:
    """Per-token acceptance rate a of one request, from its accepted counts at any K.

    Each draft token is accepted with probability a until the first rejection, so an iteration at K gives
    `accepted` successes and one failure when accepted < K: the estimate is successes / (successes +
    failures). Counts decay; a slow estimate is stable, and a fast one replaces it when the two disagree by
    more than `change_z` standard errors (the request's acceptance changed phase).
    """

    def __init__(self, config: AcceptanceConfig, prior_rate: float | None = None) -> None:
        """`prior_rate` replaces the config's prior estimate, with as many pseudo-counts (e.g. the acceptance
        of other requests, for a new one)."""
        self.config = config
        # Decayed (accepted, rejected) counts of the slow and the fast estimate. Plain floats: this runs once
        # per request per iteration on the serving loop.
        accepted, rejected = config.prior_accepted, config.prior_rejected
        if prior_rate is not None:
            accepted, rejected = (
                prior_rate * (accepted + rejected),
                (1.0 - prior_rate) * (accepted + rejected),
            )
        self._slow_accepted = self._fast_accepted = accepted
        self._slow_rejected = self._fast_rejected = rejected
        self.num_observations = 0
        self.num_changes = 0  # phase changes detected
        self.rate = self._clipped(self._slow_accepted, self._slow_rejected)

    def record(self, num_spec_tokens: int, num_accepted_tokens: int) -> None:
        if num_spec_tokens > 0:
            self.record_counts(num_accepted_tokens, rejections(num_spec_tokens, num_accepted_tokens))

    def record_counts(self, accepted: float, rejected: float) -> None:
        """One observation of `accepted` successes and `rejected` failures (summed over requests, say)."""
        config = self.config
        slow_accepted = config.decay * self._slow_accepted + accepted
        slow_rejected = config.decay * self._slow_rejected + rejected
        fast_accepted = config.fast_decay * self._fast_accepted + accepted
        fast_rejected = config.fast_decay * self._fast_rejected + rejected
        self.num_observations += 1
        num_fast = fast_accepted + fast_rejected
        fast = fast_accepted / num_fast
        standard_error = (max(fast * (1.0 - fast), 0.01) / num_fast) ** 0.5
        if abs(fast - slow_accepted / (slow_accepted + slow_rejected)) > config.change_z * standard_error:
            slow_accepted, slow_rejected = fast_accepted, fast_rejected
            self.num_changes += 1
        self._slow_accepted, self._slow_rejected = slow_accepted, slow_rejected
        self._fast_accepted, self._fast_rejected = fast_accepted, fast_rejected
        rate = slow_accepted / (slow_accepted + slow_rejected)
        self.rate = min(max(rate, 1.0 - config.max_rate), config.max_rate)

    @property
    def standard_error(self) -> float:
        """Of `rate`: sqrt(rate (1 - rate) / n), n the slow estimate's counts (decayed, prior included)."""
        return (self.rate * (1.0 - self.rate) / (self._slow_accepted + self._slow_rejected)) ** 0.5

    def _clipped(self, accepted: float, rejected: float) -> float:
        """The estimate accepted / (accepted + rejected), clipped to [1 - max_rate, max_rate]."""
        max_rate = self.config.max_rate
        return min(max(accepted / (accepted + rejected), 1.0 - max_rate), max_rate)
