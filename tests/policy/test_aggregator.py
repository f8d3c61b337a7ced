"""The central aggregator: many routers, windows and versions, a shared cost model, expiry."""

from __future__ import annotations

import pytest

from policy.aggregator import AggregatorConfig, PolicyAggregator
from policy.batch_aware import BatchAwareChooser, BatchAwareConfig
from policy.cascade import CascadeChooser, CascadeConfig
from policy.cost_model import CostModel
from policy.cost_model_config import CostModelConfig
from policy.presets import PRESETS
from policy.stats import IterationStats, RequestIterationStats

MIXTRAL = PRESETS["mixtral-8x7b-h100"]


def stats_for(source: str, iteration: int, ks: dict[str, int]) -> IterationStats:
    requests = [RequestIterationStats(r, k, k, k + 1, 10) for r, k in ks.items()]
    total = len(ks) + sum(ks.values())
    return IterationStats(iteration, len(ks), requests, total, 0.001, 0.03, 0.001, source=source)


def cascade_aggregator(**overrides: int) -> PolicyAggregator:
    return PolicyAggregator(AggregatorConfig(**overrides), lambda: CascadeChooser(CascadeConfig()))


def test_a_decision_holds_for_its_window_and_versions_increase() -> None:
    aggregator = cascade_aggregator(window_iterations=4)
    first = aggregator.decide("router-a", ["x", "y"], iteration=0, now_s=0.0)
    assert (first.version, first.first_iteration, first.num_iterations) == (1, 0, 4)
    assert aggregator.decide("router-a", ["x"], iteration=3, now_s=0.1) is first
    second = aggregator.decide("router-a", ["x", "y"], iteration=4, now_s=0.2)
    assert second.version == 2
    # A request the cached decision does not list gets a fresh decision at once.
    third = aggregator.decide("router-a", ["x", "y", "z"], iteration=5, now_s=0.3)
    assert third.version == 3 and set(third.num_spec_tokens) == {"x", "y", "z"}


def test_each_router_has_its_own_chooser_and_all_share_the_cost_model() -> None:
    model = CostModel(
        CostModelConfig(MIXTRAL.routing, min_samples=8, refit_interval=8), MIXTRAL.cost_params()
    )
    built: list[BatchAwareChooser] = []

    def make() -> BatchAwareChooser:
        built.append(BatchAwareChooser(BatchAwareConfig(), model))
        return built[-1]

    aggregator = PolicyAggregator(AggregatorConfig(), make)
    for i in range(8):
        for source, ids in (("a", ["a1", "a2"]), ("b", ["b1"])):
            decision = aggregator.decide(source, ids, iteration=i, now_s=float(i))
            aggregator.ingest(
                stats_for(source, i, {r: decision.num_spec_tokens[r] for r in ids}), now_s=float(i)
            )
    assert len(built) == 2
    assert all(c.cost_model is model for c in built)
    assert model.params != MIXTRAL.cost_params()  # refitted from both routers' 16 iterations


def test_silent_requests_expire_by_iterations_and_by_time() -> None:
    aggregator = cascade_aggregator(window_iterations=1, max_silent_iterations=10, max_silent_s=5.0)
    aggregator.ingest(stats_for("a", 0, {"old": 0, "kept": 0}), now_s=0.0)
    aggregator.ingest(stats_for("b", 0, {"other": 0}), now_s=0.0)
    for i in range(1, 12):
        aggregator.ingest(stats_for("a", i, {"kept": 0}), now_s=0.1 * i)
    assert aggregator.expire(now_s=1.2) == ["old"]  # its router moved on 11 iterations
    assert aggregator.expire(now_s=5.5) == ["other"]  # router b went silent for 5.5 s
    assert aggregator.num_requests == 1


def test_ended_requests_are_released_from_their_chooser() -> None:
    aggregator = cascade_aggregator()
    aggregator.decide("a", ["x"], iteration=0, now_s=0.0)
    aggregator.release("x")
    aggregator.release("never-seen")  # harmless
    assert aggregator.num_requests == 0


def test_config_rejects_bad_values() -> None:
    with pytest.raises(ValueError, match="window_iterations=0"):
        AggregatorConfig(window_iterations=0)
    with pytest.raises(ValueError, match="max_silent_s=0"):
        AggregatorConfig(max_silent_s=0.0)
