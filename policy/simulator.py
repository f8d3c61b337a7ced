"""Simulated serving loop: a batch of synthetic requests, iteration times from a preset's cost model, a policy.

Decode iterations only (prefill and the draft's catch-up prefill are not modelled). Speedups are committed
tokens per simulated second relative to plain decoding on the same workload (same seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from policy.baselines import BatchSizeTableChooser, BatchSizeTableConfig, OffChooser, StaticChooser
from policy.batch_aware import BatchAwareChooser, BatchAwareConfig
from policy.cascade import CascadeChooser, CascadeConfig
from policy.cost_model import CostModel, CostModelConfig, CostParams
from policy.presets import Preset
from policy.stats import IterationStats, KChooser, RequestIterationStats
from policy.workload import Arrivals, SimRequest, WorkloadConfig

POLICIES = ("off", "static-1", "static-2", "static-3", "static-4", "table", "cascade", "batch-aware")
MAX_SPEC_TOKENS = 8  # the bound every adaptive policy runs with


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
    truth = CostModel(CostModelConfig(preset.routing), preset.cost_params())
    rng = np.random.default_rng([workload.seed, 2**31])
    arrivals = Arrivals(workload, MAX_SPEC_TOKENS)
    running: list[SimRequest] = []
    now_s, num_committed = 0.0, 0
    k_counts = np.zeros(MAX_SPEC_TOKENS + 1, dtype=np.int64)
    for iteration in range(workload.num_iterations):
        now_s = arrivals.admit(running, now_s)
        ks = chooser.choose([r.request_id for r in running])
        records = [_step(request, ks[request.request_id]) for request in running]
        for record in records:
            k_counts[record.num_spec_tokens] += 1
            num_committed += record.num_committed_tokens
        stats = _measure(truth, preset, iteration, records, rng, workload.time_noise)
        now_s += stats.iteration_time_s
        chooser.observe(stats)
        for request in [r for r in running if r.is_finished]:
            chooser.release(request.request_id)
            running.remove(request)
    return SimulationResult(num_committed, now_s, workload.num_iterations, tuple(int(c) for c in k_counts))


def _step(request: SimRequest, num_spec_tokens: int) -> RequestIterationStats:
    if not 0 <= num_spec_tokens <= MAX_SPEC_TOKENS:
        raise ValueError(
            f"num_spec_tokens={num_spec_tokens} for {request.request_id} is outside [0, {MAX_SPEC_TOKENS}]"
        )
    context_len = request.num_committed_tokens
    accepted, committed = request.step(num_spec_tokens)
    return RequestIterationStats(request.request_id, num_spec_tokens, accepted, committed, context_len)


def _measure(
    truth: CostModel,
    preset: Preset,
    iteration: int,
    records: list[RequestIterationStats],
    rng: np.random.Generator,
    noise: float,
) -> IterationStats:
    """The iteration's stats as a router would report them: phase times with jitter, experts per layer."""
    ks = [r.num_spec_tokens for r in records]
    draft, verify, other = (float(t) for t in truth.phase_times(len(ks), max(ks), sum(ks)))
    jitter = np.clip(1.0 + noise * rng.standard_normal(3), 0.5, 1.5)
    num_tokens = len(ks) + sum(ks)
    # Distinct experts per layer: the expected count, stochastically rounded (unbiased).
    expected = float(truth.expert_counts.predict(num_tokens))
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
    )


def profile_cost_model(preset: Preset, seed: int = 0, noise: float = 0.02) -> CostModel:
    """The start-up calibration: 24 measured iterations across batch sizes 1..64, plain and at K = 3.

    Starts from a prior 1.5x off the preset's true params, so that the fit, not the prior, does the work.
    """
    truth = CostModel(CostModelConfig(preset.routing), preset.cost_params())
    rng = np.random.default_rng([seed, 2**30])
    measured = []
    for i, batch in enumerate(b for b in (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64) for _ in range(2)):
        ks = [3 * (i % 2)] * batch
        records = [RequestIterationStats(f"p{j}", k, 0, 1, 0) for j, k in enumerate(ks)]
        measured.append(_measure(truth, preset, i, records, rng, noise))
    prior = CostParams(*(1.5 * preset.cost_params().as_array()))
    model = CostModel(CostModelConfig(preset.routing), prior)
    model.calibrate(measured)
    return model


def make_chooser(policy: str, preset: Preset, seed: int = 0) -> KChooser:
    """A fresh chooser by name (see POLICIES)."""
    if policy == "off":
        return OffChooser()
    if policy.startswith("static-"):
        return StaticChooser(int(policy.removeprefix("static-")))
    if policy == "table":
        return BatchSizeTableChooser(BatchSizeTableConfig())
    if policy == "cascade":
        return CascadeChooser(CascadeConfig(max_spec_tokens=MAX_SPEC_TOKENS))
    if policy == "batch-aware":
        config = BatchAwareConfig(max_spec_tokens=MAX_SPEC_TOKENS)
        return BatchAwareChooser(config, profile_cost_model(preset, seed))
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
