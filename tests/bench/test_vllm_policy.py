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
    assert summary["step_ms_p50_drafting"] == 50.0 and summary["step_ms_p50_plain"] == 20.0


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
