"""The simulator's truth: each cost term a real server has moves iteration times the way it should."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import pytest

from policy.presets import PAPER_PRESETS, PRESETS, Preset
from policy.simulator import simulate
from policy.stats import IterationStats, KChooser
from policy.truth import IterationShape, ServerTruth
from policy.workload import WorkloadConfig

QWEN = PRESETS["qwen2-57b-a14b-h100"]


def server(preset: Preset) -> ServerTruth:
    truth = preset.truth()
    assert isinstance(truth, ServerTruth)
    return truth


def plain(batch: int, context: int = 100) -> IterationShape:
    return IterationShape([0] * batch, [context] * batch)


def test_kv_reads_grow_with_context_and_sequences() -> None:
    truth = server(QWEN)
    assert truth.iteration_time(plain(32, 4000)) > truth.iteration_time(plain(32, 100))
    short, long = (
        truth.iteration_time(plain(b, 4000)) - truth.iteration_time(plain(b, 100)) for b in (8, 32)
    )
    assert long == pytest.approx(4 * short, rel=0.01)  # KV bytes: sequences x context


def test_tensor_parallel_halves_weight_reads_but_adds_all_reduces() -> None:
    one, two = (server(dataclasses.replace(QWEN, num_gpus=n)) for n in (1, 2))
    assert two.target_forward(64, [100] * 64) < 0.6 * one.target_forward(64, [100] * 64)
    assert two._all_reduces(64) > 0.0 and one._all_reduces(64) == 0.0
    slow_link = dataclasses.replace(QWEN, num_gpus=2, hardware=PAPER_PRESETS["qwen2-57b-a14b-4xl40"].hardware)
    assert server(slow_link)._all_reduces(64) > 10 * two._all_reduces(64)  # PCIe against NVLink


def target_efficiency(preset: str, batch: int, num_spec_tokens: int = 4) -> float:
    """MoESD: T(B, 1 token) / T(B, K + 1 tokens per sequence)."""
    truth = server(PRESETS[preset])
    contexts = [100] * batch
    return truth.target_forward(batch, contexts) / truth.target_forward(
        batch * (num_spec_tokens + 1), contexts
    )


def test_target_efficiency_rises_then_falls_on_an_moe_and_falls_on_a_dense_model() -> None:
    """MoESD Fig. 3: extra experts to read below saturation, compute above it; a dense model only computes."""
    batches = (1, 2, 4, 8, 16, 32, 64, 128)
    for preset in ("qwen2-57b-a14b-h100", "mixtral-8x7b-h100"):
        moe = [target_efficiency(preset, b) for b in batches]
        top = moe.index(max(moe))
        assert 4 <= batches[top] <= 32 and moe[0] < 0.8 * moe[top] and moe[-1] < 0.6 * moe[top], moe
    dense = [target_efficiency("llama-70b-h100", b) for b in batches]
    assert all(a > b for a, b in zip(dense, dense[1:], strict=False)), dense


def test_speculation_and_catch_up_prefill_cost_draft_time() -> None:
    truth = server(QWEN)
    draft, _, _ = truth.phase_times(IterationShape([2, 1, 0], [100] * 3))
    assert draft == pytest.approx(truth.draft_step(2, [100] * 3) + truth.draft_step(1, [100] * 3))
    caught_up, _, _ = truth.phase_times(IterationShape([2, 1, 0], [100] * 3, num_draft_prefill_tokens=500))
    assert caught_up > draft + truth.draft_step(1, [100])


class Recorder:
    """A fixed K schedule that records what the loop reports."""

    def __init__(self, schedule: list[int]) -> None:
        self.schedule = schedule
        self.stats: list[IterationStats] = []

    def choose(self, request_ids: Sequence[str]) -> dict[str, int]:
        return dict.fromkeys(request_ids, self.schedule[len(self.stats)])

    def observe(self, stats: IterationStats) -> None:
        self.stats.append(stats)

    def release(self, request_id: str) -> None:
        pass

    def gauges(self) -> dict[str, float]:
        return {}


def test_the_drafter_catches_up_on_first_speculation_and_after_a_pause() -> None:
    recorder = Recorder([0, 0, 2, 2, 0, 0, 0, 2])
    chooser: KChooser = recorder
    workload = WorkloadConfig(2, (0.0,), mean_output_tokens=1000, num_iterations=8, time_noise=0.0)
    simulate(QWEN, chooser, workload)
    prefill = [s.num_draft_prefill_tokens for s in recorder.stats]
    contexts = sum(r.context_len for r in recorder.stats[2].requests)
    assert prefill[:2] == [0, 0] and prefill[2] == contexts  # the whole history, prompt included
    assert prefill[3] == 0 and prefill[7] == 2 * 3  # three plain tokens each to catch up
