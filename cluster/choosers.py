"""Builds a router's K chooser: the whole stack, in one place (`router_chooser`), and the local chooser at
its bottom (`make_chooser`), which is also what the central policy actor runs per router.

Who decides K, for each request of an iteration, outermost first:
1. the request itself: a numeric `num_spec_tokens` bypasses the stack ("auto" asks it);
2. the measured guard (`policy.guard.MeasuredGuard`): K = 0 for the whole batch while it holds (the
   chooser's iterations measured slower than plain ones) and on its periodic plain baselines; otherwise
   what the layer below chose. It asks that layer every iteration, holds included;
3. the central window (`cluster.policy_actor.PolicyClient`): while a central decision covers the
   iteration, its K for the requests it lists; otherwise (no answer yet, actor unreachable, requests the
   decision does not list) the local chooser's K;
4. the local chooser (batch-aware, Cascade, static or off), which observes every iteration either way.
The engine then caps each K at max_spec_tokens, the tokens the request may still emit and its context.
`off` and `static` run the local chooser alone; `use_central_actor: false` drops layer 3.
Every layer reports its counters through `gauges()` (the router exports them as metrics).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass

from cluster.config import AppConfig, PolicySettings, resolve_model_path
from policy.baselines import OffChooser, StaticChooser
from policy.batch_aware import BatchAwareChooser, BatchAwareConfig
from policy.cascade import CascadeChooser, CascadeConfig
from policy.cost_model import CostModel, CostParams
from policy.cost_model_config import CostModelConfig, DraftPadding
from policy.guard import MeasuredGuard
from policy.routing import RoutingConfig
from policy.stats import KChooser
from workers.checkpoint import checkpoint_dtype
from workers.config import ModelConfig
from workers.target import TargetInfo


@dataclass(frozen=True)
class Hardware:
    """Nominal machine figures for the cost model's starting point (the online fit replaces it)."""

    bandwidth_bytes_s: float = 10e9  # weights streamed per second (measured here: ~11 GB/s on 2 cores)
    flops: float = 1e11
    layer_overhead_s: float = 5e-4  # per layer per forward: kernel launches, Python (CPU-sized)
    sequence_overhead_s: float = 2e-4  # per layer per sequence in a forward: attention over its cache,
    # ragged-batch bookkeeping (CPU-sized; the demo pair measured 0.19 ms in the target, 0.27 in the draft)
    call_overhead_s: float = 2e-3  # per iteration outside the forwards: actor calls, bookkeeping


# A GPU's figures, fitted (`python -m bench.gpu_fit bench/results/gpu_step.json`) on one H200's
# steps replayed from CUDA graphs: full Mixtral-8x7B and Qwen2-57B-A14B verifying B * (K + 1) tokens at
# B = 1-64 (rms error 7% over the 50 steps) and Qwen2-0.5B's draft step (within 6%), through transformers'
# kernels (vLLM's fused ones read weights faster; the online fit takes over either way). What they fix is the
# shape: with the CPU's figures, a GPU's step verifying 4 drafts per sequence at batch 32 was predicted at
# 2.8x a plain one (measured 1.08x: at medium batch every expert is read anyway, MoESD's regime), so the
# chooser would start a GPU server believing drafting a loss where it pays most. These put it at 1.2x.
# The call overhead is the CPU's: not measured on a GPU here.
GPU_HARDWARE = Hardware(
    bandwidth_bytes_s=2.4e12, flops=3.5e14, layer_overhead_s=1.0e-4, sequence_overhead_s=3.0e-6
)


def analytic_prior(
    target: ModelConfig, draft: ModelConfig | None, bytes_per_param: int, hardware: Hardware | None = None
) -> CostParams:
    """MoESD-style times from the models' shapes: bytes read / bandwidth, plus per-layer overheads."""
    hw = hardware or Hardware()
    bw, bpp = hw.bandwidth_bytes_s, bytes_per_param
    expert_params = 3 * target.hidden_size * target.moe_intermediate_size
    num_moe = len(target.moe_layer_ids)
    active = _dense_params(target) + num_moe * target.top_k * expert_params
    draft_params = _dense_params(draft) if draft is not None else 0
    draft_layers = draft.num_layers if draft is not None else 0
    return CostParams(
        fixed_s=_dense_params(target) * bpp / bw + target.num_layers * hw.layer_overhead_s,
        per_expert_s=expert_params * bpp * num_moe / bw,
        per_token_s=2 * active / hw.flops,
        draft_fixed_s=draft_params * bpp / bw + draft_layers * hw.layer_overhead_s,
        # A draft step runs one token per drafting sequence: its per-token cost is a per-sequence cost.
        draft_per_token_s=2 * draft_params / hw.flops + draft_layers * hw.sequence_overhead_s,
        draft_prefill_per_token_s=2 * draft_params / hw.flops,
        other_s=hw.call_overhead_s,
        per_seq_s=target.num_layers * hw.sequence_overhead_s,
        draft_call_s=hw.call_overhead_s if draft is not None else 0.0,
    )


