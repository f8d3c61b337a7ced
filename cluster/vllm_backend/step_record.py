"""The scheduler's step record: what each step did, as `PolicyScheduler` saw it, kept in memory for tests
(`SchedulerSettings.is_recording`) and appended to a file as JSON lines for diagnostics (`record_path`: the
benchmarks keep one for every server that runs our scheduler; `bench.replay_record` and the report read it).
`StepLog` is where the scheduler's steps and counters go: that record, its file and the metrics file.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from cluster.vllm_backend.counters import SchedulerCounters
from cluster.vllm_backend.settings import SchedulerSettings

MAX_UNWRITTEN_STEPS = 64  # a record file's lines are written at most this many steps late


@dataclass
class StepRecord:
    """One step as the scheduler saw it (kept when `is_recording`, for tests and debugging)."""

    step: int
    num_drafts: dict[str, int]  # drafts verified this step per request (K_r of this step)
    num_accepted: dict[str, int]  # drafts accepted per request
    chosen: dict[str, int] = field(default_factory=dict)  # K_r decided this step (verified next step)
    num_draft_steps: int = 0  # num_spec_tokens_to_schedule: the drafter's steps at the end of this step
    step_time_s: float = 0.0  # schedule() to update_from_output()
    draft_time_s: float | None = None  # the drafter at the end of this step (None: not measured)
    draft_prefill_tokens: int | None = None  # ... and the history tokens it caught up on (its prefill)
    guard_holds: int = 0  # the measured guard's verdicts against the chooser so far
    num_scheduled: int = 0  # requests in the target's forward (decoding and prefilling)
    num_tokens: int = 0  # tokens in the target's forward (prefill chunks, verified drafts, sampled positions)
    num_prefill_tokens: int = 0  # of those, prefill tokens (requests not decoding this step)
    # in the chooser's choose() for this step's K (inside the step; off its path when chosen ahead)
    choose_s: float = 0.0
    choose_cpu_s: float = (
        0.0  # ... of which this thread ran on a CPU (the rest: waiting for the GIL or a core)
    )
    # this step's K were chosen while the worker ran the step before (`choose_ahead`), before its observation;
    # choose_s and choose_cpu_s are that call's, off the path between steps
    is_chosen_ahead: bool = False
    # in the chooser's choose_joined() for the requests whose prompts complete in this step, others' K kept
    # (chosen ahead only): inside the step, on its path before the worker starts it
    join_s: float = 0.0
    join_cpu_s: float = 0.0  # ... of which this thread ran on a CPU
    # per request, the `RequestOutlook` the chooser was given with the choice of `chosen`: [catch-up tokens,
    # tokens it may still generate] (`bench.replay_record` gives the chooser the same)
    outlook: dict[str, list[int]] = field(default_factory=dict)
    # observing this step between it and the next (the chooser's observe() where it is not deferred)
    observe_s: float = 0.0
    # in the chooser's observe() of this step (and release() of the requests it finished), deferred to while the
    # worker ran the next step (`PolicyScheduler` with choose_ahead): off the path between steps
    observe_ahead_s: float = 0.0
    # CPU in the cost model's refits while the worker ran this step (`CostModel.refit_if_due`: 16 steps and
    # 0.25 s apart at least, 2 s where none of them drafted), besides choose and observe
    refit_cpu_s: float = 0.0
    gap_s: float = 0.0  # from the end of the step before to this one's schedule(): the engine core outside
    is_near_drafting: bool = False  # IterationStats.is_near_drafting: the drafter ran at or next to this step
    start_s: float = 0.0  # wall clock (time.time()) at schedule(), to align with a client's timeline


class RecordFile:
    """A step record file. `keep` holds a step; `write` writes the steps held, where writing delays no
    step (the scheduler calls it while the worker runs one, and when the engine has nothing left to run).
    A step's line took 0.2 ms of CPU at batch 32, on the engine core's path between steps before. The lines
    are msgspec's JSON: a batch-32 line took 37 us with `json.dumps`, 4 us so. The record is the benchmarks',
    and should not cost what they measure: served on the demo pair, auto without it ran 1.029x auto with it
    with `json.dumps` (paired over 16 runs), 0.998x with msgspec (8 runs at batch 16 / 32)."""

    def __init__(self, path: str | Path) -> None:
        self._file = open(path, "ab")  # noqa: SIM115 (open for the engine's life)
        self._unwritten: list[StepRecord] = []
        self._encoder = msgspec.json.Encoder()

    def keep(self, record: StepRecord) -> None:
        self._unwritten.append(record)
        if len(self._unwritten) >= MAX_UNWRITTEN_STEPS:  # a vLLM that never calls get_grammar_bitmask
            self.write()

    def write(self) -> None:
        if not self._unwritten:
            return
        lines = b"".join(self._encoder.encode(record) + b"\n" for record in self._unwritten)
        self._unwritten.clear()
        self._file.write(lines)
        self._file.flush()  # a served engine's record survives its kill, less the steps since

    def close(self) -> None:
        self.write()
        self._file.close()


class StepLog:
    """Where `PolicyScheduler`'s steps and counters go: the steps kept in memory (`is_recording`), the record
    file (`record_path`) and, every `metrics_interval_s`, the counters for the Serve replica (`metrics_path`).
    `write` and `close` write what is held; the scheduler calls `write` where it delays no step."""

    def __init__(self, settings: SchedulerSettings) -> None:
        self.steps: list[StepRecord] = []
        self._is_recording = settings.is_recording
        path = settings.record_path
        self.file = None if path is None else RecordFile(path)
        self._metrics_path = settings.metrics_path
        self._metrics_interval_s = settings.metrics_interval_s
        self._last_metrics_write = 0.0

    @property
    def takes_steps(self) -> bool:
        """Whether `keep` keeps anything (the scheduler builds a step's record only then)."""
        return self._is_recording or self.file is not None

    def keep(self, record: StepRecord) -> None:
        if self._is_recording:
            self.steps.append(record)
        if self.file is not None:
            self.file.keep(record)

    def write(self) -> None:
        if self.file is not None:
            self.file.write()

    def write_metrics(self, counters: SchedulerCounters, chooser: Any) -> None:
        """The counters, with the chooser's gauges, if `metrics_interval_s` has passed since the last write."""
        now = time.monotonic()
        if self._metrics_path is None or now - self._last_metrics_write < self._metrics_interval_s:
            return
        self._last_metrics_write = now
        counters.take_chooser_gauges(chooser)
        counters.write(self._metrics_path)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
