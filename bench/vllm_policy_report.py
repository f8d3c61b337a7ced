"""The reports of `bench.vllm_policy`: what our scheduler did in a cell (from its step record), and the tables
of a run (each cell as a ratio to off; medians over launches and rounds, with auto against the best of off
and vLLM's static K)."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

import numpy as np


def scheduler_summary(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """What the scheduler did over these steps (its `StepRecord`s): how often it drafted, how much, what was
    accepted, the guard's verdicts, and where the time went.

    Step times are split by what the target's forward held, not by whether the drafter ran after it: a step
    whose drafter was off still verifies the drafts of the step before (session 7 labelled those "plain").
    Steps with prefill tokens (new requests) are apart: they cost several decode steps each. The hooks'
    times (the chooser's choose and observe) and the engine core's time between steps are in the record
    from session 8 on (older records give None)."""
    decode = [s for s in steps if s["num_drafts"]]  # steps with decoding requests
    num_drafts = sum(sum(s["num_drafts"].values()) for s in decode)
    num_accepted = sum(sum(s["num_accepted"].values()) for s in decode)
    request_steps = sum(len(s["num_drafts"]) for s in decode)
    k_histogram: dict[int, int] = {}
    for s in decode:
        for k in s["num_drafts"].values():
            k_histogram[k] = k_histogram.get(k, 0) + 1
    has_detail = bool(steps) and "num_prefill_tokens" in steps[0]
    prefill = [s for s in steps if s.get("num_prefill_tokens", 0) > 0]
    pure = [s for s in decode if not s.get("num_prefill_tokens", 0)]  # decode only
    verifying = [s for s in pure if any(s["num_drafts"].values())]
    not_verifying = [s for s in pure if not any(s["num_drafts"].values())]
    line = plain_line(pure) if has_detail else None  # older records have no gap_s

    # The drain: the trailing steps below the cell's full batch, where no request replaces a finished one.
    full = max((s.get("num_scheduled", 0) for s in steps), default=0)
    num_drain = next((i for i, s in enumerate(reversed(steps)) if s.get("num_scheduled", 0) >= full), 0)
    drain = steps[len(steps) - num_drain :]

    def median(values: list[Any]) -> Any:
        return sorted(values)[len(values) // 2] if values else None  # the upper median

    def median_ms(values: list[float]) -> float | None:
        return None if not values else round(1e3 * median(values), 2)

    def mean_ms(values: list[float]) -> float | None:
        return round(1e3 * sum(values) / len(values), 3) if values else None

    def detail(key: str) -> float | None:
        return median_ms([s[key] for s in steps[1:]]) if has_detail and len(steps) > 1 else None

    def total_s(selected: list[dict[str, Any]], key: str = "step_time_s") -> float:
        return round(sum(s[key] for s in selected), 3)

    return {
        "num_steps": len(steps),
        "num_drafting_steps": sum(s["num_draft_steps"] > 0 for s in steps),
        "mean_num_spec_tokens": num_drafts / request_steps if request_steps else 0.0,
        "num_spec_tokens_histogram": {str(k): v for k, v in sorted(k_histogram.items())},
        "acceptance": num_accepted / num_drafts if num_drafts else None,
        "guard_holds": (steps[-1]["guard_holds"] - steps[0]["guard_holds"]) if steps else 0,
        "mean_batch": request_steps / len(decode) if decode else 0.0,
        # Decode-only steps (no prefill tokens; all steps in older records), by whether they verified drafts.
        "step_ms_p50_verifying": median_ms([s["step_time_s"] for s in verifying]),
        "step_ms_p50_not_verifying": median_ms([s["step_time_s"] for s in not_verifying]),
        "draft_ms_p50": median_ms(
            [s["draft_time_s"] for s in steps if s["num_draft_steps"] and s["draft_time_s"]]
        ),
        # What the drafter fed beyond one token per drafting request: its catch-ups and the prompts of new
        # requests that drafted at once. Served on the demo pair (64-token requests), 6-12 thousand per cell
        # at concurrency 16-32 cost 5-10% of the cell's time (session 25).
        "draft_prefill_tokens": sum(s.get("draft_prefill_tokens") or 0 for s in steps)
        if has_detail
        else None,
        "steps_s": total_s(steps),
        "prefill_steps": len(prefill) if has_detail else None,
        "prefill_steps_s": total_s(prefill) if has_detail else None,
        # How many new prompts' tokens a prefill step carried: few per step = prefills fragmented.
        "prefill_tokens_per_step_p50": median([s["num_prefill_tokens"] for s in prefill]),
        # A closed loop's cell ends with a drain; requests that progressed at different rates make it longer.
        "drain_steps": len(drain) if has_detail else None,
        "drain_s": total_s(drain) if has_detail else None,
        # The first step's gap holds the server's idle time before the run.
        "gap_s": total_s(steps[1:], "gap_s") if has_detail else None,
        "choose_ms_p50": detail("choose_s"),
        "observe_ms_p50": detail("observe_s"),
        # The means too: served, the chooser's time is bimodal (a search, or a step without one), and on the
        # demo pair at batch 32 its p50 read 0.4 ms where its mean was 1.3 ms (session 19).
        "choose_ms_mean": mean_ms([s["choose_s"] for s in steps[1:]]) if has_detail else None,
        # ... of which the engine core's thread ran (records from session 21 on): the rest waited for the GIL
        # or for a core.
        "choose_cpu_ms_mean": (
            mean_ms([s["choose_cpu_s"] for s in steps[1:]]) if steps and "choose_cpu_s" in steps[0] else None
        ),
        "observe_ms_mean": mean_ms([s["observe_s"] for s in steps[1:]]) if has_detail else None,
        # ... and the observation deferred to while the worker ran the next step (records from session 68 on)
        "observe_ahead_ms_mean": (
            mean_ms([s["observe_ahead_s"] for s in steps[1:]])
            if steps and "observe_ahead_s" in steps[0]
            else None
        ),
        # The cost model's refits, a step's share (records from session 49 on): beside choose and observe, the
        # policy's CPU on the engine core, which on 2 cores takes it from the worker's step.
        "refit_cpu_ms_mean": (
            mean_ms([s["refit_cpu_s"] for s in steps[1:]]) if steps and "refit_cpu_s" in steps[0] else None
        ),
        "gap_ms_p50": detail("gap_s"),
        "decode_speedup": decode_speedup(pure, line) if has_detail else None,
        "drafting_net_cost_share": drafting_net_cost_share(pure, line, total_s(steps))
        if has_detail
        else None,
    }


def decode_speedup(decode: list[dict[str, Any]], line: PlainLine | None) -> float | None:
    """The decode steps' committed tokens at this server's own plain-step time, over the steps' actual time
    (step and gap): what the policy's choices gained over plain decoding on the same server, apart from how
    fast the launch ran. Launches of one configuration differed by up to 14% here (session 9), as much as
    any policy change at batch 1: auto's plain steps took 12.6-14.1 ms where off's TPOT was 11.6-13.9 ms in
    the same run (session 15), so that auto / off mixed the two.

    Plain steps: no drafts verified, no drafter after them, not next to drafting (`is_near_drafting`); their
    time is a least-squares line in the batch size (one mean where they all had one size), used only within
    the batch sizes they span. None unless that covers half the decode time: at concurrency 16 / 32 a
    drafting server's plain steps are the ramp and the drain, and extrapolated from them to the full batch
    the line said drafting gained 1.03-1.35x where auto ran 0.73-0.98x off (session 15). `line`:
    `plain_line(decode)`."""
    if line is None:
        return None
    covered = [s for s in decode if line.covers(s)]
    actual_s = sum(s["step_time_s"] + s["gap_s"] for s in covered)
    if actual_s < 0.5 * sum(s["step_time_s"] + s["gap_s"] for s in decode):
        return None
    return round(float(sum(line.committed_s(s) for s in covered) / actual_s), 3)


def drafting_net_cost_share(
    decode: list[dict[str, Any]], line: PlainLine | None, steps_s: float
) -> float | None:
    """What the decode steps that drafted or verified drafts took beyond plain decoding's time for the tokens
    they committed (`decode_speedup`'s plain line), as a share of all steps' time: where drafting does not
    pay, what its tests and catch-ups cost the cell (served on the demo pair at 16 / 32: 1-5%, session 26);
    negative where it pays. None without a plain line, or where no such step lies within its span."""
    if line is None or not steps_s:
        return None
    drafting = [
        s for s in decode if (any(s["num_drafts"].values()) or s["num_draft_steps"]) and line.covers(s)
    ]
    if not drafting:
        return None
    net_s = sum(s["step_time_s"] + s["gap_s"] - line.committed_s(s) for s in drafting)
    return round(float(net_s / steps_s), 4)


@dataclass(frozen=True)
class PlainLine:
    """Plain decode steps' time (step and gap) as a line in the batch size, within the sizes it was fitted on."""

    slope: float
    intercept: float
    lo: float
    hi: float

    def covers(self, step: dict[str, Any]) -> bool:
        return self.lo <= len(step["num_drafts"]) <= self.hi

    def committed_s(self, step: dict[str, Any]) -> float:
        """Plain decoding's time for the tokens this step committed (one per request, plus the accepted)."""
        size = len(step["num_drafts"])
        return (self.intercept + self.slope * size) * (1 + sum(step["num_accepted"].values()) / size)


def plain_line(decode: list[dict[str, Any]]) -> PlainLine | None:
    """The line of `decode_speedup`'s docstring, from the steps without drafts, drafter or drafting near."""
    plain = [
        s
        for s in decode
        if not any(s["num_drafts"].values())
        and not s["num_draft_steps"]
        and not s.get("is_near_drafting", False)
    ]
    if not plain:
        return None
    sizes = np.array([len(s["num_drafts"]) for s in plain], dtype=np.float64)
    seconds = np.array([s["step_time_s"] + s["gap_s"] for s in plain])
    if np.ptp(sizes) > 0:
        slope, intercept = np.polyfit(sizes, seconds, 1)
    else:
        slope, intercept = 0.0, float(seconds.mean())
    return PlainLine(float(slope), float(intercept), float(sizes.min()), float(sizes.max()))


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: each mode's throughput and TPOT as ratios to vLLM without speculation, per cell."""

    def cell(r: dict[str, Any]) -> tuple[str, int, int, int]:
        return r["workload"], r["concurrency"], r.get("launch", 0), r.get("round", 0)

    off = {cell(r): r for r in rows if r["mode"] == "off"}
    lines = [
        "| workload | conc | launch | round | mode | tok/s | x off | TPOT p50 (x off) | TPOT p99 (x off) |",
        "|---|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    keys = ("output_throughput", "tpot_p50_ms", "tpot_p99_ms")
    for r in sorted(rows, key=lambda r: (*cell(r), r["mode"])):
        base = off.get(cell(r))
        x = {key: r[key] / base[key] if base else float("nan") for key in keys}
        lines.append(
            f"| {r['workload']} | {r['concurrency']} | {r.get('launch', 0)} | {r.get('round', 0)} | {r['mode']} | "
            f"{r['output_throughput']:.1f} | "
            f"{x['output_throughput']:.2f} | {r['tpot_p50_ms']:.1f} ms ({x['tpot_p50_ms']:.2f}) | "
            f"{r['tpot_p99_ms']:.1f} ms ({x['tpot_p99_ms']:.2f}) |"
        )
    return "\n".join(lines)


def median_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: per cell, each mode's median throughput over its launches and rounds, as a ratio to off's
    median, auto's median over max(off, the best static K) (vLLM's own modes named by a number), and with
    our scheduler the median decode speedup over the server's own plain steps (`decode_speedup`) and of
    drafting's net cost as a share of the steps' time (`drafting_net_cost_share`, in percent). "spread":
    each mode's fastest run over its slowest, the launch noise against which a ratio is read (up to 1.37 for
    off in one demo-pair cell on this 2-core machine, session 16).

    "x off, paired": the median over runs of the mode's throughput over off's in the same run (launch and
    round), where every run has one row per mode. In a `--side-by-side` run the two ran seconds apart, so the
    machine's drift cancels in each ratio; the ratio of medians mixes runs at different speeds. "paired"
    after auto's comparison: auto's paired ratio over the largest of 1 (off) and the static modes' paired
    ratios. Session 27's regime pair, code at concurrency 16, three rounds: 0.90 from the medians, 1.08
    paired; off's rounds there spread 1.26."""
    by_mode: dict[tuple[str, int], dict[str, list[float]]] = {}
    own: dict[str, dict[tuple[str, int, str], list[float]]] = {
        "decode_speedup": {},
        "drafting_net_cost_share": {},
    }
    paired = paired_ratios(rows)
    for r in rows:
        by_mode.setdefault((r["workload"], r["concurrency"]), {}).setdefault(r["mode"], []).append(
            r["output_throughput"]
        )
        for key, figures in own.items():
            value = r.get("scheduler", {}).get(key)
            if value is not None:
                figures.setdefault((r["workload"], r["concurrency"], r["mode"]), []).append(value)

    def own_text(key: str, cell: tuple[str, int, str], scale: float, digits: int) -> str:
        values = own[key].get(cell)
        return f"{scale * statistics.median(values):.{digits}f}" if values else ""

    lines = [
        "| workload | conc | mode | runs | median tok/s | spread | x off | x off, paired | "
        "auto / max(off, best static K) | paired | decode speedup over own plain | "
        "drafting's net cost, % of steps |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for (workload, concurrency), modes in sorted(by_mode.items()):
        median = {mode: statistics.median(values) for mode, values in modes.items()}
        # off and vLLM's static K (modes named by a number); not our own paths (ours2, k0)
        best = max((v for m, v in median.items() if m == "off" or m.isdigit()), default=float("nan"))
        paired_median = {
            mode: statistics.median(pairs)
            for mode in modes
            if (pairs := paired.get((workload, concurrency, mode))) and mode != "off"
        }
        paired_best = max([1.0, *(v for m, v in paired_median.items() if m.isdigit())])  # off's is 1
        for mode, values in sorted(modes.items()):
            x_off = median[mode] / median["off"] if "off" in median else float("nan")
            versus = f"{median[mode] / best:.2f}" if mode == "auto" else ""
            cell = (workload, concurrency, mode)
            paired_text = f"{paired_median[mode]:.2f}" if mode in paired_median else ""
            versus_paired = (
                f"{paired_median[mode] / paired_best:.2f}" if mode == "auto" and mode in paired_median else ""
            )
            lines.append(
                f"| {workload} | {concurrency} | {mode} | {len(values)} | {median[mode]:.1f} | "
                f"{max(values) / min(values):.2f} | {x_off:.2f} | {paired_text} | {versus} | {versus_paired} | "
                f"{own_text('decode_speedup', cell, 1.0, 2)} | {own_text('drafting_net_cost_share', cell, 100.0, 1)} |"
            )
    return "\n".join(lines)


def paired_ratios(
    rows: list[dict[str, Any]], reference: str = "off"
) -> dict[tuple[str, int, str], list[float]]:
    """Per (workload, concurrency, mode): its throughput over `reference`'s of the same run (launch, round),
    for the runs with exactly one row of the mode and one of the reference."""
    runs: dict[tuple[str, int, int, int], dict[str, list[float]]] = {}
    for r in rows:
        run = (r["workload"], r["concurrency"], r.get("launch", 0), r.get("round", 0))
        runs.setdefault(run, {}).setdefault(r["mode"], []).append(r["output_throughput"])
    ratios: dict[tuple[str, int, str], list[float]] = {}
    for (workload, concurrency, _, _), modes in runs.items():
        base = modes.get(reference, [])
        if len(base) != 1:
            continue
        for mode, values in modes.items():
            if len(values) == 1:
                ratios.setdefault((workload, concurrency, mode), []).append(values[0] / base[0])
    return ratios


def base_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: each mode served from `--base-checkout` (`<mode>-base`) against its twin from this checkout,
    paired by run (launch and round): per cell the geometric mean of twin / base over its runs, and over all
    cells that mean with the standard error of the runs' log ratios (about the ratio's relative error). Empty
    without -base modes. An A/B of a change to the policy reads here (earlier sessions counted it with scratch
    scripts); on this 2-core machine its standard error over 12-24 runs was 0.006-0.017 (sessions 52, 53)."""
    lines: list[str] = []
    for base in sorted({r["mode"] for r in rows if r["mode"].endswith("-base")}):
        twin = base.removesuffix("-base")
        logs = {
            cell[:2]: [math.log(ratio) for ratio in ratios]
            for cell, ratios in paired_ratios(rows, reference=base).items()
            if cell[2] == twin
        }
        if not logs:
            continue
        lines += [f"| workload | conc | runs | {twin} / {base} | each run |", "|---|---:|---:|---:|---|"]
        for (workload, concurrency), values in sorted(logs.items()):
            each = ", ".join(f"{math.exp(v):.3f}" for v in values)
            lines.append(
                f"| {workload} | {concurrency} | {len(values)} | {math.exp(statistics.mean(values)):.3f} | {each} |"
            )
        pooled = [v for values in logs.values() for v in values]
        error = statistics.stdev(pooled) / math.sqrt(len(pooled)) if len(pooled) > 1 else float("nan")
        lines.append(
            f"| all | | {len(pooled)} | {math.exp(statistics.mean(pooled)):.3f} | standard error {error:.3f} |"
        )
    return "\n".join(lines)