def _dense_params(config: ModelConfig) -> int:
    """Parameters every forward reads whatever the routing: attention, dense MLPs, routers, lm_head."""
    h, q, kv = config.hidden_size, config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    moe_layers = config.moe_layer_ids
    attention = config.num_layers * h * (2 * q + 2 * kv)
    dense_mlps = (config.num_layers - len(moe_layers)) * 3 * h * config.intermediate_size
    routers = len(moe_layers) * h * (config.num_experts + 3 * config.shared_expert_intermediate_size)
    return attention + dense_mlps + routers + config.vocab_size * h


# Used when nothing is known about the models (tests of the choosers alone).
DEFAULT_PRIOR = CostParams(
    fixed_s=2e-3,
    per_expert_s=2e-4,
    per_token_s=5e-5,
    draft_fixed_s=1e-3,
    draft_per_token_s=2e-5,
    other_s=3e-4,
)


def router_chooser(config: AppConfig, info: TargetInfo) -> KChooser:
    """The stack of the module docstring for one router, its prior from the served models' shapes."""
    policy, max_spec, model = config.policy, config.engine.max_spec_tokens, config.model
    target = ModelConfig.from_dir(resolve_model_path(model.target))
    draft = ModelConfig.from_dir(resolve_model_path(model.draft)) if model.draft else None
    dtype = checkpoint_dtype(resolve_model_path(model.target)) if model.dtype == "auto" else model.dtype
    prior = analytic_prior(target, draft, 2 if "16" in str(dtype) else 4)
    local = make_chooser(policy, info, max_spec, prior=prior)
    if policy.kind in ("off", "static"):
        return local
    if not policy.use_central_actor:
        return MeasuredGuard(local)
    # Imported here: this module is also the vllm backend's, inside vLLM's engine core, where Ray may not be.
    from cluster.policy_actor import PolicyClient, policy_actor_handle

    factory = shared_chooser_factory(policy, info, max_spec, prior)
    client = PolicyClient(
        f"router-{uuid.uuid4().hex[:8]}",
        local,
        lambda: policy_actor_handle(policy.actor_name, policy.window_iterations, factory),
    )
    # This router's batch must measure faster drafting than plain, whatever the policy's model says.
    return MeasuredGuard(client)


def make_chooser(
    settings: PolicySettings,
    info: TargetInfo,
    max_spec_tokens: int,
    cost_model: CostModel | None = None,
    prior: CostParams = DEFAULT_PRIOR,
) -> KChooser:
    if settings.kind == "off" or max_spec_tokens == 0:
        return OffChooser()
    if settings.kind == "static":
        return StaticChooser(min(settings.num_spec_tokens, max_spec_tokens))
    if settings.kind == "cascade":
        return CascadeChooser(CascadeConfig(max_spec_tokens=max_spec_tokens))
    return BatchAwareChooser(
        BatchAwareConfig(
            max_spec_tokens=max_spec_tokens,
            weighs_catch_up=settings.weighs_catch_up,
            min_predicted_gain=settings.min_predicted_gain,
        ),
        cost_model or new_cost_model(info, prior),
    )


def new_cost_model(
    info: TargetInfo, prior: CostParams = DEFAULT_PRIOR, draft_padding: DraftPadding = "none"
) -> CostModel:
    """`draft_padding`: the drafts the engine's drafter runs beyond each request's K, see CostModelConfig."""
    routing = RoutingConfig(num_experts=info.num_experts, top_k=info.top_k if info.num_experts else 0)
    return CostModel(CostModelConfig(routing=routing, draft_padding=draft_padding), prior)


def shared_chooser_factory(
    settings: PolicySettings,
    info: TargetInfo,
    max_spec_tokens: int,
    prior: CostParams = DEFAULT_PRIOR,
    draft_padding: DraftPadding = "none",
) -> Callable[[], KChooser]:
    """For the central actor: one chooser per router, all sharing one cost model (one target hardware).

    The cost model is built by the first call, in the actor's process: the factory travels to the actor
    pickled, and numpy state that crosses Ray arrives read-only."""
    shared: list[CostModel] = []

    def make() -> KChooser:
        if not shared:
            shared.append(new_cost_model(info, prior, draft_padding))
        return make_chooser(settings, info, max_spec_tokens, shared[0])

    return make
