"""`bench.record_steps`: a served run's step records, read per cell, batch-size range and kind of step."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest

from bench.record_steps import (
    Account,
    account,
    break_even,
    break_even_lines,
    main,
    parse_ranges,
    steps_by_cell,
    uniform_steps,
)
from bench.replay_record import Cell

START = 1_800_000_000.0  # a whole minute: the steps' clocks below stay within it


def step(
    at_s: float, batch: int, *, drafts: int = 0, accepted: int = 0, prompt: int = 0, ms: float = 10.0
) -> dict[str, Any]:
    """A record line of our scheduler: `drafts` verified (and `accepted`) for the first request."""
    num_drafts = {"r0": drafts} if drafts else {}
    return {
        "start_s": START + at_s,
        "step_time_s": ms / 1000,
        "num_scheduled": batch,
        "num_prefill_tokens": prompt,
        "num_drafts": num_drafts,
        "num_accepted": {"r0": accepted} if drafts else {},
    }


def clock(at_s: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(START + at_s))


def test_steps_fall_into_the_cell_whose_span_holds_them() -> None:
    steps = [step(0, 1), step(10, 1), step(12, 2), step(30, 4)]
    cells = [Cell("code 1", clock(9), clock(11)), Cell("code 4", clock(12), clock(20))]
    assert steps_by_cell(steps, cells) == [[steps[1]], [steps[2]]]  # the warm-up and the last step: none


def test_seconds_steps_and_drafting_by_batch_size_range_and_kind() -> None:
    ranges = parse_ranges("1-4,28-32")
    steps = [
        step(0, 2, drafts=1, accepted=1, ms=20),  # 1-4 decode, drafting: 3 tokens
        step(1, 3, ms=10),  # 1-4 decode
        step(2, 32, prompt=100, ms=150),  # 28-32 with a prompt
        step(3, 16, ms=40),  # in no range: in the total alone
    ]
    acc = account(steps, ranges)
    decode = acc.spent[(0, "decode")]
    assert (round(decode.seconds, 6), decode.steps, decode.drafting) == (0.03, 2, 1)
    prompts = acc.spent[(1, "prompts")]
    assert (round(prompts.seconds, 6), prompts.steps, prompts.drafting) == (0.15, 1, 0)
    assert set(acc.spent) == {(0, "decode"), (1, "prompts")}
    assert round(acc.seconds, 6) == 0.22
    assert acc.tokens == 3 + 3 + 32 + 16
    total = Account()
    total.add(acc)
    total.add(acc)
    assert total.tokens == 2 * acc.tokens and total.spent[(0, "decode")].steps == 4


@pytest.mark.parametrize("text", ["1-4,4-8", "8-16,1-4", "4-1", "1-", "a-b"])
def test_ranges_must_be_ordered_and_apart(text: str) -> None:
    with pytest.raises(ValueError, match="range"):
        parse_ranges(text)


def test_the_command_prints_each_cell_and_every_cell_per_mode(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rows = [
        {"mode": mode, "workload": "code", "concurrency": 4, "started": clock(10), "ended": clock(20)}
        for mode in ("auto", "ours1")
    ]
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"args": {}, "rows": rows}))
    records = {
        "auto": [step(11, 4, ms=10), step(12, 4, ms=10)],
        "ours1": [step(11, 4, drafts=1, accepted=1, ms=20)],
    }
    argv = [str(result)]
    for mode, lines in records.items():
        path = tmp_path / f"record-{mode}.jsonl"
        path.write_text("\n".join(map(json.dumps, lines)) + "\n")
        argv += ["--record", f"{mode}={path}"]
    main([*argv, "--ranges", "1-4"])
    out = capsys.readouterr().out
    assert "code 4" in out and "every cell (1)" in out
    auto_lines = [
        line for line in out.splitlines() if line.strip().startswith("auto") and "plain" not in line
    ]
    assert len(auto_lines) == 2 and all("0.02s    2 (   0)" in line for line in auto_lines)
    # The break-even reading: auto's two plain decode steps; ours1 has no step with the whole batch at one K.
    assert "auto      1-4: plain 10.0 ms (2)" in out and "ours1     1-4" not in out
    assert "0.02s    1 (   1)" in out  # ours1's drafting step
    with pytest.raises(SystemExit):
        main([str(result), "--record", "k0=" + str(tmp_path / "record-auto.jsonl")])  # no k0 cells


def batch_step(
    ks: list[int], accepted: list[int], *, next_k: int, ms: float, prompt: int = 0
) -> dict[str, Any]:
    """A record line of a batch of len(ks) requests: each verified ks[i] drafts, of them accepted[i]; the
    drafter drafted `next_k` at its end."""
    ids = [f"r{i}" for i in range(len(ks))]
    return {
        **step(0, len(ks), prompt=prompt, ms=ms),
        "num_drafts": {r: k for r, k in zip(ids, ks, strict=True) if k},
        "num_accepted": {r: a for r, a, k in zip(ids, accepted, ks, strict=True) if k},
        "num_draft_steps": next_k,
    }


@pytest.mark.parametrize(
    ("ratio", "k", "needed"), [(1.5, 1, 0.5), (1.75, 2, 0.5), (0.9, 1, 0.0), (2.0, 1, 1.0), (2.1, 1, None)]
)
def test_break_even_is_the_acceptance_whose_expected_tokens_equal_the_time_ratio(
    ratio: float, k: int, needed: float | None
) -> None:
    found = break_even(ratio, k)
    assert found == pytest.approx(needed, abs=1e-6) if needed is not None else found is None


def test_only_decode_steps_with_the_whole_batch_at_one_k_count_toward_the_break_even() -> None:
    ranges = parse_ranges("1-4")
    steps = [
        batch_step([0, 0], [0, 0], next_k=0, ms=10),  # plain
        batch_step([0, 0], [0, 0], next_k=0, ms=12),  # plain
        batch_step([1, 1], [1, 0], next_k=1, ms=15),  # the whole batch at K = 1: 1 accepted, 1 rejected
        batch_step([1, 0], [1, 0], next_k=1, ms=30),  # half the batch: left out
        batch_step([1, 1], [1, 1], next_k=2, ms=30),  # drafts K = 2 next: left out
        batch_step([0, 0], [0, 0], next_k=0, ms=90, prompt=50),  # a prompt: left out
        batch_step([2, 2], [2, 2], next_k=2, ms=40),  # K = 2 at 4x plain's 10 ms: never pays
    ]
    uniform = uniform_steps(steps, ranges)
    assert sorted(uniform) == [(0, 0), (0, 1), (0, 2)]
    assert uniform[(0, 0)].seconds == [0.01, 0.012]
    assert (uniform[(0, 1)].seconds, uniform[(0, 1)].accepted, uniform[(0, 1)].rejected) == ([0.015], 1, 1)
    assert (uniform[(0, 2)].accepted, uniform[(0, 2)].rejected) == (4, 0)
    (line,) = break_even_lines(uniform, ranges, "auto")
    # plain's median 11 ms: K = 1 at 15 ms is 1.36x, paying from 0.36; K = 2 at 40 ms, 3.64x, never.
    assert "plain 11.0 ms (2)" in line
    assert "K=1 1.36x (1) needs 0.36, measured 0.50" in line
    assert "K=2 3.64x (1) needs never, measured 1.00" in line
