"""Where each mode's time went in a served run, from the step records of our scheduler's modes (auto, k0,
oursN, ... of `bench.vllm_policy`), several modes of one run side by side.

Per cell (a client run, its span from the result file) and mode: the seconds and steps by batch-size range and
kind of step (decode steps; steps that carry new requests' prompts), how many of those steps verified drafts,
and the tokens committed a second over the whole cell (each scheduled request's token plus its accepted
drafts). Last, the same summed over every cell.

Why. Throughput says which mode won a cell, not where. Session 63 found auto at 0.95x our scheduler at static
K = 1 (ours1) at batch 32 on the regime pair, in all 8 runs, and at 0.985x our scheduler at K = 0 (k0). Read
this way (the records of the run in `bench/results/vllm_policy_s63_regime_c32_ours1_k0_side_by_side.json`),
the 8 cells took 169.2 s of auto's steps, 160.9 s of ours1's and 165.9 s of k0's; at batch 28-32 auto spent
135.1 s against ours1's 126.7, in 629 decode steps (220 of them drafting) against ours1's 381 (all at K = 1)
and k0's 844. Sessions before it wrote this reading afresh, each in its own scratch script.

Last, per mode and range, what drafting would need to pay there by the steps themselves, not the cost model:
decode steps where the whole batch verified K drafts each and the drafter drafted K again (K = 0: plain
decoding), their median time over plain decoding's, and the uniform acceptance a at which that time pays
(1 + a + ... + a^K, the policy's expected tokens a step, equals the ratio; "never" where K + 1 tokens do not),
beside the acceptance those steps measured. Session 66 read it on the demo pair (auto, 16 / 32): at batch 13-16
the whole batch at K = 2 took 2.22x a plain step and at K = 4 3.19x (0.71 and 0.77 to pay), where those steps
measured 0.73 and 0.75; at 28-32 K = 1 took 2.25x (never) and K = 2 2.92x (0.97, measured 0.75).

    python -m bench.record_steps RESULT.json --record auto=RECORD.jsonl --record ours1=RECORD.jsonl
        [--launch N] [--ranges 1-4,5-16,17-27,28-32]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.replay_record import Cell, cells_of
from policy.utility import expected_etr

KINDS = ("decode", "prompts")


@dataclass
class Spent:
    """Seconds and steps in one batch-size range and kind of step; the steps that verified drafts."""

    seconds: float = 0.0
    steps: int = 0
    drafting: int = 0

    def add(self, other: Spent) -> None:
        self.seconds += other.seconds
        self.steps += other.steps
        self.drafting += other.drafting

    def __str__(self) -> str:
        return f"{self.seconds:6.2f}s {self.steps:4d} ({self.drafting:4d})"


@dataclass
class Account:
    """One mode's steps in one cell (or summed over cells): `Spent` by (range, kind), and tokens committed."""

    spent: dict[tuple[int, str], Spent] = field(default_factory=dict)
    seconds: float = 0.0
    tokens: int = 0

    def add(self, other: Account) -> None:
        for key, part in other.spent.items():
            self.spent.setdefault(key, Spent()).add(part)
        self.seconds += other.seconds
        self.tokens += other.tokens


@dataclass
class Uniform:
    """Decode steps of one batch-size range where the whole batch verified K drafts each and the drafter drafted
    K again (K = 0: plain decoding): their seconds, and the acceptance trials of their drafts (each request's
    accepted drafts, and one rejection where it accepted fewer than K)."""

    seconds: list[float] = field(default_factory=list)
    accepted: int = 0
    rejected: int = 0


def range_of(batch: int, ranges: Sequence[tuple[int, int]]) -> int | None:
    """The index of the range that holds this batch size; None if none does."""
    return next((i for i, (low, high) in enumerate(ranges) if low <= batch <= high), None)


