"""The central policy's logic without transport: many routers' statistics in, versioned K decisions out.

One chooser per router (its batch), built by an injected factory that may share one cost model among them;
requests that ended or went silent are released. Time is passed in (`now_s`); nothing reads a clock.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from policy.stats import Decision, IterationStats, KChooser


@dataclass(frozen=True)
class AggregatorConfig:
    window_iterations: int = 4  # a decision holds for this many iterations of its router
    max_silent_iterations: int = 256  # release a request its router has not reported for this many iterations
    max_silent_s: float = 60.0  # ... or for this many seconds
    default_num_spec_tokens: int = 0  # for requests a decision does not list

    def __post_init__(self) -> None:
        if self.window_iterations < 1:
            raise ValueError(f"window_iterations={self.window_iterations} must be >= 1")
        if self.max_silent_iterations < self.window_iterations:
            raise ValueError(
                f"max_silent_iterations={self.max_silent_iterations} must be >= window_iterations"
            )
        if self.max_silent_s <= 0.0:
            raise ValueError(f"max_silent_s={self.max_silent_s} must be > 0")
        if self.default_num_spec_tokens < 0:
            raise ValueError(f"default_num_spec_tokens={self.default_num_spec_tokens} must be >= 0")


@dataclass
class _Source:
    chooser: KChooser
    iteration: int = 0  # the latest iteration this router reported or asked about
    decision: Decision | None = None


@dataclass
class _Seen:
    source: str
    iteration: int  # the router's iteration when the request was last reported or decided
    time_s: float


class PolicyAggregator:
    """Merges IterationStats from many routers and answers each router's `decide` for its next window."""

    def __init__(self, config: AggregatorConfig, make_chooser: Callable[[], KChooser]) -> None:
        self.config = config
        self._make_chooser = make_chooser
        self._sources: dict[str, _Source] = {}
        self._seen: dict[str, _Seen] = {}  # request id -> when its router last mentioned it
        self.version = 0

    def ingest(self, stats: IterationStats, now_s: float) -> None:
        """One iteration of one router (`stats.source`)."""
        source = self._source(stats.source)
        source.iteration = max(source.iteration, stats.iteration)
        for r in stats.requests:
            self._seen[r.request_id] = _Seen(stats.source, stats.iteration, now_s)
        source.chooser.observe(stats)

    def decide(self, source_name: str, request_ids: Sequence[str], iteration: int, now_s: float) -> Decision:
        """K for `request_ids` from the router's `iteration` on, for one window (cached within it)."""
        source = self._source(source_name)
        source.iteration = max(source.iteration, iteration)
        for request_id in request_ids:
            self._seen[request_id] = _Seen(source_name, iteration, now_s)
        cached = source.decision
        if (
            cached is not None
            and cached.first_iteration <= iteration < cached.first_iteration + cached.num_iterations
            and all(r in cached.num_spec_tokens for r in request_ids)
        ):
            return cached
        self.version += 1
        source.decision = Decision(
            version=self.version,
            source=source_name,
            first_iteration=iteration,
            num_iterations=self.config.window_iterations,
            num_spec_tokens=source.chooser.choose(request_ids),
            default_num_spec_tokens=self.config.default_num_spec_tokens,
        )
        return source.decision

    def release(self, request_id: str) -> None:
        """A request ended: forget it everywhere."""
        seen = self._seen.pop(request_id, None)
        if seen is not None and seen.source in self._sources:
            self._sources[seen.source].chooser.release(request_id)

    def expire(self, now_s: float) -> list[str]:
        """Release requests silent for too long (in their router's iterations or in seconds)."""
        expired = [
            request_id
            for request_id, seen in self._seen.items()
            if now_s - seen.time_s > self.config.max_silent_s
            or self._sources[seen.source].iteration - seen.iteration > self.config.max_silent_iterations
        ]
        for request_id in expired:
            self.release(request_id)
        return expired

    @property
    def num_requests(self) -> int:
        return len(self._seen)

    @property
    def source_names(self) -> list[str]:
        """The routers (or vLLM engines) that have reported or asked so far."""
        return sorted(self._sources)

    def gauges(self) -> dict[str, dict[str, float]]:
        """Each source's chooser's gauges, by source name."""
        return {name: source.chooser.gauges() for name, source in sorted(self._sources.items())}

    def _source(self, name: str) -> _Source:
        source = self._sources.get(name)
        if source is None:
            source = self._sources[name] = _Source(self._make_chooser())
        return source
