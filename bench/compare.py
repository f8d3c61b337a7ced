"""Peer comparison on the benchmark pair: our server against vLLM's CPU build and `transformers` `generate`.

    python -m bench.compare            # the whole comparison, about 40 minutes on 2 cores
    python -m bench.compare --quick    # mixed, concurrency 1 and 4, ours K = 2, vLLM off: about 6 minutes
    python -m bench.compare --served-speed   # our served `off` against offline generation, batch 1-32

One run, one machine, in this order: memory bandwidth; our iteration times offline (SpecEngine at several
batch sizes and K) against the MoESD-form cost model fitted on a subset of them; `generate` with and without
`assistant_model`; then one server at a time, alternating ours and vLLM's: vLLM without speculation and
with draft-model speculation at K = 1, ours with the batch-aware policy (phases: off, static K = 1..4, auto),
vLLM at K = 2, 3, ours with Cascade (phases: off, auto), vLLM at K = 4; the bandwidth again. Every server gets the same
load generator (bench/http_load.py: streamed /v1/completions, Poisson arrivals, greedy, ignore_eos), workloads
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

from bench import http_load, peers
from bench.bound import ELEMENT_SIZE, bandwidth, weight_params
from bench.launches import RAW, REPO, RESULTS, run_servers, serve_settings
from bench.peers import log
from bench.regime_pair import ensure_checkpoint
from bench.report import write_report
from bench.served_speed import Placement, SpeedConfig, cpu_table, served_speed, speed_table
from cluster.cli import INGRESS_ENV
from cluster.config import LOOP_PLACEMENTS


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
    prompts = [tokenizer.encode(t) for t in http_load.load_prompts("mixed", max(config.cost_batch_sizes))]
    max_k = max(config.static_num_spec_tokens)
    model: dict[str, Any] = {"target": str(target), "draft": str(draft), "dtype": dtype}
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
    from policy.cost_model import CostModel
    from policy.cost_model_config import CostModelConfig
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
    prompts = {w: http_load.load_prompts(w, config.hf_num_prompts) for w in config.workloads}
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
    parser.add_argument(
        "--placements",
        default="router,beside_target,target_host",
        help="--served-speed: comma-separated engine.loop placements (router: the loop in the Router, the "
        "target in its own actor; beside_target: both in the Router's process; target_host: the loop in the "
        "target's actor), each optionally with :N, its server.stream_interval, and :nostream, non-streaming "
        "requests (e.g. target_host,target_host:4,target_host:nostream)",
    )
    parser.add_argument(
        "--gap-ms",
        type=float,
        default=0.0,
        help="--served-speed: mean Poisson gap before each served request (default 0: closed-loop clients)",
    )
    parser.add_argument(
        "--ingress",
        default="proxy",
        choices=sorted(INGRESS_ENV),
        help="--served-speed: Serve's HTTP ingress (as cluster.cli serve --ingress)",
    )
    parser.add_argument("--out", default=None, help="--served-speed: the JSON to write")
    args = parser.parse_args(argv)
    if args.served_speed:
        try:
            placements = tuple(parse_placement(item) for item in args.placements.split(","))
        except ValueError as error:
            parser.error(f"--placements: {error}")
        speed = SpeedConfig(
            repeats=args.repeats, mean_gap_s=args.gap_ms / 1e3, placements=placements, ingress=args.ingress
        )
        speed = replace(speed, **_shared_overrides(args))
        result = served_speed(speed)
        result["table"] = speed_table(result)
        result["cpu_table"] = cpu_table(result)
        print(result["table"], result["cpu_table"], sep="\n\n", flush=True)
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


def parse_placement(item: str) -> Placement:
    """`LOOP[:N][:nostream]`: an engine.loop placement, its server.stream_interval N (default 1), and
    `nostream` for non-streaming requests."""
    where, *options = item.split(":")
    intervals = [int(option) for option in options if option.isdigit() and int(option) >= 1]
    is_streamed = "nostream" not in options
    if (
        where not in LOOP_PLACEMENTS
        or len(intervals) + (not is_streamed) != len(options)
        or len(intervals) > 1
    ):
        raise ValueError(f"{item!r} is not one of {LOOP_PLACEMENTS}, with an optional :N and :nostream")
    return where, intervals[0] if intervals else 1, is_streamed


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
