"""Serving metrics in the Prometheus text format.

Speculative-decoding counters are named like vLLM's (`spec_decode_num_drafts`, `..._num_draft_tokens`,
`..._num_accepted_tokens`, `..._num_accepted_tokens_per_pos`) under our prefix; our own gauges say what the
policy is doing (mean K in use, utility estimate, batch size, iteration time).
"""

from __future__ import annotations

import threading
from collections import defaultdict

from policy.stats import IterationStats

PREFIX = "moespec"


class Metrics:
    def __init__(self, model_name: str) -> None:
        self.model_name = model_name
        self._lock = threading.Lock()
        self.counters: dict[str, float] = defaultdict(float)
        self.accepted_per_pos: dict[int, int] = defaultdict(int)
        self.gauges: dict[str, float] = defaultdict(float)
        self._plain_iteration_s = 0.0  # EWMA of iteration time with K = 0 everywhere, for the utility gauge

    def count(self, name: str, value: float = 1.0) -> None:
        with self._lock:
            self.counters[name] += value

    def set_gauge(self, name: str, value: float) -> None:
        with self._lock:
            self.gauges[name] = value

    def observe(self, stats: IterationStats) -> None:
        drafts = [r for r in stats.requests if r.num_spec_tokens > 0]
        with self._lock:
            self.counters["iterations_total"] += 1
            self.counters["draft_seconds_total"] += stats.draft_time_s
            self.counters["verify_seconds_total"] += stats.verify_time_s
            self.counters["other_seconds_total"] += stats.other_time_s
            self.counters["generation_tokens_total"] += sum(r.num_committed_tokens for r in stats.requests)
            self.counters["spec_decode_num_drafts_total"] += len(drafts)
            self.counters["spec_decode_num_draft_tokens_total"] += sum(r.num_spec_tokens for r in drafts)
            self.counters["spec_decode_num_accepted_tokens_total"] += sum(
                r.num_accepted_tokens for r in drafts
            )
            for r in drafts:
                for pos in range(r.num_accepted_tokens):
                    self.accepted_per_pos[pos] += 1
            num_spec = [r.num_spec_tokens for r in stats.requests]
            self.gauges["batch_size"] = stats.batch_size
            self.gauges["num_spec_tokens_mean"] = sum(num_spec) / max(1, len(num_spec))
            self.gauges["iteration_time_seconds"] = stats.iteration_time_s
            self.gauges["overhead_fraction"] = stats.other_time_s / max(1e-9, stats.iteration_time_s)
            self._update_utility(stats, num_spec)

    def _update_utility(self, stats: IterationStats, num_spec: list[int]) -> None:
        if not any(num_spec):
            self._plain_iteration_s = (
                0.9 * self._plain_iteration_s + 0.1 * stats.iteration_time_s
                if self._plain_iteration_s
                else stats.iteration_time_s
            )
            self.gauges["utility"] = 1.0
        elif self._plain_iteration_s:
            etr = sum(r.num_committed_tokens for r in stats.requests) / max(1, stats.batch_size)
            self.gauges["utility"] = etr / (stats.iteration_time_s / self._plain_iteration_s)

    def render(self) -> str:
        label = f'model_name="{self.model_name}"'
        lines: list[str] = []
        with self._lock:
            for name, value in sorted(self.counters.items()):
                lines += [f"# TYPE {PREFIX}:{name} counter", f"{PREFIX}:{name}{{{label}}} {value:g}"]
            lines.append(f"# TYPE {PREFIX}:spec_decode_num_accepted_tokens_per_pos_total counter")
            for pos, value in sorted(self.accepted_per_pos.items()):
                lines.append(
                    f'{PREFIX}:spec_decode_num_accepted_tokens_per_pos_total{{{label},position="{pos}"}} '
                    f"{value}"
                )
            for name, value in sorted(self.gauges.items()):
                lines += [f"# TYPE {PREFIX}:{name} gauge", f"{PREFIX}:{name}{{{label}}} {value:g}"]
        return "\n".join(lines) + "\n"
