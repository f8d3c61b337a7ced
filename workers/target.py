"""The target engine: the MoE with its KV cache; prefill of prompts and verification of ragged drafts.

Invariant: the target cache holds every committed token of a sequence except the last one (the pending
token), which is fed at the start of the next verification: [pending, d_1 .. d_K] -> K+1 rows of logits.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workers.drafter import Proposal
from workers.rejection import verify_greedy, verify_sampled
from workers.runner import ModelRunner
from workers.sampling import SamplingParams, probs_from_logits, sample


@dataclass
class VerifyRequest:
    seq_id: int
    pending_id: int  # the last committed token, not yet in the target cache
    proposal: Proposal
    params: SamplingParams
    generator: torch.Generator


class Target:
    def __init__(self, runner: ModelRunner) -> None:
        self.runner = runner

    def prefill(
        self,
        seq_ids: Sequence[int],
        prompts: Sequence[Sequence[int]],
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator],
    ) -> list[int]:
        """Add and prefill new sequences; returns the first output token of each."""
        for seq_id in seq_ids:
            self.runner.add_sequence(seq_id)
        try:
            logits = self.runner.forward(seq_ids, prompts, logits_for="last").logits
        except Exception:
            for seq_id in seq_ids:
                self.runner.free(seq_id)
            raise
        return [
            self._sample_one(logits[i], p, g) for i, (p, g) in enumerate(zip(params, generators, strict=True))
        ]

    def verify(self, requests: Sequence[VerifyRequest]) -> tuple[list[list[int]], list[int]]:
        """One forward over [pending, drafts...] per request; returns committed tokens per request and the
        distinct experts touched per MoE layer."""
        feeds = [[r.pending_id, *r.proposal.draft_ids] for r in requests]
        out = self.runner.forward([r.seq_id for r in requests], feeds)
        committed_all: list[list[int]] = []
        start = 0
        for request, feed in zip(requests, feeds, strict=True):
            logits = out.logits[start : start + len(feed)]  # [K+1, V]
            start += len(feed)
            drafts = request.proposal.draft_ids
            if request.params.is_greedy:
                committed = verify_greedy(logits, drafts)
            else:
                target_probs = probs_from_logits(logits, request.params)
                draft_probs = request.proposal.draft_probs
                if draft_probs is None:
                    draft_probs = target_probs.new_zeros(0, target_probs.shape[1])
                committed = verify_sampled(target_probs, draft_probs, drafts, request.generator)
            # Keep pending + accepted drafts in the cache; the new last token becomes pending.
            self.runner.rollback(request.seq_id, len(drafts) - (len(committed) - 1))
            committed_all.append(committed)
        return committed_all, out.experts_touched

    def rollback(self, seq_id: int, num_tokens: int) -> None:
        self.runner.rollback(seq_id, num_tokens)

    def free(self, seq_id: int) -> None:
        self.runner.free(seq_id)

    @staticmethod
    def _sample_one(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
        if params.is_greedy:
            return int(logits.argmax())
        return sample(probs_from_logits(logits[None], params)[0], generator)
