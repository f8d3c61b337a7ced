"""The scheduler's counters file, as the scheduler writes it and the Serve replica reads it (no vLLM)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from cluster.vllm_backend.counters import SchedulerCounters, read_scheduler_counters
from policy.stats import RequestIterationStats


def test_the_replica_reads_what_the_scheduler_wrote_and_nothing_before(tmp_path: Path) -> None:
    path = str(tmp_path / "counters.json")
    assert read_scheduler_counters(path) == {} and read_scheduler_counters(None) == {}
    counters = SchedulerCounters(num_steps=7, num_drafting_steps=3, mean_num_spec_tokens=1.5)
    # A guard around a client of the central policy actor: its gauges, each layer's added.
    gauges = {
        "policy_guard_holds": 2,
        "policy_guard_plain_restarts": 5,
        "policy_central_decisions": 4,
        "policy_actor_failures": 1,
        "policy_tracked_requests": 3.0,
    }
    counters.take_chooser_gauges(SimpleNamespace(gauges=lambda: gauges))
    counters.write(path)
    read = read_scheduler_counters(path)
    assert read["num_steps"] == 7.0 and read["mean_num_spec_tokens"] == 1.5
    assert (read["guard_holds"], read["central_decisions"], read["policy_actor_failures"]) == (2.0, 4.0, 1.0)
    assert read["tracked_requests"] == 3.0 and read["guard_plain_restarts"] == 5.0
    assert not Path(f"{path}.tmp").exists()  # written aside, then moved into place
    counters.num_steps = 8
    counters.take_chooser_gauges(object())  # a chooser without gauges: 0
    counters.write(path)
    assert read_scheduler_counters(path)["num_steps"] == 8.0
    assert read_scheduler_counters(path)["guard_holds"] == 0.0


def test_a_step_adds_its_requests_to_the_totals_and_sets_the_last_steps_gauges() -> None:
    counters = SchedulerCounters()
    step = [
        RequestIterationStats(
            "a", num_spec_tokens=3, num_accepted_tokens=2, num_committed_tokens=3, context_len=9
        ),
        RequestIterationStats(
            "b", num_spec_tokens=0, num_accepted_tokens=0, num_committed_tokens=1, context_len=5
        ),
    ]
    counters.count_step(step, 0.1)
    counters.count_step(step[:1], 0.2)
    assert (counters.num_request_steps, counters.num_drafts) == (3, 2)
    assert (counters.num_draft_tokens, counters.num_accepted_tokens) == (6, 4)
    assert (counters.mean_num_spec_tokens, counters.batch_size, counters.step_time_s) == (3.0, 1, 0.2)
    counters.count_step([], 0.5)  # prompts alone: no decoding request, the last step's gauges stay
    assert (counters.num_request_steps, counters.batch_size, counters.step_time_s) == (3, 1, 0.2)
