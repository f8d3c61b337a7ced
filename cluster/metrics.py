"""Serving metrics in the Prometheus text format, built with `prometheus_client` (one registry per router).

Every series is declared here with its help text and exists from start-up at 0. Speculative-decoding
counters are named like vLLM's (`spec_decode_num_drafts`, `..._num_draft_tokens`, `..._num_accepted_tokens`,
`..._num_accepted_tokens_per_pos`) under our prefix; our own gauges say what the policy is doing (mean K in
use, utility estimate, batch size, iteration time).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, exposition, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from policy.stats import IterationStats

PREFIX = "moespec"
CONTENT_TYPE = exposition.CONTENT_TYPE_LATEST

# Exposed name -> help. Counters end in `_total` (prometheus_client adds the suffix to the family name).
COUNTERS = {
    "requests_total": "Requests admitted to the engine.",
    "requests_rejected_total": "Requests refused with 429 because the batch and the queue were full.",
    "requests_aborted_total": "Requests aborted because the client went away.",
    "requests_timed_out_total": "Requests that exceeded engine.request_timeout_s.",
    "iterations_total": "Engine iterations (one verification forward each).",
    "drafting_iterations_total": "Engine steps in which the drafter proposed for at least one request (vllm backend).",
    "draft_seconds_total": "Time spent in the drafter's forwards.",
    "verify_seconds_total": "Time spent in the target's verification forwards.",
    "other_seconds_total": "Iteration time outside the draft and verify forwards (calls, scheduling).",
    "generation_tokens_total": "Output tokens committed.",
    "spec_decode_num_drafts_total": "Request-iterations that proposed at least one draft token (as vLLM's).",
    "spec_decode_num_draft_tokens_total": "Draft tokens proposed (as vLLM's).",
    "spec_decode_num_accepted_tokens_total": "Draft tokens accepted by the target (as vLLM's).",
}
PER_POSITION = (
    "spec_decode_num_accepted_tokens_per_pos_total",
    "Draft tokens accepted, by position in the draft (as vLLM's).",
)
GAUGES = {
    "num_requests_outstanding": "Requests submitted and not yet finished.",
    "drafter_failures": "Drafter calls that failed (serving continued without speculation).",
    "target_recoveries": "Times the target's caches were rebuilt from the token histories.",
    "policy_guard_holds": "Times the measured guard held plain decoding because drafting measured slower.",
    "policy_guard_plain_restarts": "Times the measured guard learned a batch size's plain decoding rate again "
    "because a plain step ran far faster than it (a rate learned while the machine was slowed).",
    "policy_central_decisions": "K decisions received from the central policy actor.",
    "policy_actor_failures": "Calls to the central policy actor that failed (the local chooser decided).",
    "policy_acceptance": "Per-token draft acceptance of the traffic, as the local chooser estimates it.",
    "policy_opening_acceptance": "Per-token draft acceptance of requests' opening verifications (their first "
    "decode step's), as the local chooser estimates it apart from the traffic's.",
    "policy_tracked_requests": "Requests the local chooser keeps state for: it follows the requests running "
    "(a finished one is released; growing alone, it leaks).",
    "policy_predicted_speedup": "The local chooser's last K choice: predicted tokens/s over plain decoding.",
    "policy_test_cost_share": "Net time of the local chooser's test phases over the time observed (its budget).",
    "batch_size": "Requests in the last iteration's batch.",
    "num_spec_tokens_mean": "Mean K over the last iteration's requests.",
    "iteration_time_seconds": "Duration of the last iteration.",
    "overhead_fraction": "Fraction of the last iteration outside the draft and verify forwards.",
    "utility": "Estimated speedup of the last iteration over plain decoding (committed tokens / cost).",
}


class Metrics:
    """Counters and gauges by declared name; `render` exposes them through prometheus_client (no `_created`
    series: a counter's start is the process's)."""

    def __init__(self, model_name: str, max_spec_tokens: int = 0) -> None:
        self.model_name = model_name
        self._lock = threading.Lock()
        self.counters = dict.fromkeys(COUNTERS, 0.0)
        self.accepted_per_pos = dict.fromkeys(range(max_spec_tokens), 0)  # every position the config allows
        self.gauges = dict.fromkeys(GAUGES, 0.0)
        self._plain_iteration_s = 0.0  # EWMA of iteration time with K = 0 everywhere, for the utility gauge
        self.registry = CollectorRegistry(auto_describe=True)
        self.registry.register(self)

    def count(self, name: str, value: float = 1.0) -> None:
        with self._lock:
            self.counters[_declared(self.counters, name)] += value

    def set_gauge(self, name: str, value: float) -> None:
        with self._lock:
            self.gauges[_declared(self.gauges, name)] = value

    def render(self) -> str:
        return generate_latest(self.registry).decode()

    def collect(self) -> Iterator[Metric]:
        """prometheus_client's collector protocol: one family per declared series."""
        with self._lock:
            counters, per_pos, gauges = dict(self.counters), dict(self.accepted_per_pos), dict(self.gauges)
        labels = ["model_name"]
        for name, value in counters.items():
            family = CounterMetricFamily(f"{PREFIX}:{name}", COUNTERS[name], labels=labels)
            family.add_metric([self.model_name], value)
            yield family
        family = CounterMetricFamily(
            f"{PREFIX}:{PER_POSITION[0]}", PER_POSITION[1], labels=[*labels, "position"]
        )
        for pos, count in sorted(per_pos.items()):
            family.add_metric([self.model_name, str(pos)], count)
        yield family
        for name, value in gauges.items():
            gauge = GaugeMetricFamily(f"{PREFIX}:{name}", GAUGES[name], labels=labels)
            gauge.add_metric([self.model_name], value)
            yield gauge

    def observe(self, stats: IterationStats) -> None:
        drafts = [r for r in stats.requests if r.num_spec_tokens > 0]
        self.count("iterations_total")
        self.count("draft_seconds_total", stats.draft_time_s)
        self.count("verify_seconds_total", stats.verify_time_s)
        self.count("other_seconds_total", stats.other_time_s)
        self.count("generation_tokens_total", sum(r.num_committed_tokens for r in stats.requests))
        self.count("spec_decode_num_drafts_total", len(drafts))
        self.count("spec_decode_num_draft_tokens_total", sum(r.num_spec_tokens for r in drafts))
        self.count("spec_decode_num_accepted_tokens_total", sum(r.num_accepted_tokens for r in drafts))
        with self._lock:
            for r in drafts:
                for pos in range(r.num_accepted_tokens):
                    self.accepted_per_pos[pos] = self.accepted_per_pos.get(pos, 0) + 1
        num_spec = [r.num_spec_tokens for r in stats.requests]
        self.set_gauge("batch_size", stats.batch_size)
        self.set_gauge("num_spec_tokens_mean", sum(num_spec) / max(1, len(num_spec)))
        self.set_gauge("iteration_time_seconds", stats.iteration_time_s)
        self.set_gauge("overhead_fraction", stats.other_time_s / max(1e-9, stats.iteration_time_s))
        self._update_utility(stats, num_spec)

    def _update_utility(self, stats: IterationStats, num_spec: list[int]) -> None:
        """Called from the engine loop's thread only (it alone touches `_plain_iteration_s`)."""
        if not any(num_spec):
            self._plain_iteration_s = (
                0.9 * self._plain_iteration_s + 0.1 * stats.iteration_time_s
                if self._plain_iteration_s
                else stats.iteration_time_s
            )
            self.set_gauge("utility", 1.0)
        elif self._plain_iteration_s:
            etr = sum(r.num_committed_tokens for r in stats.requests) / max(1, stats.batch_size)
            self.set_gauge("utility", etr / (stats.iteration_time_s / self._plain_iteration_s))


def _declared(table: dict[str, float], name: str) -> str:
    if name not in table:
        raise KeyError(
            f"metric {name!r} is not declared; declare it with its help text in cluster/metrics.py"
        )
    return name
