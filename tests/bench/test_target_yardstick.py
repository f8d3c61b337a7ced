"""The per-cell target's yardstick (`bench.target_yardstick`): twins' noise, the truth, an oracle's chance."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest

from bench.target_yardstick import (
    is_closed_loop,
    oracle_chance,
    pooled,
    pooled_verdicts,
    sd_by_concurrency,
    server_sd,
    truth,
    twin_log_ratios,
    twin_misses,
)


def row(mode: str, tput: float, round_: int, workload: str = "code", concurrency: int = 4) -> dict[str, Any]:
    return {
        "mode": mode,
        "workload": workload,
        "concurrency": concurrency,
        "round": round_,
        "output_throughput": tput,
    }


def test_twins_are_paired_run_by_run_and_their_noise_is_split_between_the_two_servers() -> None:
    rows = [
        row("off", 100.0, 0),
        row("off-sync", 110.0, 0),
        row("off", 100.0, 1),
        row("off-sync", 100.0 / 1.1, 1),
    ]
    rows += [row("off", 50.0, 2)]  # no twin in that round: not a pair
    logs = twin_log_ratios(rows, "off-sync", "off")
    assert list(logs) == [("code", 4)]
    assert logs[("code", 4)] == pytest.approx([math.log(1.1), -math.log(1.1)])
    assert server_sd(logs) == pytest.approx(math.log(1.1) / math.sqrt(2.0))
    assert twin_misses(logs) == []  # the median of +-log 1.1 is 1.0
    assert twin_misses({("prose", 1): [math.log(0.9), math.log(0.93), math.log(1.0)]}) == [("prose", 1)]


def test_the_truth_is_off_and_vllms_static_modes_as_median_paired_ratios_to_off() -> None:
    rows = []
    for round_, (off, k2, auto) in enumerate(
        [(100.0, 120.0, 90.0), (200.0, 220.0, 150.0), (100.0, 130.0, 99.0)]
    ):
        rows += [
            row("off", off, round_),
            row("2", k2, round_),
            row("auto", auto, round_),
            row("ours2", k2, round_),
        ]
    modes = truth(rows)[("code", 4)]
    assert set(modes) == {"off", "2"}  # not auto, not our own path
    assert modes["off"] == 0.0 and modes["2"] == pytest.approx(math.log(1.2))


def test_an_oracle_always_meets_the_target_without_noise_and_misses_some_cells_with_it() -> None:
    rng = random.Random(0)
    equal = {"off": 0.0, "1": 0.0, "2": 0.0, "3": 0.0, "4": 0.0}
    assert oracle_chance(equal, 1e-9, 3, 200, rng) == 1.0
    noisy = oracle_chance(equal, 0.08, 3, 2000, rng)
    assert 0.3 < noisy < 0.9  # the largest of five equal noisy figures is biased upward
    # The same noise where every static K is far below off: the oracle (off) meets it about as often as one
    # noisy figure is within 5% of another, and more often than among equals.
    apart = {"off": 0.0, "1": -0.5, "2": -0.5, "3": -0.5, "4": -0.5}
    assert noisy < oracle_chance(apart, 0.08, 3, 2000, rng) < 1.0
    assert oracle_chance(equal, 0.08, 9, 2000, rng) > noisy  # more rounds, less noise in each median


def test_the_noise_is_taken_per_concurrency_where_the_twins_ran_it_often_enough() -> None:
    quiet, loud = math.log(1.02), math.log(1.2)
    logs = {
        ("code", 1): [loud, -loud, loud],
        ("prose", 1): [-loud, loud, -loud],
        ("code", 32): [quiet, -quiet],
    }
    sds = sd_by_concurrency(logs, min_runs=6)
    assert sds[1] == pytest.approx(loud / math.sqrt(2.0))
    assert sds[32] == pytest.approx(server_sd(logs))  # two runs: the pooled figure


def test_pooling_pairs_each_run_with_its_own_off_across_files_and_judges_auto_against_the_best_mode() -> None:
    first = [row("off", 100.0, 0), row("4", 130.0, 0), row("auto", 120.0, 0), row("ours4", 200.0, 0)]
    first += [row("off", 100.0, 0, "prose"), row("4", 80.0, 0, "prose"), row("auto", 97.0, 0, "prose")]
    # a second session on a machine half as fast, the same round number
    second = [row("off", 50.0, 0), row("4", 70.0, 0), row("auto", 62.0, 0)]
    second += [row("off", 50.0, 0, "prose"), row("4", 40.0, 0, "prose"), row("auto", 47.0, 0, "prose")]
    cells = pooled([first, second])
    code = cells[("code", 4)]
    assert set(code) == {"4", "auto"}  # off is the reference; our own path is not a peer
    assert code["4"].num_runs == 2 and code["4"].mean == pytest.approx(math.log(math.sqrt(1.3 * 1.4)))
    assert code["auto"].se == pytest.approx(abs(math.log(1.2) - math.log(1.24)) / 2.0)
    verdicts = {cell: (best, ratio) for cell, best, ratio, _ in pooled_verdicts(cells)}
    best, ratio = verdicts[("code", 4)]
    assert best == "4" and ratio == pytest.approx(math.sqrt(1.2 * 1.24) / math.sqrt(1.3 * 1.4))
    assert ratio < 0.95  # a miss: 0.90
    best, ratio = verdicts[("prose", 4)]  # K = 4 loses: auto is judged against off
    assert best == "off" and ratio == pytest.approx(math.sqrt(0.97 * 0.94))


def test_results_at_a_finite_request_rate_are_not_the_closed_loops_target() -> None:
    assert is_closed_loop({"args": {"request_rate": "inf"}})
    assert is_closed_loop({"args": {}})  # results from before the option
    assert not is_closed_loop({"args": {"request_rate": "4.0"}})
