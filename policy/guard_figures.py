"""The measured guard's figures (`policy.guard`): a smoothed rate with its standard error, and how a plain
step's time grows with the batch inside one batch-size bucket, so that steps at different batch sizes there
are compared at one size."""

from __future__ import annotations

import math


def _weight(count: int, smoothing: float) -> float:
    """The newest sample's weight in a figure of `count` samples: the mean of the first ones (no sample
    dominates), then an EWMA's `smoothing`."""
    return max(1.0 / (count + 1), smoothing)


class Rate:
    """Committed tokens per request over seconds, both smoothed (a ratio of sums, not a mean of ratios: an
    iteration that committed many tokens counts by its tokens), with the number of iterations seen and the
    standard error of the figure.

    The standard error is a ratio estimator's, R = E[tokens] / E[seconds]: the spread of tokens - R * seconds
    over the iterations, so that both the accepted counts and the times count as noise. Tokens alone were
    used first (accepted counts vary far more than the times of drafting iterations do), but the chooser's
    figure mixes its plain iterations with its drafting ones, all committing one token: served on the regime
    pair (synthetic at batch 1), the first iteration of a test (the drafter's catch-up prefill, both drafts
    rejected) among plain ones had a standard error of 0 and was a verdict on its own, and the bucket was
    held plain where static K = 4 paid 1.32x."""

    def __init__(self) -> None:
        self.tokens, self.seconds, self.count = 0.0, 0.0, 0
        self.tokens_sq, self.seconds_sq, self.tokens_seconds = 0.0, 0.0, 0.0  # second moments
        self._smoothing = 1.0

    def add(self, tokens: float, seconds: float, smoothing: float) -> None:
        weight = _weight(self.count, smoothing)
        self.tokens += weight * (tokens - self.tokens)
        self.seconds += weight * (seconds - self.seconds)
        self.tokens_sq += weight * (tokens * tokens - self.tokens_sq)
        self.seconds_sq += weight * (seconds * seconds - self.seconds_sq)
        self.tokens_seconds += weight * (tokens * seconds - self.tokens_seconds)
        self.count += 1
        self._smoothing = smoothing

    @property
    def value(self) -> float:
        return self.tokens / self.seconds

    @property
    def standard_error(self) -> float:
        # Var(tokens - R * seconds), whose mean is 0 by R's definition.
        rate = self.value
        variance = self.tokens_sq - 2.0 * rate * self.tokens_seconds + rate * rate * self.seconds_sq
        num_effective = min(self.count, (2.0 - self._smoothing) / self._smoothing)  # an EWMA's sample size
        return math.sqrt(max(variance, 0.0) / num_effective) / self.seconds


class PlainShape:
    """A plain decoding step's time against the batch size inside one batch-size bucket, t(b) = a + c * b,
    fitted by smoothed least squares over the bucket's plain steps (weighted as `Rate`'s samples), so that a
    step at batch b counts at `reference` by `scale(b, reference)`.

    Why: the guard's figures are tokens per second per request, and in the memory-bound regime a plain step
    at batch 17 takes about half the time of one at 32, so a bucket's figures mixed batch sizes that differ
    by twice in rate. Served on the regime pair (session 61, synthetic at concurrency 32), batch 17-32's plain
    figure was learnt from prose 32's tail, 35 plain steps while the batch drained from 29 to 17 (49-60 ms
    each), and stood at 17.5 tokens a second a request; at batch 32 plain steps took 90-107 ms (about 10.5).
    The batch then filled to 32 and drafted K = 4 at 12.7 tokens a second a request, 1.2x plain at that size,
    and the guard held it plain for 64 steps as 0.82x of the plain figure.

    Where the fit cannot tell (the batch sizes spread by less than one, or time does not grow with the
    batch), the scale is 1; it never leaves the physical range between 1 (time flat in the batch: a
    memory-bound step) and reference / b (time proportional to it: per-request rate flat)."""

    def __init__(self) -> None:
        self.batch, self.seconds, self.batch_sq, self.batch_seconds, self.count = 0.0, 0.0, 0.0, 0.0, 0

    def add(self, batch: int, seconds: float, smoothing: float) -> None:
        weight = _weight(self.count, smoothing)
        self.batch += weight * (batch - self.batch)
        self.seconds += weight * (seconds - self.seconds)
        self.batch_sq += weight * (batch * batch - self.batch_sq)
        self.batch_seconds += weight * (batch * seconds - self.batch_seconds)
        self.count += 1

    def scale(self, batch: int, reference: int) -> float:
        """What a step at `batch` takes at `reference`, as a factor of its time."""
        variance = self.batch_sq - self.batch * self.batch
        if batch == reference or variance < 1.0:
            return 1.0
        slope = (self.batch_seconds - self.batch * self.seconds) / variance
        if slope <= 0.0:
            return 1.0
        fixed = max(self.seconds - slope * self.batch, 0.0)
        low, high = sorted((1.0, reference / batch))
        return min(max((fixed + slope * reference) / (fixed + slope * batch), low), high)
