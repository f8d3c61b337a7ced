"""Simulated serving loop: a batch of synthetic requests, iteration times from a preset's truth, a policy.

Decode iterations, with the draft's catch-up prefill when a request starts or resumes speculating (the
target's prefill is not modelled). The policy sees only what a router reports: noisy phase times, counts,
experts touched. Speedups are committed tokens per simulated second relative to plain decoding on the same
workload (same seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policy.baselines import BatchSizeTableChooser, BatchSizeTableConfig, OffChooser, StaticChooser
from policy.batch_aware import BatchAwareChooser, BatchAwareConfig
from policy.cascade import CascadeChooser, CascadeConfig
from policy.cost_model import CostModel
from policy.cost_model_config import CostModelConfig
from policy.guard import MeasuredGuard
from policy.presets import MeasuredTruth, Preset
from policy.stats import IterationStats, KChooser, RequestIterationStats
from policy.truth import IterationShape, ServerTruth
from policy.workload import Arrivals, SimRequest, WorkloadConfig

POLICIES = ("off", "static-1", "static-2", "static-3", "static-4", "table", "cascade", "batch-aware", "auto")
MAX_SPEC_TOKENS = 8  # the bound every adaptive policy runs with

Truth = ServerTruth | MeasuredTruth


@dataclass(frozen=True)
class SimulationResult:
    num_committed_tokens: int
    elapsed_s: float
    num_iterations: int
    num_spec_tokens_counts: tuple[int, ...]  # request-iterations run at each K = 0..MAX_SPEC_TOKENS

    @property
    def tokens_per_s(self) -> float:
        return self.num_committed_tokens / self.elapsed_s

    @property
    def mean_batch_size(self) -> float:
        return sum(self.num_spec_tokens_counts) / self.num_iterations

    @property
    def mean_num_spec_tokens(self) -> float:
        counts = np.array(self.num_spec_tokens_counts)
        return float((counts * np.arange(len(counts))).sum() / max(counts.sum(), 1))


def simulate(preset: Preset, chooser: KChooser, workload: WorkloadConfig) -> SimulationResult:
    """Run `workload.num_iterations` iterations of the speculative loop with `chooser` deciding K."""
    truth = preset.truth()
    rng = np.random.default_rng([workload.seed, 2**31])
    arrivals = Arrivals(workload, MAX_SPEC_TOKENS)
    running: list[SimRequest] = []
    now_s, num_committed = 0.0, 0
    k_counts = np.zeros(MAX_SPEC_TOKENS + 1, dtype=np.int64)
    for iteration in range(workload.num_iterations):
        now_s = arrivals.admit(running, now_s)
        ks = chooser.choose([r.request_id for r in running])
        steps = [_step(request, ks[request.request_id]) for request in running]
        records = [record for record, _ in steps]
        for record in records:
            k_counts[record.num_spec_tokens] += 1
            num_committed += record.num_committed_tokens
        catch_up = sum(tokens for _, tokens in steps)
        stats = _measure(truth, preset, iteration, records, rng, workload.time_noise, catch_up)
        now_s += stats.iteration_time_s
        chooser.observe(stats)
        for request in [r for r in running if r.is_finished]:
            chooser.release(request.request_id)
            running.remove(request)
    return SimulationResult(num_committed, now_s, workload.num_iterations, tuple(int(c) for c in k_counts))


def _step(request: SimRequest, num_spec_tokens: int) -> tuple[RequestIterationStats, int]:
    """The request's record for this iteration and the history tokens the drafter caught up on."""
    if not 0 <= num_spec_tokens <= MAX_SPEC_TOKENS:
        raise ValueError(
            f"num_spec_tokens={num_spec_tokens} for {request.request_id} is outside [0, {MAX_SPEC_TOKENS}]"
        )
    context_len = request.context_len
    accepted, committed, catch_up = request.step(num_spec_tokens)
    record = RequestIterationStats(request.request_id, num_spec_tokens, accepted, committed, context_len)
    return record, catch_up


def _measure(
    truth: Truth,
    preset: Preset,
    iteration: int,
    records: list[RequestIterationStats],
    rng: np.random.Generator,
    noise: float,
    num_draft_prefill_tokens: int = 0,
) -> IterationStats:
    """The iteration's stats as a router would report them: phase times with jitter, experts per layer."""
    ks = [r.num_spec_tokens for r in records]
    shape = IterationShape(ks, [r.context_len for r in records], num_draft_prefill_tokens)
    draft, verify, other = truth.phase_times(shape)
    jitter = np.clip(1.0 + noise * rng.standard_normal(3), 0.5, 1.5)
    num_tokens = len(ks) + sum(ks)
    # Distinct experts per layer: the expected count, stochastically rounded (unbiased).
    expected = truth.experts_touched(num_tokens)
    num_layers = preset.target.num_layers if preset.target.num_experts else 0
    experts = np.floor(expected + rng.random(num_layers)).astype(int).tolist()
    return IterationStats(
        iteration=iteration,
        batch_size=len(ks),
        requests=records,
        num_target_tokens=num_tokens,
        draft_time_s=draft * float(jitter[0]),
        verify_time_s=verify * float(jitter[1]),
        other_time_s=other * float(jitter[2]),
        experts_touched=experts,
        num_experts=preset.target.num_experts,
        num_draft_prefill_tokens=num_draft_prefill_tokens,
    )


def make_chooser(policy: str, preset: Preset, seed: int = 0) -> KChooser:
    """A fresh chooser by name (see POLICIES). The adaptive ones start from the preset's analytic roofline
    prior (`Preset.cost_params`), not from the truth, and learn online from the measured iterations, as when
    served; "auto" is what a router serves: the batch-aware chooser inside the measured guard."""
    del seed  # every chooser is deterministic given the iterations it observes
    if policy == "off":
        return OffChooser()
    if policy.startswith("static-"):
        return StaticChooser(int(policy.removeprefix("static-")))
    if policy == "table":
        return BatchSizeTableChooser(BatchSizeTableConfig())
    if policy == "cascade":
        return CascadeChooser(CascadeConfig(max_spec_tokens=MAX_SPEC_TOKENS))
    if policy in ("batch-aware", "auto"):
        model = CostModel(CostModelConfig(preset.routing), preset.cost_params())
        chooser = BatchAwareChooser(BatchAwareConfig(max_spec_tokens=MAX_SPEC_TOKENS), model)
        return chooser if policy == "batch-aware" else MeasuredGuard(chooser)
    raise ValueError(f"policy={policy!r} is not one of {POLICIES}")


def speedups(
    preset: Preset, workload: WorkloadConfig, policies: tuple[str, ...] = POLICIES
) -> dict[str, float]:
    """Tokens per second of each policy over plain decoding, on the same workload."""
    results = {p: simulate(preset, make_chooser(p, preset, workload.seed), workload) for p in policies}
    off = results["off"] if "off" in results else simulate(preset, OffChooser(), workload)
    return {p: r.tokens_per_s / off.tokens_per_s for p, r in results.items()}


def iterations_for(batch_size: int, request_iterations: int = 8_000, min_iterations: int = 300) -> int:
    """Enough iterations that every batch size sees about the same number of request-iterations."""
    return max(min_iterations, request_iterations // batch_size)


def workload_for(batch_size: int, rates: tuple[float, ...], seed: int = 0) -> WorkloadConfig:
    """The benchmark workload at one batch size and acceptance level."""
    return WorkloadConfig(batch_size, rates, num_iterations=iterations_for(batch_size), seed=seed)
