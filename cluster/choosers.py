"""Builds the K chooser a router runs locally, from the policy settings and what the target is.

The same chooser is the fallback when the central policy actor is unreachable (see policy_actor.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from cluster.config import PolicySettings
from policy.baselines import OffChooser, StaticChooser
from policy.batch_aware import BatchAwareChooser, BatchAwareConfig
from policy.cascade import CascadeChooser, CascadeConfig
from policy.cost_model import CostModel, CostModelConfig, CostParams
from policy.routing import RoutingConfig
from policy.stats import KChooser
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
        BatchAwareConfig(max_spec_tokens=max_spec_tokens), cost_model or new_cost_model(info, prior)
    )


def new_cost_model(info: TargetInfo, prior: CostParams = DEFAULT_PRIOR) -> CostModel:
    routing = RoutingConfig(num_experts=info.num_experts, top_k=info.top_k if info.num_experts else 0)
    return CostModel(CostModelConfig(routing=routing), prior)


def shared_chooser_factory(
    settings: PolicySettings, info: TargetInfo, max_spec_tokens: int, prior: CostParams = DEFAULT_PRIOR
) -> Callable[[], KChooser]:
    """For the central actor: one chooser per router, all sharing one cost model (one target hardware).

    The cost model is built by the first call, in the actor's process: the factory travels to the actor
    pickled, and numpy state that crosses Ray arrives read-only."""
    shared: list[CostModel] = []

    def make() -> KChooser:
        if not shared:
            shared.append(new_cost_model(info, prior))
        return make_chooser(settings, info, max_spec_tokens, shared[0])

    return make
