"""bench.vllm_policy without vLLM: the auto server's command carries the record path, and a cell's summary of
the scheduler's record counts what it did."""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import signal
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import vllm_policy
from bench.vllm_policy import PolicySettings, cell_row
from bench.vllm_policy_client import CLIENT
from bench.vllm_policy_report import base_table, median_table, scheduler_summary
from cluster.vllm_backend.settings import SchedulerSettings
from policy.batch_aware import BatchAwareConfig


def _step(step: int, drafts: dict[str, int], accepted: dict[str, int], holds: int = 0) -> dict[str, Any]:
    return {
        "step": step,
        "num_drafts": drafts,
        "num_accepted": accepted,
        "chosen": {},
        "num_draft_steps": max(drafts.values(), default=0),
        "step_time_s": 0.05 if any(drafts.values()) else 0.02,
        "draft_time_s": None,
        "guard_holds": holds,
    }


def test_summary_counts_drafting_acceptance_and_holds() -> None:
    steps = [
        _step(1, {}, {}),  # a prefill step: no decoding request
        _step(2, {"a": 0, "b": 0}, {"a": 0, "b": 0}),
        _step(3, {"a": 2, "b": 0}, {"a": 1, "b": 0}, holds=0),
        _step(4, {"a": 2, "b": 4}, {"a": 2, "b": 1}, holds=1),
    ]
    summary = scheduler_summary(steps)
    assert summary["num_steps"] == 4
    assert summary["num_drafting_steps"] == 2
    assert summary["num_spec_tokens_histogram"] == {"0": 3, "2": 2, "4": 1}
    assert summary["mean_num_spec_tokens"] == 8 / 6
    assert summary["acceptance"] == 4 / 8
    assert summary["guard_holds"] == 1
    assert summary["step_ms_p50_verifying"] == 50.0 and summary["step_ms_p50_not_verifying"] == 20.0
    assert summary["prefill_steps"] is None and summary["choose_ms_p50"] is None  # an older record
    assert summary["draft_prefill_tokens"] is None
    assert summary["choose_cpu_ms_mean"] is None and summary["refit_cpu_ms_mean"] is None


def test_summary_splits_steps_by_what_the_target_verified_and_prefilled() -> None:
    """A step whose drafter is off (num_draft_steps 0) still verifies the drafts of the step before: it is a
    verifying step (session 7's summary called it plain). Steps with prefill tokens are counted apart."""
    detail = {
        "num_prefill_tokens": 0,
        "choose_s": 0.001,
        "choose_cpu_s": 0.0005,
        "observe_s": 0.002,
        "refit_cpu_s": 0.0001,
        "gap_s": 0.004,
    }
    steps = [
        # New requests, after the server sat idle for 30 s (not the engine core's time between steps).
        {**_step(1, {}, {}), **detail, "num_prefill_tokens": 100, "step_time_s": 0.5, "gap_s": 30.0},
        {
            **_step(2, {"a": 0, "b": 0}, {"a": 0, "b": 0}),
            **detail,
            "num_draft_steps": 2,
            "draft_prefill_tokens": 40,
        },
        {**_step(3, {"a": 2, "b": 2}, {"a": 1, "b": 2}), **detail, "num_draft_steps": 0},
        {**_step(4, {"a": 0, "b": 0}, {"a": 0, "b": 0}), **detail, "num_draft_steps": 0},
        {**_step(5, {"a": 1, "b": 1}, {"a": 1, "b": 0}), **detail, "num_prefill_tokens": 30},
    ]
    summary = scheduler_summary(steps)
    assert summary["num_drafting_steps"] == 2  # steps 2 and 5
    assert summary["step_ms_p50_verifying"] == 50.0  # step 3 only: step 5 also prefilled
    assert summary["step_ms_p50_not_verifying"] == 20.0  # steps 2 and 4
    assert summary["prefill_steps"] == 2 and summary["prefill_steps_s"] == 0.55
    assert summary["prefill_tokens_per_step_p50"] == 100
    assert summary["draft_prefill_tokens"] == 40  # step 2's catch-up (the other steps carry none)
    assert summary["steps_s"] == 0.64 and summary["gap_s"] == 0.016
    assert summary["mean_batch"] == 2.0
    assert (summary["choose_ms_p50"], summary["observe_ms_p50"], summary["gap_ms_p50"]) == (1.0, 2.0, 4.0)
    assert (summary["choose_ms_mean"], summary["observe_ms_mean"]) == (1.0, 2.0)
    assert summary["choose_cpu_ms_mean"] == 0.5 and summary["refit_cpu_ms_mean"] == 0.1
    steps[2]["choose_s"] = 0.009  # one search among quick steps: the p50 hides it, the mean does not
    assert (scheduler_summary(steps)["choose_ms_p50"], scheduler_summary(steps)["choose_ms_mean"]) == (
        1.0,
        3.0,
    )
    # The drain: the trailing steps below the cell's full batch (2 here).
    for s, num_scheduled in zip(steps, (2, 2, 2, 1, 2), strict=True):
        s["num_scheduled"] = num_scheduled
    assert scheduler_summary(steps)["drain_steps"] == 0
    assert (scheduler_summary(steps[:4])["drain_steps"], scheduler_summary(steps[:4])["drain_s"]) == (1, 0.02)


