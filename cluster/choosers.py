"""Builds the K chooser a router runs locally, from the policy settings and what the target is.

The same chooser is the fallback when the central policy actor is unreachable (see policy_actor.py).
"""

from __future__ import annotations

from collections.abc import Callable

from cluster.config import PolicySettings
from policy.baselines import OffChooser, StaticChooser
from policy.batch_aware import BatchAwareChooser, BatchAwareConfig
from policy.cascade import CascadeChooser, CascadeConfig
from policy.cost_model import CostModel, CostModelConfig, CostParams
from policy.routing import RoutingConfig
from policy.stats import KChooser
from workers.target import TargetInfo

# Starting point of the online cost-model fit (seconds); replaced by the fit after a few iterations.
PRIOR = CostParams(
    fixed_s=2e-3,
    per_expert_s=2e-4,
    per_token_s=5e-5,
    draft_fixed_s=1e-3,
    draft_per_token_s=2e-5,
    other_s=3e-4,
)


def make_chooser(
    settings: PolicySettings, info: TargetInfo, max_spec_tokens: int, cost_model: CostModel | None = None
) -> KChooser:
    if settings.kind == "off" or max_spec_tokens == 0:
        return OffChooser()
    if settings.kind == "static":
        return StaticChooser(min(settings.num_spec_tokens, max_spec_tokens))
    if settings.kind == "cascade":
        return CascadeChooser(CascadeConfig(max_spec_tokens=max_spec_tokens))
    return BatchAwareChooser(
        BatchAwareConfig(max_spec_tokens=max_spec_tokens), cost_model or new_cost_model(info)
    )


def new_cost_model(info: TargetInfo) -> CostModel:
    routing = RoutingConfig(num_experts=info.num_experts, top_k=info.top_k if info.num_experts else 0)
    return CostModel(CostModelConfig(routing=routing), PRIOR)


def shared_chooser_factory(
    settings: PolicySettings, info: TargetInfo, max_spec_tokens: int
) -> Callable[[], KChooser]:
    """For the central actor: one chooser per router, all sharing one cost model (one target hardware)."""
    cost_model = new_cost_model(info)
    return lambda: make_chooser(settings, info, max_spec_tokens, cost_model)
