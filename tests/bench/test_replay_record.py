"""bench.replay_record: a record written by a chooser replays through the same chooser code with every choice
the same, and each step lands in the cell whose wall-clock span holds it."""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bench.replay_record import Cell, CpuTally, cells_of, level_error, relative_error, replay, vllm_config
from cluster.vllm_backend.chooser import build_chooser, iteration_stats
from cluster.vllm_backend.settings import DraftMeasurement, SchedulerSettings
from policy.guard import MeasuredGuard
from policy.prompt_steps import NO_CUE, prompt_cue
from policy.stats import RequestIterationStats, RequestOutlook

REPO = Path(__file__).resolve().parents[2]
# Each request's prompt: the drafter's catch-up before its first draft, long enough that a 24-token request
# does not always repay it (`BatchAwareChooser._repaid`), so that a replay without the recorded outlooks
# chooses otherwise.
PROMPT_TOKENS = 1000


def _chooser() -> MeasuredGuard:
    config = vllm_config(REPO / "models" / "demo-moe", REPO / "models" / "demo-draft")
    chooser, _ = build_chooser(SchedulerSettings(), config, 4, "test")
    assert isinstance(chooser, MeasuredGuard)
    return chooser


def _serve(
    start_s: float, num_steps: int, concurrency: int, seed: int, chooses_ahead: bool = False
) -> list[dict[str, Any]]:
    """A served-like record: requests of 24 tokens at `concurrency`, accepting about 0.7, the K chosen at a step
    verified in the next (vLLM's lag), one step every 50 ms from `start_s`. `chooses_ahead`: each step's K
    chosen while the step before ran (`PolicyScheduler.choose_ahead`), a new request's at 0. Each choice is
    given the requests' outlooks (a drafter that has not drafted for a request lags by its prompt,
    `PROMPT_TOKENS`, and what it generated), recorded with the step whose K it chose, as `PolicyScheduler`
    records them."""
    chooser, rng = _chooser(), np.random.default_rng(seed)
    steps: list[dict[str, Any]] = []
    held: dict[str, int] = {}
    left: dict[str, int] = {}
    previous, next_id = DraftMeasurement(0.0, 0), 0
    ahead: dict[str, int] | None = None
    ahead_outlook: dict[str, list[int]] = {}
    seen: set[str] = set()  # requests the drafter has drafted for
    verified_cue = NO_CUE

    def outlook_of(ids: list[str]) -> dict[str, list[int]]:
        return {r: [0 if r in seen else PROMPT_TOKENS + 24 - left[r], left[r]] for r in ids}

    for step in range(num_steps):
        while len(left) < concurrency:
            left[f"r{next_id}"], next_id = 24, next_id + 1
        ids = list(left)
        drafts = {r: held.get(r, 0) for r in ids}
        accepted = {r: int(np.sum(np.cumprod(rng.random(k) < 0.7))) for r, k in drafts.items()}
        is_chosen_ahead = ahead is not None
        outlook = outlook_of(ids)
        if ahead is None:
            chooser.set_outlook({r: RequestOutlook(*v) for r, v in outlook.items()})
            chosen = chooser.choose(ids)
        else:
            chosen, outlook = {r: ahead.get(r, 0) for r in ids}, ahead_outlook
        catch_up = sum(outlook[r][0] for r, k in chosen.items() if k and r not in seen)
        seen.update(r for r, k in chosen.items() if k)
        if chooses_ahead:
            ahead_outlook = outlook_of(ids)
            chooser.set_outlook({r: RequestOutlook(*v) for r, v in ahead_outlook.items()})
        ahead = chooser.choose(ids) if chooses_ahead else None
        inner: Any = chooser.inner
        inner.cost_model.refit_if_due()  # as the scheduler does while the worker runs the step
        # The drafter's catch-up: 0.2 ms a token.
        draft_s = 0.004 * max(chosen.values()) + 0.0002 * catch_up if any(chosen.values()) else None
        step_s = 0.012 + 0.003 * sum(drafts.values()) + (draft_s or 0.0)
        requests = [RequestIterationStats(r, drafts[r], accepted[r], accepted[r] + 1, 100) for r in ids]
        draft = DraftMeasurement(draft_s or 0.0, catch_up)
        # the prompt cue of the choice verified in the step (the step before's), as the scheduler reports it
        stats = iteration_stats(
            step, requests, step_s, draft, previous, is_near_drafting=False, prompt_cue=verified_cue
        )
        chooser.observe(stats)
        verified_cue = prompt_cue(RequestOutlook(*v) for v in outlook.values())
        previous, held = draft, dict(chosen)
        finishing = [r for r in ids if left[r] <= accepted[r] + 1]
        steps.append(
            {
                "step": step,
                "num_drafts": drafts,
                "num_accepted": accepted,
                # as `PolicyScheduler` records it: without the requests that finish in the step (freed first)
                "chosen": {r: k for r, k in chosen.items() if r not in finishing},
                "num_draft_steps": max(chosen.values()),
                "step_time_s": step_s,
                "draft_time_s": draft_s,
                "is_near_drafting": False,
                "start_s": start_s + 0.05 * step,
                "is_chosen_ahead": is_chosen_ahead,
                "outlook": outlook,
            }
        )
        for r in ids:
            left[r] -= accepted[r] + 1
            if left[r] <= 0:
                del left[r], held[r]
                chooser.release(r)
    return steps


