"""Peer comparison on the demo pair: our server against vLLM's CPU build and `transformers` `generate`.

    python -m bench.compare            # the whole comparison, about 40 minutes on 2 cores
    python -m bench.compare --quick    # mixed, concurrency 1 and 4, ours K = 2, vLLM off: about 6 minutes

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
import asyncio
import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from bench import load, peers, plots
from bench.peers import log

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
RAW = RESULTS / "raw" / "compare"


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
    serve_config: str = "cluster/configs/demo-cpu.yaml"  # ours; vLLM serves the same model settings

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

    def phase(workload: str, mode: str, label: str, concurrency: int, num_requests: int) -> load.PhaseResult:
        prompts = load.load_prompts(workload, num_requests)
        return asyncio.run(
            load.run_phase(
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


# -- the limit: memory bandwidth and the weights a decode step reads -----------------------------------------


def bandwidth(
    model_bytes: int, dtype: str, num_bytes: int = 256 * 2**20, repeats: int = 5
) -> dict[str, float]:
    """GB/s: a torch copy of 256 MB (bytes read + written: memory), weight bytes read by matrix-vector
    products of 256 MB (memory) and of `model_bytes` in the serving dtype (the model's size: on a machine
    whose last-level cache holds the model, this is the rate its weights can stream at)."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(2)

    def best(fn: Any) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    def matvec(size: int, torch_dtype: torch.dtype) -> float:
        cols = 1024
        weight = torch.full(
            (size // torch_dtype.itemsize // cols, cols), 0.01, dtype=torch_dtype
        )  # [rows, cols]
        x = torch.ones(1, cols, dtype=torch_dtype)
        with torch.inference_mode():
            return size / best(lambda: F.linear(x, weight)) / 1e9

    buffers = [torch.ones(num_bytes // 4, dtype=torch.float32), torch.empty(num_bytes // 4)]
    rates = {"copy_gbps": 2 * num_bytes / best(lambda: buffers[1].copy_(buffers[0])) / 1e9}
    buffers.clear()
    rates["matvec_bfloat16_gbps"] = matvec(num_bytes, torch.bfloat16)
    rates["matvec_float32_gbps"] = matvec(num_bytes, torch.float32)
    rates[f"matvec_{dtype}_model_size_gbps"] = matvec(model_bytes, getattr(torch, dtype))
    return rates


def weight_params(target: Path) -> plots.WeightParams:
    """Parameters a plain decode step reads, from the safetensors header (nothing is loaded)."""
    config = json.loads((target / "config.json").read_text())
    header: dict[str, Any] = {}
    for file in sorted(target.glob("*.safetensors")):
        with file.open("rb") as f:
            header |= json.loads(f.read(int.from_bytes(f.read(8), "little")))
    header.pop("__metadata__", None)
    sizes = {name: _numel(info["shape"]) for name, info in header.items()}
    experts = {n: v for n, v in sizes.items() if ".experts." in n}
    embeddings = sum(v for n, v in sizes.items() if "embed_tokens" in n)  # a decode step reads B rows
    dense = sum(sizes.values()) - sum(experts.values()) - embeddings
    if config.get("tie_word_embeddings") and not any("lm_head" in n for n in sizes):
        dense += embeddings  # the LM head is the embedding matrix, read whole every step
    num_layers = config["num_hidden_layers"]
    num_experts = config.get("num_local_experts") or config.get("num_experts")
    return plots.WeightParams(
        dense=dense,
        per_expert=sum(experts.values()) // (num_layers * num_experts),
        num_moe_layers=num_layers,
        num_experts=num_experts,
        top_k=config["num_experts_per_tok"],
    )


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


# -- the cost model against measured iterations --------------------------------------------------------------


def measure_iterations(target: Path, draft: Path, dtype: str, config: RunConfig) -> list[dict[str, Any]]:
    """Our offline engine at every batch size x K (static): one IterationStats per decode iteration.

    One thread, as each model deployment of the demo Serve config has.
    """
    import torch

    from policy.baselines import OffChooser, StaticChooser
    from workers.drafter import Drafter
    from workers.engine import EngineConfig, SpecEngine
    from workers.kv_cache import CacheConfig
    from workers.runner import ModelRunner
    from workers.sampling import SamplingParams
    from workers.target import Target
    from workers.tokenizer import Tokenizer

    torch.set_num_threads(1)
    tokenizer = Tokenizer(target)
    prompts = [tokenizer.encode(t) for t in load.load_prompts("mixed", max(config.cost_batch_sizes))]
    max_k = max(config.static_num_spec_tokens)
    cache = CacheConfig(
        max_seqs=max(config.cost_batch_sizes),
        max_seq_len=max(map(len, prompts)) + config.cost_max_tokens + max_k + 2,
    )
    torch_dtype = getattr(torch, dtype)
    target_engine = Target(ModelRunner.from_checkpoint(target, cache, torch_dtype))
    drafter = Drafter(ModelRunner.from_checkpoint(draft, cache, torch_dtype))
    params = SamplingParams(temperature=0.0, max_tokens=config.cost_max_tokens, ignore_eos=True)

    def iterations(batch_size: int, k: int) -> list[Any]:
        chooser = StaticChooser(k) if k else OffChooser()
        engine_config = EngineConfig(max_batch_size=batch_size, max_spec_tokens=k)
        engine = SpecEngine(target_engine, drafter if k else None, chooser, engine_config)
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
    prior = analytic_prior(
        ModelConfig.from_dir(target), ModelConfig.from_dir(draft), plots.ELEMENT_SIZE[dtype]
    )
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
    target, draft = REPO / model["target"], REPO / model["draft"]
    for path in (target / "config.json", draft / "config.json"):
        if not path.is_file():
            raise SystemExit(f"{path} is missing: train the demo pair first (python -m workers.demo.train)")
    return target, draft


def run(config: RunConfig) -> dict[str, Any]:
    start = time.perf_counter()
    target, draft = check_models(config)
    RAW.mkdir(parents=True, exist_ok=True)
    (RAW / "phases.jsonl").unlink(missing_ok=True)
    vllm_python = peers.ensure_vllm_venv(RESULTS / "raw" / "vllm-venv") if config.with_vllm else None
    dtype = serve_settings(config)["model"]["dtype"]
    weights = weight_params(target)
    model_bytes = int(weights.bytes_per_step(max(config.concurrencies), plots.ELEMENT_SIZE[dtype]))
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
    parser.add_argument("--config", default=None, help="our Serve config (default: the demo's)")
    parser.add_argument("--report-only", action="store_true", help="rewrite the report from compare.json")
    args = parser.parse_args(argv)
    out = RAW / "quick" if args.quick else RESULTS / "compare"  # a quick run's report stays out of git
    if args.report_only:
        report = json.loads(out.with_suffix(".json").read_text())
    else:
        config = QUICK if args.quick else RunConfig()
        if args.no_vllm:
            config = replace(config, with_vllm=False)
        if args.workloads:
            config = replace(config, workloads=tuple(args.workloads.split(",")))
        if args.concurrency:
            config = replace(config, concurrencies=tuple(int(c) for c in args.concurrency.split(",")))
        if args.max_tokens:
            config = replace(config, max_tokens=args.max_tokens)
        if args.config:
            config = replace(config, serve_config=str(Path(args.config).resolve().relative_to(REPO)))
        report = run(config)
    report = plots.write_report(report, out)
    log(f"wrote {out}.json, {out}.md and {out}/*.png in {report['elapsed_s'] / 60:.1f} min")


if __name__ == "__main__":
    main()
