"""The Serve replica of the vllm backend: one vLLM `AsyncLLM` engine (draft and target inside it, our
`PolicyScheduler` choosing K) behind the native backend's OpenAI `Router`.

Why our Router and not Ray Serve LLM's `build_openai_app`: the API must be the native backend's (the
`num_spec_tokens` field, our validation and error bodies, the API key, our `/metrics` names), and our
gauges come from the scheduler in vLLM's engine-core process, which vLLM's OpenAI layer cannot reach. The
Router needs only two small adapters: `VllmLoop` (the engine-loop interface over `AsyncLLM.generate`) and
`EngineView` (what the Router asks of an engine). Ray Serve LLM's CPU support is recent and was not tried
here.

Per replica: `num_replicas` (or autoscaling) in the Serve config gives one engine per replica; every
replica's scheduler reports to the one central SpecPolicy actor (see chooser.py for how).
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Any

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from cluster.config import AppConfig, resolve_model_path
from cluster.metrics import Metrics
from cluster.router import Router
from cluster.vllm_backend.counters import read_scheduler_counters
from cluster.vllm_backend.settings import (
    NUM_SPEC_TOKENS_ARG,
    SCHEDULER_CLS,
    WORKER_CLS,
    SchedulerSettings,
    executor_backend,
)
from workers.sampling import SamplingParams, TokenLogprob
from workers.sequence import RequestOutput
from workers.tokenizer import Tokenizer

logger = logging.getLogger(__name__)
# Scheduler counters exported as counters (named like vLLM's spec-decode ones) and as gauges.
_COUNTERS = {
    "num_steps": "iterations_total",
    "num_drafts": "spec_decode_num_drafts_total",
    "num_draft_tokens": "spec_decode_num_draft_tokens_total",
    "num_accepted_tokens": "spec_decode_num_accepted_tokens_total",
    "num_drafting_steps": "drafting_iterations_total",
    "draft_time_s": "draft_seconds_total",  # measured by our worker, sent with each step's output
}
_GAUGES = {
    "mean_num_spec_tokens": "num_spec_tokens_mean",
    "batch_size": "batch_size",
    "step_time_s": "iteration_time_seconds",
    "guard_holds": "policy_guard_holds",
    "guard_plain_restarts": "policy_guard_plain_restarts",
    "central_decisions": "policy_central_decisions",
    "policy_actor_failures": "policy_actor_failures",
    "tracked_requests": "policy_tracked_requests",
}


def engine_args(config: AppConfig, settings: SchedulerSettings, *, is_cpu: bool) -> dict[str, Any]:
    """vLLM's engine arguments for our Serve config (AsyncEngineArgs fields; `vllm serve` flags alike), on
    vLLM's CPU build or not."""
    model, engine, vllm = config.model, config.engine, config.vllm
    num_ranks = config.expert_parallel.num_ranks
    args: dict[str, Any] = {
        "model": str(resolve_model_path(model.target)),
        "served_model_name": model.served_name,
        "dtype": model.dtype,
        "max_model_len": model.max_seq_len,
        "max_num_seqs": model.max_seqs,
        "seed": 0,
        "enforce_eager": vllm.enforce_eager,
        "gpu_memory_utilization": vllm.gpu_memory_utilization,
        "tensor_parallel_size": num_ranks,
        "enable_expert_parallel": num_ranks > 1,
        "scheduler_cls": SCHEDULER_CLS,
        "worker_cls": WORKER_CLS,
        "distributed_executor_backend": executor_backend(is_cpu=is_cpu, world_size=num_ranks),
        "async_scheduling": False,  # PolicyScheduler cuts drafts that synchronous scheduling holds
        "additional_config": settings.to_additional_config(),
    }
    if model.draft is not None and engine.max_spec_tokens > 0:
        args["speculative_config"] = {
            "method": "draft_model",
            "model": str(resolve_model_path(model.draft)),
            "num_speculative_tokens": engine.max_spec_tokens,
        }
        args["per_request_spec_decode_metrics"] = "summary"
    if is_cpu:
        args["kv_cache_memory_bytes"] = int(vllm.cpu_kv_cache_gib * 2**30)
    return args


@dataclass(frozen=True)
class EngineInfo:
    vocab_size: int
    max_seq_len: int


