"""The scheduler's counters file, as the scheduler writes it and the Serve replica reads it (no vLLM)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

from cluster.vllm_backend.counters import SchedulerCounters, read_scheduler_counters


def test_the_replica_reads_what_the_scheduler_wrote_and_nothing_before(tmp_path: Path) -> None:
    path = str(tmp_path / "counters.json")
    assert read_scheduler_counters(path) == {} and read_scheduler_counters(None) == {}
    counters = SchedulerCounters(num_steps=7, num_drafting_steps=3, mean_num_spec_tokens=1.5)
    # A guard (num_holds) around a client of the central policy actor.
    client = SimpleNamespace(num_central_decisions=4, num_failures=1)
    counters.take_chooser_gauges(SimpleNamespace(num_holds=2, inner=client))
    counters.write(path)
    read = read_scheduler_counters(path)
    assert read["num_steps"] == 7.0 and read["mean_num_spec_tokens"] == 1.5
    assert (read["guard_holds"], read["central_decisions"], read["policy_actor_failures"]) == (2.0, 4.0, 1.0)
    assert not Path(f"{path}.tmp").exists()  # written aside, then moved into place
    counters.num_steps = 8
    counters.take_chooser_gauges(object())  # a chooser without gauges: 0
    counters.write(path)
    assert read_scheduler_counters(path)["num_steps"] == 8.0
    assert read_scheduler_counters(path)["guard_holds"] == 0.0
