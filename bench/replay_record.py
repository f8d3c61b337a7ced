"""Replay a served step record through the chooser of this checkout, and say what it knew at each cell.

`bench.vllm_policy` runs our scheduler with a step record (`record-auto-*.jsonl` under
bench/results/raw/vllm_policy/: every step's chosen K, verified and accepted drafts, step and drafter
times). This feeds the record to a fresh chooser built as the served one is (`build_chooser`, our worker,
the measured guard), step by step as `PolicyScheduler` does (choose, then observe the step), and prints per
cell of the run:
- the chooser's state at the cell's start: the traffic's acceptance, the test budget spent per batch-size
  bucket, the guard's holds;
- what the record did: steps, drafting steps, the requests that drafted with their acceptance, and the
  share of steps at which this checkout's chooser chose as the served one did;
- the cost model's prediction of each step (before observing it) over the measured time, for drafting and
  plain steps, those with other requests' prompts apart (session 15: right within 0.83-1.04 on decode
  steps at concurrency 16 / 32, 0.01-0.57 on steps with prompts, which it does not model);
and at the end, the cost model's error in drafting relative to plain decoding (`relative_error`), the figure
to compare two versions of the cost model by on the same records, and its error in plain decoding's time
itself (`level_error`), which the machine's drift is in; last, the chooser's CPU per call by batch-size range
(`CpuTally`: the same record replayed by two checkouts says what a change costs the engine core).

Records from session 15 on carry each step's prompt tokens of other requests and the drafter's catch-up
tokens, as the served chooser saw them; in older ones the catch-up reads as 0. Records from session 31 on
carry the outlook each choice was given (`RequestOutlook`: its catch-up and remaining tokens per request), and
the replay gives the chooser the same; without it, `BatchAwareChooser._repaid` did not run in a replay, and
replays of the same code chose as served in 40-98% of the steps at batch 4 and above. The outlook also names
the requests each choice was asked about, which the step's `chosen` does not (it lacks the requests that
finished in the step, freed before the record was made): replayed without them, a choice was made for a
smaller batch, and the same code chose as served in 60-100% of the steps per cell of session 35's release A/B
record (18 cells); with them, in 100% of every cell. Each request is released after its last step in the
record, as the scheduler releases it after observing the step that finished it (from session 35 on; before, it
released it first, and that observation made its state again, so older records replay differently from where a
request finished while drafting). The replay is faithful while the choices agree (the same code replays its
own record exactly); after a different choice, the record's accepted counts are those of the served choice,
not the replayed one, so the state is the served run's as this code would read it, not a counterfactual run.
It found in seconds what a benchmark rerun took minutes to show (session 14: the test budget spent by unforced
tests at batch 1).

    python -m bench.replay_record bench/results/raw/vllm_policy/record-auto-1764600000.jsonl \\
        --result bench/results/vllm_policy.json --mode auto --target models/demo-moe-wide
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from cluster.vllm_backend.chooser import build_chooser, iteration_stats
from cluster.vllm_backend.settings import WORKER_CLS, DraftMeasurement, SchedulerSettings
from policy.cost_model import batch_bucket
from policy.guard import MeasuredGuard
from policy.prompt_steps import NO_CUE, prompt_cue
from policy.stats import JoinAware, RequestIterationStats, RequestOutlook

REPO = Path(__file__).resolve().parent.parent
MAX_SPEC_TOKENS = 4  # bench.vllm_policy serves auto at K_max = 4
T = TypeVar("T")


class _Config:
    """An attribute bag standing in for vLLM's config objects (what `build_chooser` reads of them)."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


