"""`KPlan` (each request's K for the step being scheduled) and `StepLog` (where the scheduler's steps go),
without vLLM: a chooser that answers from a table and keeps what it was asked."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from cluster.vllm_backend.chooser import DrafterLag
from cluster.vllm_backend.counters import SchedulerCounters
from cluster.vllm_backend.k_plan import KPlan
from cluster.vllm_backend.settings import SchedulerSettings
from cluster.vllm_backend.step_record import RecordFile, StepLog, StepRecord
from policy.stats import IterationStats, RequestOutlook

MAX_SPEC_TOKENS = 4


@dataclasses.dataclass
class _Request:  # what KPlan reads of a vLLM request
    num_tokens: int
    max_tokens: int
    num_output_tokens: int


class _TableChooser:
    """Answers K from `table` (7 where it has none: above K_max), and keeps every call."""

    def __init__(self, table: dict[str, int]) -> None:
        self.table = table
        self.asked: list[list[str]] = []
        self.joined: list[tuple[list[str], dict[str, int]]] = []
        self.outlooks: list[dict[str, RequestOutlook]] = []

    def choose(self, request_ids: list[str]) -> dict[str, int]:
        self.asked.append(list(request_ids))
        return {r: self.table.get(r, 7) for r in request_ids}

    def observe(self, stats: IterationStats) -> None:
        pass

    def release(self, request_id: str) -> None:
        pass

    def set_outlook(self, outlook: dict[str, RequestOutlook]) -> None:
        self.outlooks.append(outlook)

    def choose_joined(self, joined: list[str], others: dict[str, int]) -> dict[str, int]:
        self.joined.append((list(joined), dict(others)))
        return {r: 1 for r in joined}


def _plan(chooser: _TableChooser, chooses_ahead: bool = True) -> KPlan:
    return KPlan(chooser, MAX_SPEC_TOKENS, DrafterLag(skips_drafter=True), chooses_ahead)


REQUESTS = {r: _Request(num_tokens=40, max_tokens=64, num_output_tokens=10) for r in "abcde"}


def test_api_settings_win_over_the_chooser_and_every_k_stays_within_k_max() -> None:
    chooser = _TableChooser({"a": 2, "b": 3})
    plan = _plan(chooser, chooses_ahead=False)
    plan.add("a", None)  # the policy decides
    plan.add("b", "off")
    plan.add("c", 9)  # capped at K_max
    plan.add("d", "sometimes")  # refused: the policy decides
    assert plan.decide(["a", "b", "c", "d"], REQUESTS) == {"a": 2, "b": 0, "c": 4, "d": 4}
    assert chooser.asked == [["a", "d"]]  # only the requests the policy decides
    assert not plan.is_chosen_ahead
    plan.forget("a")
    assert "a" not in plan.chosen and "a" not in plan.requested


def test_a_choice_made_ahead_is_used_and_a_joined_request_gets_its_k_with_the_others_kept() -> None:
    chooser = _TableChooser({"a": 3, "b": 1})
    plan = _plan(chooser)
    for request_id in "abc":
        plan.add(request_id, None)
    plan.decide(["a", "b"], REQUESTS)  # nothing chosen ahead yet: chosen now
    assert chooser.asked == [["a", "b"]]
    plan.choose_ahead(REQUESTS)  # while the worker runs the step: for its drafting requests
    assert chooser.asked == [["a", "b"], ["a", "b"]]
    chooser.table = {"a": 0, "b": 0}  # what a choice made now would say
    assert plan.decide(["a", "b", "c"], REQUESTS) == {"a": 3, "b": 1, "c": 1}
    assert plan.is_chosen_ahead
    assert chooser.joined == [(["c"], {"a": 3, "b": 1})]
    assert len(chooser.asked) == 2  # the step used the ahead choice; nothing asked in between
    # The joined request's choice is timed apart from the ahead one: it runs on the step's path.
    assert plan.join_s > 0.0 and plan.choose_s == plan._ahead_s
    plan.choose_ahead(REQUESTS)
    plan.decide(["a", "b", "c"], REQUESTS)  # nobody joined
    assert plan.join_s == 0.0 and len(chooser.joined) == 1


def test_without_choosing_ahead_every_step_asks_the_chooser_and_outlooks_go_with_the_choice() -> None:
    chooser = _TableChooser({"a": 2})
    plan = _plan(chooser, chooses_ahead=False)
    plan.add("a", None)
    plan.choose_ahead(REQUESTS)
    plan.decide(["a"], REQUESTS)
    plan.choose_ahead(REQUESTS)
    plan.decide(["a"], REQUESTS)
    assert chooser.asked == [["a"], ["a"]]
    # 54 tokens still to generate; the drafter never lagged: nothing to catch up
    assert plan.chosen_outlook == {"a": RequestOutlook(num_catch_up_tokens=0, num_remaining_tokens=54)}
    assert chooser.outlooks[-1] == plan.chosen_outlook


def test_a_record_files_lines_read_back_as_the_steps_every_field(tmp_path: Path) -> None:
    # What `bench.replay_record` and the report read: each field as kept (floats exact, None, the per-request
    # dicts, the outlook's lists), one JSON line per step, appended to an existing file.
    path = tmp_path / "record.jsonl"
    path.write_text('{"step": 0}\n')  # an earlier engine's line
    steps = [
        StepRecord(
            step=1,
            num_drafts={"r-1": 2, "r-2": 0},
            num_accepted={"r-1": 1, "r-2": 0},
            chosen={"r-1": 3},
            num_draft_steps=3,
            step_time_s=0.1 + 0.2,
            draft_time_s=None,
            draft_prefill_tokens=17,
            choose_cpu_s=1.5e-05,
            is_chosen_ahead=True,
            join_s=2.5e-4,
            outlook={"r-1": [0, 54]},
            refit_cpu_s=7e-4,
            start_s=1796491627.123456,
        ),  # fmt: skip
        StepRecord(step=2, num_drafts={}, num_accepted={}),
    ]
    record = RecordFile(path)
    for step in steps:
        record.keep(step)
    record.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert lines == [{"step": 0}, *(dataclasses.asdict(step) for step in steps)]


def test_the_step_log_keeps_steps_where_asked_and_writes_its_file_and_metrics(tmp_path: Path) -> None:
    quiet = StepLog(SchedulerSettings())
    assert not quiet.takes_steps
    record_path, metrics_path = tmp_path / "record.jsonl", tmp_path / "metrics.json"
    settings = SchedulerSettings(
        is_recording=True, record_path=str(record_path), metrics_path=str(metrics_path), metrics_interval_s=60
    )
    log = StepLog(settings)
    assert log.takes_steps
    for step in (1, 2):
        log.keep(StepRecord(step=step, num_drafts={"a": step}, num_accepted={"a": 1}))
    assert [r.step for r in log.steps] == [1, 2]
    assert record_path.read_text() == ""  # held until a write, where it delays no step
    log.write()
    assert [json.loads(line)["num_drafts"] for line in record_path.read_text().splitlines()] == [
        {"a": 1},
        {"a": 2},
    ]
    counters = SchedulerCounters(num_steps=2)
    chooser = _TableChooser({})
    log.write_metrics(counters, chooser)
    assert json.loads(metrics_path.read_text())["num_steps"] == 2
    counters.num_steps = 3
    log.write_metrics(counters, chooser)  # within the interval: not written
    assert json.loads(metrics_path.read_text())["num_steps"] == 2
    log.close()
    log.close()  # closing twice is harmless (the scheduler's shutdown after a test's)