def test_the_decode_speedup_is_against_the_servers_own_plain_steps() -> None:
    """Each decode step's committed tokens at the plain steps' time for its batch size (a line fitted in the
    batch size), over the steps' actual time; prefill steps are not decode steps, and a plain step next to
    drafting (it carries the drafter's costs) is no reference."""
    detail = {
        "num_prefill_tokens": 0,
        "gap_s": 0.0,
        "choose_s": 0.0,
        "observe_s": 0.0,
        "is_near_drafting": False,
    }
    plain = {"a": 0, "b": 0}
    steps = [
        {**_step(1, {}, {}), **detail, "num_prefill_tokens": 100, "step_time_s": 0.5},
        {**_step(2, plain, plain), **detail},  # 0.02 s at batch 2
        {**_step(3, {"a": 0}, {"a": 0}), **detail, "step_time_s": 0.01},  # 0.01 s at batch 1
        {**_step(4, {"a": 2, "b": 2}, {"a": 2, "b": 1}), **detail, "step_time_s": 0.04},
        {**_step(5, plain, plain), **detail, "step_time_s": 0.09, "is_near_drafting": True},
    ]
    # Plain-step time: 0.01 s per request. Step 4 commits 5 tokens (0.05 s plain), step 5 2 (0.02 s).
    assert scheduler_summary(steps)["decode_speedup"] == round((0.02 + 0.01 + 0.05 + 0.02) / 0.16, 3)
    assert scheduler_summary(steps[:1] + steps[3:])["decode_speedup"] is None  # no plain step as reference
    # What drafting cost the cell: step 4 took 0.04 s for 0.05 s of plain decoding's tokens (a saving), of
    # the steps' 0.66 s; step 5 is plain, whatever it carried.
    assert scheduler_summary(steps)["drafting_net_cost_share"] == round(-0.01 / 0.66, 4)
    steps[3]["num_accepted"] = {"a": 0, "b": 0}  # every draft rejected: 0.04 s for 0.02 s of plain tokens
    assert scheduler_summary(steps)["drafting_net_cost_share"] == round(0.02 / 0.66, 4)
    assert scheduler_summary(steps[:1] + steps[3:])["drafting_net_cost_share"] is None


def _command(tmp_path: Path, **policy: Any) -> list[str]:
    """The command line of a policy server on a tiny model shape, with `policy`'s settings."""
    settings = PolicySettings(
        target=tmp_path / "target",
        draft=tmp_path / "draft",
        served_name="t",
        dtype="float32",
        max_model_len=256,
        max_num_seqs=4,
        cache_root=tmp_path,
        **policy,
    )
    return settings.command(Path("python"), 8000, 4)


def test_auto_server_command_records_its_steps(tmp_path: Path) -> None:
    command = _command(tmp_path, policy="auto", record_path=tmp_path / "record.jsonl")
    section = json.loads(command[command.index("--additional-config") + 1])["moespec"]
    assert section == {"policy": {"kind": "auto"}, "record_path": str(tmp_path / "record.jsonl")}
    assert "--scheduler-cls" in command


def test_ours_static_server_runs_our_scheduler_at_a_fixed_k(tmp_path: Path) -> None:
    command = _command(tmp_path, policy="static", policy_num_spec_tokens=2)
    section = json.loads(command[command.index("--additional-config") + 1])["moespec"]
    assert section == {"policy": {"kind": "static", "num_spec_tokens": 2}}
    assert "--scheduler-cls" in command and "--worker-cls" in command
    executor = command[command.index("--distributed-executor-backend") + 1]
    assert executor == "cluster.vllm_backend.executor.PolicyMultiprocExecutor"  # vLLM's CPU build: processes
    vllms = _command(tmp_path, policy="static", policy_num_spec_tokens=2, fetches_every_step=True)
    assert "--distributed-executor-backend" not in vllms and "--worker-cls" in vllms


def _base_settings(tmp_path: Path) -> PolicySettings:
    """The settings `mode_server` starts from (what `bench.vllm_policy` builds from its arguments)."""
    return PolicySettings(
        target=tmp_path, draft=tmp_path, served_name="t", dtype="float32", max_model_len=256, max_num_seqs=4,
        cache_root=tmp_path,
    )  # fmt: skip


