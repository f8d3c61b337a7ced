"""The traffic's prior: its strength from how alike requests accept, and what the chooser does with it."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from policy.batch_aware import BatchAwareConfig
from policy.traffic_prior import TrafficSpread
from tests.policy.regime_loop import regime_chooser, step, waves


def _spread_of(rates: list[float], seed: int, trials: int = 16) -> float | None:
    rng = np.random.default_rng(seed)
    spread = TrafficSpread(window=32, min_requests=8, min_strength=2.0, max_strength=64.0)
    for rate in rates:
        accepted = float(rng.binomial(trials, rate))
        spread.record(accepted, trials - accepted)
    return spread.strength()


@pytest.mark.parametrize("seed", range(5))
def test_requests_that_accept_alike_give_a_strong_prior_and_unlike_ones_a_weak_one(seed: int) -> None:
    """Served records (regime pair) read 20-100 on one workload and 4-6 on mixed code and prose."""
    alike = _spread_of([0.85] * 32, seed)
    unlike = _spread_of([0.4, 0.9] * 16, seed)
    assert alike is not None and alike >= 20.0, alike
    assert unlike is not None and unlike <= 6.0, unlike
    assert _spread_of([0.85] * 7, seed) is None  # too few requests to tell


def test_a_spread_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="window"):
        TrafficSpread(window=4, min_requests=8, min_strength=2.0, max_strength=64.0)
    with pytest.raises(ValueError, match="strengths"):
        TrafficSpread(window=32, min_requests=8, min_strength=8.0, max_strength=4.0)
    with pytest.raises(ValueError, match="traffic_prior_requests"):
        BatchAwareConfig(traffic_prior_requests=-1)


@pytest.mark.parametrize("seed", range(3))
def test_requests_that_accept_alike_keep_one_k_through_their_first_drafts(seed: int) -> None:
    """Served on the regime pair at synthetic 32, a wave's requests drafted at K 1-4 during their tests,
    following their first two or three verifications, where they all accepted alike (about 0.85). With the
    traffic's prior, after a first wave has shown how alike they are, the next waves keep one K."""

    def off_the_max(ks: list[list[int]]) -> float:  # request-iterations below their iteration's max K
        later = ks[20:]  # after the first wave
        return sum(sum(k < max(row) for k in row) for row in later) / (32 * len(later))

    with_prior = off_the_max(waves(regime_chooser(), [0.85], 4, seed))
    without = off_the_max(waves(regime_chooser(traffic_prior_requests=0), [0.85], 4, seed))
    assert without > 0.05, without  # the premise: noise moves K apart without the prior
    assert with_prior < without / 3, (with_prior, without)


@pytest.mark.parametrize("seed", range(3))
def test_requests_that_accept_unlike_still_get_their_own_k(seed: int) -> None:
    """Mixed traffic (half the requests at 0.95, half at 0.3): the prior stays weak, and the two halves
    draft apart."""
    chooser = regime_chooser()
    ks = np.array(waves(chooser, [0.95, 0.3], 4, seed)[40:])
    assert chooser._traffic_prior.strength is not None and chooser._traffic_prior.strength < 6.0
    assert ks[:, 0::2].mean() > ks[:, 1::2].mean() + 1.5, (ks[:, 0::2].mean(), ks[:, 1::2].mean())


def test_a_request_unlike_the_traffic_is_estimated_from_its_own_counts() -> None:
    """After traffic that accepts alike at 0.85, one request that accepts nothing: the strong prior would
    hold it near the traffic's figure for its life; its counts disagree, and it is estimated from them."""
    chooser = regime_chooser()
    waves(chooser, [0.85], 2, seed=0)
    assert chooser._traffic_prior.strength == 64.0
    ids = [f"late{i}" for i in range(32)]
    for i in range(10):
        chosen = chooser.choose(ids)
        step(chooser, 100 + i, chosen, {r: 0 if r == "late0" else k for r, k in chosen.items()})
    chosen = chooser.choose(ids)
    assert chosen["late0"] < min(k for r, k in chosen.items() if r != "late0"), chosen


@pytest.mark.parametrize("seed", range(3))
def test_after_a_shift_a_wave_leaves_the_old_traffics_figure_within_a_few_iterations(seed: int) -> None:
    """Traffic at 0.65 (alike: a strong prior; K = 1), then a wave at 0.9. Held to the old figure, served on the
    regime pair, such a wave drafted at K = 1 for 10 iterations and reached K = 4 after 20 (here it stays at
    K = 1); the batch's own counts move its prior's mean, and it drafts as without the prior, or sooner."""

    def mean_k(ks: list[list[int]]) -> float:
        return float(np.mean(ks[2:8]))  # the shifted wave's iterations 2-7

    ks_with: list[list[int]] = []
    ks_without: list[list[int]] = []
    for overrides, out in (({}, ks_with), ({"traffic_prior_requests": 0}, ks_without)):
        chooser = regime_chooser(**overrides)
        waves(chooser, [0.65], 3, seed)
        out.extend(waves(chooser, [0.9], 1, seed, first_wave=3))
    assert mean_k(ks_with) >= mean_k(ks_without) - 0.25, (mean_k(ks_with), mean_k(ks_without))
    assert mean_k(ks_with) >= 2.0, mean_k(ks_with)  # held to the old mean (no batch's counts): 1.0


def test_a_request_alone_in_the_batch_is_estimated_as_without_the_prior() -> None:
    """Alone, a request's prior mean is the traffic's figure alone, which a shift leaves stale: served on the
    regime pair at synthetic 1 after prose, requests held to prose's figure tested at K = 1 for 9-10
    iterations before drafting at K = 4. Alone after traffic that accepted alike at 0.5, a request that
    accepts every draft climbs as fast as without the prior."""

    def climb(**overrides: Any) -> list[int]:
        chooser = regime_chooser(**overrides)
        waves(chooser, [0.5], 2, seed=0)
        ks = []
        for i in range(6):
            k = chooser.choose(["alone"])["alone"]
            ks.append(k)
            step(chooser, 100 + i, {"alone": k}, {"alone": k})
        return ks

    with_prior = climb()
    assert with_prior == climb(traffic_prior_requests=0), with_prior
    assert max(with_prior) == 4, with_prior