class EngineView:
    """What the Router asks of its engine (`SpecEngine`'s members it reads), for a vLLM engine."""

    def __init__(self, info: EngineInfo) -> None:
        self.info = info
        self.num_draft_failures = 0  # the drafter lives inside vLLM; its failures fail the engine
        self.num_target_recoveries = 0
        self.chooser = None  # the chooser runs in vLLM's engine-core process; its gauges come from a file

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt_ids if not 0 <= t < self.info.vocab_size]
        if bad:
            raise ValueError(
                f"prompt token id {bad[0]} is outside the vocabulary [0, {self.info.vocab_size})"
            )
        if len(prompt_ids) + params.max_tokens > self.info.max_seq_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"length {self.info.max_seq_len}"
            )


def vllm_sampling_params(params: SamplingParams) -> Any:
    from vllm import SamplingParams as VllmSamplingParams
    from vllm.sampling_params import RequestOutputKind

    num_spec = "auto" if params.num_spec_tokens is None else params.num_spec_tokens
    return VllmSamplingParams(
        temperature=params.temperature,
        top_p=params.top_p,
        top_k=params.top_k if params.top_k > 0 else -1,
        seed=params.seed,
        max_tokens=params.max_tokens,
        stop=list(params.stop) or None,
        stop_token_ids=list(params.stop_token_ids) or None,
        ignore_eos=params.ignore_eos,
        presence_penalty=params.presence_penalty,
        frequency_penalty=params.frequency_penalty,
        repetition_penalty=params.repetition_penalty,
        # vLLM's default logprobs mode is the raw model output, before penalties and temperature: the
        # native backend's `token_logprobs` of the target's logits, too.
        logprobs=params.num_logprobs,
        output_kind=RequestOutputKind.DELTA,
        extra_args={NUM_SPEC_TOKENS_ARG: num_spec},
    )


def token_logprobs_of(token_ids: list[int], logprobs: Any, num_top: int | None) -> list[TokenLogprob]:
    """vLLM's per-token logprobs (a dict per token: token id -> Logprob with its rank; the chosen token and
    the `num_top` most likely) -> ours. Empty when the request asked for none."""
    if num_top is None or logprobs is None:
        return []
    result = []
    for token_id, entries in zip(token_ids, logprobs, strict=True):
        ranked = sorted((e.rank, t, e.logprob) for t, e in entries.items() if e.rank is not None)
        top = [(t, lp) for rank, t, lp in ranked if rank <= num_top][:num_top]
        result.append(TokenLogprob(token_id, entries[token_id].logprob, top))
    return result