def uniform_steps(
    steps: Sequence[dict[str, Any]], ranges: Sequence[tuple[int, int]]
) -> dict[tuple[int, int], Uniform]:
    """The steps' `Uniform` by (range index, K)."""
    result: dict[tuple[int, int], Uniform] = {}
    for step in steps:
        batch = int(step["num_scheduled"])
        found = range_of(batch, ranges)
        if found is None or step["num_prefill_tokens"] > 0:
            continue
        drafts = [k for k in step["num_drafts"].values() if k > 0]
        k = drafts[0] if drafts else 0
        if (
            len(drafts) not in (0, batch)
            or any(d != k for d in drafts)
            or step.get("num_draft_steps", 0) != k
        ):
            continue
        part = result.setdefault((found, k), Uniform())
        part.seconds.append(float(step["step_time_s"]))
        for request_id, num in step["num_drafts"].items():
            accepted = int(step["num_accepted"].get(request_id, 0))
            part.accepted += accepted
            part.rejected += accepted < num
    return result


def break_even(ratio: float, num_spec_tokens: int) -> float | None:
    """The uniform acceptance at which a step at K drafts that takes `ratio` times a plain step commits as many
    tokens a second as plain decoding (`policy.utility.expected_etr`); None where K + 1 tokens fall short."""
    if ratio <= 1.0:
        return 0.0
    if expected_etr(1.0, num_spec_tokens) < ratio:
        return None
    low, high = 0.0, 1.0
    for _ in range(40):
        middle = (low + high) / 2
        low, high = (middle, high) if expected_etr(middle, num_spec_tokens) < ratio else (low, middle)
    return high


def break_even_lines(
    uniform: dict[tuple[int, int], Uniform], ranges: Sequence[tuple[int, int]], mode: str
) -> list[str]:
    """One line per range that has plain decode steps: plain decoding's median step, then per K its median
    over plain's (steps), the acceptance at which it pays, and the acceptance its drafts measured."""
    lines = []
    for index, (low, high) in enumerate(ranges):
        plain = uniform.get((index, 0))
        if plain is None or not plain.seconds:
            continue
        plain_s = statistics.median(plain.seconds)
        parts = [f"plain {1000 * plain_s:.1f} ms ({len(plain.seconds)})"]
        for k in sorted(key[1] for key in uniform if key[0] == index and key[1] > 0):
            part = uniform[(index, k)]
            ratio = statistics.median(part.seconds) / plain_s
            needed = break_even(ratio, k)
            measured = part.accepted / max(part.accepted + part.rejected, 1)
            parts.append(
                f"K={k} {ratio:.2f}x ({len(part.seconds)}) needs "
                f"{'never' if needed is None else f'{needed:.2f}'}, measured {measured:.2f}"
            )
        lines.append(f"  {mode:9} {low}-{high}: " + " | ".join(parts))
    return lines


def parse_ranges(text: str) -> list[tuple[int, int]]:
    """Batch-size ranges, in order and apart, from their text: "1-4,5-16" is [(1, 4), (5, 16)]."""
    ranges = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        if not (low.isdigit() and high.isdigit()) or int(low) > int(high):
            raise ValueError(f"batch-size range {part!r}: expected LOW-HIGH, e.g. 1-4")
        ranges.append((int(low), int(high)))
    if any(high >= low for (_, high), (low, _) in zip(ranges, ranges[1:], strict=False)):
        raise ValueError(f"batch-size ranges {text!r} must be in order and apart")
    return ranges


def steps_by_cell(steps: Sequence[dict[str, Any]], cells: Sequence[Cell]) -> list[list[dict[str, Any]]]:
    """Each cell's steps: those that started within its span (the result file's local H:M:S, as
    `bench.replay_record` reads it); steps outside every cell (warm-ups) are left out."""
    by_cell: list[list[dict[str, Any]]] = [[] for _ in cells]
    for step in steps:
        clock = time.strftime("%H:%M:%S", time.localtime(step["start_s"]))
        for index, cell in enumerate(cells):
            if cell.started <= clock <= cell.ended:
                by_cell[index].append(step)
                break
    return by_cell


