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

    def __init__(self, config: AcceptanceConfig, change_z: float) -> None:
        self.estimator = AcceptanceEstimator(config)
        self.change_z = change_z
        self.num_requests = 0  # requests whose openings fed it

    @property
    def rate(self) -> float:
        return self.estimator.rate

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