def test_fetch_modes_run_our_scheduler_with_vllms_executor(tmp_path: Path) -> None:
    base, args = _base_settings(tmp_path), argparse.Namespace(python="python", base_checkout=None)
    for mode, fetches in (("ours2-fetch", True), ("ours2", False)):
        server, record = vllm_policy.mode_server(args, base, mode, 8000)
        settings: Any = server.settings
        assert (settings.policy, settings.policy_num_spec_tokens) == ("static", 2)
        assert settings.fetches_every_step is fetches and record is not None
        assert record.name.startswith(f"record-{mode}-") and server.log_path.name == f"server-{mode}.log"
    server, _ = vllm_policy.mode_server(args, base, "2", 8000)  # vLLM's own static K
    settings = server.settings
    assert not settings.policy and not settings.fetches_every_step
    with pytest.raises(ValueError, match="2-fetch"):  # vLLM's own modes fetch anyway
        vllm_policy.mode_server(args, base, "2-fetch", 8000)


def test_now_mode_runs_auto_choosing_between_steps(tmp_path: Path) -> None:
    base, args = _base_settings(tmp_path), argparse.Namespace(python="python", base_checkout=None)
    for mode, ahead in (("auto-now", False), ("auto", True), ("auto-now-fetch", False)):
        server, record = vllm_policy.mode_server(args, base, mode, 8000)
        settings: Any = server.settings
        assert settings.policy == "auto" and settings.chooses_ahead is ahead and record is not None
        assert record.name.startswith(f"record-{mode}-")
        command = settings.command(Path("python"), 8000, 4)
        section = json.loads(command[command.index("--additional-config") + 1])["moespec"]
        assert section.get("choose_ahead", True) is ahead
        assert SchedulerSettings.from_additional_config({"moespec": section}).choose_ahead is ahead
    with pytest.raises(ValueError, match="ours2-now"):  # a static K costs nothing to choose
        vllm_policy.mode_server(args, base, "ours2-now", 8000)


def test_nooutlook_mode_runs_auto_weighing_one_iteration_alone(tmp_path: Path) -> None:
    base, args = _base_settings(tmp_path), argparse.Namespace(python="python", base_checkout=None)
    for mode, weighs in (("auto-nooutlook", False), ("auto", True)):
        server, record = vllm_policy.mode_server(args, base, mode, 8000)
        bench_settings: Any = server.settings
        assert bench_settings.policy == "auto" and record is not None
        command = bench_settings.command(Path("python"), 8000, 4)
        section = json.loads(command[command.index("--additional-config") + 1])["moespec"]
        settings = SchedulerSettings.from_additional_config({"moespec": section})
        assert settings.policy.weighs_catch_up is weighs
    with pytest.raises(ValueError, match="k0-nooutlook"):
        vllm_policy.mode_server(args, base, "k0-nooutlook", 8000)


def test_norecord_modes_serve_ours_without_a_step_record(tmp_path: Path) -> None:
    """k0-norecord / auto-norecord: our modes as served outside the benchmarks, no record path given to the
    scheduler (its record's CPU is what they measure against k0 / auto)."""
    base, args = _base_settings(tmp_path), argparse.Namespace(python="python", base_checkout=tmp_path)
    for mode, policy in (("auto-norecord", "auto"), ("k0-norecord", "off"), ("auto-norecord-base", "auto")):
        server, record = vllm_policy.mode_server(args, base, mode, 8000)
        assert record is None and server.settings.policy == policy
        command = server.settings.command(Path("python"), 8000, 4)
        section = json.loads(command[command.index("--additional-config") + 1])["moespec"]
        assert "record_path" not in section
        assert SchedulerSettings.from_additional_config({"moespec": section}).record_path is None
        assert server.log_path.name == f"server-{mode}.log"
    _, record = vllm_policy.mode_server(args, base, "auto", 8000)
    assert record is not None
    with pytest.raises(ValueError, match="off-norecord"):  # vLLM's own modes keep none
        vllm_policy.mode_server(args, base, "off-norecord", 8000)


def test_gain_mode_sets_the_predicted_gain_auto_needs_to_leave_plain_decoding(tmp_path: Path) -> None:
    base, args = _base_settings(tmp_path), argparse.Namespace(python="python", base_checkout=None)
    for mode, gain in (
        ("auto-gain0", 0.0),
        ("auto-gain12", 0.12),
        ("auto", BatchAwareConfig.min_predicted_gain),
    ):
        server, record = vllm_policy.mode_server(args, base, mode, 8000)
        assert record is not None and record.name.startswith(f"record-{mode}-")
        command = server.settings.command(Path("python"), 8000, 4)
        section = json.loads(command[command.index("--additional-config") + 1])["moespec"]
        settings = SchedulerSettings.from_additional_config({"moespec": section})
        assert settings.policy.kind == "auto" and settings.policy.min_predicted_gain == pytest.approx(gain)
    for bad in ("k0-gain5", "auto-gainx"):
        with pytest.raises(ValueError, match=bad):
            vllm_policy.mode_server(args, base, bad, 8000)