class VllmLoop:
    """The engine-loop interface the Router uses (submit, abort, health), over `AsyncLLM.generate`: one
    asyncio task per request turns vLLM's delta outputs into our `RequestOutput`s."""

    def __init__(self, engine: Any, request_timeout_s: float, metrics: Metrics, view: EngineView) -> None:
        self.engine = engine
        self.request_timeout_s = request_timeout_s
        self.metrics = metrics
        self.view = view
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self.num_outstanding = 0
        self.last_error: BaseException | None = None
        self.has_started = False

    def start(self, event_loop: asyncio.AbstractEventLoop) -> None:
        self.has_started = True

    def stop(self) -> None:
        pass  # the engine shuts down with the server

    @property
    def vocab_size(self) -> int:
        return self.view.info.vocab_size

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self.view.validate(prompt_ids, params)

    def gauges(self) -> dict[str, float]:
        return {"num_requests_outstanding": self.num_outstanding}  # the scheduler's come from its file

    @property
    def is_alive(self) -> bool:
        return self.has_started and not self.engine.errored

    def submit(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> asyncio.Queue[Any]:
        outputs: asyncio.Queue[Any] = asyncio.Queue()
        self.num_outstanding += 1
        task = asyncio.get_running_loop().create_task(self._run(request_id, prompt_ids, params, outputs))
        self._tasks[request_id] = task
        return outputs

    def abort(self, request_id: str) -> None:
        task = self._tasks.get(request_id)
        if task is not None:
            task.cancel()

    async def _run(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, outputs: asyncio.Queue[Any]
    ) -> None:
        from vllm.inputs import TokensPrompt

        num_output = 0
        try:
            async with asyncio.timeout(self.request_timeout_s):
                stream = self.engine.generate(
                    TokensPrompt(prompt_token_ids=prompt_ids), vllm_sampling_params(params), request_id
                )
                async for out in stream:
                    completion = out.outputs[0]
                    new_ids = list(completion.token_ids)
                    num_output += len(new_ids)
                    finish = _finish_reason(completion.finish_reason) if out.finished else None
                    outputs.put_nowait(
                        RequestOutput(
                            request_id,
                            new_ids,
                            completion.text,
                            len(prompt_ids),
                            num_output,
                            finish,
                            token_logprobs_of(new_ids, completion.logprobs, params.num_logprobs),
                        )
                    )
            self.last_error = None
        except TimeoutError:
            await self.engine.abort(request_id)
            outputs.put_nowait(TimeoutError(f"request {request_id} exceeded its deadline"))
        except asyncio.CancelledError:
            await self.engine.abort(request_id)
            outputs.put_nowait(RequestOutput(request_id, [], "", len(prompt_ids), num_output, "abort"))
        except Exception as error:  # noqa: BLE001 (reported to this request; /health reports a dead engine)
            logger.exception("vLLM failed request %s", request_id)
            self.last_error = error if self.engine.errored else None
            outputs.put_nowait(error)
        finally:
            self.num_outstanding -= 1
            self._tasks.pop(request_id, None)


def _finish_reason(reason: str | None) -> str:
    return "length" if reason == "length" else "abort" if reason == "abort" else "stop"


class VllmServer:
    """The vllm backend's Serve deployment (`serve.deployment` is applied in `cluster.app`)."""

    def __init__(self, config: AppConfig) -> None:
        self.config = config
        self._metrics_dir = tempfile.mkdtemp(prefix="moespec-vllm-")
        self.settings = scheduler_settings(config, os.path.join(self._metrics_dir, "scheduler.json"))
        self.engine = _start_engine(config, self.settings)
        tokenizer = Tokenizer(resolve_model_path(config.model.target))
        info = EngineInfo(vocab_size=tokenizer.vocab_size, max_seq_len=config.model.max_seq_len)
        api_key = config.server.api_key
        if api_key is None and config.server.api_key_env:
            api_key = os.environ.get(config.server.api_key_env) or None
        self.metrics = Metrics(config.model.served_name)
        self._counted: dict[str, float] = {}  # scheduler counters already added to self.metrics
        self.loop = VllmLoop(self.engine, config.engine.request_timeout_s, self.metrics, EngineView(info))
        self.router = Router(config, self.loop, tokenizer, api_key)

    async def __call__(self, request: Request) -> Response:
        if request.method == "GET" and request.url.path == "/metrics":
            await self.router(request)  # authorization and the Router's own gauges
            return PlainTextResponse(self.render_metrics(), media_type="text/plain; version=0.0.4")
        return await self.router(request)

    def render_metrics(self) -> str:
        """Our metrics (Router counters, the scheduler's counters and gauges) followed by vLLM's own."""
        from prometheus_client import generate_latest
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        self.metrics.set_gauge("num_requests_outstanding", self.loop.num_outstanding)
        for name, value in read_scheduler_counters(self.settings.metrics_path).items():
            if name in _COUNTERS:
                self.metrics.count(_COUNTERS[name], value - self._counted.get(name, 0.0))
                self._counted[name] = value
            elif name in _GAUGES:
                self.metrics.set_gauge(_GAUGES[name], value)
        return self.metrics.render() + generate_latest(get_prometheus_registry()).decode()

    def check_health(self) -> None:
        if self.engine.errored:
            raise RuntimeError(f"the vLLM engine has failed: {self.engine.dead_error}")

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()


def scheduler_settings(config: AppConfig, metrics_path: str) -> SchedulerSettings:
    ray_address = None
    if config.policy.use_central_actor and config.policy.kind in ("auto", "cascade"):
        import ray

        ray_address = ray.get_runtime_context().gcs_address
    return SchedulerSettings(
        policy=config.policy,
        ray_address=ray_address,
        source=f"vllm-{os.getpid()}-{int(time.time()) % 100000}",
        metrics_path=metrics_path,
    )


def _start_engine(config: AppConfig, settings: SchedulerSettings) -> Any:
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.platforms import current_platform
    from vllm.v1.engine.async_llm import AsyncLLM

    vllm = config.vllm
    if os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None) is not None:
        # The CPU build's legacy setting (whole GiB) overrides kv_cache_memory_bytes: one way, the config's.
        logger.warning(
            "VLLM_CPU_KVCACHE_SPACE is ignored: vllm.cpu_kv_cache_gib=%s sets the KV cache",
            vllm.cpu_kv_cache_gib,
        )
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    # CPU builds: the replica's threads. vLLM's automatic binding pins every engine on a node to the same
    # first cores, so replicas sharing a node would share one core; let the OS place them instead.
    os.environ.setdefault("OMP_NUM_THREADS", str(config.resources.torch_threads))
    os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
    args = engine_args(config, settings, is_cpu=current_platform.is_cpu())
    return AsyncLLM.from_engine_args(AsyncEngineArgs(**args))
