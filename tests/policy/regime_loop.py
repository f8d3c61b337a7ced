"""A closed loop at batch 32 with costs like the regime pair's (vLLM backend), and its costs at batch 1, for the
chooser's tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from policy.batch_aware import BatchAwareChooser, BatchAwareConfig
from policy.cost_model import CostModel, CostParams
from policy.cost_model_config import CostModelConfig
from policy.routing import RoutingConfig
from policy.stats import IterationStats, RequestIterationStats

# Costs like the regime pair's at batch 32 (vLLM backend): a plain step 71 ms, each verified draft 0.8 ms, a
# draft step over the batch 7 ms. At acceptance 0.85 the batch's best K is 3; a request at 0.6 drops to 1-2.
REGIME = CostParams(
    fixed_s=0.045, per_expert_s=0.0, per_token_s=0.0008, draft_fixed_s=0.002, draft_per_token_s=0.00015
)

# Batch 1 like the regime pair's (vLLM backend, session 59's code 1): a plain step 12 ms, K = 1 21.5 ms (the
# drafter's first pass costs most), 4.4 ms a K beyond (a verification token 2.25 ms, a draft step 2.15 ms).
REGIME_BATCH_1 = CostParams(
    fixed_s=0.012,
    per_expert_s=0.0,
    per_token_s=0.00225,
    draft_fixed_s=0.002,
    draft_per_token_s=0.00015,
    draft_first_pass_s=0.0051,
)


def regime_batch_1_seconds(k: int) -> tuple[float, float]:
    """The drafter's and the target's seconds of a batch-1 iteration at K at `REGIME_BATCH_1`'s costs."""
    params = REGIME_BATCH_1
    draft_s = params.draft_first_pass_s + k * (params.draft_fixed_s + params.draft_per_token_s) if k else 0.0
    return draft_s, params.fixed_s + params.per_token_s * k


def regime_chooser(**overrides: Any) -> BatchAwareChooser:
    model = CostModel(CostModelConfig(RoutingConfig(0, 0), draft_padding="batch"), REGIME)
    config = BatchAwareConfig(max_spec_tokens=4, min_population_requests=0, **overrides)
    return BatchAwareChooser(config, model)


def regime_verify_s(num_tokens: int) -> float:
    return REGIME.fixed_s + REGIME.per_token_s * num_tokens


def step(
    chooser: BatchAwareChooser,
    iteration: int,
    chosen: dict[str, int],
    accepted: dict[str, int],
    verify_s: Callable[[int], float] = regime_verify_s,
) -> None:
    """Observe an iteration at these K and accepted counts: the regime's drafter, `verify_s` of its tokens."""
    requests = [RequestIterationStats(r, k, accepted[r], accepted[r] + 1, 100) for r, k in chosen.items()]
    num_tokens = len(chosen) + sum(chosen.values())
    draft_s = max(chosen.values()) * (REGIME.draft_fixed_s + len(chosen) * REGIME.draft_per_token_s)
    chooser.observe(
        IterationStats(iteration, len(chosen), requests, num_tokens, draft_s, verify_s(num_tokens), 0.0)
    )


def waves(
    chooser: BatchAwareChooser,
    rates: list[float],
    num_waves: int,
    seed: int,
    first_wave: int = 0,
    verify_s: Callable[[int], float] = regime_verify_s,
) -> list[list[int]]:
    """Waves of 32 requests, each 20 iterations long (the i-th request of a wave accepts at
    rates[i % len(rates)]), every verification's accepted count drawn at its request's rate (`step`). Returns the K
    of each iteration's requests."""
    rng = np.random.default_rng(seed)
    ks: list[list[int]] = []
    for wave in range(first_wave, first_wave + num_waves):
        ids = [f"w{wave}r{i}" for i in range(32)]
        for _ in range(20):
            chosen = chooser.choose(ids)
            ks.append([chosen[r] for r in ids])
            accepted = {}
            for i, request_id in enumerate(ids):
                accepted[request_id] = 0
                while accepted[request_id] < chosen[request_id] and rng.random() < rates[i % len(rates)]:
                    accepted[request_id] += 1
            step(chooser, len(ks), chosen, accepted, verify_s)
        for request_id in ids:
            chooser.release(request_id)
    return ks