def test_base_modes_serve_ours_from_the_base_checkout(tmp_path: Path) -> None:
    """auto-base: auto served from another checkout's code (the server's working directory, first on its
    path), beside auto from this one; every other server starts in this repository."""
    base, args = _base_settings(tmp_path), argparse.Namespace(python="python", base_checkout=tmp_path)
    server, record = vllm_policy.mode_server(args, base, "auto-base", 8000)
    settings: Any = server.settings
    assert server.cwd == tmp_path and settings.policy == "auto"
    assert record is not None and record.name.startswith("record-auto-base-")
    assert server.log_path.name == "server-auto-base.log"
    for mode in ("auto", "off", "2"):
        assert vllm_policy.mode_server(args, base, mode, 8000)[0].cwd == vllm_policy.REPO
    with pytest.raises(ValueError, match="2-base"):  # vLLM's own modes run none of our code
        vllm_policy.mode_server(args, base, "2-base", 8000)
    with pytest.raises(ValueError, match="--base-checkout"):
        vllm_policy.mode_server(
            argparse.Namespace(python="python", base_checkout=None), base, "auto-base", 8000
        )


def test_off_ours_runs_our_scheduler_without_a_draft_model(tmp_path: Path) -> None:
    """off-ours: vLLM without speculation on our scheduler and worker, so that its step record shows what off's
    steps are (k0 against it: what the idle draft model costs)."""
    base, args = _base_settings(tmp_path), argparse.Namespace(python="python", base_checkout=None)
    server, record = vllm_policy.mode_server(args, base, "off-ours", 8000)
    assert server.num_spec_tokens == 0 and record is not None and record.name.startswith("record-off-ours-")
    command = server.settings.command(Path("python"), 8000, server.num_spec_tokens)
    assert (
        "--speculative-config" not in command and "--scheduler-cls" in command and "--worker-cls" in command
    )
    server, _ = vllm_policy.mode_server(args, base, "k0", 8000)
    assert server.num_spec_tokens == vllm_policy.MAX_SPEC_TOKENS


def test_a_cell_summarises_the_record_steps_that_started_within_its_measured_client_run(
    tmp_path: Path,
) -> None:
    """All cells of a server run in one client process; each cell's steps are those whose wall-clock start
    falls in its measured run: not the steps of the cell before and after, nor its own warm-up's, which run
    in the client's span before the `duration` that `vllm bench serve` measured."""
    record = tmp_path / "record.jsonl"
    steps = [{**_step(i, {"a": k}, {"a": k}), "start_s": 100.0 + i} for i, k in enumerate((4, 3, 1, 2, 4))]
    record.write_text("".join(json.dumps(s) + "\n" for s in steps))
    result = {"output_throughput": 10.0, "median_tpot_ms": 20.0, "p99_tpot_ms": 30.0, "duration": 2.0}
    span = {"started": 100.5, "ended": 103.5, "load_1min": [1.234, 2.0]}  # the warm-up: the step at 101
    row = cell_row({**result, "span": span}, record)
    assert row["scheduler"]["num_steps"] == 2 and row["scheduler"]["num_spec_tokens_histogram"] == {
        "1": 1,
        "2": 1,
    }
    whole_span = cell_row({**result, "duration": 5.0, "span": span}, record)  # clamped to the span
    assert whole_span["scheduler"]["num_steps"] == 3
    assert row["load_1min"] == [1.23, 2.0] and row["output_throughput"] == 10.0
    assert "scheduler" not in cell_row({**result, "span": span}, None)  # vLLM's own server: no record


def test_the_client_script_compiles() -> None:
    compile(CLIENT, "<client>", "exec")


def _fake_completions_server() -> tuple[str, Any, list[int]]:
    """An OpenAI completions endpoint streaming `max_tokens` chunks of one character each, as `vllm bench
    serve` reads them; (base URL, stop function, each request's max_tokens as received)."""
    import asyncio
    import threading

    from aiohttp import web

    async def completions(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        received.append(body["max_tokens"])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for _ in range(body["max_tokens"]):
            await response.write(b'data: {"choices": [{"text": "a"}]}\n\n')
        usage = {"completion_tokens": body["max_tokens"], "prompt_tokens": 5}
        await response.write(f"data: {json.dumps({'usage': usage})}\n\ndata: [DONE]\n\n".encode())
        return response

    received: list[int] = []
    loop = asyncio.new_event_loop()
    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    runner = web.AppRunner(app)
    loop.run_until_complete(runner.setup())
    site = web.TCPSite(runner, "127.0.0.1", 0)
    loop.run_until_complete(site.start())
    port = runner.addresses[0][1]
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def stop() -> None:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)

    return f"http://127.0.0.1:{port}", stop, received


