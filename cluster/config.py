"""The application's configuration: the Serve config's `args`, validated once into frozen dataclasses.

`AppConfig.from_args` is the only entry from YAML/JSON (msgspec, unknown fields refused with their name);
everything downstream receives the dataclasses.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

from policy.batch_aware import BatchAwareConfig

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_TARGET = REPO_ROOT / "models" / "demo-moe"
DEMO_DRAFT = REPO_ROOT / "models" / "demo-draft"
POLICIES = ("auto", "cascade", "static", "off")
BACKENDS = ("native", "vllm")
DTYPES = ("bfloat16", "float32", "auto")
DRAFT_PROPOSALS = ("one_hot", "distribution")  # as workers.drafter.PROPOSALS (this module imports no torch)
LOOP_PLACEMENTS = ("router", "beside_target", "target_host")  # engine.loop


def resolve_model_path(path: str) -> Path:
    """A model path as given, or relative to the repository (the demo checkpoints ship there)."""
    candidate = Path(path)
    if candidate.is_dir():
        return candidate
    in_repo = REPO_ROOT / path
    if in_repo.is_dir():
        return in_repo
    raise ValueError(f"model directory {path!r} does not exist")


@dataclass(frozen=True)
class ModelSettings:
    target: str = str(DEMO_TARGET)
    draft: str | None = str(DEMO_DRAFT)  # None: no speculation
    served_name: str = "demo-moe"
    dtype: str = "float32"  # "auto" = the checkpoint's dtype
    max_seqs: int = 32  # the one batch limit: requests running at once = KV slots of each model
    max_seq_len: int = 1024  # prompt + output tokens of a request (the served max_model_len)

    def __post_init__(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.max_seqs < 1 or self.max_seq_len < 16:
            raise ValueError(
                f"model.max_seqs >= 1 and max_seq_len >= 16 required, got {self.max_seqs}, {self.max_seq_len}"
            )


@dataclass(frozen=True)
class EngineSettings:
    backend: str = (
        "native"  # native: our engine (workers/); vllm: a vLLM engine per replica (cluster/vllm_backend)
    )
    max_batch_size: int | None = None  # removed: model.max_seqs is the one batch limit (an error if set)
    max_spec_tokens: int = 6
    max_waiting: int = 256  # queued requests beyond the batch; more get 429
    request_timeout_s: float = 300.0  # a request still running after this ends with an error
    target_recovery_s: float = 120.0  # after a target failure, re-prefill running requests for this long
    # What a sampled request's drafter sends the target (native backend): "one_hot" = draft token ids only
    # (the draft's argmax; lossless), "distribution" = also each draft's [vocab] fp32 distribution.
    draft_proposals: str = "one_hot"
    # Where the engine loop runs (docs/native-backend-measurements.md, "The served path ..."):
    #   router:        in the Router replica, the target in its own host actor (a call per iteration);
    #   beside_target: in the Router replica with the target's model (a target failure is a router failure);
    #   target_host:   in the target's host actor (`EngineHost`), which calls the drafter itself; the Router
    #                  keeps HTTP, validation and streaming, and sends typed commands to it.
    # beside_target and target_host need expert_parallel.num_ranks 1; beside_target also no GPU.
    loop: str = "router"
    loop_beside_target: bool | None = None  # removed: see `loop` (an error if set)

    def __post_init__(self) -> None:
        if self.loop_beside_target is not None:
            raise ValueError(
                "engine.loop_beside_target is no longer a setting: set engine.loop to one of "
                f"{LOOP_PLACEMENTS} (loop_beside_target: true is engine.loop: beside_target)"
            )
        if self.loop not in LOOP_PLACEMENTS:
            raise ValueError(f"engine.loop must be one of {LOOP_PLACEMENTS}, got {self.loop!r}")
        if self.max_batch_size is not None:
            raise ValueError(
                f"engine.max_batch_size ({self.max_batch_size}) is no longer a setting: model.max_seqs is the one "
                "limit on requests running at once (and the KV slots each model holds); remove "
                "engine.max_batch_size and set model.max_seqs"
            )
        if self.max_waiting < 0 or self.max_spec_tokens < 0:
            raise ValueError("engine.max_waiting >= 0 and max_spec_tokens >= 0 required")
        if self.request_timeout_s <= 0:
            raise ValueError(f"engine.request_timeout_s must be > 0, got {self.request_timeout_s}")
        if self.draft_proposals not in DRAFT_PROPOSALS:
            raise ValueError(
                f"engine.draft_proposals must be one of {DRAFT_PROPOSALS}, got {self.draft_proposals!r}"
            )
        if self.backend not in BACKENDS:
            raise ValueError(f"engine.backend must be one of {BACKENDS}, got {self.backend!r}")


@dataclass(frozen=True)
class PolicySettings:
    kind: str = "auto"  # auto = batch-aware; cascade; static; off
    num_spec_tokens: int = 3  # for kind = static
    window_iterations: int = 4  # how long a central decision holds
    use_central_actor: bool = True  # False: each router decides alone
    actor_name: str = "moespec-spec-policy"
    # auto: a request whose drafter lags drafts only where the rest of its life repays the catch-up
    # (`BatchAwareConfig.weighs_catch_up`; both engines set the outlooks); false for measuring it.
    weighs_catch_up: bool = True
    # auto: a batch leaves plain decoding only where the cost model predicts more than this gain
    # (`BatchAwareConfig.min_predicted_gain`: the model's error at the margin); 0 for measuring it.
    min_predicted_gain: float = BatchAwareConfig.min_predicted_gain

    def __post_init__(self) -> None:
        if self.kind not in POLICIES:
            raise ValueError(f"policy.kind must be one of {POLICIES}, got {self.kind!r}")
        if self.min_predicted_gain < 0.0:
            raise ValueError(f"policy.min_predicted_gain must be >= 0, got {self.min_predicted_gain}")
        if self.num_spec_tokens < 0 or self.window_iterations < 1:
            raise ValueError("policy.num_spec_tokens >= 0 and window_iterations >= 1 required")


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = None  # bearer token required on every endpoint but /health; None = open
    api_key_env: str | None = "MOESPEC_API_KEY"  # read the key from this variable if api_key is unset
    max_body_bytes: int = 1 << 20
    # A stream's tokens go out in chunks of at least this many (native backend): the first token at once,
    # the last ones when the request ends. Each chunk costs the HTTP path (the replica's event loop, Serve's
    # proxy, the client) about the same CPU whatever its size, so a larger interval frees CPU for the model
    # under load, at the price of coarser streaming (as vLLM's `stream_interval`).
    stream_interval: int = 1

    def __post_init__(self) -> None:
        if self.max_body_bytes < 1024:
            raise ValueError(f"server.max_body_bytes must be >= 1024, got {self.max_body_bytes}")
        if self.stream_interval < 1:
            raise ValueError(
                f"server.stream_interval must be >= 1 (1 = every token), got {self.stream_interval}"
            )


@dataclass(frozen=True)
class ResourceSettings:
    router_num_cpus: float = 0.5
    drafter_num_cpus: float = 0.5
    target_num_cpus: float = 1.0
    target_num_gpus: float = 0.0  # per expert-parallel rank
    drafter_num_gpus: float = 0.0
    torch_threads: int = 1  # torch.set_num_threads in each model process


@dataclass(frozen=True)
class ExpertParallelSettings:
    num_ranks: int = 1  # 1 = the whole target in one process
    strategy: str = "allreduce"  # or all_to_all

    def __post_init__(self) -> None:
        if self.num_ranks < 1:
            raise ValueError(f"expert_parallel.num_ranks must be >= 1, got {self.num_ranks}")
        if self.strategy not in ("allreduce", "all_to_all"):
            raise ValueError(
                f"expert_parallel.strategy must be allreduce or all_to_all, got {self.strategy!r}"
            )


@dataclass(frozen=True)
class ReplicaSettings:
    """How many copies of the whole unit (a Router replica with its own drafter and target, native backend)
    run: Serve's `num_replicas`, or Serve's `autoscaling_config` (its fields: min_replicas, max_replicas,
    target_ongoing_requests, ...), which replaces a fixed number."""

    num_replicas: int | None = None  # None: 1, or what autoscaling_config decides
    autoscaling_config: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.num_replicas is not None and self.num_replicas < 1:
            raise ValueError(f"replicas.num_replicas must be >= 1, got {self.num_replicas}")
        if self.autoscaling_config is None:
            return
        if self.num_replicas is not None:
            raise ValueError(
                "replicas.num_replicas and replicas.autoscaling_config are both set; set one: a fixed number "
                "of replicas, or autoscaling between its min_replicas and max_replicas"
            )
        from ray.serve.config import AutoscalingConfig  # Serve's own validation (ranges, types)

        unknown = set(self.autoscaling_config) - set(AutoscalingConfig.model_fields)
        if unknown:
            raise ValueError(
                f"replicas.autoscaling_config has unknown fields {sorted(unknown)}; Serve's are "
                f"{sorted(AutoscalingConfig.model_fields)}"
            )
        try:
            AutoscalingConfig.model_validate(self.autoscaling_config)
        except ValueError as error:  # pydantic's ValidationError is a ValueError
            raise ValueError(f"replicas.autoscaling_config is invalid: {error}") from error

    @property
    def num_starting(self) -> int:
        """Replicas at deployment (autoscaling: its initial_replicas, else min_replicas, at least 1)."""
        if self.autoscaling_config is None:
            return self.num_replicas or 1
        auto = self.autoscaling_config
        return max(1, int(auto.get("initial_replicas") or auto.get("min_replicas") or 1))


@dataclass(frozen=True)
class VllmSettings:
    """Settings of the vllm backend that our other sections do not cover (read only when backend = vllm)."""

    num_replicas: int | None = None  # removed: replicas.num_replicas (an error if set)
    enforce_eager: bool = False  # True: no torch.compile / CUDA graphs (a much shorter start)
    gpu_memory_utilization: float = 0.9
    # The KV cache on CPU builds, through vLLM's kv_cache_memory_bytes (fractions of a GiB too: the benchmark
    # serves the regime pair at 0.25 each, seven servers side by side); on GPUs, gpu_memory_utilization sets it.
    cpu_kv_cache_gib: float = 1.0

    def __post_init__(self) -> None:
        if self.num_replicas is not None:
            raise ValueError(
                "vllm.num_replicas is no longer a setting: both backends scale with replicas.num_replicas "
                "or replicas.autoscaling_config (one vLLM engine per replica)"
            )
        if not 0.0 < self.gpu_memory_utilization <= 1.0 or not self.cpu_kv_cache_gib > 0.0:
            raise ValueError(
                f"vllm.gpu_memory_utilization={self.gpu_memory_utilization} must be in (0, 1] and "
                f"vllm.cpu_kv_cache_gib={self.cpu_kv_cache_gib} > 0 (GiB)"
            )


@dataclass(frozen=True)
class AppConfig:
    model: ModelSettings = field(default_factory=ModelSettings)
    engine: EngineSettings = field(default_factory=EngineSettings)
    policy: PolicySettings = field(default_factory=PolicySettings)
    server: ServerSettings = field(default_factory=ServerSettings)
    resources: ResourceSettings = field(default_factory=ResourceSettings)
    expert_parallel: ExpertParallelSettings = field(default_factory=ExpertParallelSettings)
    replicas: ReplicaSettings = field(default_factory=ReplicaSettings)
    vllm: VllmSettings = field(default_factory=VllmSettings)

    def __post_init__(self) -> None:
        if self.engine.loop == "beside_target" and (
            self.expert_parallel.num_ranks != 1 or self.resources.target_num_gpus > 0
        ):
            raise ValueError(
                "engine.loop beside_target runs the whole target in the Router replica's process: it needs "
                "expert_parallel.num_ranks 1 and resources.target_num_gpus 0; use engine.loop router for an "
                "expert-parallel or GPU target"
            )
        if self.engine.loop == "target_host" and self.expert_parallel.num_ranks != 1:
            raise ValueError(
                "engine.loop target_host runs the engine beside a target in one process: it needs "
                "expert_parallel.num_ranks 1; use engine.loop router for an expert-parallel target"
            )

    @property
    def max_outstanding(self) -> int:
        """Requests a router holds at once: a running batch plus the waiting queue; more get 429."""
        return self.model.max_seqs + self.engine.max_waiting

    @classmethod
    def from_args(cls, args: dict[str, Any] | None) -> AppConfig:
        """Build from a Serve config's `args` (nested dicts); unknown keys are refused by name."""
        try:
            return msgspec.convert(args or {}, type=_AppArgs, strict=False).to_config()
        except msgspec.ValidationError as error:
            raise ValueError(f"invalid application args: {error}") from error