def vllm_config(target: Path, draft: Path, max_num_seqs: int = 32, worker_cls: str = WORKER_CLS) -> Any:
    """What the chooser reads of vLLM's config, for a served target and draft checkpoint."""
    hf = json.loads((target / "config.json").read_text())
    return _Config(
        model_config=_Config(
            model=str(target),
            dtype="float32",
            hf_text_config=_Config(
                num_local_experts=hf.get("num_local_experts"),
                num_experts_per_tok=hf.get("num_experts_per_tok"),
                eos_token_id=hf.get("eos_token_id"),
            ),
            max_model_len=int(hf.get("max_position_embeddings", 1024)),
            get_vocab_size=lambda: int(hf["vocab_size"]),
        ),
        scheduler_config=_Config(max_num_seqs=max_num_seqs),
        speculative_config=_Config(method="draft_model", draft_model_config=_Config(model=str(draft))),
        parallel_config=_Config(worker_cls=worker_cls),
    )


@dataclass
class Cell:
    """One client run of the record's server: its name and wall-clock span (local H:M:S, as the result
    file gives it), and what the replay saw in it."""

    name: str
    started: str
    ended: str
    state: str = ""
    steps: int = 0
    drafting_steps: int = 0
    matched: int = 0
    drafted: Counter[str] = field(default_factory=Counter)  # drafting steps per request
    accepted: Counter[str] = field(default_factory=Counter)  # accepted drafts per request
    drafts: Counter[str] = field(default_factory=Counter)  # verified drafts per request
    # Accepted and verified drafts of the requests' first verifications (the one right after the prompt, where
    # the request drafted from its prompt's step on) and of their later ones. Session 59: on the regime
    # pair's benchmark prompts a first verification accepted 0.44-0.49 a draft, a second 0.70-0.71 (code's
    # prompts end alike, and the draft matches the second generated token of 17% of them), and the estimator
    # counts it as the request's own acceptance.
    first_verification: list[int] = field(default_factory=lambda: [0, 0])
    later_verifications: list[int] = field(default_factory=lambda: [0, 0])
    # The cost model's prediction of each iteration (before observing it) and its measured seconds, summed
    # over drafting iterations and over plain ones (not near drafting), those with other requests' prefill
    # tokens apart; "drafter": the drafter's part of drafting iterations without a catch-up.
    predicted_s: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    measured_s: defaultdict[str, float] = field(default_factory=lambda: defaultdict(float))
    # Predicted over measured seconds of each decode iteration without prompts or catch-ups, by (batch-size
    # bucket, max K): for `relative_error`.
    ratios: defaultdict[tuple[int, int], list[float]] = field(default_factory=lambda: defaultdict(list))

    def summary(self) -> str:
        total_drafts = sum(self.drafts.values())
        acceptance = sum(self.accepted.values()) / total_drafts if total_drafts else 0.0
        per_request = sorted(
            (self.accepted[r] / self.drafts[r], self.drafted[r]) for r in self.drafts if self.drafts[r]
        )
        requests = " ".join(f"{a:.2f}x{n}" for a, n in per_request)
        first, later = (
            f"{accepted / drafts:.2f} ({drafts} drafts)" if drafts else "-"
            for accepted, drafts in (self.first_verification, self.later_verifications)
        )
        model = ", ".join(
            f"{kind} {self.predicted_s[kind] / self.measured_s[kind]:.2f}"
            for kind in ("drafting", "drafter", "plain", "drafting with prefill", "plain with prefill")
            if self.measured_s[kind]
        )
        return (
            f"{self.name}: steps {self.steps}, drafting {self.drafting_steps}, same choice "
            f"{self.matched / max(self.steps, 1):.0%}, acceptance {acceptance:.2f}\n"
            f"  cost model's time over the measured: {model or '-'}\n"
            f"  {len(per_request)} requests drafted (acceptance x drafting steps): {requests}\n"
            f"  acceptance in a request's first verification {first}, in its later ones {later}\n"
            f"  at start: {self.state}"
        )


def relative_error(cells: list[Cell], min_steps: int = 4) -> tuple[float, int]:
    """How far off the cost model put drafting relative to plain decoding, where choices are decided: per cell
    and batch-size bucket, each max K's median predicted-over-measured ratio over plain iterations' (both of at
    least `min_steps` iterations), as |log|; their mean and their number. Iterations of one cell ran minutes
    apart at most, so the machine's drift, which moved a server's speed by 10-20% between runs here, cancels
    out of each ratio: what is left is the error in the shape that decides K."""
    errors = []
    for cell in cells:
        medians = {key: statistics.median(r) for key, r in cell.ratios.items() if len(r) >= min_steps}
        for (bucket, max_k), median in medians.items():
            plain = medians.get((bucket, 0))
            if max_k and plain is not None:
                errors.append(abs(math.log(median / plain)))
    return (statistics.fmean(errors) if errors else math.nan), len(errors)


