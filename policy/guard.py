"""A measured guard around any K chooser: speculation must beat plain decoding by measurement, not only in
the chooser's model.

Per batch-size bucket it keeps the committed tokens per second per request of iterations that drafted and
of iterations that did not (EWMAs). While the chooser speculates, every `baseline_every`-th iteration runs
plain to keep the plain figure fresh (every 4th until a batch-size bucket has one). When drafting iterations measure worse than plain ones by more than
`margin`, the guard runs plain for `hold_iterations` (doubled per consecutive verdict, capped), then lets
the chooser try again. The chooser sees every iteration either way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from policy.stats import IterationStats, KChooser


@dataclass(frozen=True)
class GuardConfig:
    margin: float = 0.05  # drafting must not measure more than this much worse than plain
    min_samples: int = 8  # iterations of each kind in a bucket before a verdict
    smoothing: float = 0.05  # EWMA weight of the newest iteration (about 20 iterations of memory)
    baseline_every: int = 16  # while drafting, one plain iteration in this many
    hold_iterations: int = 64  # plain iterations after a verdict against drafting
    max_hold_iterations: int = 1024  # cap of the doubling hold

    def __post_init__(self) -> None:
        if not 0.0 <= self.margin < 1.0 or not 0.0 < self.smoothing <= 1.0:
            raise ValueError(f"margin={self.margin} must be in [0, 1), smoothing={self.smoothing} in (0, 1]")
        if min(self.min_samples, self.baseline_every, self.hold_iterations) < 1:
            raise ValueError("min_samples, baseline_every and hold_iterations must be >= 1")
        if self.max_hold_iterations < self.hold_iterations:
            raise ValueError(f"max_hold_iterations={self.max_hold_iterations} must be >= hold_iterations")


class _Rate:
    """Committed tokens per request over seconds, both smoothed (a ratio of sums, not a mean of ratios: an
    iteration that committed many tokens counts by its tokens), with the number of iterations seen."""

    def __init__(self) -> None:
        self.tokens, self.seconds, self.count = 0.0, 0.0, 0

    def add(self, tokens: float, seconds: float, smoothing: float) -> None:
        weight = 1.0 if self.count == 0 else smoothing
        self.tokens += weight * (tokens - self.tokens)
        self.seconds += weight * (seconds - self.seconds)
        self.count += 1

    @property
    def value(self) -> float:
        return self.tokens / self.seconds


class MeasuredGuard:
    """A `KChooser` wrapping another one (see the module docstring)."""

    def __init__(self, inner: KChooser, config: GuardConfig | None = None) -> None:
        self.inner = inner
        self.config = config or GuardConfig()
        self._plain: dict[int, _Rate] = {}
        self._drafting: dict[int, _Rate] = {}
        self._hold_left = 0  # plain iterations still to run after a verdict
        self._num_verdicts = 0  # consecutive verdicts against drafting (the hold doubles)
        self._num_drafting = 0  # drafting iterations since the last plain one
        self.num_holds = 0

    def choose(self, request_ids: Sequence[str]) -> dict[str, int]:
        if self._hold_left > 0:
            self._hold_left -= 1
            return dict.fromkeys(request_ids, 0)
        chosen = self.inner.choose(request_ids)
        plain = self._plain.get(len(request_ids).bit_length())
        is_known = plain is not None and plain.count >= self.config.min_samples
        every = self.config.baseline_every if is_known else 4  # learn the plain rate of a new bucket fast
        if any(chosen.values()) and self._num_drafting >= every - 1:
            return dict.fromkeys(request_ids, 0)  # a baseline iteration
        return chosen

    def observe(self, stats: IterationStats) -> None:
        self.inner.observe(stats)
        if not stats.requests or stats.iteration_time_s <= 0.0:
            return
        bucket = stats.batch_size.bit_length()  # batch sizes 1, 2-3, 4-7, 8-15, ...
        per_request = sum(r.num_committed_tokens for r in stats.requests) / stats.batch_size
        is_drafting = any(r.num_spec_tokens > 0 for r in stats.requests)
        rates = self._drafting if is_drafting else self._plain
        rates.setdefault(bucket, _Rate()).add(per_request, stats.iteration_time_s, self.config.smoothing)
        self._num_drafting = self._num_drafting + 1 if is_drafting else 0
        if is_drafting:
            self._judge(bucket)

    def release(self, request_id: str) -> None:
        self.inner.release(request_id)

    def _judge(self, bucket: int) -> None:
        plain, drafting = self._plain.get(bucket), self._drafting[bucket]
        if plain is None or min(plain.count, drafting.count) < self.config.min_samples:
            return
        if drafting.value < (1.0 - self.config.margin) * plain.value:
            hold = self.config.hold_iterations * 2**self._num_verdicts
            self._hold_left = min(hold, self.config.max_hold_iterations)
            self._num_verdicts += 1
            self.num_holds += 1
            del self._drafting[bucket]  # the next try is judged on fresh iterations
        elif drafting.count >= 4 * self.config.min_samples:
            self._num_verdicts = 0  # drafting has held its own for a while
