"""bench.vllm_policy without vLLM: the auto server's command carries the record path, and a cell's summary of
the scheduler's record counts what it did."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.vllm_policy import PolicySettings, scheduler_summary


def _step(step: int, drafts: dict[str, int], accepted: dict[str, int], holds: int = 0) -> dict[str, object]:
    return {
        "step": step,
        "num_drafts": drafts,
        "num_accepted": accepted,
        "chosen": {},
        "num_draft_steps": max(drafts.values(), default=0),
        "step_time_s": 0.05 if any(drafts.values()) else 0.02,
        "draft_time_s": None,
        "guard_holds": holds,
    }


def test_summary_counts_drafting_acceptance_and_holds() -> None:
    steps = [
        _step(1, {}, {}),  # a prefill step: no decoding request
        _step(2, {"a": 0, "b": 0}, {"a": 0, "b": 0}),
        _step(3, {"a": 2, "b": 0}, {"a": 1, "b": 0}, holds=0),
        _step(4, {"a": 2, "b": 4}, {"a": 2, "b": 1}, holds=1),
    ]
    summary = scheduler_summary(steps)
    assert summary["num_steps"] == 4
    assert summary["num_drafting_steps"] == 2
    assert summary["num_spec_tokens_histogram"] == {"0": 3, "2": 2, "4": 1}
    assert summary["mean_num_spec_tokens"] == 8 / 6
    assert summary["acceptance"] == 4 / 8
    assert summary["guard_holds"] == 1
    assert summary["step_ms_p50_verifying"] == 50.0 and summary["step_ms_p50_not_verifying"] == 20.0
    assert summary["prefill_steps"] is None and summary["choose_ms_p50"] is None  # an older record


def test_summary_splits_steps_by_what_the_target_verified_and_prefilled() -> None:
    """A step whose drafter is off (num_draft_steps 0) still verifies the drafts of the step before: it is a
    verifying step (session 7's summary called it plain). Steps with prefill tokens are counted apart."""
    detail = {"num_prefill_tokens": 0, "choose_s": 0.001, "observe_s": 0.002, "gap_s": 0.004}
    steps = [
        {**_step(1, {}, {}), **detail, "num_prefill_tokens": 100, "step_time_s": 0.5},  # new requests
        {**_step(2, {"a": 0, "b": 0}, {"a": 0, "b": 0}), **detail, "num_draft_steps": 2},
        {**_step(3, {"a": 2, "b": 2}, {"a": 1, "b": 2}), **detail, "num_draft_steps": 0},
        {**_step(4, {"a": 0, "b": 0}, {"a": 0, "b": 0}), **detail, "num_draft_steps": 0},
        {**_step(5, {"a": 1, "b": 1}, {"a": 1, "b": 0}), **detail, "num_prefill_tokens": 30},
    ]
    summary = scheduler_summary(steps)
    assert summary["num_drafting_steps"] == 2  # steps 2 and 5
    assert summary["step_ms_p50_verifying"] == 50.0  # step 3 only: step 5 also prefilled
    assert summary["step_ms_p50_not_verifying"] == 20.0  # steps 2 and 4
    assert summary["prefill_steps"] == 2 and summary["prefill_steps_s"] == 0.55
    assert summary["steps_s"] == 0.64 and summary["gap_s"] == 0.02
    assert summary["mean_batch"] == 2.0
    assert (summary["choose_ms_p50"], summary["observe_ms_p50"], summary["gap_ms_p50"]) == (1.0, 2.0, 4.0)


def _command(tmp_path: Path, **policy: Any) -> list[str]:
    """The command line of a policy server on a tiny model shape, with `policy`'s settings."""
    settings = PolicySettings(
        target=tmp_path / "target",
        draft=tmp_path / "draft",
        served_name="t",
        dtype="float32",
        max_model_len=256,
        max_num_seqs=4,
        cache_root=tmp_path,
        **policy,
    )
    return settings.command(Path("python"), 8000, 4)


def test_auto_server_command_records_its_steps(tmp_path: Path) -> None:
    command = _command(tmp_path, policy="auto", record_path=tmp_path / "record.jsonl")
    section = json.loads(command[command.index("--additional-config") + 1])["moespec"]
    assert section == {"policy": {"kind": "auto"}, "record_path": str(tmp_path / "record.jsonl")}
    assert "--scheduler-cls" in command


def test_ours_static_server_runs_our_scheduler_at_a_fixed_k(tmp_path: Path) -> None:
    command = _command(tmp_path, policy="static", policy_num_spec_tokens=2)
    section = json.loads(command[command.index("--additional-config") + 1])["moespec"]
    assert section == {"policy": {"kind": "static", "num_spec_tokens": 2}}
    assert "--scheduler-cls" in command and "--worker-cls" in command