def _client_args(**values: Any) -> argparse.Namespace:
    """`bench.vllm_policy`'s arguments as `client_argv` reads them, for the demo target's tokenizer."""
    from bench.vllm_policy_client import REPO

    defaults = {"served_name": "demo-moe", "target": REPO / "models" / "demo-moe", "output_len_spread": 0.0}
    return argparse.Namespace(**{**defaults, **values}, min_prompts=2, requests_per_slot=1, cell_warmups=1)


@pytest.mark.slow  # about 25-50 s: it imports vLLM
def test_one_client_process_runs_every_cell_of_a_server(tmp_path: Path, monkeypatch: Any) -> None:
    """`vllm bench serve`'s main, twice in one process, against a fake server: each cell's own result (its
    prompts, concurrency and request rate) and span come back, in order; each cell's warm-up request reaches
    the server and stays out of the cell's result."""
    pytest.importorskip("vllm")
    import bench.vllm_policy_client as client

    monkeypatch.setattr(client, "RAW", tmp_path)
    args = _client_args(max_tokens=3, request_rate=50.0)  # Poisson arrivals
    url, stop, received = _fake_completions_server()
    try:
        outs = [tmp_path / "a.json", tmp_path / "b.json"]
        cells = [client.client_argv(url, "code", c, args, out) for c, out in zip((1, 3), outs, strict=True)]
        results = client.run_clients(Path(sys.executable), cells, outs)
    finally:
        stop()
    assert [(r["completed"], r["max_concurrency"], r["total_output_tokens"]) for r in results] == [
        (2, 1, 6),
        (3, 3, 9),
    ]
    assert [r["request_rate"] for r in results] == [50.0, 50.0]
    assert len(received) == 2 + 3 + 2  # the cells' prompts and one warm-up each
    assert results[0]["span"]["ended"] <= results[1]["span"]["started"]


