"""Cascade, as published: per-request test and set phases driven by speculation utility.

A request alternates a short test phase (up to `max_test_values` K values, hill-climbing on utility) and a
longer set phase at the best K found; each choice of K = 0 doubles the next set phase (back-off). The
chooser measures the plain-decode baseline itself, forcing one plain iteration when it is missing or stale.

In a batch (the paper ran batch 1 only) a request is charged its share of the iteration's extra time, not
the whole batch's: the batch ran B * (cost - 1) plain-iteration-equivalents of extra time per request-slot,
split over the requests in proportion to the tokens they drafted. If every request's utility under that
charge is >= 1, the batch's tokens per second is >= plain's (the charges sum to the batch's cost).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from policy.stats import IterationStats
from policy.utility import UtilityTracker


@dataclass(frozen=True)
class CascadeConfig:
    max_spec_tokens: int = 8  # K never exceeds this
    initial_num_spec_tokens: int = 1  # where a new request's first test starts
    max_test_values: int = 4  # K values tried per test phase
    test_iterations: int = 4  # iterations per tested K
    set_iterations: int = 16  # set-phase length after a choice of K > 0
    max_set_iterations: int = 1024  # back-off cap
    convergence_tolerance: float = 0.10  # stop testing when two utilities are this close (relative)
    baseline_refresh_iterations: int = 100  # re-measure the plain-decode time this often

    def __post_init__(self) -> None:
        if self.max_spec_tokens < 1:
            raise ValueError(f"max_spec_tokens={self.max_spec_tokens} must be >= 1")
        if not 1 <= self.initial_num_spec_tokens <= self.max_spec_tokens:
            raise ValueError(
                f"initial_num_spec_tokens={self.initial_num_spec_tokens} must be in [1, max_spec_tokens]"
            )
        for name in ("max_test_values", "test_iterations", "set_iterations", "baseline_refresh_iterations"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        if self.max_set_iterations < self.set_iterations:
            raise ValueError(f"max_set_iterations={self.max_set_iterations} must be >= set_iterations")
        if not 0.0 <= self.convergence_tolerance < 1.0:
            raise ValueError(f"convergence_tolerance={self.convergence_tolerance} must be in [0, 1)")


class CascadeController:
    """One request's test/set state machine. Feed it every iteration the request ran in."""

    def __init__(self, config: CascadeConfig) -> None:
        self.config = config
        self.tracker = UtilityTracker(window=config.test_iterations)
        self.num_spec_tokens = config.initial_num_spec_tokens  # K to run now
        self.is_testing = True
        self.set_length = 0  # length of the current (or last) set phase
        self._best = config.initial_num_spec_tokens  # the last set-phase choice
        self._num_zero_choices = 0  # consecutive set phases at K = 0: the back-off exponent
        self._remaining = 0
        self._tested: list[tuple[int, float]] = []  # (K, utility) in the current test phase
        self._start = 0  # first K of the current test phase
        self._reference: tuple[int, float] = (0, 1.0)  # the point the hill-climb compares against
        self._direction = 1
        self._start_test()

    def observe(self, num_spec_tokens: int, etr: float, cost: float) -> None:
        """The request ran one iteration at `num_spec_tokens`, committing `etr` tokens at this `cost`.

        Iterations at another K than asked for (a router's window or clip) are recorded but not counted.
        """
        self.tracker.record(num_spec_tokens, etr, cost)
        if num_spec_tokens != self.num_spec_tokens:
            return
        self._remaining -= 1
        if self._remaining > 0:
            return
        if not self.is_testing:
            self._start_test()
            return
        utility = self.tracker.utility(self.num_spec_tokens)
        self._tested.append((self.num_spec_tokens, 1.0 if utility is None else utility))
        next_value = self._next_test_value()
        if next_value is None:
            self._start_set(self._best_tested())
        else:
            self._run_test_value(next_value)

    def _start_test(self) -> None:
        self.is_testing = True
        self._tested = []
        self._start = min(max(1, self._best), self.config.max_spec_tokens)
        self._direction = 1
        self._run_test_value(self._start)

    def _run_test_value(self, num_spec_tokens: int) -> None:
        self.tracker.clear(num_spec_tokens)
        self.num_spec_tokens = num_spec_tokens
        self._remaining = self.config.test_iterations

    def _next_test_value(self) -> int | None:
        """Hill-climb: up from the start, or down from it if the first step up was worse. None: stop."""
        value, utility = self._tested[-1]
        if value == 1 and utility < 1.0:
            return None  # speculation is off for the next set phase
        if len(self._tested) >= self.config.max_test_values:
            return None
        if len(self._tested) > 1:
            ref_utility = self._reference[1]
            if abs(utility - ref_utility) <= self.config.convergence_tolerance * max(utility, ref_utility):
                return None  # converged
            if utility < ref_utility:
                if self._direction == -1 or len(self._tested) > 2:
                    return None  # passed a maximum
                self._direction = -1  # the first step up was worse: climb down from the start instead
                return self._step_from(self._reference[0])
        self._reference = (value, utility)
        return self._step_from(value)

    def _step_from(self, value: int) -> int | None:
        candidate = value + self._direction
        if candidate > self.config.max_spec_tokens and value == self._start:
            self._direction, candidate = -1, value - 1  # no room above the start
        if not 1 <= candidate <= self.config.max_spec_tokens:
            return None  # reached K = 0 (utility 1 by definition) or the bound
        return candidate

    def _best_tested(self) -> int:
        """Highest utility among the tested K and K = 0 (utility 1); ties go to the smaller K."""
        best_value, best_utility = 0, 1.0
        for value, utility in self._tested:
            if utility > best_utility or (utility == best_utility and value < best_value):
                best_value, best_utility = value, utility
        return best_value

    def _start_set(self, num_spec_tokens: int) -> None:
        self.is_testing = False
        self._best = num_spec_tokens
        self._num_zero_choices = self._num_zero_choices + 1 if num_spec_tokens == 0 else 0
        self.set_length = min(
            self.config.set_iterations * 2**self._num_zero_choices, self.config.max_set_iterations
        )
        self.num_spec_tokens = num_spec_tokens
        self._remaining = self.set_length


