"""Requests' opening verifications, apart from their acceptance (`BatchAwareConfig.opening_apart`, where the
measurements are): a request's first decode step verifies the drafts proposed with its prompt (generated
positions 1 to K), and where the traffic's openings accept unlike its later drafts, an opening says little
of the request's acceptance.
"""

from __future__ import annotations

from policy.utility import AcceptanceConfig, AcceptanceEstimator

# Requests whose openings were verified before they may be counted apart (and a request's first choice made at
# their figure).
MIN_REQUESTS = 4


class Openings:
    """The acceptance of requests' opening verifications, and whether it differs from the traffic's."""

    def __init__(self, config: AcceptanceConfig, change_z: float, sample_every: int = 0) -> None:
        self.estimator = AcceptanceEstimator(config)
        self.change_z = change_z
        self.num_requests = 0  # requests whose openings fed it
        self.sample_every = sample_every  # (`BatchAwareConfig.opening_sample_every`)
        self._num_new = 0  # new requests asked about (`samples_new`)

    @property
    def rate(self) -> float:
        return self.estimator.rate

    def samples_new(self) -> bool:
        """Whether the new request now starting opens at the traffic's acceptance all the same, where openings
        are apart: one in `sample_every` (0: none), so that the figure goes on learning."""
        self._num_new += 1
        return self.sample_every > 0 and self._num_new % self.sample_every == 0

    def record(self, accepted: int, rejected: float) -> None:
        """A request's opening verification."""
        self.estimator.record_counts(accepted, rejected)
        self.num_requests += 1

    def are_apart(self, traffic: AcceptanceEstimator) -> bool:
        """Whether openings accept unlike `traffic`, by more than `change_z` standard errors of the difference,
        once `MIN_REQUESTS` opened."""
        if self.num_requests < MIN_REQUESTS:
            return False
        error = (self.estimator.standard_error**2 + traffic.standard_error**2) ** 0.5
        return abs(self.estimator.rate - traffic.rate) > self.change_z * error
