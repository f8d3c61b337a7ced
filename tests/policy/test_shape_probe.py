"""The shape probes: a batch that drafts alike measures one K up where its shape was never measured, and a batch
whose optimum is plain decoding the unmeasured K that the model puts near it."""

from __future__ import annotations

import numpy as np
import pytest

from policy.batch_aware import BatchAwareChooser, BatchAwareConfig
from policy.cost_model import CostModel
from policy.cost_model_config import CostModelConfig
from policy.routing import RoutingConfig
from policy.stats import IterationStats, RequestIterationStats
from policy.utility import expected_etr
from tests.policy.regime_loop import (
    REGIME,
    REGIME_BATCH_1,
    regime_batch_1_seconds,
    regime_chooser,
    regime_verify_s,
    waves,
)


def _saturating_verify_s(num_tokens: int) -> float:
    """A target whose verification stops growing beyond 96 tokens (3 drafts a sequence at batch 32): the
    linear form, fitted where it grows, prices K = 3 / 4 at 1.27 / 1.54x a K = 2 step, where they run 1.02 /
    1.05x (served on the regime pair at synthetic 32: the model 1.30 / 1.57x, measured 1.13 / 1.17x)."""
    return REGIME.fixed_s + 0.002 * min(num_tokens, 96)


def _late_mean_k(seed: int, **overrides: float) -> float:
    chooser = regime_chooser(**overrides)
    ks = waves(chooser, [0.85], 6, seed, verify_s=_saturating_verify_s)
    return float(np.mean(ks[80:]))  # the last two waves


def test_a_batch_that_drafts_alike_finds_the_k_its_model_overprices() -> None:
    """Requests that accept alike (0.85) keep one K (`policy.traffic_prior`), so nothing measures the K the
    model overprices; with the probe every seed reaches K = 4, where the truth pays most (1.37x K = 2)."""
    probed = [_late_mean_k(seed) for seed in range(4)]
    unprobed = [_late_mean_k(seed, shape_probe_rows=0) for seed in range(4)]
    assert min(unprobed) < 2.5, unprobed  # the premise: without the probe a seed stays at K = 2 or below
    assert min(probed) > 3.8, probed


def _tokens_per_second(ks: list[list[int]], acceptance: float) -> float:
    """Expected committed tokens per second of these iterations at the regime's costs (linear verification)."""
    tokens = seconds = 0.0
    for row in ks:
        k = np.array(row)
        tokens += float(((1.0 - acceptance ** (k + 1)) / (1.0 - acceptance)).sum())
        draft_s = k.max() * (REGIME.draft_fixed_s + len(k) * REGIME.draft_per_token_s)
        seconds += draft_s + regime_verify_s(len(k) + int(k.sum()))
    return tokens / seconds


@pytest.mark.parametrize("seed", range(3))
def test_where_the_model_is_right_the_probe_costs_little(seed: int) -> None:
    """The form is the truth (linear verification; K = 2 and 3 within 1% of each other): the probes measure
    what the model predicted, and the batch runs within 2% of the unprobed one's throughput (a probe runs at
    most 5% below the model's optimum, until a refit counts it)."""

    def later(**overrides: float) -> float:
        chooser = regime_chooser(**overrides)
        return _tokens_per_second(waves(chooser, [0.85], 5, seed, verify_s=regime_verify_s)[40:], 0.85)

    assert later() >= 0.98 * later(shape_probe_rows=0), (later(), later(shape_probe_rows=0))


def test_the_probe_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="shape_probe"):
        BatchAwareConfig(shape_probe_margin=1.0)
    with pytest.raises(ValueError, match="shape_probe"):
        BatchAwareConfig(shape_probe_rows=-1)


def _batch_1_chooser(**overrides: float) -> tuple[BatchAwareChooser, CostModel]:
    """A chooser at batch 1 (`REGIME_BATCH_1`: at the traffic's 0.7, K = 1 loses 5% to plain decoding, and
    K = 2 / 3 / 4 run 1.015 / 1.003 / 0.959x plain, under the bar of `min_predicted_gain` and within
    `shape_probe_margin`) whose plain steps and K = 1 tests are measured (16 each, at the prior's times),
    K = 2-4 not, after a request that accepted 0.75 (the traffic's figure for the next)."""
    model = CostModel(CostModelConfig(RoutingConfig(0, 0), draft_padding="batch"), REGIME_BATCH_1)
    chooser = BatchAwareChooser(
        BatchAwareConfig(max_spec_tokens=4, min_population_requests=0, **overrides), model
    )
    for i in range(32):
        k, accepted = (1, int(i // 2 % 4 != 0)) if i % 2 else (0, 0)  # 3 of 4 accepted
        draft_s, verify_s = regime_batch_1_seconds(k)
        requests = [RequestIterationStats("old", k, accepted, accepted + 1, 100 + i)]
        chooser.observe(IterationStats(i, 1, requests, 1 + k, draft_s, verify_s, 0.0))
    chooser.release("old")
    model.refit()
    return chooser, model


def test_a_plain_optimum_probes_the_unmeasured_k_that_the_model_puts_near_it() -> None:
    """With K = 1 measured and losing, the model prices K = 2-4 from K = 1's shape within 5% of plain decoding
    (the premise): a new request drafts at the best of them, and the requests after it measure each (here at
    the prior's times: the model was right), after which none is probed. Without the probe, nothing measures
    them."""
    chooser, model = _batch_1_chooser()
    rate = chooser._population.rate
    plain = 1.0 / model.iteration_time([0])
    per_k = [expected_etr(rate, k) / model.iteration_time([k]) / plain for k in range(5)]
    assert max(per_k[1:]) < 1.0 + chooser.config.min_predicted_gain  # the premise: the optimum is plain
    assert min(per_k[2:]) > 1.0 - chooser.config.shape_probe_margin  # ... and K = 2-4 within the margin
    unprobed, _ = _batch_1_chooser(shape_probe_rows=0)
    assert unprobed.choose(["new"])["new"] <= 1  # plain, or its test at K = 1
    assert chooser.choose(["new"])["new"] == int(np.argmax(per_k[2:])) + 2
    chooser.release("new")
    for i in range(4):  # requests of 8 steps, alone, each accepting 2 drafts a step
        for j in range(8):
            k = chooser.choose([f"r{i}"])[f"r{i}"]
            draft_s, verify_s = regime_batch_1_seconds(k)
            requests = [RequestIterationStats(f"r{i}", k, min(k, 2), min(k, 2) + 1, 100 + j)]
            chooser.observe(IterationStats(8 * i + j, 1, requests, 1 + k, draft_s, verify_s, 0.0))
        chooser.release(f"r{i}")
        model.refit()
    rows = [model.num_shape_rows(1, k) for k in range(5)]
    assert min(rows) >= chooser.config.shape_probe_rows, rows
    times = chooser._time_table(1)
    assert chooser._plain_shape_probe(["later"], np.array([rate]), times) == 0
