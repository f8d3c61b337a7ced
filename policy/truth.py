"""The simulator's ground truth: iteration times of a GPU server, built from hardware and model specs.

Terms a real server has (MoESD section 1.2-1.4, in `../shared/papers.md`): weights read at the achieved
memory bandwidth (dense weights plus the distinct experts touched, N(t)); KV-cache reads per sequence and
context length; GEMM compute whose efficiency falls when an expert sees few tokens; tensor-parallel
all-reduces per layer over the GPUs' link; the engine's overhead per forward, per layer and per token; the
draft on one GPU, and its catch-up prefill when a request starts or resumes speculating. The policy never
sees this model: it learns its own (`policy.cost_model`) from the times this one produces.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from policy.routing import RoutingConfig, expected_experts


@dataclass(frozen=True)
class HardwareSpec:
    """One GPU (or CPU) from its public spec sheet."""

    name: str
    memory_bandwidth_bytes_per_s: float
    peak_flops: float  # dense bf16
    link_bandwidth_bytes_per_s: float = 0.0  # per GPU, one direction, to its tensor-parallel peers
    # The analytic prior's default efficiencies (`Preset.cost_params`), not the truth's (`EngineSpec`).
    bandwidth_efficiency: float = 0.8
    flops_efficiency: float = 0.5
    forward_overhead_s: float = 2e-4
    iteration_overhead_s: float = 5e-4
    per_token_overhead_s: float = 2e-6

    def __post_init__(self) -> None:
        for name in ("memory_bandwidth_bytes_per_s", "peak_flops"):
            if getattr(self, name) <= 0.0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("bandwidth_efficiency", "flops_efficiency"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in (0, 1]")


@dataclass(frozen=True)
class ModelSpec:
    """Parameter counts and shapes from a model's published config."""

    name: str
    dense_params: float  # read by every forward: attention, norms, shared experts, LM head
    num_layers: int
    expert_params: float = 0.0  # one routed expert in one layer (0 for a dense model)
    num_experts: int = 0  # routed experts per layer (0 for a dense model)
    top_k: int = 0  # routed experts per token
    bytes_per_param: float = 2.0  # bf16
    hidden_size: int = 0  # the activations all-reduced per layer under tensor parallelism
    kv_bytes_per_token: float = 0.0  # K and V of one token, all layers: 2 * layers * kv_heads * head_dim * 2

    def __post_init__(self) -> None:
        if self.dense_params <= 0.0 or self.num_layers < 1:
            raise ValueError(f"{self.name}: dense_params and num_layers must be positive")
        if (self.num_experts > 0) != (self.expert_params > 0.0):
            raise ValueError(f"{self.name}: expert_params={self.expert_params} needs num_experts > 0")
        RoutingConfig(self.num_experts, self.top_k)  # validates top_k against num_experts

    @property
    def active_params(self) -> float:
        return self.dense_params + self.num_layers * self.top_k * self.expert_params

    @property
    def total_params(self) -> float:
        return self.dense_params + self.num_layers * self.num_experts * self.expert_params


