"""Peer comparison on the benchmark pair: our server against vLLM's CPU build and `transformers` `generate`.

    python -m bench.compare            # the whole comparison, about 40 minutes on 2 cores
    python -m bench.compare --quick    # mixed, concurrency 1 and 4, ours K = 2, vLLM off: about 6 minutes
    python -m bench.compare --served-speed   # our served `off` against offline generation, batch 1-32

One run, one machine, in this order: memory bandwidth; our iteration times offline (SpecEngine at several
batch sizes and K) against the MoESD-form cost model fitted on a subset of them; `generate` with and without
`assistant_model`; then one server at a time, alternating ours and vLLM's: vLLM without speculation and
with draft-model speculation at K = 1, ours with the batch-aware policy (phases: off, static K = 1..4, auto),
vLLM at K = 2, 3, ours with Cascade (phases: off, auto), vLLM at K = 4; the bandwidth again. Every server gets the same
load generator (bench/load.py: streamed /v1/completions, Poisson arrivals, greedy, ignore_eos), workloads
and concurrency levels. Our policy-off reference is the mean of the two off runs (their spread is the
noise floor). Writes bench/results/compare.{json,md} and bench/results/compare/*.png (--quick: under
bench/results/raw/compare/); server logs, the vLLM environment (created on first use) and its compile cache,
and the temporary Serve configs go to bench/results/raw/ (git-ignored).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench import load, peers
from bench.bound import ELEMENT_SIZE, bandwidth, weight_params
from bench.launches import RAW, REPO, RESULTS, run_servers, serve_settings
from bench.peers import log
from bench.regime_pair import ensure_checkpoint
from bench.report import write_report


@dataclass(frozen=True)
class RunConfig:
    workloads: tuple[str, ...] = ("code", "prose", "synthetic", "mixed")
    concurrencies: tuple[int, ...] = (1, 4, 16, 32)
    static_num_spec_tokens: tuple[int, ...] = (1, 2, 3, 4)  # ours: per request, on one server
    vllm_num_spec_tokens: tuple[int, ...] = (1, 2, 3, 4)  # vLLM: one launch each, and one without
    with_cascade: bool = True
    with_vllm: bool = True
    vllm_eager: bool = False  # vLLM without torch.compile (starts in half the time; see peers.VllmSettings)
    max_tokens: int = 32  # output tokens per request (ignore_eos)
    requests_per_client: float = 2.0  # requests per phase = max(min_requests, this x concurrency)
    min_requests: int = 8
    cost_batch_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    cost_fit_batch_sizes: tuple[int, ...] = (1, 4, 16)  # the rest is held out
    cost_max_tokens: int = 16  # output tokens per request of the offline runs
    hf_num_prompts: int = 3  # per workload, batch 1, with and without assistant_model
    # Ours; vLLM serves the same model settings. The benchmark pair (bench.regime_pair, built on first use);
    # --config cluster/configs/demo-cpu.yaml runs the shipped demo pair.
    serve_config: str = "cluster/configs/bench-cpu.yaml"

    def num_requests(self, concurrency: int) -> int:
        return max(self.min_requests, round(self.requests_per_client * concurrency))


QUICK = RunConfig(
    workloads=("mixed",),
    concurrencies=(1, 4),
    static_num_spec_tokens=(2,),
    vllm_num_spec_tokens=(),
    with_cascade=False,
    max_tokens=16,
    requests_per_client=2.0,
    min_requests=4,
    cost_batch_sizes=(1, 2, 4, 8),
    cost_fit_batch_sizes=(1, 4),
    hf_num_prompts=2,
)


# -- the cost model against measured iterations --------------------------------------------------------------


def measure_iterations(target: Path, draft: Path, dtype: str, config: RunConfig) -> list[dict[str, Any]]:
    """Our offline engine at every batch size x K (static): one IterationStats per decode iteration.

    One thread, as each model deployment of the demo Serve config has.
    """
    import torch

    from cluster.config import AppConfig
    from cluster.engine_builder import build_engine, local_backends
    from policy.baselines import OffChooser, StaticChooser
    from workers.sampling import SamplingParams
    from workers.tokenizer import Tokenizer

    torch.set_num_threads(1)
    tokenizer = Tokenizer(target)
    prompts = [tokenizer.encode(t) for t in load.load_prompts("mixed", max(config.cost_batch_sizes))]
    max_k = max(config.static_num_spec_tokens)
    model = {"target": str(target), "draft": str(draft), "dtype": dtype}
    model |= {
        "max_seqs": max(config.cost_batch_sizes),
        "max_seq_len": max(map(len, prompts)) + config.cost_max_tokens,
    }
    app = AppConfig.from_args({"model": model})
    target_engine, drafter = local_backends(app)  # shared by every engine below (one cache of max_seqs slots)
    params = SamplingParams(temperature=0.0, max_tokens=config.cost_max_tokens, ignore_eos=True)

    def iterations(batch_size: int, k: int) -> list[Any]:
        # The served engine's settings (cluster.engine_builder), at this batch size and static K.
        run = replace(
            app, model=replace(app.model, max_seqs=batch_size), engine=replace(app.engine, max_spec_tokens=k)
        )
        chooser = StaticChooser(k) if k else OffChooser()
        engine = build_engine(run, target_engine, drafter if k else None, chooser, None)
        for i, prompt in enumerate(prompts[:batch_size]):
            engine.add_request(f"r{i}", prompt, params)
        stats = []
        while engine.has_unfinished:
            before = engine.iteration
            engine.step()
            if engine.iteration != before and engine.last_stats is not None:
                stats.append(engine.last_stats)
        return stats

    iterations(2, max_k)  # warm-up
    return [
        {"batch_size": b, "num_spec_tokens": k, "stats": s}
        for b in config.cost_batch_sizes
        for k in (0, *config.static_num_spec_tokens)
        for s in iterations(b, k)
    ]


def cost_model_check(target: Path, draft: Path, dtype: str, config: RunConfig) -> dict[str, Any]:
    """Fit the MoESD-form model (from the server's analytic prior) on some batch sizes; predict the rest."""
    from cluster.choosers import analytic_prior
    from policy.cost_model import CostModel, CostModelConfig
    from policy.routing import RoutingConfig
    from workers.config import ModelConfig

    rows = measure_iterations(target, draft, dtype, config)
    weights = weight_params(target)
    prior = analytic_prior(ModelConfig.from_dir(target), ModelConfig.from_dir(draft), ELEMENT_SIZE[dtype])
    model = CostModel(CostModelConfig(RoutingConfig(weights.num_experts, weights.top_k)), prior)
    is_fit = [r["batch_size"] in config.cost_fit_batch_sizes for r in rows]
    params = model.calibrate([r["stats"] for r, fit in zip(rows, is_fit, strict=True) if fit])
    points = []
    for row, fit in zip(rows, is_fit, strict=True):
        stats = row["stats"]
        points.append(
            {
                "batch_size": row["batch_size"],
                "num_spec_tokens": row["num_spec_tokens"],
                "actual_batch_size": stats.batch_size,
                "is_fit": fit,
                "measured_s": stats.iteration_time_s,
                "predicted_s": model.iteration_time([r.num_spec_tokens for r in stats.requests]),
            }
        )
    return {"params": asdict(params), "points": points}


# -- served speed: our served `off` against offline generation at the same batch ----------------------------


@dataclass(frozen=True)
class SpeedConfig:
    """`--served-speed`: our server (`serve_config`, requests at `off`) in each target placement, and, in this
    process with the same torch threads as each model process, `SpecEngine.generate` and `transformers`
    `generate` (greedy)."""

    serve_config: str = "cluster/configs/demo-cpu.yaml"  # the demo pair
    concurrencies: tuple[int, ...] = (1, 4, 16, 32)
    max_tokens: int = 64  # output tokens per request (ignore_eos)
    # served requests per client in a phase: continuous batching holds the batch at B between the ramps
    requests_per_client: int = 3
    repeats: int = 3  # rounds; each round runs every placement, offline and transformers at every batch size
    workload: str = "mixed"
    # engine.loop_beside_target of each served placement: False = the target in its own host actor (one call
    # between processes per iteration), True = in the Router's process
    placements: tuple[bool, ...] = (False, True)


def offline_generate(app: Any, prompts: list[list[int]], max_tokens: int) -> float:
    """Output tokens/s of `SpecEngine.generate` (no drafter: `off`) over all `prompts` as one batch."""
    from dataclasses import replace as replace_config

    from cluster.engine_builder import build_engine, local_backends
    from policy.baselines import OffChooser
    from workers.sampling import SamplingParams

    run = replace_config(app, model=replace_config(app.model, draft=None, max_seqs=len(prompts)))
    target, _ = local_backends(run)
    engine = build_engine(run, target, None, OffChooser(), None)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outputs = engine.generate(prompts, params)
    return sum(map(len, outputs)) / (time.perf_counter() - start)


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


def served_speed(config: SpeedConfig) -> dict[str, Any]:
    """Rounds of: for each placement of the target, served `off` at concurrency B for every B (each client
    sends `requests_per_client` requests one after another, so the batch stays near B); then offline `SpecEngine.generate` and `transformers.generate` at
    batch B. The served phases' share of iteration time outside the forwards comes from /metrics
    (`other_seconds_total`)."""
    import asyncio

    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cluster.config import AppConfig, resolve_model_path
    from workers.tokenizer import Tokenizer

    args = load.load_serve_config_args(REPO / config.serve_config)
    app = AppConfig.from_args(args)
    torch.set_num_threads(app.resources.torch_threads)  # as each model process of the served app
    target = resolve_model_path(app.model.target)
    texts = load.load_prompts(config.workload, max(config.concurrencies))
    ids = [Tokenizer(target).encode(t) for t in texts]
    transformers.logging.set_verbosity_error()
    hf_tokenizer = AutoTokenizer.from_pretrained(target, padding_side="left")
    hf_tokenizer.pad_token = hf_tokenizer.pad_token or hf_tokenizer.eos_token
    hf_model = AutoModelForCausalLM.from_pretrained(target, dtype=getattr(torch, app.model.dtype)).eval()
    offline_generate(app, ids[:2], 4)  # warm-up
    transformers_generate(hf_model, hf_tokenizer, texts[:2], 4)
    name, port = app.model.served_name, None
    rows: list[dict[str, Any]] = []
    for round_index in range(config.repeats):
        served: dict[tuple[bool, int], Any] = {}
        for beside in config.placements:
            placed = json.loads(json.dumps(args))
            placed.setdefault("engine", {})["loop_beside_target"] = beside
            url = deploy(placed, port)
            port = int(url.rsplit(":", 1)[1])
            asyncio.run(load.run_phase(url, texts, "off", 2, 2, config.max_tokens, name, seed=0))  # warm-up
            for batch in config.concurrencies:
                log(f"round {round_index}, loop beside target {beside}, batch {batch}")
                prompts = [texts[i % len(texts)] for i in range(batch * config.requests_per_client)]
                served[beside, batch] = asyncio.run(
                    load.run_phase(
                        url, prompts, "off", batch, len(prompts), config.max_tokens, name, seed=batch
                    )
                )
        for batch in config.concurrencies:
            log(f"round {round_index}, offline, batch {batch}")
            offline = offline_generate(app, ids[:batch], config.max_tokens)
            hf = transformers_generate(hf_model, hf_tokenizer, texts[:batch], config.max_tokens)
            for beside in config.placements:
                phase = served[beside, batch]
                metrics = phase.metrics
                iterations = max(1.0, metrics.get("iterations_total", 0.0))
                forward_s = metrics.get("draft_seconds_total", 0.0) + metrics.get("verify_seconds_total", 0.0)
                outside_s = metrics.get("other_seconds_total", 0.0)
                rows.append(
                    {
                        "round": round_index,
                        "batch": batch,
                        "loop_beside_target": beside,
                        "served": phase.throughput,
                        "offline": offline,
                        "transformers": hf,
                        "outside_share": phase.overhead_share,
                        "iteration_ms": (forward_s + outside_s) / iterations * 1e3,
                        "outside_ms": outside_s / iterations * 1e3,
                        "num_errors": phase.num_errors,
                    }
                )
    return {"config": asdict(config), "rows": rows, "load_average_1m_at_end": os.getloadavg()[0]}


def speed_table(result: dict[str, Any]) -> str:
    """Medians over rounds of each ratio (min-max in brackets), side by side per batch size."""
    import statistics

    lines = [
        "| target | batch | served tok/s | offline tok/s | transformers tok/s | served / offline "
        "| served / transformers | outside forwards | outside ms / iteration |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    keys = sorted({(r["loop_beside_target"], r["batch"]) for r in result["rows"]})
    for beside, batch in keys:
        rows = [r for r in result["rows"] if (r["loop_beside_target"], r["batch"]) == (beside, batch)]

        def summary(values: list[float], fmt: str) -> str:
            return f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}})"

        lines.append(
            f"| {'router process' if beside else 'host actor'} | {batch} "
            f"| {statistics.median(r['served'] for r in rows):.1f} "
            f"| {statistics.median(r['offline'] for r in rows):.1f} "
            f"| {statistics.median(r['transformers'] for r in rows):.1f} "
            f"| {summary([r['served'] / r['offline'] for r in rows], '.2f')} "
            f"| {summary([r['served'] / r['transformers'] for r in rows], '.2f')} "
            f"| {summary([r['outside_share'] for r in rows], '.1%')} "
            f"| {statistics.median(r['outside_ms'] for r in rows):.2f} |"
        )
    return "\n".join(lines)


