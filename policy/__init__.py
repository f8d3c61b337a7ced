"""K policies for speculative decoding on MoE targets: statistics in, num_spec_tokens per request out.

Plain Python with numpy and scipy; no torch, no Ray. The simulator lives in `policy.simulator`.
"""

from policy.aggregator import AggregatorConfig, PolicyAggregator
from policy.baselines import BatchSizeTableChooser, BatchSizeTableConfig, OffChooser, StaticChooser
from policy.batch_aware import BatchAwareChooser, BatchAwareConfig
from policy.cascade import CascadeChooser, CascadeConfig
from policy.cost_model import CostModel, CostParams
from policy.cost_model_config import CostModelConfig
from policy.guard import GuardConfig, MeasuredGuard
from policy.presets import PRESETS, Preset
from policy.routing import RoutingConfig
from policy.stats import Decision, IterationStats, KChooser, RequestIterationStats

__all__ = [
    "PRESETS",
    "AggregatorConfig",
    "BatchAwareChooser",
    "BatchAwareConfig",
    "BatchSizeTableChooser",
    "BatchSizeTableConfig",
    "CascadeChooser",
    "CascadeConfig",
    "CostModel",
    "CostModelConfig",
    "CostParams",
    "Decision",
    "GuardConfig",
    "IterationStats",
    "KChooser",
    "MeasuredGuard",
    "OffChooser",
    "PolicyAggregator",
    "Preset",
    "RequestIterationStats",
    "RoutingConfig",
    "StaticChooser",
]