@pytest.mark.parametrize("chooses_ahead", [False, True])
def test_a_record_replays_with_the_same_choices_in_its_cells(tmp_path: Path, chooses_ahead: bool) -> None:
    start = float(int(time.time())) - 600.0  # whole seconds: the cells' spans are H:M:S
    steps = _serve(start, 100, 1, seed=0, chooses_ahead=chooses_ahead)
    assert sum(s["is_chosen_ahead"] for s in steps) == (99 if chooses_ahead else 0)
    rows = []
    for name, offset, concurrency in (("code", 0, 1), ("prose", 10, 1)):
        span = [time.strftime("%H:%M:%S", time.localtime(start + offset + d)) for d in (0, 5)]
        rows.append(
            {
                "mode": "auto",
                "workload": name,
                "concurrency": concurrency,
                "started": span[0],
                "ended": span[1],
            }
        )
    (tmp_path / "result.json").write_text(json.dumps({"rows": rows}))
    cells = cells_of(tmp_path / "result.json", "auto", 0)
    assert [c.name for c in cells] == ["code 1", "prose 1"]
    # Steps 0-99 take 5 s from the start: all in the first cell, none in the second.
    cpu = CpuTally()
    code, prose = replay(steps, _chooser(), cells, cpu)
    assert (code.steps, prose.steps) == (100, 0)
    assert code.matched == code.steps  # the same code: every choice the same
    assert code.drafting_steps == sum(s["num_draft_steps"] > 0 for s in steps) > 0
    assert "requests drafted" in code.summary()
    # The chooser's CPU: one choice per step (ahead but the first, where chosen ahead), one observation per
    # step, one refit check per step.
    calls = Counter()
    for (kind, _), seconds in cpu.seconds.items():
        calls[kind] += len(seconds)
    assert calls["choose"] + calls["choose ahead"] == 100 and calls["choose ahead"] == (
        99 if chooses_ahead else 0
    )
    assert calls["observe"] == calls["refit"] == 100
    assert any(line.startswith("  choose") and "at batch 1-4: " in line for line in cpu.lines())


def test_the_cost_models_error_is_drafting_relative_to_plain_in_the_same_cell_and_bucket() -> None:
    """A cell whose every prediction is 20% under (the machine ran slow then) has no error; one that put
    drafting 20% over plain's ratio has log 1.2. Groups under `min_steps` iterations and buckets without
    plain iterations do not count."""
    slow, off = Cell("code 16", "00:00:00", "00:01:00"), Cell("prose 16", "00:01:00", "00:02:00")
    slow.ratios.update({(4, 0): [0.8] * 4, (4, 3): [0.79, 0.8, 0.81, 0.8], (5, 2): [1.5] * 4})
    off.ratios.update({(4, 0): [1.0] * 5, (4, 2): [1.2] * 4, (4, 4): [3.0] * 3})
    error, num_groups = relative_error([slow, off])
    assert num_groups == 2 and error == pytest.approx(math.log(1.2) / 2)


def test_the_cost_models_level_error_is_plain_decodings_time_in_each_cell_and_bucket() -> None:
    """Plain iterations predicted 20% under in one cell and right in another: the mean |log| is half of
    log 0.8's. Drafting groups and groups under `min_steps` iterations do not count."""
    slow, right = Cell("code 16", "00:00:00", "00:01:00"), Cell("prose 16", "00:01:00", "00:02:00")
    slow.ratios.update({(4, 0): [0.8] * 4, (4, 3): [1.5] * 4, (5, 0): [2.0] * 3})
    right.ratios.update({(4, 0): [1.0, 0.9, 1.1, 1.0, 1.0]})
    error, num_groups = level_error([slow, right])
    assert num_groups == 2 and error == pytest.approx(-math.log(0.8) / 2)


def test_a_cell_tells_the_requests_first_verifications_from_their_later_ones(tmp_path: Path) -> None:
    start = float(int(time.time())) - 600.0
    steps = _serve(start, 100, 4, seed=1)
    # Every request's first verified drafts all rejected, every later one's all accepted.
    seen: set[str] = set()
    first = later = 0
    for step in steps:
        for r, k in step["num_drafts"].items():
            if k:
                if r in seen:
                    step["num_accepted"][r] = k
                    later += k
                else:
                    step["num_accepted"][r] = 0
                    first += k
        seen.update(r for r, k in step["num_drafts"].items() if k)
    assert first > 0 and later > 0
    span = [time.strftime("%H:%M:%S", time.localtime(start + d)) for d in (0, 5)]
    row = {"mode": "auto", "workload": "code", "concurrency": 4, "started": span[0], "ended": span[1]}
    (tmp_path / "result.json").write_text(json.dumps({"rows": [row]}))
    (cell,) = replay(steps, _chooser(), cells_of(tmp_path / "result.json", "auto", 0))
    assert cell.first_verification == [0, first]
    assert cell.later_verifications == [later, later]
    assert (
        f"first verification 0.00 ({first} drafts), in its later ones 1.00 ({later} drafts)" in cell.summary()
    )
