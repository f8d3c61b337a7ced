"""Per-iteration cost of each K chooser: the time spent in choose() + observe() (+ release()).

Every chooser runs the simulator's loop (`policy.simulator.simulate`, closed loop, short requests so that
requests come and go and test phases keep starting); only the time inside the chooser's calls is counted.
Prints ms per iteration (mean over the run; median of the repeats and the spread) and the p99 iteration.

    python -m bench.policy_overhead
    python -m bench.policy_overhead --batch-sizes 32 --policies batch-aware --repeats 7 --profile out.prof
"""

from __future__ import annotations

import argparse
import cProfile
import statistics
import time
from collections.abc import Sequence

import numpy as np

from policy.presets import PRESETS
from policy.simulator import make_chooser, simulate
from policy.stats import IterationStats, KChooser
from policy.workload import ACCEPTANCE_LEVELS, WorkloadConfig

POLICIES = ("off", "static-3", "cascade", "batch-aware")


class TimedChooser:
    """Wraps a chooser; one entry per iteration: seconds in choose + observe (+ the releases after it)."""

    def __init__(self, inner: KChooser) -> None:
        self.inner = inner
        self.iteration_s: list[float] = []
        self._current = 0.0

    def choose(self, request_ids: Sequence[str]) -> dict[str, int]:
        start = time.perf_counter()
        chosen = self.inner.choose(request_ids)
        self._current += time.perf_counter() - start
        return chosen

    def observe(self, stats: IterationStats) -> None:
        start = time.perf_counter()
        self.inner.observe(stats)
        self.iteration_s.append(self._current + time.perf_counter() - start)
        self._current = 0.0

    def release(self, request_id: str) -> None:
        start = time.perf_counter()
        self.inner.release(request_id)
        if self.iteration_s:
            self.iteration_s[-1] += time.perf_counter() - start

    def gauges(self) -> dict[str, float]:
        return self.inner.gauges()


def measure(policy: str, batch_size: int, num_iterations: int, seed: int) -> tuple[float, float]:
    """(mean, p99) milliseconds per iteration of one run."""
    preset = PRESETS["mixtral-8x7b-h100"]
    workload = WorkloadConfig(
        batch_size,
        ACCEPTANCE_LEVELS["mixed"],
        mean_output_tokens=48,
        num_iterations=num_iterations,
        seed=seed,
    )
    timed = TimedChooser(make_chooser(policy, preset, seed))
    simulate(preset, timed, workload)
    times = np.array(timed.iteration_s) * 1e3
    return float(times.mean()), float(np.percentile(times, 99))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch-sizes", default="1,4,16,32")
    parser.add_argument("--policies", default=",".join(POLICIES))
    parser.add_argument("--iterations", type=int, default=300, help="per run")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--profile", default=None, help="write a cProfile of every run to this file")
    args = parser.parse_args(argv)
    policies = args.policies.split(",")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    profiler = cProfile.Profile() if args.profile else None
    print(f"ms per iteration in the chooser: median of {args.repeats} runs [min-max], p99 iteration (median)")
    print(f"{'batch':>5} " + " ".join(f"{p:>26}" for p in policies))
    for batch_size in batch_sizes:
        cells = []
        for policy in policies:
            runs = []
            for seed in range(args.repeats):
                if profiler is not None:
                    profiler.enable()
                runs.append(measure(policy, batch_size, args.iterations, seed))
                if profiler is not None:
                    profiler.disable()
            means = [m for m, _ in runs]
            p99 = statistics.median(p for _, p in runs)
            cells.append(f"{statistics.median(means):6.3f} [{min(means):.3f}-{max(means):.3f}] {p99:6.2f}")
        print(f"{batch_size:>5} " + " ".join(f"{c:>26}" for c in cells), flush=True)
    if profiler is not None:
        profiler.dump_stats(args.profile)
        print(f"profile written to {args.profile}")


if __name__ == "__main__":
    main()
