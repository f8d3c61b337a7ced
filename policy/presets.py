"""Hardware and model presets: the simulator's ground truth (`Preset.truth`) and the policy's prior
(`Preset.cost_params`, an analytic roofline with default efficiencies that the truth does not share).

Every constant below is a public spec or a published measurement, cited beside it, except the engine
constants in `VLLM_ENGINE`: those were fitted the way MoESD's Algorithm 1 fits its model, on MoESD's Table 1
(2 x A800) only, and Table 2 (2 x H800, 4 x A800, 4 x L40) is predicted (`python -m bench.simulate --paper
moesd --fit` refits them). `MEASURED_PRESETS` hold parameters fitted on measured iterations instead.
"""

from __future__ import annotations

from dataclasses import dataclass

from policy.cost_model import CostModel, CostParams
from policy.cost_model_config import CostModelConfig
from policy.routing import RoutingConfig
from policy.truth import EngineSpec, HardwareSpec, IterationShape, ModelSpec, ServerTruth

__all__ = ["EngineSpec", "HardwareSpec", "ModelSpec", "Preset", "MeasuredPreset", "PRESETS", "PAPER_PRESETS"]

GB = 1e9

# -- hardware: NVIDIA data sheets (dense bf16 tensor FLOPs, i.e. without 2:4 sparsity; NVLink figures are
# the total of both directions, so one direction is half) -------------------------------------------------
# A800 SXM4 80GB: HBM2e 2,039 GB/s, bf16 312 TFLOPS, NVLink 400 GB/s.
A800 = HardwareSpec("A800-SXM4-80GB", 2039 * GB, 312e12, link_bandwidth_bytes_per_s=200 * GB)
# H800 SXM5: HBM3 3.35 TB/s, bf16 989 TFLOPS, NVLink 400 GB/s.
H800 = HardwareSpec("H800-SXM5", 3350 * GB, 989e12, link_bandwidth_bytes_per_s=200 * GB)
# L40: GDDR6 864 GB/s, bf16 181 TFLOPS; no NVLink: PCIe 4.0 x16, 64 GB/s both directions.
L40 = HardwareSpec("L40", 864 * GB, 181e12, link_bandwidth_bytes_per_s=32 * GB)
# H100 SXM5: HBM3 3.35 TB/s, bf16 989 TFLOPS, NVLink 900 GB/s.
H100 = HardwareSpec("H100-SXM", 3350 * GB, 989e12, link_bandwidth_bytes_per_s=450 * GB)
# H200 SXM: HBM3e 4.8 TB/s, bf16 989 TFLOPS, NVLink 900 GB/s.
H200 = HardwareSpec("H200-SXM", 4800 * GB, 989e12, link_bandwidth_bytes_per_s=450 * GB)

# -- models: parameter counts from the published config.json of each (bf16) --------------------------------
# Mixtral-8x7B: 32 layers, hidden 4096, 32 heads / 8 KV heads of 128, expert FFN 14336 (3 matrices),
# 8 experts top-2, vocab 32000: attention 41.9 M per layer + LM head 131 M = 1.47 B dense.
MIXTRAL_8X7B = ModelSpec(
    "Mixtral-8x7B",
    dense_params=1.47e9,
    num_layers=32,
    expert_params=176.2e6,
    num_experts=8,
    top_k=2,
    hidden_size=4096,
    kv_bytes_per_token=2 * 32 * 8 * 128 * 2,
)
# Qwen2-57B-A14B: 28 layers, hidden 3584, 28 heads / 4 KV heads of 128, 64 experts of FFN 2560 top-8,
# shared expert FFN 20480 (6.2 B over 28 layers), attention 0.82 B, LM head 0.54 B: 7.5 B dense.
QWEN2_57B_A14B = ModelSpec(
    "Qwen2-57B-A14B",
    dense_params=7.5e9,
    num_layers=28,
    expert_params=27.5e6,
    num_experts=64,
    top_k=8,
    hidden_size=3584,
    kv_bytes_per_token=2 * 28 * 4 * 128 * 2,
)
# Qwen2-0.5B (MoESD's draft for Qwen2): 24 layers, hidden 896, 2 KV heads of 64, FFN 4864, tied
# embeddings of 151936 x 896: 0.49 B.
QWEN2_0_5B = ModelSpec(
    "Qwen2-0.5B", dense_params=0.494e9, num_layers=24, hidden_size=896, kv_bytes_per_token=2 * 24 * 2 * 64 * 2
)
# EAGLE head for Mixtral (MoESD's draft for Mixtral; EAGLE, arXiv 2401.15077: an FC layer 2h -> h and one
# decoder layer, reusing the target's LM head): 33.5 M + 41.9 M + 176.2 M + the 131 M LM head read.
EAGLE_MIXTRAL = ModelSpec(
    "EAGLE-Mixtral-8x7B",
    dense_params=0.383e9,
    num_layers=1,
    hidden_size=4096,
    kv_bytes_per_token=2 * 1 * 8 * 128 * 2,
)
# Llama-3.1-70B: 80 layers, hidden 8192, 8 KV heads of 128 (a dense target of about Mixtral's size).
LLAMA_70B = ModelSpec(
    "Llama-3.1-70B",
    dense_params=70.6e9,
    num_layers=80,
    hidden_size=8192,
    kv_bytes_per_token=2 * 80 * 8 * 128 * 2,
)
# Llama-3.2-1B: 16 layers, hidden 2048, 8 KV heads of 64.
LLAMA_1B = ModelSpec(
    "Llama-3.2-1B",
    dense_params=1.24e9,
    num_layers=16,
    hidden_size=2048,
    kv_bytes_per_token=2 * 16 * 8 * 64 * 2,
)