class _Section(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    pass


def _section(settings_cls: type) -> type[msgspec.Struct]:
    """A msgspec Struct mirroring a settings dataclass, every field optional, unknown fields refused."""
    defaults = settings_cls()
    fields = [
        (f.name, Any, msgspec.field(default=getattr(defaults, f.name)))
        for f in dataclasses.fields(settings_cls)
    ]
    return msgspec.defstruct(f"_{settings_cls.__name__}Args", fields, bases=(_Section,))


_SECTIONS = {
    "model": ModelSettings,
    "engine": EngineSettings,
    "policy": PolicySettings,
    "server": ServerSettings,
    "resources": ResourceSettings,
    "expert_parallel": ExpertParallelSettings,
    "replicas": ReplicaSettings,
    "vllm": VllmSettings,
}
_AppArgsBase = msgspec.defstruct(
    "_AppArgsBase",
    [(name, _section(cls) | None, None) for name, cls in _SECTIONS.items()],
    bases=(_Section,),
)


class _AppArgs(_AppArgsBase):  # type: ignore[misc, valid-type]
    def to_config(self) -> AppConfig:
        parts = {}
        for name, cls in _SECTIONS.items():
            section = getattr(self, name)
            values = {} if section is None else msgspec.structs.asdict(section)
            parts[name] = cls(**values)
        return AppConfig(**parts)
