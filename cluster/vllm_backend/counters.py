"""The scheduler's counters: totals since start that `PolicyScheduler` writes as JSON every
`SchedulerSettings.metrics_interval_s` (atomically) and the Serve replica reads for `/metrics`, beside vLLM's
own. Free of vLLM: the replica's process imports it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from policy.stats import RequestIterationStats

# The counters taken from the chooser's gauges (`take_chooser_gauges`): each field and the gauge it reads.
_CHOOSER_GAUGES = {
    "guard_holds": "policy_guard_holds",
    "guard_plain_restarts": "policy_guard_plain_restarts",
    "central_decisions": "policy_central_decisions",
    "policy_actor_failures": "policy_actor_failures",
    "tracked_requests": "policy_tracked_requests",
}


@dataclass
class SchedulerCounters:
    num_steps: int = 0
    num_drafting_steps: int = 0  # steps with max K > 0 (the others run no drafter on our worker)
    num_request_steps: int = 0  # (request, decode step) pairs
    num_drafts: int = 0  # (request, decode step) pairs with K > 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    mean_num_spec_tokens: float = 0.0  # over the last step's decoding requests
    batch_size: int = 0
    step_time_s: float = 0.0
    draft_time_s: float = 0.0  # total in the drafter, as our worker measured it (0 without it)
    guard_holds: int = 0
    guard_plain_restarts: int = 0  # (`policy_guard_plain_restarts`)
    central_decisions: int = 0
    policy_actor_failures: int = 0
    tracked_requests: int = 0  # requests the chooser keeps state for (`policy_tracked_requests`)

    def count_step(self, requests: list[RequestIterationStats], step_time_s: float) -> None:
        """A step's decoding requests (none: a step of prompts alone, which leaves the per-step gauges)."""
        if not requests:
            return
        self.num_request_steps += len(requests)
        self.num_drafts += sum(r.num_spec_tokens > 0 for r in requests)
        self.num_draft_tokens += sum(r.num_spec_tokens for r in requests)
        self.num_accepted_tokens += sum(r.num_accepted_tokens for r in requests)
        self.mean_num_spec_tokens = sum(r.num_spec_tokens for r in requests) / len(requests)
        self.batch_size = len(requests)
        self.step_time_s = step_time_s

    def take_chooser_gauges(self, chooser: Any) -> None:
        """Guard holds and plain figures learned again, central decisions and policy actor failures, and the
        requests the chooser keeps state for: read from the chooser's `gauges()`, where each layer of the
        stack (the measured guard, a `PolicyClient`, the local chooser) adds its own (0 where none says)."""
        gauges_of = getattr(chooser, "gauges", None)
        gauges = gauges_of() if gauges_of else {}
        for field, gauge in _CHOOSER_GAUGES.items():
            setattr(self, field, int(gauges.get(gauge, 0)))

    def write(self, path: str) -> None:
        """As JSON, atomically: a reader sees the last write or the one before."""
        tmp = f"{path}.tmp"
        with open(tmp, "w") as out:
            json.dump(self.__dict__, out)
        os.replace(tmp, path)


def read_scheduler_counters(path: str | None) -> dict[str, float]:
    """The scheduler's latest counters ({} before its first write)."""
    if path is None or not Path(path).is_file():
        return {}
    return {k: float(v) for k, v in json.loads(Path(path).read_text()).items()}