# -- the whole run -------------------------------------------------------------------------------------------


def check_models(config: RunConfig) -> tuple[Path, Path]:
    model = serve_settings(config)["model"]
    return ensure_checkpoint(REPO / model["target"]), ensure_checkpoint(REPO / model["draft"])


def run(config: RunConfig) -> dict[str, Any]:
    start = time.perf_counter()
    target, draft = check_models(config)
    RAW.mkdir(parents=True, exist_ok=True)
    (RAW / "phases.jsonl").unlink(missing_ok=True)
    vllm_python = peers.ensure_vllm_venv(RESULTS / "raw" / "vllm-venv") if config.with_vllm else None
    dtype = serve_settings(config)["model"]["dtype"]
    weights = weight_params(target)
    model_bytes = int(weights.bytes_per_step(max(config.concurrencies), ELEMENT_SIZE[dtype]))
    log("memory bandwidth")
    bandwidth_start = bandwidth(model_bytes, dtype)
    log("our iteration times offline, against the cost model")
    cost = cost_model_check(target, draft, dtype, config)
    log("transformers generate")
    prompts = {w: load.load_prompts(w, config.hf_num_prompts) for w in config.workloads}
    generate = [
        {"workload": w, **asdict(r), "throughput": r.throughput}
        for w in config.workloads
        for r in peers.hf_generate(
            target, draft, prompts[w], config.max_tokens, dtype, list(config.concurrencies)
        )
    ]
    phases, launch_seconds = run_servers(config, vllm_python)
    log("memory bandwidth again")
    bandwidth_end = bandwidth(model_bytes, dtype)
    return {
        "config": asdict(config),
        "machine": {
            "python": platform.python_version(),
            "num_cpus": os.cpu_count(),
            "load_average_1m_at_end": os.getloadavg()[0],
            "vllm": peers.vllm_version(vllm_python) if vllm_python else "",
            "serve_args": serve_settings(config),
        },
        "bandwidth": {"start": bandwidth_start, "end": bandwidth_end},
        "weights": asdict(weights),
        "dtype": dtype,
        "cost_model": cost,
        "generate": generate,
        "phases": phases,
        "launch_seconds": launch_seconds,
        "elapsed_s": time.perf_counter() - start,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="mixed, concurrency 1 and 4, K = 2, vLLM off")
    parser.add_argument("--no-vllm", action="store_true", help="ours and transformers only")
    parser.add_argument("--workloads", default=None, help="comma-separated, e.g. mixed,code")
    parser.add_argument("--concurrency", default=None, help="comma-separated, e.g. 1,4,16,32")
    parser.add_argument("--max-tokens", type=int, default=None)
    parser.add_argument("--config", default=None, help="our Serve config (default: the benchmark pair's)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from compare.json")
    parser.add_argument(
        "--served-speed",
        action="store_true",
        help="served off against SpecEngine.generate and transformers.generate at batch = concurrency "
        "(the demo pair unless --config; --concurrency, --max-tokens, --repeats); "
        "writes bench/results/served-speed.json",
    )
    parser.add_argument("--repeats", type=int, default=3, help="--served-speed: rounds")
    parser.add_argument("--out", default=None, help="--served-speed: the JSON to write")
    args = parser.parse_args(argv)
    if args.served_speed:
        speed = replace(SpeedConfig(repeats=args.repeats), **_shared_overrides(args))
        result = served_speed(speed)
        result["table"] = speed_table(result)
        print(result["table"], flush=True)
        path = Path(args.out) if args.out else RESULTS / "served-speed.json"
        path.write_text(json.dumps(result, indent=1))
        log(f"wrote {path}")
        return
    out = RAW / "quick" if args.quick else RESULTS / "compare"  # a quick run's report stays out of git
    if args.report_only:
        report = json.loads(out.with_suffix(".json").read_text())
    else:
        config = QUICK if args.quick else RunConfig()
        if args.no_vllm:
            config = replace(config, with_vllm=False)
        if args.workloads:
            config = replace(config, workloads=tuple(args.workloads.split(",")))
        report = run(replace(config, **_shared_overrides(args)))
    report = write_report(report, out)
    log(f"wrote {out}.json, {out}.md and {out}/*.png in {report['elapsed_s'] / 60:.1f} min")


def _shared_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The options both runs take (concurrency levels, tokens, serve config), as dataclass field changes."""
    changes: dict[str, Any] = {}
    if args.concurrency:
        changes["concurrencies"] = tuple(int(c) for c in args.concurrency.split(","))
    if args.max_tokens:
        changes["max_tokens"] = args.max_tokens
    if args.config:
        changes["serve_config"] = str(Path(args.config).resolve().relative_to(REPO))
    return changes


if __name__ == "__main__":
    main()