# -- the engine: vLLM with speculative decoding, as MoESD ran it -------------------------------------------
# Fitted on MoESD Table 1 only (24 peak speedups, 2 x A800, Qwen2 and Mixtral) by least squares on relative
# errors within physical bounds set beforehand (`python -m bench.simulate --paper moesd --fit`; rms 5.9%);
# Table 2 is predicted with them. Two fitted values sit on a bound: the bandwidth efficiency (0.95) and the
# per-layer overhead (50 us); the fit put no cost on the per-forward and per-token CPU overheads, and
# charged verification to GEMMs at 11% of peak (the sum of memory and compute times, see `ServerTruth`).
VLLM_ENGINE = EngineSpec(
    bandwidth_efficiency=0.95,
    flops_efficiency=0.1103,
    gemm_half_tokens=0.0,
    step_overhead_s=0.0,
    layer_overhead_s=50e-6,
    per_token_overhead_s=0.0,
)


@dataclass(frozen=True)
class Preset:
    """A target on `num_gpus` GPUs (tensor parallel) and its draft on one of them."""

    name: str
    target: ModelSpec
    draft: ModelSpec
    hardware: HardwareSpec
    num_gpus: int = 1
    engine: EngineSpec = VLLM_ENGINE

    @property
    def routing(self) -> RoutingConfig:
        return RoutingConfig(self.target.num_experts, self.target.top_k)

    def truth(self) -> ServerTruth | MeasuredTruth:
        return ServerTruth(self.target, self.draft, self.hardware, self.num_gpus, self.engine)

    def cost_params(self) -> CostParams:
        """The analytic roofline with the hardware's default efficiencies: the policy's prior. No attention,
        communication, GEMM-efficiency or engine terms beyond fixed constants; the truth has all of them."""
        hw, target, draft = self.hardware, self.target, self.draft
        bandwidth = hw.memory_bandwidth_bytes_per_s * hw.bandwidth_efficiency * self.num_gpus
        flops = hw.peak_flops * hw.flops_efficiency * self.num_gpus
        draft_bandwidth = hw.memory_bandwidth_bytes_per_s * hw.bandwidth_efficiency
        draft_flops = hw.peak_flops * hw.flops_efficiency
        return CostParams(
            fixed_s=target.dense_params * target.bytes_per_param / bandwidth + hw.forward_overhead_s,
            per_expert_s=target.num_layers * target.expert_params * target.bytes_per_param / bandwidth,
            per_token_s=2.0 * target.active_params / flops,
            draft_fixed_s=draft.total_params * draft.bytes_per_param / draft_bandwidth
            + hw.forward_overhead_s,
            draft_per_token_s=2.0 * draft.active_params / draft_flops,
            draft_prefill_per_token_s=2.0 * draft.active_params / draft_flops,
            other_s=hw.iteration_overhead_s,
            other_per_token_s=hw.per_token_overhead_s,
        )


def _preset(name: str, target: ModelSpec, draft: ModelSpec, hardware: HardwareSpec, num_gpus: int) -> Preset:
    return Preset(name, target, draft, hardware, num_gpus)


