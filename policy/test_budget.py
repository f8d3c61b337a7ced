"""The budget of a chooser's forced tests (`BatchAwareConfig.test_budget`): per batch-size bucket, the net
seconds its test iterations cost and the seconds observed, both decayed over about `num_iterations`
iterations of that bucket. A test iteration's net cost is its time less what plain decoding would have taken
for the tokens it committed; where drafting pays it is negative and tests are free.

Per bucket, not one figure for the server: a test's cost grows with the batch (each pays the whole batch's
drafter catch-up), so with one figure the tests of large batches decided whether small ones might test.
Served on the regime pair, synthetic at batch 1 followed prose at batch 32 on the same server and ran 0.71x
of static K = 4, almost untested. That pointed here, but the per-bucket budget alone did not make it draft:
batch 1's own budget was spent too, by tests the optimum covered, which the chooser counts no longer
(`BatchAwareChooser._account_tests`).
"""

from __future__ import annotations

from policy.cost_model import batch_bucket


class TestBudget:
    __test__ = False  # not a pytest class

    def __init__(self, share: float, num_iterations: int) -> None:
        self.share = share
        self._keep = 1.0 - 1.0 / num_iterations
        self._cost_s: dict[int, float] = {}  # by batch bucket: decayed net seconds of test iterations
        self._elapsed_s: dict[int, float] = {}  # ... and of all iterations

    def allows(self, batch_size: int) -> bool:
        """Whether a forced test may start in a batch of this size."""
        bucket = batch_bucket(batch_size)
        return self._cost_s.get(bucket, 0.0) <= self.share * self._elapsed_s.get(bucket, 0.0)

    def add(self, batch_size: int, seconds: float, net_cost_s: float | None) -> None:
        """Count an iteration of `seconds`; `net_cost_s` if it was a test iteration."""
        bucket = batch_bucket(batch_size)
        self._elapsed_s[bucket] = self._keep * self._elapsed_s.get(bucket, 0.0) + seconds
        self._cost_s[bucket] = self._keep * self._cost_s.get(bucket, 0.0) + (net_cost_s or 0.0)

    def spent_share(self) -> float:
        """Net cost of tests over the time observed, all buckets together."""
        elapsed = sum(self._elapsed_s.values())
        return sum(self._cost_s.values()) / elapsed if elapsed else 0.0

    def spent_by_bucket(self) -> dict[int, float]:
        """Net cost of tests over the time observed, per batch-size bucket."""
        return {k: self._cost_s[k] / elapsed for k, elapsed in sorted(self._elapsed_s.items()) if elapsed}
