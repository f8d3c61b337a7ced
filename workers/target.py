"""The target engine: the MoE with its KV cache; prefill of prompts and verification of ragged drafts.

Invariant: the target cache holds every committed token of a sequence except the last one (the pending
token), which is fed at the start of the next verification: [pending, d_1 .. d_K] -> K+1 rows of logits.
The target may be remote, so it owns each sequence's random generator (seeded from the request's seed).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workers.rejection import verify_greedy, verify_one_hot, verify_sampled
from workers.runner import Runner
from workers.sampling import (
    PenaltyContext,
    SamplingParams,
    TokenLogprob,
    apply_penalties,
    make_generator,
    probs_from_logits,
    sample,
    token_logprobs,
)


@dataclass(frozen=True)
class TargetInfo:
    """What an engine needs to know about the target it drives."""

    vocab_size: int
    eos_token_ids: tuple[int, ...]
    num_experts: int
    top_k: int  # experts per token (0 for a dense target)
    max_seqs: int
    max_seq_len: int


@dataclass
class VerifyRequest:
    seq_id: int
    pending_id: int  # the last committed token, not yet in the target cache
    draft_ids: list[int]  # [K_r], possibly empty (plain decoding)
    draft_probs: torch.Tensor | None  # [K_r, V] with distribution proposals; None: one-hot (or greedy)
    params: SamplingParams
    penalty: PenaltyContext | None = None  # the history (pending token included), if params have penalties


@dataclass
class VerifyOutput:
    committed_ids: list[list[int]]  # per request: accepted drafts + one recovered-or-bonus token
    experts_touched: list[int]  # distinct experts per MoE layer in the verification forward
    compute_time_s: float = 0.0  # time in the forward and verification (excludes any call overhead)
    logprobs: list[list[TokenLogprob]] | None = None  # per request, one per committed token ([] if unasked)


@dataclass
class PrefillOutput:
    token_ids: list[int]  # the first output token of each sequence
    logprobs: list[TokenLogprob | None]  # its logprob, for sequences whose params ask for logprobs


class Target:
    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        self._generators: dict[int, torch.Generator] = {}

    @property
    def info(self) -> TargetInfo:
        config, cache = self.runner.config, self.runner.cache.config
        return TargetInfo(
            config.vocab_size,
            config.eos_token_ids,
            config.num_experts,
            config.top_k,
            cache.max_seqs,
            cache.max_seq_len,
        )

    def prefill(
        self, seq_ids: Sequence[int], prompts: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> PrefillOutput:
        """Add and prefill new sequences; returns the first output token of each."""
        try:
            for seq_id, p in zip(seq_ids, params, strict=True):
                self.runner.add_sequence(seq_id)
                self._generators[seq_id] = make_generator(p.seed)
            logits = self.runner.forward(seq_ids, prompts, logits_for="last").logits
        except Exception:
            self.free(seq_ids)
            raise
        token_ids, logprobs = [], []
        for i, (seq_id, p, prompt) in enumerate(zip(seq_ids, params, prompts, strict=True)):
            token_id = self._sample_one(logits[i], p, list(prompt), self._generators[seq_id])
            token_ids.append(token_id)
            wanted = p.num_logprobs is not None
            logprobs.append(
                token_logprobs(logits[i : i + 1], [token_id], p.num_logprobs or 0)[0] if wanted else None
            )
        return PrefillOutput(token_ids, logprobs)

    def restore(
        self, seq_ids: Sequence[int], token_ids: Sequence[Sequence[int]], params: Sequence[SamplingParams]
    ) -> None:
        """Rebuild lost sequences from their history minus the pending token (after a target failure)."""
        self.free(seq_ids)
        if seq_ids:  # an empty restore only checks that the target answers
            self.prefill(seq_ids, token_ids, params)  # the sampled token is discarded: the pending one stays

    def verify(self, requests: Sequence[VerifyRequest]) -> VerifyOutput:
        """One forward over [pending, drafts...] of every request, then per-request verification."""
        start_time = time.perf_counter()
        feeds = [[r.pending_id, *r.draft_ids] for r in requests]
        out = self.runner.forward([r.seq_id for r in requests], feeds)
        committed_all: list[list[int]] = []
        logprobs_all: list[list[TokenLogprob]] = []
        start = 0
        for request, feed in zip(requests, feeds, strict=True):
            logits = out.logits[start : start + len(feed)]  # [K+1, V]
            start += len(feed)
            committed = self._verify_one(request, logits)
            # Keep pending + accepted drafts in the cache; the new last token becomes pending.
            self.runner.rollback(request.seq_id, len(request.draft_ids) - (len(committed) - 1))
            committed_all.append(committed)
            num_logprobs = request.params.num_logprobs
            logprobs_all.append(
                [] if num_logprobs is None else token_logprobs(logits, committed, num_logprobs)
            )
        return VerifyOutput(
            committed_all, out.experts_touched, time.perf_counter() - start_time, logprobs_all
        )

    def free(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            self.runner.free(seq_id)
            self._generators.pop(seq_id, None)

    def _verify_one(self, request: VerifyRequest, logits: torch.Tensor) -> list[int]:
        if request.params.has_penalties:  # row j is penalized given the history and the drafts before j
            if request.penalty is None:
                raise ValueError(f"sequence {request.seq_id}: penalties need the token history")
            logits = apply_penalties(logits, request.params, request.penalty, request.draft_ids)
        if request.params.is_greedy:
            return verify_greedy(logits, request.draft_ids)  # on the model's device
        # Sampling runs on the host with the request's CPU generator: the same seed gives the same tokens
        # whatever the device.
        target_probs = probs_from_logits(logits.cpu(), request.params)
        generator = self._generators[request.seq_id]
        if request.draft_probs is None:  # one-hot proposals (also K = 0: the bonus token alone)
            return verify_one_hot(target_probs, request.draft_ids, generator)
        return verify_sampled(target_probs, request.draft_probs, request.draft_ids, generator)

    @staticmethod
    def _sample_one(
        logits: torch.Tensor, params: SamplingParams, prompt_ids: list[int], generator: torch.Generator
    ) -> int:
        """The first output token, from the last prompt position's logits [V]."""
        if params.has_penalties:
            logits = apply_penalties(logits[None], params, PenaltyContext(prompt_ids, []), [])[0]
        if params.is_greedy:
            return int(logits.argmax())
        return sample(probs_from_logits(logits[None].cpu(), params)[0], generator)