# MoESD's setups (section 1.5): Qwen2-57B-A14B with Qwen2-0.5B, Mixtral-8x7B with an EAGLE head; the target
# tensor-parallel over the GPUs, the draft on one GPU ("the small draft model stays on one GPU").
PAPER_PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _preset("qwen2-57b-a14b-2xa800", QWEN2_57B_A14B, QWEN2_0_5B, A800, 2),
        _preset("mixtral-8x7b-2xa800", MIXTRAL_8X7B, EAGLE_MIXTRAL, A800, 2),
        _preset("qwen2-57b-a14b-2xh800", QWEN2_57B_A14B, QWEN2_0_5B, H800, 2),
        _preset("qwen2-57b-a14b-4xa800", QWEN2_57B_A14B, QWEN2_0_5B, A800, 4),
        _preset("qwen2-57b-a14b-4xl40", QWEN2_57B_A14B, QWEN2_0_5B, L40, 4),
    )
}
# The policy benchmarks' presets: the same pairs on 2 x H100 (both targets need more than one 80 GB GPU).
PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        _preset("mixtral-8x7b-h100", MIXTRAL_8X7B, EAGLE_MIXTRAL, H100, 2),
        _preset("qwen2-57b-a14b-h100", QWEN2_57B_A14B, QWEN2_0_5B, H100, 2),
        _preset("llama-70b-h100", LLAMA_70B, LLAMA_1B, H100, 2),
        _preset("qwen2-57b-a14b-h200", QWEN2_57B_A14B, QWEN2_0_5B, H200, 1),
    )
}


class MeasuredTruth:
    """A truth from measured `CostParams` (the policy's own model form), with the draft's catch-up prefill."""

    def __init__(self, routing: RoutingConfig, params: CostParams) -> None:
        self.model = CostModel(CostModelConfig(routing), params)

    def phase_times(self, shape: IterationShape) -> tuple[float, float, float]:
        ks = list(shape.num_spec_tokens)
        draft, verify, other = (float(t) for t in self.model.phase_times(len(ks), max(ks), sum(ks)))
        draft += self.model.params.draft_prefill_per_token_s * shape.num_draft_prefill_tokens
        return draft, verify, other

    def experts_touched(self, num_tokens: int) -> float:
        return float(self.model.expert_counts.predict(num_tokens))


@dataclass(frozen=True)
class MeasuredPreset(Preset):
    """A preset whose iteration times were fitted on measured iterations, not derived from the hardware."""

    measured: CostParams = CostParams(0.0, 0.0, 0.0, 0.0, 0.0)

    def truth(self) -> ServerTruth | MeasuredTruth:
        return MeasuredTruth(self.routing, self.measured)


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
# One H200, measured (session 39, `python -m bench.gpu_step --graphs`, `bench/results/gpu_step.json`): the full
# targets (random bf16 weights, transformers' grouped-GEMM experts and SDPA attention, a 512-token KV cache per
# sequence) verifying B * (K + 1) tokens at B = 1-64, K = 0-4, and Qwen2-0.5B's one-token step, each replayed
# from a CUDA graph; fitted in the cost model's form by `python -m bench.gpu_fit` (largest error
# 5.8% for Mixtral, 3.3% for Qwen2, over 25 steps each). Qwen2-0.5B drafts for both (MoESD's Mixtral draft
# is an EAGLE head, not measured). Not measured, so left out: the engine's work outside the forwards (vLLM's
# scheduling and sampling: a cost per step, which only makes each drafted token cheaper relative to it), and
# the drafter's catch-up prefill, priced at Qwen2-0.5B's FLOPs at the prior's GPU rate (`GPU_HARDWARE` in
# cluster.choosers: 2 * 0.49e9 / 3.5e14 s per token).
H200_DRAFT_PREFILL_PER_TOKEN_S = 2 * QWEN2_0_5B.dense_params / 3.5e14
H200_MIXTRAL_PARAMS = CostParams(
    fixed_s=8.215e-3,
    per_seq_s=3.111e-4,
    per_expert_s=4.161e-3,
    per_token_s=3.648e-5,
    draft_fixed_s=2.896e-3,
    draft_per_token_s=6.757e-5,
    draft_prefill_per_token_s=H200_DRAFT_PREFILL_PER_TOKEN_S,
)
H200_QWEN2_PARAMS = CostParams(
    fixed_s=1.111e-2,
    per_seq_s=2.355e-4,
    per_expert_s=5.378e-4,
    per_token_s=4.241e-5,
    draft_fixed_s=2.896e-3,
    draft_per_token_s=6.757e-5,
    draft_prefill_per_token_s=H200_DRAFT_PREFILL_PER_TOKEN_S,
)
MEASURED_PRESETS: dict[str, MeasuredPreset] = {
    "demo-moe-cpu": MeasuredPreset("demo-moe-cpu", DEMO_MOE, DEMO_DRAFT, DEMO_CPU, measured=DEMO_CPU_PARAMS),
    "mixtral-8x7b-h200-measured": MeasuredPreset(
        "mixtral-8x7b-h200-measured", MIXTRAL_8X7B, QWEN2_0_5B, H200, measured=H200_MIXTRAL_PARAMS
    ),
    "qwen2-57b-a14b-h200-measured": MeasuredPreset(
        "qwen2-57b-a14b-h200-measured", QWEN2_57B_A14B, QWEN2_0_5B, H200, measured=H200_QWEN2_PARAMS
    ),
}