@dataclass(frozen=True)
class EngineSpec:
    """What the serving engine adds to the hardware: achieved efficiencies and overheads (see presets.py
    for where each value comes from)."""

    bandwidth_efficiency: float  # achieved fraction of the memory bandwidth by weight-reading kernels
    flops_efficiency: float  # achieved fraction of peak FLOPs by a large GEMM
    gemm_half_tokens: float  # rows per GEMM at which it reaches half its large-GEMM efficiency
    step_overhead_s: float  # per forward (target or draft step): scheduling, input preparation, launch
    layer_overhead_s: float  # per layer per forward: kernels that neither read weights nor compute much
    per_token_overhead_s: float  # per verified token: sampling, rejection, bookkeeping
    link_latency_s: float = 0.0  # per all-reduce

    def __post_init__(self) -> None:
        for name in ("bandwidth_efficiency", "flops_efficiency"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in (0, 1]")
        for name in ("gemm_half_tokens", "step_overhead_s", "layer_overhead_s", "per_token_overhead_s"):
            if getattr(self, name) < 0.0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")


@dataclass(frozen=True)
class IterationShape:
    """What one iteration ran: K and context per request, and draft catch-up tokens."""

    num_spec_tokens: Sequence[int]  # K_r per request
    context_lens: Sequence[int]  # tokens in each request's cache before the iteration
    num_draft_prefill_tokens: int = 0  # history tokens the drafter caught up on


class ServerTruth:
    """Phase times (draft, verify, other) of one iteration: the target on `num_gpus` GPUs with tensor
    parallelism, the draft on one of them."""

    def __init__(
        self, target: ModelSpec, draft: ModelSpec, hardware: HardwareSpec, num_gpus: int, engine: EngineSpec
    ) -> None:
        if num_gpus < 1:
            raise ValueError(f"num_gpus={num_gpus} must be >= 1")
        if num_gpus > 1 and hardware.link_bandwidth_bytes_per_s <= 0.0:
            raise ValueError(f"{hardware.name}: tensor parallelism needs link_bandwidth_bytes_per_s > 0")
        self.target, self.draft, self.hardware = target, draft, hardware
        self.num_gpus, self.engine = num_gpus, engine

    def phase_times(self, shape: IterationShape) -> tuple[float, float, float]:
        ks, contexts = list(shape.num_spec_tokens), list(shape.context_lens)
        num_tokens = len(ks) + sum(ks)
        draft = sum(
            self.draft_step(sum(k >= j for k in ks), contexts) for j in range(1, max(ks, default=0) + 1)
        )
        if shape.num_draft_prefill_tokens > 0:
            draft += self.draft_prefill(shape.num_draft_prefill_tokens)
        verify = self.target_forward(num_tokens, contexts)
        other = self.engine.per_token_overhead_s * num_tokens
        return draft, verify, other

    def iteration_time(self, shape: IterationShape) -> float:
        return sum(self.phase_times(shape))

    def experts_touched(self, num_tokens: int) -> float:
        """Expected distinct experts per MoE layer (uniform routing, MoESD Eq. 8)."""
        return float(expected_experts(num_tokens, self.target.num_experts, self.target.top_k))

    def target_forward(self, num_tokens: int, context_lens: Sequence[int]) -> float:
        m, p = self.target, self.num_gpus
        experts = self.experts_touched(num_tokens)
        dense = self._roofline(
            m.dense_params / p, num_tokens, sum(context_lens) * m.kv_bytes_per_token / p, m
        )
        routed = 0.0
        if experts > 0.0:
            # Each touched expert's GEMMs see the tokens routed to it: T_exp = t * top_k / N (MoESD Eq. 10).
            tokens_per_expert = num_tokens * m.top_k / experts
            routed = m.num_layers * experts * self._roofline(m.expert_params / p, tokens_per_expert, 0.0, m)
        return dense + routed + self._all_reduces(num_tokens) + self._overhead(m)

    def draft_step(self, num_seqs: int, context_lens: Sequence[int]) -> float:
        """One draft forward of one token for `num_seqs` sequences (their caches: the longest contexts)."""
        if num_seqs == 0:
            return 0.0
        kv = sum(sorted(context_lens)[-num_seqs:]) * self.draft.kv_bytes_per_token
        return self._roofline(self.draft.dense_params, num_seqs, kv, self.draft) + self._overhead(self.draft)

    def draft_prefill(self, num_tokens: int) -> float:
        """The drafter catching up on `num_tokens` history tokens in one forward."""
        return self._roofline(self.draft.dense_params, num_tokens, 0.0, self.draft) + self._overhead(
            self.draft
        )

    def _roofline(self, params: float, rows: float, extra_bytes: float, model: ModelSpec) -> float:
        """Memory plus compute time of GEMMs over `params` weights with `rows` tokens, plus `extra_bytes` read.

        The two add (the smooth upper bound of the roofline's max: small-batch kernels do not overlap them
        well), and GEMM efficiency rises with rows as rows / (rows + gemm_half_tokens), so the compute time
        is 2 * params * (rows + half) / (peak * efficiency).
        """
        hw, eng = self.hardware, self.engine
        memory = (params * model.bytes_per_param + extra_bytes) / (
            hw.memory_bandwidth_bytes_per_s * eng.bandwidth_efficiency
        )
        compute = 2.0 * params * (rows + eng.gemm_half_tokens) / (hw.peak_flops * eng.flops_efficiency)
        return memory + compute

    def _all_reduces(self, num_tokens: int) -> float:
        """Two ring all-reduces per layer of the activations (after attention and after the MLP)."""
        p = self.num_gpus
        if p == 1:
            return 0.0
        m = self.target
        volume = 2.0 * (p - 1) / p * num_tokens * m.hidden_size * m.bytes_per_param
        per_all_reduce = volume / self.hardware.link_bandwidth_bytes_per_s + self.engine.link_latency_s
        return 2 * m.num_layers * per_all_reduce

    def _overhead(self, model: ModelSpec) -> float:
        return self.engine.step_overhead_s + model.num_layers * self.engine.layer_overhead_s
