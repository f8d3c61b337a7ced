"""`python -m bench.vllm_policy --side-by-side`: every mode's server up at once, each cell run on every server
in turn (see `measure_side_by_side`)."""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import bench.vllm_policy as served  # called through the module: tests replace its servers and client
from bench.vllm_policy import PolicySettings


def measure_side_by_side(
    args: argparse.Namespace, base: PolicySettings, launch: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """Every mode's server up at once (ports from `--port` on), one client running each cell on every server
    in turn, the modes' order rotated from cell to cell: each mode's cells run beside the others' in time,
    so a slowdown of the machine that lasts a minute falls on every mode alike instead of on one launch.

    Why: on this 2-core machine, shared with other jobs, the same server's speed drifted by 10-20% from one
    launch to the next (session 19: off at concurrency 32 on the demo pair, 1096-1510 tok/s in one evening),
    and the modes launched one after another each saw one stretch of that drift. With `--pause-idle` the
    servers not in use are stopped during each cell (`vllm_policy_client.pause_others`, which says why)."""
    check_memory(len(args.modes), args.kv_cache_gib)
    plan = served.cell_plan(args)
    servers = {
        mode: served.mode_server(args, base, mode, args.port + index) for index, mode in enumerate(args.modes)
    }
    # Odd launches start the servers in reverse. The order they start in is a server's own: at batch 1 on
    # the demo pair (session 50), two servers of one code ran 0.989x apart (the second started over the
    # third, paired over 6 runs, standard error 0.006), and an A/B of code that chose exactly alike ran 0.966x
    # started second and 1.013x started third. With --launches 2 each mode starts in both places.
    starting = args.modes if launch % 2 == 0 else args.modes[::-1]
    with contextlib.ExitStack() as stack:
        urls = {mode: stack.enter_context(servers[mode][0]) for mode in starting}
        cells: list[list[str]] = []
        outs: list[Path] = []
        cell_modes: list[str] = []
        if args.warmup_prompts:
            for mode, url in urls.items():
                warmup, warmup_out = served.warmup_cell(args, url, mode)
                cells.append(warmup)
                outs.append(warmup_out)
                cell_modes.append(mode)
        num_warmups = len(cells)
        keys: list[tuple[str, tuple[int, str, int]]] = []
        for r, w, c in plan:
            shift = rotation_shift(args, r, w, c, launch)
            for mode in args.modes[shift:] + args.modes[:shift]:
                out = served.RAW / f"{mode}-{w}-c{c}-r{r}-{int(time.time())}.json"
                cells.append(served.client_argv(urls[mode], w, c, args, out))
                outs.append(out)
                cell_modes.append(mode)
                keys.append((mode, (r, w, c)))
        groups = [servers[mode][0].process_group for mode in cell_modes] if args.pause_idle else None
        results = served.run_clients(Path(args.python), cells, outs, groups, served.client_cores(args))
    for mode, result in zip(urls, results[:num_warmups], strict=False):
        served.log(f"{mode}: warm-up, {result['output_throughput']:.1f} tok/s (not a cell)")
    measured = results[num_warmups:]
    rows = [
        served.plan_row(args, mode, launch, cell, result, servers[mode][1])
        for (mode, cell), result in zip(keys, measured, strict=False)
    ]
    missing = [f"{mode} {w} c{c} launch {launch} round {r}" for mode, (r, w, c) in keys[len(measured) :]]
    return rows, missing


# What one vLLM CPU server held here beside its KV cache (`--kv-cache-gib`): the API server, the engine core
# and the worker, about 0.7 + 0.7 + 0.8 GiB on the demo pairs.
def rotation_shift(
    args: argparse.Namespace, round_index: int, workload: str, concurrency: int, launch: int
) -> int:
    """Where a cell's rotation of the modes starts: one further per round, per workload and per concurrency,
    so that each mode runs first (and second, ...) as often as the others in every cell over as many rounds
    as there are modes, and in every concurrency over as many workloads. Counted along the plan instead
    (sessions 19-33), the rotation was the same in every round and workload wherever the number of modes
    divides the number of concurrencies: with 4 modes (the session 34 twins: off, off-sync, auto, auto-base)
    or 2, a mode held the same place at one concurrency in every cell of the run."""
    position = round_index + args.workloads.index(workload) + args.concurrency.index(concurrency) + launch
    return position % len(args.modes)


SERVER_GIB = 2.5


def check_memory(num_servers: int, kv_cache_gib: float) -> None:
    """Servers side by side must fit in memory together: a clear error before starting them, not an OOM kill
    half way through."""
    available_gib = _available_gib()
    needed_gib = num_servers * (SERVER_GIB + kv_cache_gib)
    if available_gib is not None and needed_gib > available_gib:
        sys.exit(
            f"--side-by-side: {num_servers} servers need about {needed_gib:.0f} GiB ({SERVER_GIB} + "
            f"--kv-cache-gib {kv_cache_gib:g} each), {available_gib:.0f} GiB is available; run fewer modes "
            "or lower --kv-cache-gib"
        )


def _available_gib() -> float | None:
    try:
        meminfo = Path("/proc/meminfo").read_text()
    except OSError:
        return None  # not Linux: no check
    for line in meminfo.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 2**20
    return None
