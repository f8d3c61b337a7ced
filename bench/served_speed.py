"""Served `off` against offline generation at the same batch (`python -m bench.compare --served-speed`).

Our Serve app (the demo pair by default) in each placement of the target, requests at `off`, driven by
closed-loop clients (`bench.http_load.run_phase` with no think time: each client sends its next request as soon
as the last one finished, so the batch is the concurrency); against, in this process with the torch threads
of each model process, `SpecEngine.generate` and `transformers` greedy `generate` over the same number of
prompts as one batch. Beside every served row: the batch the server actually ran (running requests per
iteration) and its decode iteration time next to the offline engine's at that batch.
"""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

from bench import http_load, load
from bench.launches import REPO
from bench.peers import log
from bench.process_cpu import ProcessCpu

Placement = tuple[str, int, bool]  # (engine.loop, server.stream_interval, whether the requests stream)


@dataclass(frozen=True)
class SpeedConfig:
    """`--served-speed`: our server (`serve_config`, requests at `off`) in each target placement, and, in this
    process with the same torch threads as each model process, `SpecEngine.generate` and `transformers`
    `generate` (greedy)."""

    serve_config: str = "cluster/configs/demo-cpu.yaml"  # the demo pair
    concurrencies: tuple[int, ...] = (1, 4, 16, 32)
    max_tokens: int = 64  # output tokens per request (ignore_eos)
    requests_per_client: int = 3  # served requests per client in a phase, one after another
    # 0: closed-loop clients (batch = concurrency); > 0: Poisson gaps of this mean before every request
    mean_gap_s: float = 0.0
    repeats: int = 3  # rounds; each round runs every placement, offline and transformers at every batch size
    workload: str = "mixed"
    # Served variants: (engine.loop, server.stream_interval, streamed requests). router = the loop in the
    # Router, the target in its own host actor (one call between processes per iteration); beside_target =
    # the loop and the target in the Router's process; target_host = the loop in the target's host actor, the
    # Router apart. Not streamed: each request is answered in one response (the `openai` client's default).
    ingress: str = "proxy"  # Serve's HTTP ingress (cluster.cli.INGRESS_ENV): proxy or haproxy
    placements: tuple[Placement, ...] = (
        ("router", 1, True),
        ("beside_target", 1, True),
        ("target_host", 1, True),
    )


@dataclass(frozen=True)
class OfflineRun:
    throughput: float  # output tokens/s, prefill included
    iteration_ms: float  # mean decode iteration (prefill excluded), as the server's iteration counters
    verify_ms: float  # of which the target's forward and verification


def offline_generate(app: Any, prompts: list[list[int]], max_tokens: int) -> OfflineRun:
    """`SpecEngine.generate`'s loop (no drafter: `off`) over all `prompts` as one batch, timed per step."""
    from dataclasses import replace

    from cluster.engine_builder import build_engine, local_backends
    from policy.baselines import OffChooser
    from workers.sampling import SamplingParams

    run = replace(app, model=replace(app.model, draft=None, max_seqs=len(prompts)))
    target, _ = local_backends(run)
    engine = build_engine(run, target, None, OffChooser(), None)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"offline-{i}", prompt, params)
    num_tokens, stats = 0, []
    start = time.perf_counter()
    while engine.has_unfinished:  # what `generate` does, keeping each iteration's statistics
        iteration = engine.iteration
        num_tokens += sum(len(out.new_token_ids) for out in engine.step())
        if engine.iteration != iteration and engine.last_stats is not None:
            stats.append(engine.last_stats)
    elapsed = time.perf_counter() - start
    num_iterations = max(1, len(stats))
    return OfflineRun(
        num_tokens / elapsed,
        sum(s.iteration_time_s for s in stats) / num_iterations * 1e3,
        sum(s.verify_time_s for s in stats) / num_iterations * 1e3,
    )