def account(steps: Sequence[dict[str, Any]], ranges: Sequence[tuple[int, int]]) -> Account:
    """The steps' seconds by batch-size range and kind; steps at a batch size in no range are in the total
    alone."""
    result = Account()
    for step in steps:
        seconds = float(step["step_time_s"])
        result.seconds += seconds
        result.tokens += int(step["num_scheduled"]) + sum(step["num_accepted"].values())
        found = range_of(int(step["num_scheduled"]), ranges)
        if found is None:
            continue
        kind = KINDS[1] if step["num_prefill_tokens"] > 0 else KINDS[0]
        part = result.spent.setdefault((found, kind), Spent())
        part.seconds += seconds
        part.steps += 1
        part.drafting += any(step["num_drafts"].values())
    return result


def table(accounts: dict[str, Account], ranges: Sequence[tuple[int, int]]) -> list[str]:
    """Lines: a header, then one per mode (seconds, steps and drafting steps per range and kind)."""
    columns = [(i, kind) for i in range(len(ranges)) for kind in KINDS]
    names = [f"{ranges[i][0]}-{ranges[i][1]} {kind}" for i, kind in columns]
    width = max(len(str(Spent())), *map(len, names))
    lines = ["  mode      " + " | ".join(name.ljust(width) for name in names) + " | total s, tokens/s"]
    for mode, acc in accounts.items():
        parts = [str(acc.spent.get(column, Spent())).ljust(width) for column in columns]
        rate = acc.tokens / acc.seconds if acc.seconds else 0.0
        lines.append(f"  {mode:9} " + " | ".join(parts) + f" | {acc.seconds:.2f}, {rate:.0f}")
    return lines


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("result", type=Path, help="the run's result file (bench.vllm_policy --out)")
    parser.add_argument(
        "--record",
        action="append",
        required=True,
        metavar="MODE=PATH",
        help="a mode's step record (record-MODE-*.jsonl of the run's raw files); repeat for each mode",
    )
    parser.add_argument("--launch", type=int, default=0, help="the records' launch in the result file")
    parser.add_argument("--ranges", default="1-4,5-16,17-27,28-32", help="batch-size ranges, LOW-HIGH,...")
    args = parser.parse_args(argv)
    try:
        ranges = parse_ranges(args.ranges)
    except ValueError as error:
        parser.error(str(error))
    records: dict[str, Path] = {}
    for item in args.record:
        mode, sep, path = item.partition("=")
        if not sep or not mode or not path:
            parser.error(f"--record {item!r}: expected MODE=PATH")
        records[mode] = Path(path)
    per_mode: dict[str, list[Account]] = {}
    uniform: dict[str, dict[tuple[int, int], Uniform]] = {}
    names: list[str] = []
    for mode, path in records.items():
        cells = cells_of(args.result, mode, args.launch)
        if not cells:
            parser.error(f"{args.result} has no cells of mode {mode!r} at launch {args.launch}")
        steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        by_cell = steps_by_cell(steps, cells)
        per_mode[mode] = [account(cell_steps, ranges) for cell_steps in by_cell]
        uniform[mode] = uniform_steps([step for cell_steps in by_cell for step in cell_steps], ranges)
        names = names or [cell.name for cell in cells]
    print("seconds, steps (of them drafting) by batch size and kind of step; tokens committed a second")
    for index, name in enumerate(names):
        print(name)
        cell = {mode: accounts[index] for mode, accounts in per_mode.items() if index < len(accounts)}
        print("\n".join(table(cell, ranges)))
    totals = {mode: Account() for mode in per_mode}
    for mode, accounts in per_mode.items():
        for acc in accounts:
            totals[mode].add(acc)
    print(f"every cell ({len(names)})")
    print("\n".join(table(totals, ranges)))
    print(
        "every cell: decode steps with the whole batch at K, median over plain decoding's (steps), the uniform"
        " acceptance at which that pays and the acceptance measured"
    )
    for mode, parts in uniform.items():
        print("\n".join(break_even_lines(parts, ranges, mode)))


if __name__ == "__main__":
    main()
