"""The bytes one speculative iteration moves between processes: one-hot proposals send no [K, vocab]
distributions, so their size does not grow with the vocabulary."""

from __future__ import annotations

from bench.rpc import DEMO_VOCAB, GPU_VOCAB, iteration_bytes


def test_distributions_dominate_and_one_hot_proposals_do_not_grow_with_the_vocabulary() -> None:
    batch, k = 8, 4
    full = iteration_bytes(batch, k, DEMO_VOCAB, "distribution")
    one_hot = iteration_bytes(batch, k, DEMO_VOCAB, "one_hot")
    probs_bytes = batch * k * DEMO_VOCAB * 4  # fp32, once drafter -> router and once router -> target
    assert 2 * probs_bytes <= full["total"] < 2 * probs_bytes + 10 * one_hot["total"]
    assert one_hot["total"] < 4096  # ids and sampling parameters only
    gpu = iteration_bytes(batch, k, GPU_VOCAB, "one_hot")
    assert abs(gpu["total"] - one_hot["total"]) < 0.2 * one_hot["total"]  # only the ids' widths differ