class CascadeChooser:
    """A `KChooser` holding one `CascadeController` per request and the plain-decode baselines per batch size.

    Cost of an iteration = its time / the last plain iteration time measured at the same batch size; each
    request is charged 1 + B * (cost - 1) * K_r / sum K (`request_costs`).
    """

    def __init__(self, config: CascadeConfig) -> None:
        self.config = config
        self._controllers: dict[str, CascadeController] = {}
        self._baselines: dict[int, tuple[float, int]] = {}  # batch size -> (plain seconds, iteration)
        self._num_iterations = 0
        self._is_baseline_pending = False

    def choose(self, request_ids: Sequence[str]) -> dict[str, int]:
        baseline = self._baselines.get(len(request_ids))
        if baseline is None or self._num_iterations - baseline[1] >= self.config.baseline_refresh_iterations:
            self._is_baseline_pending = True  # this plain iteration measures the baseline
            return {request_id: 0 for request_id in request_ids}
        return {request_id: self._controller(request_id).num_spec_tokens for request_id in request_ids}

    def observe(self, stats: IterationStats) -> None:
        iteration = self._num_iterations
        self._num_iterations += 1
        if not stats.requests:
            return
        if all(r.num_spec_tokens == 0 for r in stats.requests):
            self._baselines[stats.batch_size] = (stats.iteration_time_s, iteration)
            if self._is_baseline_pending:
                self._is_baseline_pending = False
                return  # a forced plain iteration is not part of any request's phases
        baseline = self._baselines.get(stats.batch_size)
        if baseline is None or baseline[0] <= 0.0:
            return  # no cost to measure against yet; choose() forces a plain iteration
        cost = stats.iteration_time_s / baseline[0]
        ks = [r.num_spec_tokens for r in stats.requests]
        for r, charged in zip(stats.requests, request_costs(cost, ks), strict=True):
            self._controller(r.request_id).observe(r.num_spec_tokens, r.num_accepted_tokens + 1, charged)

    def release(self, request_id: str) -> None:
        self._controllers.pop(request_id, None)

    def gauges(self) -> dict[str, float]:
        return {}

    def _controller(self, request_id: str) -> CascadeController:
        controller = self._controllers.get(request_id)
        if controller is None:
            controller = self._controllers[request_id] = CascadeController(self.config)
        return controller


MIN_REQUEST_COST = 0.05  # a floor for noisy charges (cost below 1 by noise, spread over few drafters)


def request_costs(cost: float, num_spec_tokens: list[int]) -> list[float]:
    """Each request's share of a batch iteration's cost, in plain-iteration units.

    The batch's extra time, B * (cost - 1) request-slots, is split over the requests in proportion to their
    K_r; a request at K = 0 is charged 1 (what plain decoding costs it). At batch 1 this is `cost`, as
    published.
    """
    total = sum(num_spec_tokens)
    if total == 0:
        return [1.0] * len(num_spec_tokens)
    extra = len(num_spec_tokens) * (cost - 1.0)
    return [max(1.0 + extra * k / total, MIN_REQUEST_COST) for k in num_spec_tokens]