def test_a_spread_gives_each_prompt_its_own_output_length_the_same_on_every_server(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """`--output-len-spread`: the client reads each prompt's `output_tokens` (`--custom-output-len -1`), drawn
    within max_tokens * (1 -+ spread), the same on every call; without it every request is max_tokens."""
    import bench.vllm_policy_client as client

    monkeypatch.setattr(client, "RAW", tmp_path)
    args = _client_args(max_tokens=64, request_rate=float("inf"), output_len_spread=0.5)
    argv = client.client_argv("http://x", "prose", 4, args, tmp_path / "a.json")
    dataset = Path(argv[argv.index("--dataset-path") + 1])
    assert argv[argv.index("--custom-output-len") + 1] == "-1"
    rows = [json.loads(line) for line in dataset.read_text().splitlines()]
    prompts = [json.loads(line) for line in (client.PROMPTS / "prose.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p["prompt"] for p in prompts]
    lengths = [r["output_tokens"] for r in rows]
    assert min(lengths) >= 32 and max(lengths) <= 96 and len(set(lengths)) > len(lengths) // 4
    again = client.client_argv("http://x", "prose", 16, args, tmp_path / "b.json")
    assert Path(again[again.index("--dataset-path") + 1]).read_text() == dataset.read_text()
    args.output_len_spread = 0.0
    plain = client.client_argv("http://x", "prose", 4, args, tmp_path / "c.json")
    assert plain[plain.index("--custom-output-len") + 1] == "64"
    assert plain[plain.index("--dataset-path") + 1] == str(client.PROMPTS / "prose.jsonl")
    args.output_len_spread = 1.5
    with pytest.raises(ValueError, match="--output-len-spread 1.5"):
        client.client_argv("http://x", "prose", 4, args, tmp_path / "d.json")


def test_a_sync_mode_runs_vllm_without_async_scheduling_as_our_scheduler_does(tmp_path: Path) -> None:
    """Our scheduler runs with --no-async-scheduling; vLLM's own modes get it only as `N-sync`."""
    assert "--no-async-scheduling" not in _command(tmp_path)
    assert _command(tmp_path, is_sync=True).count("--no-async-scheduling") == 1
    assert _command(tmp_path, policy="auto", is_sync=True).count("--no-async-scheduling") == 1


def test_the_median_table_compares_auto_with_the_best_of_off_and_vllms_static_k() -> None:
    """Medians over launches and rounds per mode; our own fixed-K path (ours2) is not one of vLLM's static K."""
    measured = {"off": (100.0, 120.0), "2": (90.0, 130.0, 110.0), "auto": (105.0, 99.0), "ours2": (200.0,)}
    rows = [
        {"mode": mode, "workload": "code", "concurrency": 16, "output_throughput": value}
        for mode, values in measured.items()
        for value in values
    ]
    rows[-2]["scheduler"] = {"decode_speedup": 1.1, "drafting_net_cost_share": -0.021}  # auto's second launch
    lines = {line.split(" | ")[2]: line for line in median_table(rows).splitlines()[2:]}
    # 102 / max(110, 110); spread 105 / 99
    assert lines["auto"] == "| code | 16 | auto | 2 | 102.0 | 1.06 | 0.93 |  | 0.93 |  | 1.10 | -2.1 |"
    assert lines["2"] == "| code | 16 | 2 | 3 | 110.0 | 1.44 | 1.00 |  |  |  |  |  |"
    assert lines["ours2"].startswith("| code | 16 | ours2 | 1 | 200.0 | 1.00 | 1.82 |")


def test_the_median_table_compares_auto_with_the_best_static_k_paired_by_run() -> None:
    """The machine ran at 100, 300 and 200 tok/s of off in three rounds, and auto's fastest round fell in
    the slow one's: from the medians auto trails K = 2 (220 / 270), paired by round it is 1.10 of off against
    K = 2's 1.05 (per round 1.2, 1.1, 1.0 and 1.0, 1.05, 1.1)."""
    measured = {"off": (100.0, 300.0, 200.0), "2": (100.0, 315.0, 220.0), "auto": (120.0, 330.0, 200.0)}
    rows = [
        {"mode": mode, "workload": "code", "concurrency": 16, "round": i, "output_throughput": value}
        for mode, values in measured.items()
        for i, value in enumerate(values)
    ]
    lines = {line.split(" | ")[2]: line for line in median_table(rows).splitlines()[2:]}
    # median 200 / max(200, 220) = 0.91; paired 1.10 / max(1, 1.05) = 1.05
    assert lines["auto"] == "| code | 16 | auto | 3 | 200.0 | 2.75 | 1.00 | 1.10 | 0.91 | 1.05 |  |  |"
    # where every static K pairs below off, the comparison is with off: 1.10 / 1.0
    rows = [r for r in rows if r["mode"] != "2"] + [
        {"mode": "2", "workload": "code", "concurrency": 16, "round": i, "output_throughput": 0.5 * value}
        for i, value in enumerate(measured["off"])
    ]
    lines = {line.split(" | ")[2]: line for line in median_table(rows).splitlines()[2:]}
    assert lines["auto"].split(" | ")[8:10] == ["1.00", "1.10"]


class _FakeServer:
    """Stands in for `VllmServer`: records that it was started and stopped."""

    def __init__(self, mode: str, port: int, events: list[str]) -> None:
        self.mode, self.port, self.events = mode, port, events
        self.process_group = port  # (its stand-in: one per server)

    def __enter__(self) -> str:
        self.events.append(f"start {self.mode}")
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *_: object) -> None:
        self.events.append(f"stop {self.mode}")


def test_side_by_side_runs_each_cell_on_every_server_in_rotated_order(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """All servers up before the client runs, down after; every cell on every server, each mode first as often
    as the others; each result lands on the row of the mode whose server it measured; a client that stopped
    early leaves the rest named as missing."""
    import bench.vllm_policy as vllm_policy
    import bench.vllm_policy_side_by_side as side_by_side

    monkeypatch.setattr(vllm_policy, "RAW", tmp_path)
    monkeypatch.setattr(side_by_side, "_available_gib", lambda: 100.0)
    events: list[str] = []
    ports = {"off": 9000, "k0": 9001, "auto": 9002}  # from --port on

    def mode_server(args: Any, base: Any, mode: str, port: int) -> tuple[_FakeServer, None]:
        assert port == ports[mode]
        return _FakeServer(mode, port, events), None

    order: list[tuple[str, str, str]] = []  # (url, workload, concurrency) of every cell the client ran

    def run_clients(
        python: Path, cells: list[list[str]], outs: list[Path], groups: list[int] | None, cores: Any
    ) -> list[dict[str, Any]]:
        events.append("client")
        results = []
        assert groups is not None and len(groups) == len(cells)
        for argv, group in zip(cells[:-1], groups, strict=False):  # the client fails before the last cell
            url = argv[argv.index("--base-url") + 1]
            assert url.endswith(f":{group}")  # --pause-idle: each cell names its own server's group
            dataset = Path(argv[argv.index("--dataset-path") + 1]).stem
            concurrency = argv[argv.index("--max-concurrency") + 1]
            order.append((url, dataset, concurrency))
            span = {"started": 0.0, "ended": 1.0, "load_1min": [0.0, 0.0]}
            port = int(url.rsplit(":", 1)[1])
            results.append(
                {
                    "output_throughput": float(port),
                    "median_tpot_ms": 1.0,
                    "p99_tpot_ms": 1.0,
                    "duration": 1.0,
                    "span": span,
                }
            )
        return results

    monkeypatch.setattr(vllm_policy, "mode_server", mode_server)
    monkeypatch.setattr(vllm_policy, "run_clients", run_clients)
    args = argparse.Namespace(
        modes=list(ports),
        workloads=["code", "prose"],
        concurrency=[4, 16, 32],
        rounds=1,
        launches=1,
        kv_cache_gib=1.0,
        pause_idle=True,
        pin_frontend=False,
        warmup_prompts=-1,
        cell_warmups=1,
        served_name="demo-moe",
        target=vllm_policy.REPO / "models" / "demo-moe",
        max_tokens=8,
        output_len_spread=0.0,
        min_prompts=4,
        requests_per_slot=1,
        request_rate=float("inf"),
        python=sys.executable,
        port=9000,
    )
    rows, missing = side_by_side.measure_side_by_side(args, None, launch=0)  # type: ignore[arg-type]
    assert events[:3] == ["start off", "start k0", "start auto"] and events[3] == "client"
    assert sorted(events[4:]) == ["stop auto", "stop k0", "stop off"]
    warmups, cells = order[:3], order[3:]
    assert [url for url, _, _ in warmups] == [f"http://127.0.0.1:{p}" for p in ports.values()]
    assert all(c == "32" and w == "code" for _, w, c in warmups)  # the top concurrency, the first workload
    firsts = [cells[i][0] for i in range(0, len(cells), 3)]
    assert sorted(firsts) == sorted(f"http://127.0.0.1:{p}" for p in ports.values() for _ in range(2))
    for row in rows:
        assert row["output_throughput"] == ports[row["mode"]]
    assert len(rows) == 6 * 3 - 1
    # The cell the client did not reach: the last mode of the last cell's rotation (prose 32: off, k0, auto).
    assert missing == ["auto prose c32 launch 0 round 0"]
    # Over as many rounds as modes, each mode runs first in every cell once (and in every concurrency over as
    # many workloads): with 3 concurrencies and 3 modes, counting along the plan started every round alike.
    for w, c in itertools.product(args.workloads, args.concurrency):
        shifts = [side_by_side.rotation_shift(args, r, w, c, 0) for r in range(len(ports))]
        assert sorted(shifts) == [0, 1, 2]
    for r, c in itertools.product(range(3), args.concurrency):
        args.workloads = ["code", "prose", "synthetic"]
        assert sorted(side_by_side.rotation_shift(args, r, w, c, 0) for w in args.workloads) == [0, 1, 2]
    # An odd launch starts the servers in reverse (a server's start order is its own), each on its port.
    events.clear()
    order.clear()
    args.workloads = ["code", "prose"]
    args.launches = 2
    rows, _ = side_by_side.measure_side_by_side(args, None, launch=1)  # type: ignore[arg-type]
    assert events[:3] == ["start auto", "start k0", "start off"]
    assert all(row["output_throughput"] == ports[row["mode"]] and row["launch"] == 1 for row in rows)


def test_during_a_cell_only_its_server_runs_and_every_server_runs_again_after() -> None:
    """`--pause-idle`: the other servers' process groups (each its own session, as `VllmServer` starts them,
    a child included) are stopped while a cell runs, the cell's own continued; `resume_all` continues every
    one, and a group that exited is skipped."""
    import subprocess
    import time

    import psutil

    from bench.vllm_policy_client import pause_others, resume_all

    def state(pid: int) -> str:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]

    def wait_for(pid: int, expected: str) -> str:  # (generous: a loaded machine starts Python slowly)
        deadline = time.monotonic() + 60.0
        while state(pid) != expected and time.monotonic() < deadline:
            time.sleep(0.01)
        return state(pid)

    def running(pid: int) -> bool:  # not stopped (sleeping, or still starting)
        deadline = time.monotonic() + 60.0
        while state(pid) == "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        return state(pid) != "T"

    sleep = "import time; time.sleep(60)"
    code = f"import subprocess, sys; subprocess.Popen([sys.executable, '-c', {sleep!r}]); {sleep}"
    servers = [subprocess.Popen([sys.executable, "-c", code], start_new_session=True) for _ in range(2)]
    gone = subprocess.Popen([sys.executable, "-c", "pass"], start_new_session=True)
    gone.wait()
    try:
        deadline = time.monotonic() + 60.0
        while any(not psutil.Process(s.pid).children() for s in servers) and time.monotonic() < deadline:
            time.sleep(0.01)
        children = [psutil.Process(s.pid).children()[0].pid for s in servers]
        groups = [servers[0].pid, servers[1].pid, gone.pid, servers[0].pid]
        pause_others(servers[0].pid, groups)
        assert [wait_for(p, "T") for p in (servers[1].pid, children[1])] == ["T", "T"]
        assert all(running(p) for p in (servers[0].pid, children[0]))
        pause_others(servers[1].pid, groups)
        assert [wait_for(p, "T") for p in (servers[0].pid, children[0])] == ["T", "T"]
        assert all(running(p) for p in (servers[1].pid, children[1]))
        resume_all(groups)
        assert all(running(p) for p in (*[s.pid for s in servers], *children))
    finally:
        for server in servers:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()


def test_the_frontend_gets_the_last_core_and_the_worker_the_others(monkeypatch: Any) -> None:
    """`--pin-frontend`: of the cores this process may use, the last for the API server, engine core and
    client, the others for the worker; one core cannot be split."""
    from bench import peers

    monkeypatch.setattr(peers.os, "sched_getaffinity", lambda pid: {2, 0, 5, 3})
    assert peers.frontend_cores() == ({5}, {0, 2, 3})
    monkeypatch.setattr(peers.os, "sched_getaffinity", lambda pid: {1})
    with pytest.raises(ValueError, match="2 cores"):
        peers.frontend_cores()


def test_side_by_side_refuses_servers_that_do_not_fit_in_memory(monkeypatch: Any) -> None:
    import bench.vllm_policy_side_by_side as side_by_side

    monkeypatch.setattr(side_by_side, "_available_gib", lambda: 10.0)
    side_by_side.check_memory(2, 2)  # 2 x (2.5 + 2) = 9 GiB
    with pytest.raises(SystemExit, match="3 servers need about 14 GiB"):
        side_by_side.check_memory(3, 2)
    side_by_side.check_memory(3, 0.25)  # 3 x 2.75 = 8.25 GiB
    with pytest.raises(SystemExit, match=r"4 servers need about 11 GiB \(2.5 \+ --kv-cache-gib 0.25 each\)"):
        side_by_side.check_memory(4, 0.25)


def test_the_median_table_pairs_each_mode_with_off_of_the_same_run() -> None:
    """Side by side, off and k0 ran seconds apart in each round: the paired ratio is the median of k0 / off
    per round (0.9, 0.9, 1.0), where the ratio of the medians mixes rounds at different speeds."""
    measured = {"off": (100.0, 200.0, 150.0), "k0": (90.0, 180.0, 150.0)}
    rows = [
        {"mode": mode, "workload": "code", "concurrency": 4, "round": i, "output_throughput": value}
        for mode, values in measured.items()
        for i, value in enumerate(values)
    ]
    rows.append({"mode": "auto", "workload": "code", "concurrency": 4, "round": 0, "output_throughput": 50.0})
    lines = {line.split(" | ")[2]: line for line in median_table(rows).splitlines()[2:]}
    assert lines["k0"] == "| code | 4 | k0 | 3 | 150.0 | 2.00 | 1.00 | 0.90 |  |  |  |  |"
    assert lines["auto"].startswith("| code | 4 | auto | 1 | 50.0 | 1.00 | 0.33 | 0.50 |")
    assert lines["off"].startswith("| code | 4 | off | 3 | 150.0 | 2.00 | 1.00 |  |")


def test_the_base_table_pairs_each_mode_with_its_base_twin_of_the_same_run() -> None:
    """auto over auto-base per run (1.1 and 0.9 at code 4; 1.0 at prose 4), the geometric mean per cell and
    over all three runs with the standard error of their logs; off has no twin, and a run without auto-base
    pairs nothing."""
    measured = {
        ("code", 0): {"off": 100.0, "auto": 110.0, "auto-base": 100.0},
        ("code", 1): {"off": 100.0, "auto": 90.0, "auto-base": 100.0},
        ("prose", 0): {"off": 50.0, "auto": 60.0, "auto-base": 60.0},
        ("prose", 1): {"off": 50.0, "auto": 70.0},
    }
    rows = [
        {"mode": mode, "workload": workload, "concurrency": 4, "launch": launch, "output_throughput": value}
        for (workload, launch), modes in measured.items()
        for mode, value in modes.items()
    ]
    lines = base_table(rows).splitlines()
    assert lines[:2] == [
        "| workload | conc | runs | auto / auto-base | each run |",
        "|---|---:|---:|---:|---|",
    ]
    assert lines[2] == f"| code | 4 | 2 | {math.sqrt(0.99):.3f} | 1.100, 0.900 |"
    assert lines[3] == "| prose | 4 | 1 | 1.000 | 1.000 |"
    logs = [math.log(1.1), math.log(0.9), 0.0]
    error = statistics.stdev(logs) / math.sqrt(3)
    assert lines[4] == f"| all | | 3 | {math.exp(statistics.mean(logs)):.3f} | standard error {error:.3f} |"
    assert len(lines) == 5
    assert base_table([r for r in rows if r["mode"] != "auto-base"]) == ""


def test_a_server_s_kv_cache_may_be_a_fraction_of_a_gib(tmp_path: Path) -> None:
    """Seven servers side by side fit this machine's 23 GiB at 0.25 GiB of KV cache each, not at 1 (the
    CPU build's VLLM_CPU_KVCACHE_SPACE takes whole GiB); vLLM's own parser reads the size from the command."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    command = _command(tmp_path, kv_cache_gib=0.25)
    assert command[command.index("--kv-cache-memory-bytes") + 1] == str(2**28)
    parsed = make_arg_parser(FlexibleArgumentParser()).parse_args(command[3:])
    assert EngineArgs.from_cli_args(parsed).kv_cache_memory_bytes == 2**28
