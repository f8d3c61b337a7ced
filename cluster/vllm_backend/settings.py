"""The scheduler's settings: the `moespec` section of vLLM's `--additional-config` (vLLM's supported way
to pass settings to plugins; it reaches the engine-core process inside `VllmConfig.additional_config`).

    vllm serve MODEL --speculative-config '{"method": "draft_model", "model": DRAFT, "num_speculative_tokens": 4}' \
        --scheduler-cls cluster.vllm_backend.scheduler.PolicyScheduler --no-async-scheduling \
        --worker-cls cluster.vllm_backend.runner.CatchUpWorker \
        --distributed-executor-backend cluster.vllm_backend.executor.PolicyMultiprocExecutor \
        --additional-config '{"moespec": {"policy": {"kind": "auto"}}}'

No vLLM import here, so the Serve app and the tests can build and check settings without vLLM.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

import msgspec

from cluster.config import PolicySettings

ADDITIONAL_CONFIG_KEY = "moespec"
NUM_SPEC_TOKENS_ARG = "num_spec_tokens"  # the per-request setting, in SamplingParams.extra_args (vllm_xargs)
SCHEDULER_CLS = "cluster.vllm_backend.scheduler.PolicyScheduler"
WORKER_CLS = "cluster.vllm_backend.runner.CatchUpWorker"  # no drafter forward on steps where every K is 0
# Executors without the engine core's draft fetch on steps that draft nothing (executor.py), by vLLM's choice.
MULTIPROC_EXECUTOR = "cluster.vllm_backend.executor.PolicyMultiprocExecutor"  # vLLM's "mp"
UNIPROC_EXECUTOR = "cluster.vllm_backend.executor.PolicyUniProcExecutor"  # vLLM's "uni"
DRAFT_MEASUREMENT_ATTR = "moespec_draft"  # the attribute of vLLM's ModelRunnerOutput that carries it
# ... and the one that carries a drafting step's drafts (vLLM's DraftTokenIds), which our executors hand to the
# engine core instead of fetching them from the worker (executor.py).
DRAFT_TOKEN_IDS_ATTR = "moespec_draft_token_ids"
# The attribute of vLLM's SchedulerOutput that names the requests with K > 0 at a drafting step (a frozenset of
# request ids): our worker catches up the drafter's KV of those alone (runner.py).
DRAFTING_REQUESTS_ATTR = "moespec_drafting"


def executor_backend(*, is_cpu: bool, world_size: int = 1) -> str:
    """`--distributed-executor-backend` for our executor where vLLM would pick "mp" or "uni" itself: the
    multiprocess one for several ranks and on CPU (vLLM's CPU build needs it for its OpenMP setup, unless
    `VLLM_ENABLE_V1_MULTIPROCESSING=0` keeps the engine core in-process), else the in-process one."""
    multiprocessing = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1") == "1"  # vLLM's CPU rule
    uses_processes = world_size > 1 or (is_cpu and multiprocessing)
    return MULTIPROC_EXECUTOR if uses_processes else UNIPROC_EXECUTOR


def drafts_alone(speculative_config: Any) -> bool:
    """Whether our worker runs the draft model of a drafting step for the requests at K > 0 alone
    (drafter_rows.py), leaving the others lagging: a draft model in vLLM's padded drafter batch, drafting
    greedily (vLLM's default; probabilistic drafts keep per-request draft probabilities for the whole batch,
    which are not cut). The scheduler's copy of the worker's lag (`chooser.DrafterLag`) reads the same."""
    return (
        speculative_config is not None
        and getattr(speculative_config, "method", None) == "draft_model"
        and not getattr(speculative_config, "disable_padded_drafter_batch", False)
        and getattr(speculative_config, "draft_sample_method", "greedy") == "greedy"
    )


@dataclass(frozen=True)
class DraftMeasurement:
    """What the drafter did at the end of one step (our worker measures it, runner.py): it drafted for the next
    step, or was skipped (0 draft steps)."""

    time_s: float  # in the drafter: the catch-up passes and vLLM's draft steps (device synchronized)
    # tokens fed beyond one per request: the catch-up's history and the step's prompt chunks (vLLM's first pass)
    num_prefill_tokens: int


@dataclass(frozen=True)
class SchedulerSettings:
    policy: PolicySettings = field(default_factory=PolicySettings)
    # The Ray cluster (GCS address) of the central SpecPolicy actor. None: the chooser runs alone in the
    # engine process (standalone `vllm serve`); set by the Serve replica when policy.use_central_actor.
    ray_address: str | None = None
    source: str = ""  # this engine's name in its reports to the central actor (default: a random one)
    metrics_path: str | None = None  # the scheduler writes its gauges here (JSON) for the Serve replica
    metrics_interval_s: float = 1.0
    # Keep every step's K and accepted counts in `PolicyScheduler.log.steps` (tests).
    is_recording: bool = False
    # Append every step's record to this file as a JSON line (a served engine's record, for diagnostics).
    record_path: str | None = None
    # Choose the next step's K while the worker runs this one (`PolicyScheduler.get_grammar_bitmask`),
    # for the choosers that learn (auto, cascade); False: every choice between steps, as before.
    choose_ahead: bool = True

    def __post_init__(self) -> None:
        if self.metrics_interval_s <= 0:
            raise ValueError(f"metrics_interval_s must be > 0, got {self.metrics_interval_s}")

    @property
    def uses_central_actor(self) -> bool:
        return self.policy.use_central_actor and self.ray_address is not None

    @classmethod
    def from_additional_config(cls, additional_config: dict[str, Any] | None) -> SchedulerSettings:
        """From `VllmConfig.additional_config`; an absent section gives the defaults, unknown keys are refused."""
        section = (additional_config or {}).get(ADDITIONAL_CONFIG_KEY) or {}
        try:
            args = msgspec.convert(section, type=_Args, strict=False)
            policy = PolicySettings(**args.policy)
        except (msgspec.ValidationError, TypeError) as error:
            raise ValueError(
                f"invalid --additional-config section {ADDITIONAL_CONFIG_KEY!r}: {error}"
            ) from error
        values = msgspec.structs.asdict(args)
        values["policy"] = policy
        return cls(**values)

    def to_additional_config(self) -> dict[str, Any]:
        """The inverse of `from_additional_config` (what the Serve replica passes to vLLM)."""
        values = dataclasses.asdict(self)
        return {ADDITIONAL_CONFIG_KEY: values}


class _Args(msgspec.Struct, forbid_unknown_fields=True):
    policy: dict[str, Any] = {}
    ray_address: str | None = None
    source: str = ""
    metrics_path: str | None = None
    metrics_interval_s: float = 1.0
    is_recording: bool = False
    record_path: str | None = None
    choose_ahead: bool = True


def parse_num_spec_tokens(value: Any, max_spec_tokens: int) -> int | None:
    """A request's `num_spec_tokens` extra argument: None / "auto" -> None (the policy decides), "off" -> 0,
    an integer n -> n, capped at the K_max the engine was launched with."""
    if value is None or value == "auto":
        return None
    if value == "off":
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"num_spec_tokens must be 'auto', 'off' or an integer >= 0, got {value!r}")
    return min(value, max_spec_tokens)