def level_error(cells: list[Cell], min_steps: int = 4) -> tuple[float, int]:
    """How far off the cost model put plain decoding's time itself: per cell and batch-size bucket, the median
    predicted-over-measured ratio of plain iterations (at least `min_steps`), as |log|; their mean and their
    number. The machine's drift is in it: a model that follows the speed of the moment scores better. The test
    budget and the catch-up's weighing compare these times with the drafter's in seconds."""
    errors = [
        abs(math.log(statistics.median(r)))
        for cell in cells
        for (_, max_k), r in cell.ratios.items()
        if max_k == 0 and len(r) >= min_steps
    ]
    return (statistics.fmean(errors) if errors else math.nan), len(errors)


def cells_of(result: Path, mode: str, launch: int) -> list[Cell]:
    rows = json.loads(result.read_text())["rows"]
    return [
        Cell(f"{r['workload']} {r['concurrency']}", r["started"], r["ended"])
        for r in rows
        if r["mode"] == mode and r.get("launch", 0) == launch
    ]


def state_line(guard: MeasuredGuard) -> str:
    inner: Any = guard.inner
    gauges = inner.gauges()
    spent = ", ".join(f"{k}: {v:.3f}" for k, v in inner.test_budget.spent_by_bucket().items())
    return (
        f"traffic acceptance {gauges['policy_acceptance']:.2f}, test budget spent by batch bucket "
        f"{{{spent}}}, guard holds {guard.num_holds}, {guard_line(guard)}"
    )


def guard_line(guard: MeasuredGuard) -> str:
    """The guard's verdict figures by batch-size bucket: the chooser's rate over plain decoding's, and the
    noise (its `confidence` standard errors) in the same unit."""
    figures = []
    for bucket in range(16):
        judged = guard.figures(bucket)
        if judged is not None:
            chosen, plain, noise = judged
            figures.append(f"{bucket}: {chosen / plain:.3f} +- {noise / plain:.3f}")
    return f"chooser over plain by bucket {{{', '.join(figures)}}}"


def give_outlook(chooser: MeasuredGuard, step: dict[str, Any]) -> None:
    """The outlook the served chooser was given with the choice recorded at `step` (records from session 31
    on; in older ones there is none, and `BatchAwareChooser._repaid` stays out of the replay)."""
    if "outlook" in step:
        chooser.set_outlook({r: RequestOutlook(*v) for r, v in step["outlook"].items()})


BATCH_RANGES = ((1, 4), (5, 12), (13, 16), (17, 27), (28, 32))


@dataclass
class CpuTally:
    """The chooser's CPU per call in the replay, by kind of call and batch-size range: what a change to the
    policy costs the engine core, the same record fed to two checkouts (`PYTHONPATH=<checkout>`). Served, the
    same calls took 1.5-3x their replayed CPU (session 65: the engine core beside the worker on 2 cores)."""

    seconds: dict[tuple[str, int], list[float]] = field(default_factory=lambda: defaultdict(list))

    def timed(self, kind: str, batch_size: int, call: Callable[..., T], *args: Any) -> T:
        start = time.thread_time()
        result = call(*args)
        self.seconds[(kind, batch_size)].append(time.thread_time() - start)
        return result

    def lines(self) -> list[str]:
        lines = []
        for kind in sorted({k for k, _ in self.seconds}):
            for low, high in BATCH_RANGES:
                calls = [s for (k, b), v in self.seconds.items() if k == kind and low <= b <= high for s in v]
                if calls:
                    lines.append(
                        f"  {kind} at batch {low}-{high}: {len(calls)} calls, mean {1e3 * statistics.fmean(calls):.3f}"
                        f" ms, median {1e3 * statistics.median(calls):.3f} ms, {sum(calls):.2f} s in all"
                    )
        return lines


