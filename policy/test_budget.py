"""The budget of a chooser's forced tests (`BatchAwareConfig.test_budget`): per batch-size bucket, the net
seconds its test iterations cost and the seconds observed, both decayed over about `num_iterations`
iterations of that bucket. A test iteration's net cost is its time less what plain decoding would have taken
for the tokens it committed; where drafting pays it is negative and tests are free.

Per bucket, not one figure for the server: a test's cost grows with the batch (each pays the whole batch's
drafter catch-up), so with one figure the tests of large batches decided whether small ones might test.
Served on the regime pair, synthetic at batch 1 followed prose at batch 32 on the same server and ran 0.71x
of static K = 4, almost untested. That pointed here, but the per-bucket budget alone did not make it draft:
batch 1's own budget was spent too, by tests the optimum covered, which the chooser counts no longer
(`policy.test_phase.TestPhases`).

The share backs off where forced tests keep finding nothing: it halves per consecutive forced test in the
bucket whose verdict was K = 0, down to `share / 2**max_backoff`, and is whole again at a verdict of K > 0
(`verdict`). Where drafting never pays, the full share was a standing cost: served on the demo pair (vLLM
backend, code and mixed at concurrency 16 / 32), auto drafted in 1-18% of its steps, nearly all of them
K = 1 tests, and those steps cost 1-5% of each cell beyond plain decoding, while the budget read 2%
spent in both buckets. A shift to traffic that pays is still found by the next forced test, only later.

A bucket's back-off is forgotten once the batch has been out of it for `forget_after` iterations: its
finding, that the traffic at that load does not pay, is about traffic that may have gone with the load.
Kept, it was a lock: served on the regime pair, synthetic at batch 1 followed prose at batch 1 (then 4, 16
and 32) and ran 983 of its 1001 steps untested at K = 0, where static K = 3 and 4 paid 1.21x. Batch 1's
budget, replayed, read 0.6% spent against a share backed off to 0.5%; its figures decay with the bucket's
own iterations alone, so prose's spending stood until synthetic's plain steps outweighed it, and over the
budget every new request starts untested. Where the load stays, the back-off stays. Served A/B on the regime
pair (prose then synthetic at concurrency 1 / 4 / 16 / 32, two rounds): 1.039x the back-off kept, paired over
16 runs, prose 1.03 and synthetic 1.05; the tests it lets back at prose 32 cost nothing the run could see.
"""

from __future__ import annotations

from policy.cost_model import batch_bucket


class TestBudget:
    __test__ = False  # not a pytest class

    def __init__(
        self, share: float, num_iterations: int, max_backoff: int = 0, forget_after: int = 128
    ) -> None:
        self.share = share
        self.max_backoff = max_backoff
        self.forget_after = forget_after
        self._keep = 1.0 - 1.0 / num_iterations
        self._cost_s: dict[int, float] = {}  # by batch bucket: decayed net seconds of test iterations
        self._elapsed_s: dict[int, float] = {}  # ... and of all iterations
        self._num_halvings: dict[int, int] = {}  # ... and the share's back-off
        self._last_added: dict[int, int] = {}  # ... and its last iteration (`_num_added` then)
        self._num_added = 0  # iterations counted, all buckets

    def allows(self, batch_size: int, *, is_backed_off: bool = True) -> bool:
        """Whether a forced test may start in a batch of this size (`is_backed_off` False: against the whole
        share, its back-off waived)."""
        bucket = batch_bucket(batch_size)
        share = self.share_of(batch_size) if is_backed_off else self.share
        return self._cost_s.get(bucket, 0.0) <= share * self._elapsed_s.get(bucket, 0.0)

    def share_of(self, batch_size: int) -> float:
        """The share forced tests may spend in a batch of this size, after the back-off."""
        return self.share / 2 ** self._halvings(batch_bucket(batch_size))

    def verdict(self, batch_size: int, is_drafting: bool) -> None:
        """Forced tests in a batch of this size ended together (one verdict); `is_drafting`: one of them set
        its request's K above 0."""
        bucket = batch_bucket(batch_size)
        halvings = 0 if is_drafting else min(self._halvings(bucket) + 1, self.max_backoff)
        self._num_halvings[bucket] = halvings

    def add(self, batch_size: int, seconds: float, net_cost_s: float | None) -> None:
        """Count an iteration of `seconds`; `net_cost_s` if it was a test iteration."""
        bucket = batch_bucket(batch_size)
        if self._is_away(bucket):
            self._num_halvings.pop(bucket, None)  # forgotten now that the batch is back
        self._num_added += 1
        self._last_added[bucket] = self._num_added
        self._elapsed_s[bucket] = self._keep * self._elapsed_s.get(bucket, 0.0) + seconds
        self._cost_s[bucket] = self._keep * self._cost_s.get(bucket, 0.0) + (net_cost_s or 0.0)

    def _halvings(self, bucket: int) -> int:
        """The bucket's back-off: none once the batch has been out of it for `forget_after` iterations."""
        return 0 if self._is_away(bucket) else self._num_halvings.get(bucket, 0)

    def _is_away(self, bucket: int) -> bool:
        return self._num_added - self._last_added.get(bucket, self._num_added) > self.forget_after

    def spent_share(self) -> float:
        """Net cost of tests over the time observed, all buckets together."""
        elapsed = sum(self._elapsed_s.values())
        return sum(self._cost_s.values()) / elapsed if elapsed else 0.0

    def spent_by_bucket(self) -> dict[int, float]:
        """Net cost of tests over the time observed, per batch-size bucket."""
        return {k: self._cost_s[k] / elapsed for k, elapsed in sorted(self._elapsed_s.items()) if elapsed}
