"""The cost probe: when it runs a level above the choice, for how long, and how often."""

from __future__ import annotations

import numpy as np

from policy.batch_aware import BatchAwareConfig
from policy.cost_model import CostModel, CostModelConfig
from policy.cost_probe import CostProbe
from policy.presets import PRESETS
from policy.stats import IterationStats, RequestIterationStats

MIXTRAL = PRESETS["mixtral-8x7b-h100"]
BATCH = 4


def observe(model: CostModel, k: int, iteration: int) -> None:
    """A batch-4 iteration at K = k for every request, timed 10 ms plus 2 ms per verified draft."""
    requests = [RequestIterationStats(f"r{i}", k, 0, 1, 10) for i in range(BATCH)]
    model.observe(
        IterationStats(iteration, BATCH, requests, BATCH * (1 + k), 0.0, 0.01 + 0.002 * BATCH * k, 0.0)
    )


def times(step_s: float) -> np.ndarray:
    """Seconds by (max K, sum K) for batch 4 at max K 4: 10 ms plain, `step_s` more per draft step."""
    return 0.01 + step_s * np.arange(5)[:, None] + np.zeros((1, 4 * BATCH + 1))


def test_a_level_the_choices_left_is_probed_for_a_few_iterations_once_per_spacing() -> None:
    config = BatchAwareConfig(max_spec_tokens=4)
    model = CostModel(CostModelConfig(MIXTRAL.routing), MIXTRAL.cost_params())
    probe = CostProbe(config, model)
    rates, chosen = np.full(BATCH, 0.9), [1] * BATCH
    observe(model, 2, 0)  # K = 2 measured once, then K = 1 for a while
    iteration = 1
    for _ in range(config.probe_spacing - 1):
        observe(model, 1, iteration)
        iteration += 1
        assert probe.apply(chosen, chosen, rates, times(0.002)) == chosen  # K = 2 measured recently enough
    observe(model, 1, iteration)
    iteration += 1
    probed = [probe.apply(chosen, chosen, rates, times(0.002)) for _ in range(2 * config.probe_iterations)]
    assert probed == [[2] * BATCH] * config.probe_iterations + [chosen] * config.probe_iterations
    assert probe.num_probes == 1
    # The engine did not verify the probe (no row at K = 2 came): not again before probe_spacing choices.
    for _ in range(config.probe_spacing - 2 * config.probe_iterations):
        observe(model, 1, iteration)
        iteration += 1
        assert probe.apply(chosen, chosen, rates, times(0.002)) == chosen
    assert probe.apply(chosen, chosen, rates, times(0.002)) == [2] * BATCH
    assert probe.num_probes == 2


def test_no_probe_far_below_the_choice_above_the_top_k_from_unmeasured_ground_or_from_a_test() -> None:
    config = BatchAwareConfig(max_spec_tokens=4)
    model = CostModel(CostModelConfig(MIXTRAL.routing), MIXTRAL.cost_params())
    probe = CostProbe(config, model)
    rates = np.full(BATCH, 0.9)
    assert probe.apply([1] * BATCH, [1] * BATCH, rates, times(0.002)) == [1] * BATCH  # K = 1 not measured yet
    observe(model, 1, 0)
    # At 0.9, K = 2 over K = 1: 2.71 / 1.9 tokens for (10 + 2 * 20) / (10 + 20) ms, 0.86x: within 30%.
    # At 0.2 (1.24 / 1.2 tokens), 0.62x: not probed.
    assert probe.apply([1] * BATCH, [1] * BATCH, np.full(BATCH, 0.2), times(0.02)) == [1] * BATCH
    assert (
        probe.apply([0] * BATCH, [0] * BATCH, rates, times(0.002)) == [0] * BATCH
    )  # plain: nothing to raise
    assert probe.apply([1, 0, 0, 0], [1, 0, 0, 0], rates, times(0.002)) == [
        1,
        0,
        0,
        0,
    ]  # 1 / 4 and 2 / 4 round alike
    assert probe.apply([1] * BATCH, [0] * BATCH, rates, times(0.02)) == [1] * BATCH  # a test's drafting
    assert probe.apply([1] * BATCH, [1] * BATCH, rates, times(0.02)) == [2] * BATCH
    assert probe.num_probes == 1
    alone = CostModel(CostModelConfig(MIXTRAL.routing), MIXTRAL.cost_params())
    requests = [RequestIterationStats("r0", 1, 0, 1, 10)]
    alone.observe(IterationStats(0, 1, requests, 2, 0.0, 0.012, 0.0))  # K = 1 measured at batch 1
    # Alone in the batch: no probe.
    assert CostProbe(config, alone).apply([1], [1], rates[:1], times(0.02)[:, :5]) == [1]
    observe(model, 4, 1)
    assert (
        CostProbe(config, model).apply([4] * BATCH, [4] * BATCH, rates, times(0.002)) == [4] * BATCH
    )  # the top K
