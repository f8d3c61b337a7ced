"""vLLM engines on the demo pair for the scheduler tests, in this process (the engine core runs in-process,
so a test reads the scheduler's record and counts the drafter's forwards directly)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from cluster.config import DEMO_DRAFT, DEMO_TARGET
from cluster.vllm_backend.settings import SCHEDULER_CLS, UNIPROC_EXECUTOR, WORKER_CLS

MAX_SPEC_TOKENS = 4


def make_llm(policy: dict[str, Any] | None) -> Any:
    """The demo target in fp32 (greedy output exact); with `policy`, the draft at K_max = 4, our scheduler
        recording every step, our worker (no drafter pass on all-K = 0 steps) and our executor (in-process, as the
    engine core is here: no draft fetch after such steps); without, vLLM without
        speculation."""
    from vllm import LLM

    args: dict[str, Any] = {
        "model": str(DEMO_TARGET),
        "dtype": "float32",
        "max_model_len": 512,
        "max_num_seqs": 16,
        "seed": 0,
        "enforce_eager": True,
    }
    if policy is not None:
        args["speculative_config"] = {
            "method": "draft_model",
            "model": str(DEMO_DRAFT),
            "num_speculative_tokens": MAX_SPEC_TOKENS,
        }
        args["scheduler_cls"] = SCHEDULER_CLS
        args["worker_cls"] = WORKER_CLS
        args["distributed_executor_backend"] = UNIPROC_EXECUTOR
        args["additional_config"] = {"moespec": {"is_recording": True, "policy": policy}}
        args["per_request_spec_decode_metrics"] = "detailed"
    # The engine core in this process (read at construction); the variables do not outlive it.
    saved = {
        name: os.environ.get(name) for name in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")
    }
    os.environ.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1")
    try:
        return LLM(**args)
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def scheduler(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.scheduler


def executor(llm: Any) -> Any:
    return llm.llm_engine.engine_core.engine_core.model_executor


def runner(llm: Any) -> Any:
    return executor(llm).driver_worker.worker.model_runner


def drafter(llm: Any) -> Any:
    return runner(llm).drafter


@contextmanager
def count_draft_forwards(llm: Any) -> Iterator[list[int]]:
    """Counts the draft model's forwards: one entry (its token count) per call."""
    calls: list[int] = []
    model = drafter(llm).model

    def hook(module: Any, args: Any, kwargs: Any, output: Any) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        calls.append(0 if input_ids is None else int(input_ids.shape[0]))

    handle = model.register_forward_hook(hook, with_kwargs=True)
    try:
        yield calls
    finally:
        handle.remove()


@contextmanager
def count_calls(obj: Any, name: str) -> Iterator[list[int]]:
    """Counts calls of `obj.name` (one entry per call) while the block runs."""
    calls: list[int] = []
    method = getattr(obj, name)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return method(*args, **kwargs)

    setattr(obj, name, counted)
    try:
        yield calls
    finally:
        delattr(obj, name)  # the class's method again