def replay(
    steps: list[dict[str, Any]], chooser: MeasuredGuard, cells: list[Cell], cpu: CpuTally | None = None
) -> list[Cell]:
    """Feeds every step to `chooser`; fills in each cell's figures (steps outside every cell: warm-up), and the
    chooser's CPU per call in `cpu`."""
    cpu = CpuTally() if cpu is None else cpu
    inner: Any = chooser.inner
    previous = DraftMeasurement(0.0, 0)
    pending = list(cells)
    current: Cell | None = None
    ahead: dict[str, int] | None = None  # the choice made for this step while the step before ran
    last_step: dict[str, int] = {}  # each request's last step in the record: vLLM freed it there
    verified: set[str] = set()  # requests whose drafts were verified in an earlier step
    verified_cue = NO_CUE  # the prompt cue of the choice the step verifies (`IterationStats.prompt_cue`)
    for index, step in enumerate(steps):
        for request_id in (*step["chosen"], *step["num_drafts"]):
            last_step[request_id] = index
    finished: dict[int, list[str]] = {}
    for request_id, index in last_step.items():
        finished.setdefault(index, []).append(request_id)
    for index, step in enumerate(steps):
        clock = time.strftime("%H:%M:%S", time.localtime(step["start_s"]))
        if current is not None and clock > current.ended:
            current = None
        while pending and clock >= pending[0].started:
            current = pending.pop(0)
            current.state = state_line(chooser)
        # The requests the chooser was asked about: those its outlook names (records from session 31 on). The
        # step's `chosen` lacks the requests that finished in the step (freed before the record was made),
        # and a choice made without them was made for a smaller batch.
        ids = list(step.get("outlook") or step["chosen"])
        # Chosen ahead (`PolicyScheduler.choose_ahead`): for this step's drafting requests, before the step
        # before was observed; the requests that joined meanwhile were not the chooser's.
        if step.get("is_chosen_ahead"):
            chosen = {r: k for r, k in (ahead or {}).items() if r in step["chosen"]}
            # The requests whose prompts completed in the step, given their K then (`choose_joined`).
            joined = [r for r in step["chosen"] if r not in (ahead or {})]
            if joined and isinstance(chooser, JoinAware):
                size = len(chosen) + len(joined)
                chosen |= cpu.timed("choose_joined", size, chooser.choose_joined, joined, chosen)
        else:
            give_outlook(chooser, step)
            chosen = cpu.timed("choose", len(ids), chooser.choose, ids) if ids else {}
        recorded = {r: k for r, k in chosen.items() if r in step["chosen"]}
        if ids and recorded.items() <= step["chosen"].items() and current is not None:
            current.matched += 1
        is_next_ahead = index + 1 < len(steps) and steps[index + 1].get("is_chosen_ahead", False)
        ahead = None
        if is_next_ahead:  # while the worker runs this step
            after = steps[index + 1]
            give_outlook(chooser, after)  # the next step's record has its ahead choice's outlook
            ahead_ids = list(after.get("outlook") or step["chosen"])
            ahead = (
                cpu.timed("choose ahead", len(ahead_ids), chooser.choose, ahead_ids) if ahead_ids else None
            )
        # as the scheduler does while the worker runs the step
        cpu.timed("refit", len(ids), inner.cost_model.refit_if_due)
        requests = [
            RequestIterationStats(r, k, step["num_accepted"][r], step["num_accepted"][r] + 1, 100)
            for r, k in step["num_drafts"].items()
        ]
        draft = DraftMeasurement(step["draft_time_s"] or 0.0, step.get("draft_prefill_tokens") or 0)
        if requests:
            stats = iteration_stats(
                step["step"],
                requests,
                step["step_time_s"],
                draft,
                previous,
                is_near_drafting=step["is_near_drafting"],
                num_prefill_tokens=step.get("num_prefill_tokens", 0),
                gap_s=step.get("gap_s", 0.0),
                prompt_cue=verified_cue,
            )
            if current is not None:
                kind = "drafting" if any(r.num_spec_tokens for r in requests) else "plain"
                if stats.num_prefill_tokens:
                    kind += " with prefill"  # other requests' prompts in the step: not in the model
                elif stats.is_near_drafting and kind == "plain":
                    kind = "near"
                ks = [r.num_spec_tokens for r in requests]
                predicted = inner.cost_model.iteration_time(ks)
                current.predicted_s[kind] += predicted
                current.measured_s[kind] += stats.iteration_time_s
                if kind in ("drafting", "plain") and not stats.num_draft_prefill_tokens:
                    key = (batch_bucket(len(ks)), max(ks))
                    current.ratios[key].append(predicted / stats.iteration_time_s)
                if kind == "drafting" and not stats.num_draft_prefill_tokens:  # the drafter's part alone
                    draft_s, _, _ = inner.cost_model.phase_times(len(ks), max(ks), sum(ks))
                    current.predicted_s["drafter"] += float(draft_s) + inner.cost_model.padding_time(ks)
                    current.measured_s["drafter"] += stats.draft_time_s
            cpu.timed("observe", len(requests), chooser.observe, stats)
        for request_id in finished.pop(index, []):  # after its last step's observation, as the scheduler does
            chooser.release(request_id)
        previous = draft
        # The next step verifies this step's choice: the prompt cue of its outlook (as the scheduler's).
        verified_cue = prompt_cue(RequestOutlook(*o) for o in (step.get("outlook") or {}).values())
        if current is not None and ids:
            current.steps += 1
            current.drafting_steps += step["num_draft_steps"] > 0
            for r, k in step["num_drafts"].items():
                if k:
                    current.drafted[r] += 1
                    current.drafts[r] += k
                    current.accepted[r] += step["num_accepted"][r]
                    tally = current.later_verifications if r in verified else current.first_verification
                    tally[0] += step["num_accepted"][r]
                    tally[1] += k
        verified.update(r for r, k in step["num_drafts"].items() if k)
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("record", type=Path, help="a step record (JSON lines) of bench.vllm_policy")
    parser.add_argument("--result", type=Path, required=True, help="the run's result file (its cells' spans)")
    parser.add_argument("--mode", default="auto", help="the record's mode in the result file")
    parser.add_argument("--launch", type=int, default=0, help="the record's launch in the result file")
    parser.add_argument("--target", type=Path, default=REPO / "models" / "demo-moe")
    parser.add_argument("--draft", type=Path, default=REPO / "models" / "demo-draft")
    args = parser.parse_args()
    steps = [json.loads(line) for line in args.record.read_text().splitlines() if line.strip()]
    cells = cells_of(args.result, args.mode, args.launch)
    if not cells:
        parser.error(f"{args.result} has no cells of mode {args.mode!r} at launch {args.launch}")
    chooser, _ = build_chooser(
        SchedulerSettings(), vllm_config(args.target, args.draft), MAX_SPEC_TOKENS, "replay"
    )
    if not isinstance(chooser, MeasuredGuard):
        raise TypeError(f"expected the measured guard around the chooser, got {type(chooser).__name__}")
    cpu = CpuTally()
    replayed = replay(steps, chooser, cells, cpu)
    for cell in replayed:
        print(cell.summary())
    error, num_groups = relative_error(replayed)
    print(
        f"cost model, drafting relative to plain decoding within each cell and batch bucket: mean "
        f"|log(predicted / measured over plain's)| {error:.3f} over {num_groups} step groups"
    )
    error, num_groups = level_error(replayed)
    print(
        f"cost model, plain decoding's time in each cell and batch bucket: mean |log(predicted / measured)| "
        f"{error:.3f} over {num_groups} step groups"
    )
    print("the chooser's CPU per call, replayed (the refit's: per step, most steps none):")
    print("\n".join(cpu.lines()))


if __name__ == "__main__":
    main()