def transformers_generate(model: Any, tokenizer: Any, prompts: list[str], max_tokens: int) -> float:
    """Output tokens/s of `transformers` greedy `generate` over `prompts` as one (left-padded) batch."""
    import torch

    inputs = tokenizer(prompts, return_tensors="pt", padding=True)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(
            **inputs,
            max_new_tokens=max_tokens,
            min_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return (out.shape[1] - inputs["input_ids"].shape[1]) * len(prompts) / (time.perf_counter() - start)


def deploy(args: dict[str, Any], port: int | None) -> str:
    """Our app on a local Ray instance (started on first use), replacing the one deployed before."""
    import ray
    from ray import serve

    from cluster.app import build_app
    from cluster.cli import wait_healthy
    from tests.cluster.serving_app import free_port

    if port is None:
        port = free_port()
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(args), name="bench", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    wait_healthy(f"{url}/health", 600)
    return url


def served_row(phase: http_load.PhaseResult) -> dict[str, float]:
    """What a served phase's /metrics counters say per engine iteration."""
    metrics = phase.metrics
    iterations = max(1.0, metrics.get("iterations_total", 0.0))
    verify_s = metrics.get("verify_seconds_total", 0.0)
    forward_s = metrics.get("draft_seconds_total", 0.0) + verify_s
    outside_s = metrics.get("other_seconds_total", 0.0)
    # Each request in an iteration commits its accepted drafts + 1 token: request-iterations, i.e. the
    # running requests summed over iterations (prefill's first tokens are not counted).
    request_iterations = metrics.get("generation_tokens_total", 0.0) - metrics.get(
        "spec_decode_num_accepted_tokens_total", 0.0
    )
    return {
        "served": phase.throughput,
        "mean_batch": request_iterations / iterations,
        "outside_share": phase.overhead_share,
        "iteration_ms": (forward_s + outside_s) / iterations * 1e3,
        "verify_ms": verify_s / iterations * 1e3,
        "outside_ms": outside_s / iterations * 1e3,
        "num_errors": float(phase.num_errors),
        # CPU ms per engine iteration by process role ("load generator": the benchmark's client)
        **{f"cpu_ms:{role}": ms for role, ms in phase.cpu_ms_per_iteration.items()},
    }


def served_speed(config: SpeedConfig) -> dict[str, Any]:
    """Rounds of: for each placement of the target, served `off` at concurrency B for every B; then offline
    `SpecEngine.generate` and `transformers.generate` at batch B."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.cli import INGRESS_ENV
    from cluster.config import AppConfig, resolve_model_path
    from workers.tokenizer import Tokenizer

    if INGRESS_ENV[config.ingress] and "ray.serve" in sys.modules:
        raise RuntimeError("--ingress must be set before Ray Serve is imported (Serve reads it at import)")
    os.environ.update(INGRESS_ENV[config.ingress])  # before `deploy` starts Ray: its processes read it too

    args = load.load_serve_config_args(REPO / config.serve_config)
    app = AppConfig.from_args(args)
    torch.set_num_threads(app.resources.torch_threads)  # as each model process of the served app
    target = resolve_model_path(app.model.target)
    texts = http_load.load_prompts(config.workload, max(config.concurrencies))
    ids = [Tokenizer(target).encode(t) for t in texts]
    transformers.logging.set_verbosity_error()
    hf_tokenizer = AutoTokenizer.from_pretrained(target, padding_side="left")
    hf_tokenizer.pad_token = hf_tokenizer.pad_token or hf_tokenizer.eos_token
    hf_model = AutoModelForCausalLM.from_pretrained(target, dtype=getattr(torch, app.model.dtype)).eval()
    offline_generate(app, ids[:2], 4)  # warm-up
    transformers_generate(hf_model, hf_tokenizer, texts[:2], 4)
    name, port, deployed = app.model.served_name, None, None
    cpu = (
        ProcessCpu()
    )  # the served app's processes (Router, EngineHost, Serve's proxy) and the client (this one)
    rows: list[dict[str, Any]] = []
    load_average = [os.getloadavg()[0]]
    for round_index in range(config.repeats):
        served: dict[tuple[Placement, int], http_load.PhaseResult] = {}
        for placement in config.placements:
            placed = json.loads(json.dumps(args))
            placed.setdefault("engine", {})["loop"] = placement[0]
            placed.setdefault("server", {})["stream_interval"] = placement[1]
            if placed != deployed:  # placements that differ only in streaming share a deployment
                url = deploy(placed, port)
                port, deployed = int(url.rsplit(":", 1)[1]), placed
                warm_up = http_load.run_phase(url, texts, "off", 2, 2, config.max_tokens, name, seed=0)
                asyncio.run(warm_up)
            for batch in config.concurrencies:
                log(f"round {round_index}, {placement_name(placement)}, batch {batch}")
                prompts = [texts[i % len(texts)] for i in range(batch * config.requests_per_client)]
                phase = http_load.run_phase(
                    url, prompts, "off", batch, len(prompts), config.max_tokens, name, seed=batch,
                    mean_gap_s=config.mean_gap_s, stream=placement[2],
                )  # fmt: skip
                cpu_before = cpu.snapshot()
                result = asyncio.run(phase)
                iterations = result.metrics.get("iterations_total", 0.0)
                result.cpu_ms_per_iteration = cpu.per_iteration_ms(cpu_before, cpu.snapshot(), iterations)
                served[placement, batch] = result
        for batch in config.concurrencies:
            log(f"round {round_index}, offline, batch {batch}")
            offline = offline_generate(app, ids[:batch], config.max_tokens)
            hf = transformers_generate(hf_model, hf_tokenizer, texts[:batch], config.max_tokens)
            for placement in config.placements:
                rows.append(
                    {
                        "round": round_index,
                        "batch": batch,
                        "loop": placement[0],
                        "stream_interval": placement[1],
                        "stream": placement[2],
                        **served_row(served[placement, batch]),
                        "offline": offline.throughput,
                        "offline_iteration_ms": offline.iteration_ms,
                        "offline_verify_ms": offline.verify_ms,
                        "transformers": hf,
                    }
                )
        load_average.append(os.getloadavg()[0])
    serve_env = {
        k: v for k, v in os.environ.items() if k.startswith("RAY_SERVE_")
    }  # e.g. the HAProxy ingress
    return {"config": asdict(config), "rows": rows, "load_average_1m": load_average, "serve_env": serve_env}


def speed_table(result: dict[str, Any]) -> str:
    """Medians over rounds of each figure (min-max in brackets for the ratios), one row per placement and
    batch size."""
    lines = [
        "| target | batch | mean served batch | served tok/s | offline tok/s | transformers tok/s "
        "| served / offline | served / transformers | decode iteration ms served / offline "
        "| target forward ms served / offline | outside forwards |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    for placement, batch in sorted({_key(r) for r in result["rows"]}):
        rows = [r for r in result["rows"] if _key(r) == (placement, batch)]
        lines.append(f"| {placement_name(placement)} | {batch} | " + " | ".join(_cells(rows)) + " |")
    return "\n".join(lines)


CPU_COLUMNS = ("Router", "ProxyActor", "HAProxy", "load generator", "EngineHost", "DrafterHost")


def cpu_table(result: dict[str, Any]) -> str:
    """CPU ms per engine iteration of the serving path's processes during the served phases (medians over
    rounds); "other": Ray's daemons, Serve's controller, the policy actor."""
    if not any(k.startswith("cpu_ms:") for r in result["rows"] for k in r):
        return ""
    lines = [
        "| target | batch | " + " | ".join(CPU_COLUMNS) + " | other | decode iteration ms |",
        "|---|---:|" + "---:|" * (len(CPU_COLUMNS) + 2),
    ]

    def other(row: dict[str, Any]) -> float:
        roles = {f"cpu_ms:{role}" for role in CPU_COLUMNS}
        return sum(v for k, v in row.items() if k.startswith("cpu_ms:") and k not in roles)

    for placement, batch in sorted({_key(r) for r in result["rows"]}):
        rows = [r for r in result["rows"] if _key(r) == (placement, batch)]
        cells = [
            f"{statistics.median(r.get(f'cpu_ms:{role}', 0.0) for r in rows):.1f}" for role in CPU_COLUMNS
        ]
        cells += [
            f"{statistics.median(other(r) for r in rows):.1f}",
            f"{statistics.median(r['iteration_ms'] for r in rows):.1f}",
        ]
        lines.append(f"| {placement_name(placement)} | {batch} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _key(row: dict[str, Any]) -> tuple[Placement, int]:
    return (row["loop"], row.get("stream_interval", 1), row.get("stream", True)), row["batch"]


PLACEMENT_NAMES = {"router": "host actor", "beside_target": "router process", "target_host": "loop in host"}


def placement_name(placement: Placement) -> str:
    loop, stream_interval, stream = placement
    name = PLACEMENT_NAMES[loop]
    if not stream:
        name = f"{name}, not streamed"
    return name if stream_interval == 1 else f"{name}, stream interval {stream_interval}"


def _cells(rows: list[dict[str, Any]]) -> list[str]:
    def median(name: str) -> float:
        return statistics.median(r.get(name, 0.0) for r in rows)

    def ratio(over: str) -> str:
        values = [r["served"] / r[over] for r in rows]
        return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

    return [
        f"{median('mean_batch'):.1f}",
        f"{median('served'):.1f}",
        f"{median('offline'):.1f}",
        f"{median('transformers'):.1f}",
        ratio("offline"),
        ratio("transformers"),
        f"{median('iteration_ms'):.1f} / {median('offline_iteration_ms'):.1f}",
        f"{median('verify_ms'):.1f} / {median('offline_verify_ms'):.1f}",
        f"{median('outside_share'):.1%}",
    ]
