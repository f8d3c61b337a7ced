"""One server at a time for the peer comparison: ours (our Serve app with a `policy.kind`) or vLLM's (its
OpenAI server, speculation fixed at K), each started, driven through every workload x concurrency x mode
by bench/http_load.py, and stopped; launches alternate ours and vLLM's against drift.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from bench import http_load, peers
from bench.peers import log

if TYPE_CHECKING:
    from bench.compare import RunConfig


REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
RAW = RESULTS / "raw" / "compare"


@dataclass(frozen=True)
class Launch:
    """One server start: ours with a policy kind, or vLLM with speculation fixed at K (0 = none)."""

    name: str
    policy_kind: str  # ours: `policy.kind` of the Serve config ("" for vLLM)
    num_spec_tokens: int  # vLLM: K of its speculative_config (0 = no speculation)
    modes: tuple[tuple[str, str], ...]  # (request `num_spec_tokens` field or "" for none, system label)

    @property
    def is_ours(self) -> bool:
        return bool(self.policy_kind)


def launches(config: RunConfig) -> list[Launch]:
    """Alternating ours and vLLM's, so that drift over the run does not favour either."""
    static = tuple((str(k), f"ours-K{k}") for k in config.static_num_spec_tokens)
    ours = [
        Launch("ours-batch-aware", "auto", 0, (("off", "ours-off"), *static, ("auto", "ours-batch-aware")))
    ]
    if config.with_cascade:
        ours.append(Launch("ours-cascade", "cascade", 0, (("off", "ours-off"), ("auto", "ours-cascade"))))
    if not config.with_vllm:
        return ours
    names = {k: f"vllm-K{k}" if k else "vllm-off" for k in (0, *config.vllm_num_spec_tokens)}
    vllm = [Launch(name, "", k, (("", name),)) for k, name in names.items()]
    order: list[Launch] = []
    per_gap = -(-len(vllm) // (len(ours) + 1))  # vLLM launches between two of ours
    for i, launch in enumerate(ours):
        order += vllm[i * per_gap : (i + 1) * per_gap] + [launch]
    return order + vllm[len(ours) * per_gap :]


# -- servers -------------------------------------------------------------------------------------------------


def serve_settings(config: RunConfig) -> dict[str, Any]:
    return yaml.safe_load((REPO / config.serve_config).read_text())["applications"][0]["args"]


@contextmanager
def our_server(serve_config: Path, policy_kind: str, port: int) -> Iterator[str]:
    """Our Serve app from `serve_config` with `policy.kind` replaced, on a local Ray of its own."""
    config = yaml.safe_load(serve_config.read_text())
    config["applications"][0]["args"].setdefault("policy", {})["kind"] = policy_kind
    path = RAW / f"serve-{policy_kind}.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    log_path = RAW / f"serve-{policy_kind}.log"
    command = [sys.executable, "-m", "cluster.cli", "serve", "--config", str(path), "--port", str(port)]
    with log_path.open("wb") as out:
        process = subprocess.Popen(
            command,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=_default_sigint,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        start = time.perf_counter()
        peers.wait_ready(f"{url}/health", process, timeout_s=900, log_path=log_path)
        log(f"ours ({policy_kind}) ready in {time.perf_counter() - start:.0f} s")
        yield url
    finally:
        stop(process)


def _default_sigint() -> None:
    """Under `nohup ... &` SIGINT is ignored, and the child would inherit that: give Ctrl-C back to it."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def stop(process: subprocess.Popen[bytes]) -> None:
    """Ctrl-C for `cluster.cli serve` (it shuts Serve and its Ray down), then its whole process group."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
        with suppress(subprocess.TimeoutExpired):
            process.wait(timeout=30)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        time.sleep(3)


@contextmanager
def server(launch: Launch, config: RunConfig, vllm_python: Path | None, port: int) -> Iterator[str]:
    if launch.is_ours:
        with our_server(REPO / config.serve_config, launch.policy_kind, port) as url:
            yield url
        return
    assert vllm_python is not None
    args = serve_settings(config)["model"]
    settings = peers.VllmSettings(
        target=REPO / args["target"],
        draft=REPO / args["draft"],
        served_name=args["served_name"],
        dtype=args["dtype"],
        max_model_len=args["max_seq_len"],
        max_num_seqs=args["max_seqs"],
        cache_root=RESULTS / "raw" / "vllm-cache",
        is_eager=config.vllm_eager,
    )
    with peers.VllmServer(
        vllm_python, settings, launch.num_spec_tokens, port, RAW / f"{launch.name}.log"
    ) as url:
        yield url


# -- load phases ---------------------------------------------------------------------------------------------


def run_launch(launch: Launch, url: str, config: RunConfig, index: int) -> list[dict[str, Any]]:
    """Every workload x concurrency x mode of one server; modes alternate their order against drift."""
    model = serve_settings(config)["model"]["served_name"]
    prefix = "moespec:" if launch.is_ours else "vllm:"

    def phase(
        workload: str, mode: str, label: str, concurrency: int, num_requests: int
    ) -> http_load.PhaseResult:
        prompts = http_load.load_prompts(workload, num_requests)
        return asyncio.run(
            http_load.run_phase(
                url, prompts, mode, concurrency, num_requests, config.max_tokens, model, seed=concurrency,
                label=label, metrics_prefix=prefix,
            )
        )  # fmt: skip

    for concurrency, num_requests in ((1, 4), (8, 16)):  # first calls; the adaptive policies' first fits
        phase("mixed", launch.modes[-1][0], "warm-up", concurrency, num_requests)
    records = []
    for workload in config.workloads:
        for concurrency in config.concurrencies:
            num_requests = config.num_requests(concurrency)
            modes = launch.modes if (concurrency + index) % 2 else tuple(reversed(launch.modes))
            for mode, label in modes:
                result = phase(workload, mode, label, concurrency, num_requests)
                records.append(
                    {"workload": workload, "launch": launch.name, "system": label, **asdict(result)}
                )
                log(
                    f"{workload:9s} c={concurrency:2d} {label:16s} {result.throughput:7.1f} tok/s  "
                    f"TPOT p50 {result.tpot_p50 * 1e3:6.1f} ms  accept {result.acceptance:.2f}  "
                    f"errors {result.num_errors}"
                )
                with (RAW / "phases.jsonl").open("a") as out:
                    out.write(json.dumps(records[-1]) + "\n")
    return records


def run_servers(config: RunConfig, vllm_python: Path | None) -> tuple[list[dict[str, Any]], dict[str, float]]:
    from tests.cluster.serving_app import free_port

    records: list[dict[str, Any]] = []
    seconds: dict[str, float] = {}
    for index, launch in enumerate(launches(config)):
        log(f"starting {launch.name}")
        start = time.perf_counter()
        with server(launch, config, vllm_python, free_port()) as url:
            started = time.perf_counter()
            records += run_launch(launch, url, config, index)
        seconds[launch.name] = time.perf_counter() - start
        log(f"{launch.name}: start {started - start:.0f} s, phases {time.perf_counter() - started:.0f} s")
    return records, seconds
