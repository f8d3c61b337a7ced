"""`bench.prefill_chunks`: a prompt token's cost by chunk size, from a step record."""

from __future__ import annotations

from typing import Any

import pytest

from bench.prefill_chunks import prefill_costs


def _step(time_s: float, prefill: int = 0, draft_steps: int = 0, drafts: int = 0) -> dict[str, Any]:
    return {
        "step_time_s": time_s,
        "num_prefill_tokens": prefill,
        "num_draft_steps": draft_steps,
        "draft_prefill_tokens": 0,
        "num_drafts": {"a": drafts},
        "num_scheduled": 16,
    }


def test_prompt_tokens_are_priced_beyond_a_plain_step_by_chunk_size() -> None:
    steps = [_step(0.050)] * 5 + [_step(0.060)] * 4  # plain steps: median 50 ms
    steps += [_step(0.650, prefill=1000)]  # a wave's prompts together: 0.6 ms a token
    steps += [_step(0.140, prefill=100)] * 3  # one prompt at a time: 0.9 ms a token
    steps += [_step(0.500, prefill=100, draft_steps=2, drafts=1)]  # drafted: not a prompt's cost alone
    costs = prefill_costs(steps, min_batch=12, large=256)
    assert costs["large"] == (1, pytest.approx(0.6))
    assert costs["small"] == (3, pytest.approx(0.9))
    assert costs["all"] == (4, pytest.approx(1000 * (0.6 + 3 * 0.09) / 1300))
    assert prefill_costs(steps, min_batch=17, large=256) == {}  # no step at batch 17 or more
