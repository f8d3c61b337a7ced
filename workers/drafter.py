"""The draft engine: a dense model with its own KV cache that proposes K_r tokens for each request r.

Invariant: the draft cache holds a prefix of the request's token history. `propose` first feeds every
committed token the draft has not seen (one catch-up prefill: after iterations at K = 0, a restart, or a new
request), then runs up to max(K_r) single-token steps; request r drops out after its own K_r steps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workers.runner import ModelRunner
from workers.sampling import SamplingParams, probs_from_logits, sample


@dataclass
class DraftRequest:
    seq_id: int
    token_ids: Sequence[int]  # the whole committed history (prompt + output)
    num_spec_tokens: int  # K_r >= 1
    params: SamplingParams
    generator: torch.Generator


@dataclass
class Proposal:
    draft_ids: list[int]  # [K_r]
    draft_probs: torch.Tensor | None  # [K_r, V] processed draft distribution; None for greedy requests


class Drafter:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def propose(self, requests: Sequence[DraftRequest]) -> list[Proposal]:
        proposals = [Proposal([], None) for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        # Step 0 feeds each request's unseen history (at least its last committed token).
        feeds = {i: list(r.token_ids[self._ensure(r.seq_id) :]) for i, r in enumerate(requests)}
        for step in range(max((r.num_spec_tokens for r in requests), default=0)):
            active = [i for i, r in enumerate(requests) if r.num_spec_tokens > step]
            if step > 0:
                feeds = {i: proposals[i].draft_ids[-1:] for i in active}
            seq_ids = [requests[i].seq_id for i in active]
            logits = self.runner.forward(seq_ids, [feeds[i] for i in active], logits_for="last").logits
            for row, i in enumerate(active):
                request = requests[i]
                if request.params.is_greedy:
                    proposals[i].draft_ids.append(int(logits[row].argmax()))
                else:
                    q = probs_from_logits(logits[row : row + 1], request.params)[0]
                    probs[i].append(q)
                    proposals[i].draft_ids.append(sample(q, request.generator))
        for i, request in enumerate(requests):
            if not request.params.is_greedy and probs[i]:
                proposals[i].draft_probs = torch.stack(probs[i])
        return proposals

    def prefill(self, seq_ids: Sequence[int], token_ids: Sequence[Sequence[int]]) -> None:
        """Feed new sequences' prompts (their history minus the pending token) ahead of the first propose."""
        feeds = []
        for seq_id, tokens in zip(seq_ids, token_ids, strict=True):
            feeds.append(list(tokens[self._ensure(seq_id) :]))
        ready = [(s, f) for s, f in zip(seq_ids, feeds, strict=True) if f]
        if ready:
            self.runner.forward([s for s, _ in ready], [f for _, f in ready], logits_for="last")

    def commit(self, seq_id: int, num_valid: int) -> None:
        """Keep only the first `num_valid` cached tokens of a sequence (those still in its history)."""
        if seq_id in self.runner.cache:
            self.runner.cache.truncate(seq_id, min(num_valid, self.runner.seq_len(seq_id)))

    def free(self, seq_id: int) -> None:
        self.runner.free(seq_id)

    def cached_len(self, seq_id: int) -> int:
        return self.runner.seq_len(seq_id) if seq_id in self.runner.cache else 0

    def _ensure(self, seq_id: int) -> int:
        """Tokens of the sequence in the draft cache (adding the sequence if it is new)."""
        if seq_id not in self.runner.cache:
            self.runner.add_sequence(seq_id)
        return self.runner.seq_len(seq_id)
