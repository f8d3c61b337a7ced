"""The offline modes of `python -m bench.vllm_policy` (`--catch-up`, `--offline MODES`): vLLM's offline
`LLM` engines in this process instead of servers, the same greedy batch alternately on each, repeated.
`--catch-up` is off, k0_vllm and k0 on the mixed prompts: what a step costs when every K is 0.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path
from typing import Any

from bench.peers import VllmSettings, log
from bench.vllm_policy import MAX_SPEC_TOKENS
from bench.vllm_policy_client import PROMPTS, RAW
from bench.vllm_policy_report import scheduler_summary
from cluster.vllm_backend.settings import SCHEDULER_CLS, WORKER_CLS, executor_backend


def run_offline(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`--offline MODES` on the first workload's prompts, or `--catch-up`; at each --concurrency as the batch."""
    modes, workload = (
        (args.offline, args.workloads[0]) if args.offline else (["off", "k0_vllm", "k0"], "mixed")
    )
    return measure_offline(args, modes, workload, args.concurrency, args.repeats)


def offline_engine_args(mode: str, common: dict[str, Any], draft: Path) -> dict[str, Any]:
    """`vllm.LLM` arguments of an offline mode: off; N (vLLM's own static K = N); off-ours (no draft model, on
    our scheduler, worker and executor); k0_vllm (our scheduler at every K = 0, K_max 4, vLLM's runner and
    executor); k0 (the same on our worker and executor); auto (our policy, K_max 4, our worker and
    executor); oursN (our scheduler, worker and executor at a fixed K = N, K_max 4); oursN@M (the same at
    K_max M)."""

    def spec(num: int) -> dict[str, Any]:
        return {"method": "draft_model", "model": str(draft), "num_speculative_tokens": num}

    if mode == "off":
        return dict(common)
    if mode.isdigit():
        return {**common, "speculative_config": spec(int(mode))}
    ours = mode.removeprefix("ours")
    max_spec: int | None
    if mode in ("off-ours", "k0", "k0_vllm", "auto"):
        policy: dict[str, Any] = {"kind": "auto" if mode == "auto" else "off"}
        max_spec = None if mode == "off-ours" else MAX_SPEC_TOKENS
    elif mode.startswith("ours") and ours.split("@")[0].isdigit():
        num, _, top = ours.partition("@")
        policy = {"kind": "static", "num_spec_tokens": int(num)}
        max_spec = int(top) if top else MAX_SPEC_TOKENS
    else:
        raise ValueError(
            f"offline mode {mode!r}: expected off, N, off-ours, k0, k0_vllm, auto, oursN or oursN@M"
        )
    engine = {**common, "scheduler_cls": SCHEDULER_CLS, "additional_config": {"moespec": {"policy": policy}}}
    if max_spec is not None:
        engine["speculative_config"] = spec(max_spec)
    if mode == "k0_vllm":
        return engine
    return {**engine, "worker_cls": WORKER_CLS, "distributed_executor_backend": executor_backend(is_cpu=True)}


def measure_offline(
    args: argparse.Namespace, modes: list[str], workload: str, batch_sizes: list[int], repeats: int = 3
) -> list[dict[str, Any]]:
    """Seconds per greedy batch of each mode's engine, all in this process, alternating (`repeats` rounds);
    per batch, each mode's median over the first mode's, and with our scheduler what it did (its step
    record over that batch's runs, `scheduler_summary`). `--catch-up`: off, k0_vllm, k0 on mixed prompts
    (what a step costs when every K is 0)."""
    from vllm import LLM, SamplingParams

    lines = (PROMPTS / f"{workload}.jsonl").read_text().splitlines()
    prompts = [json.loads(line)["prompt"] for line in lines]
    common = {"model": str(args.target), "dtype": args.dtype, "max_model_len": 1024, "seed": 0}
    common |= {"max_num_seqs": max(batch_sizes), "enforce_eager": args.eager}
    # The servers' KV cache size: unset, vLLM's CPU build reserves 92% of the machine's memory for the first
    # engine, and the second one failed to start ("Available memory ... is less than desired").
    common["kv_cache_memory_bytes"] = int(VllmSettings.kv_cache_gib * 2**30)
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # (the CPU build's legacy setting overrides it)
    engine_args = {mode: offline_engine_args(mode, common, args.draft) for mode in modes}
    records: dict[str, Path] = {}
    for mode, engine in engine_args.items():  # our scheduler keeps its step record, as the servers' does
        if "additional_config" in engine:
            records[mode] = RAW / f"offline-record-{mode}-{int(time.time())}.jsonl"
            engine["additional_config"]["moespec"]["record_path"] = str(records[mode])
    engines = {mode: LLM(**engine) for mode, engine in engine_args.items()}
    params = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, ignore_eos=True)
    rows = []
    for batch in batch_sizes:
        times: dict[str, list[float]] = {mode: [] for mode in engines}
        spans: dict[str, list[tuple[float, float]]] = {mode: [] for mode in engines}
        for _ in range(repeats):
            for mode, llm in engines.items():
                start, wall = time.perf_counter(), time.time()
                llm.generate(prompts[:batch], params, use_tqdm=False)
                times[mode].append(time.perf_counter() - start)
                spans[mode].append((wall, time.time()))
        row: dict[str, Any] = {"batch": batch, **{f"{m}_s": sorted(t) for m, t in times.items()}}
        median = {mode: sorted(t)[repeats // 2] for mode, t in times.items()}
        for mode in modes[1:]:
            row[f"{mode}_over_{modes[0]}_median"] = float(median[mode] / median[modes[0]])
        for mode, record in records.items():
            steps = [json.loads(line) for line in record.read_text().splitlines()] if record.exists() else []
            within = [s for s in steps if any(a <= s["start_s"] <= b for a, b in spans[mode])]
            row[f"{mode}_scheduler"] = scheduler_summary(within)
        log(json.dumps(row))
        rows.append(row)
    return rows
