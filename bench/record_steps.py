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

    python -m bench.record_steps RESULT.json --record auto=RECORD.jsonl --record ours1=RECORD.jsonl
        [--launch N] [--ranges 1-4,5-16,17-27,28-32]
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.replay_record import Cell, cells_of

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
        batch = int(step["num_scheduled"])
        found = next((i for i, (low, high) in enumerate(ranges) if low <= batch <= high), None)
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
    names: list[str] = []
    for mode, path in records.items():
        cells = cells_of(args.result, mode, args.launch)
        if not cells:
            parser.error(f"{args.result} has no cells of mode {mode!r} at launch {args.launch}")
        steps = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        per_mode[mode] = [account(cell_steps, ranges) for cell_steps in steps_by_cell(steps, cells)]
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


if __name__ == "__main__":
    main()
