"""Hardware and model presets, and the cost-model parameters they imply (the simulator's ground truth).

Bytes read at memory bandwidth and FLOPs at peak, each scaled by an achievable efficiency. Parameter
counts come from the models' published configs; memory capacity is not modelled (ratios are what matter).
`MEASURED_PRESETS` hold parameters fitted on measured iterations instead (the demo pair on this CPU).
"""

from __future__ import annotations

from dataclasses import dataclass

from policy.cost_model import CostParams
from policy.routing import RoutingConfig


@dataclass(frozen=True)
class HardwareSpec:
    name: str
    memory_bandwidth_bytes_per_s: float
    peak_flops: float  # dense bf16
    bandwidth_efficiency: float = 0.8  # achieved fraction of the memory bandwidth
    flops_efficiency: float = 0.5  # achieved fraction of the peak FLOPs
    forward_overhead_s: float = 2e-4  # kernel launches and synchronisation per forward
    iteration_overhead_s: float = 5e-4  # scheduling and bookkeeping per iteration
    per_token_overhead_s: float = 2e-6  # sampling and verification per verification token

    def __post_init__(self) -> None:
        for name in ("memory_bandwidth_bytes_per_s", "peak_flops"):
            if getattr(self, name) <= 0.0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        for name in ("bandwidth_efficiency", "flops_efficiency"):
            if not 0.0 < getattr(self, name) <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in (0, 1]")


@dataclass(frozen=True)
class ModelSpec:
    name: str
    dense_params: float  # read by every forward: attention, norms, shared experts, LM head
    num_layers: int
    expert_params: float = 0.0  # one routed expert in one layer (0 for a dense model)
    num_experts: int = 0  # routed experts per layer (0 for a dense model)
    top_k: int = 0  # routed experts per token
    bytes_per_param: float = 2.0  # bf16

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
class Preset:
    """A target and its draft on one device."""

    name: str
    target: ModelSpec
    draft: ModelSpec
    hardware: HardwareSpec

    @property
    def routing(self) -> RoutingConfig:
        return RoutingConfig(self.target.num_experts, self.target.top_k)

    def cost_params(self) -> CostParams:
        hw, target, draft = self.hardware, self.target, self.draft
        bandwidth = hw.memory_bandwidth_bytes_per_s * hw.bandwidth_efficiency
        flops = hw.peak_flops * hw.flops_efficiency
        return CostParams(
            fixed_s=target.dense_params * target.bytes_per_param / bandwidth + hw.forward_overhead_s,
            per_expert_s=target.num_layers * target.expert_params * target.bytes_per_param / bandwidth,
            per_token_s=2.0 * target.active_params / flops,
            draft_fixed_s=draft.total_params * draft.bytes_per_param / bandwidth + hw.forward_overhead_s,
            draft_per_token_s=2.0 * draft.active_params / flops,
            other_s=hw.iteration_overhead_s,
            other_per_token_s=hw.per_token_overhead_s,
        )


H100 = HardwareSpec("H100-SXM", memory_bandwidth_bytes_per_s=3.35e12, peak_flops=989e12)

# Mixtral-8x7B: 32 layers, hidden 4096, expert FFN 14336 (3 matrices), 8 experts top-2, vocab 32000.
MIXTRAL_8X7B = ModelSpec(
    "Mixtral-8x7B", dense_params=1.47e9, num_layers=32, expert_params=176.2e6, num_experts=8, top_k=2
)
# Qwen2-57B-A14B: 28 layers, hidden 3584, 64 experts of FFN 2560 top-8, shared expert FFN 20480.
QWEN2_57B_A14B = ModelSpec(
    "Qwen2-57B-A14B", dense_params=7.5e9, num_layers=28, expert_params=27.5e6, num_experts=64, top_k=8
)
# A dense target of about Mixtral's total size, for the dense-versus-MoE comparison.
LLAMA_70B = ModelSpec("Llama-3.1-70B", dense_params=70.6e9, num_layers=80)
DRAFT_0_5B = ModelSpec("dense-0.5B-draft", dense_params=0.5e9, num_layers=24)
DRAFT_1B = ModelSpec("Llama-3.2-1B", dense_params=1.24e9, num_layers=16)

PRESETS: dict[str, Preset] = {
    "mixtral-8x7b-h100": Preset("mixtral-8x7b-h100", MIXTRAL_8X7B, DRAFT_0_5B, H100),
    "qwen2-57b-a14b-h100": Preset("qwen2-57b-a14b-h100", QWEN2_57B_A14B, DRAFT_0_5B, H100),
    "llama-70b-h100": Preset("llama-70b-h100", LLAMA_70B, DRAFT_1B, H100),
}


@dataclass(frozen=True)
class MeasuredPreset(Preset):
    """A preset whose iteration times were fitted on measured iterations, not derived from the hardware."""

    measured: CostParams = CostParams(0.0, 0.0, 0.0, 0.0, 0.0)

    def cost_params(self) -> CostParams:
        return self.measured


# The shipped demo pair (4-layer Mixtral, 8 experts top-2, fp32; 2-layer Llama draft), one torch thread
# each, in process (no actor calls). Fitted on 305 decode iterations at batch 1/4/16/32 x K = 0..4
# (`bench.compare.measure_iterations`, 24 output tokens per request). Its plain step: 8.9 ms at batch 1,
# 53 ms at batch 32; a draft step costs about half of it, so speculation pays little (best static K:
# 1.0-1.2x). Greedy acceptance per token (models/demo-moe/README.md): code 0.75, prose 0.55, synthetic 0.90.
DEMO_MOE = ModelSpec(
    "demo-moe", dense_params=1.85e6, num_layers=4, expert_params=0.39e6, num_experts=8, top_k=2
)
DEMO_DRAFT = ModelSpec("demo-draft", dense_params=2.2e6, num_layers=2)
DEMO_CPU = HardwareSpec("2-core CPU", memory_bandwidth_bytes_per_s=10e9, peak_flops=1e11)
DEMO_CPU_PARAMS = CostParams(
    fixed_s=4.7e-3,
    per_expert_s=1.6e-3,
    per_token_s=2.5e-4,
    draft_fixed_s=4.0e-3,
    draft_per_token_s=5.4e-4,
    other_s=1e-4,
    other_per_token_s=5e-6,
    per_seq_s=7.7e-4,
)
MEASURED_PRESETS: dict[str, MeasuredPreset] = {
    "demo-moe-cpu": MeasuredPreset("demo-moe-cpu", DEMO_MOE, DEMO_DRAFT, DEMO_CPU, DEMO_CPU_PARAMS),
}
