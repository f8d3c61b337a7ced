"""The draft engine: a dense model with its own KV cache that proposes K_r tokens for each request r.

The caller (the engine) tracks how much of each history the draft cache holds (`DraftRequest.start`) and
sends only the rest: that one message both rolls back rejected drafts and catches up on tokens committed
while the request ran at K = 0. The drafter then runs up to max(K_r) single-token steps; request r drops
out after its own K_r. K_r = 0 only feeds the tokens (a prefill). The drafter may be remote, so it owns
each sequence's random generator; a drafter that lost a sequence (a restart) raises `DraftCacheMiss`.

Proposals ("one_hot", the default): every draft token is the draft's argmax (after penalties) and only its
id goes back; the target verifies sampled requests against one-hot proposals, which is exact
(`workers.rejection.verify_one_hot`). "distribution": sampled requests draw their drafts from the draft's
distribution q and send q ([K_r, V] fp32) for standard rejection sampling (higher acceptance when q is
close to p and flat, at V floats per draft token between processes).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from workers.runner import ModelRunner
from workers.sampling import (
    PenaltyContext,
    SamplingParams,
    apply_penalties,
    make_generator,
    probs_from_logits,
    sample,
)

PROPOSALS = ("one_hot", "distribution")


class DraftCacheMiss(RuntimeError):
    """The drafter holds fewer tokens of a sequence than the caller believes: resend from position 0."""


@dataclass
class DraftRequest:
    seq_id: int
    start: int  # history position the drafter's cache is valid up to; token_ids continue from here
    token_ids: list[int]  # history[start:]; for K_r > 0 it ends with the last committed token
    num_spec_tokens: int  # K_r
    params: SamplingParams
    penalty: PenaltyContext | None = None  # the history, if params have penalties (drafts as the target)


@dataclass
class Proposal:
    draft_ids: list[int]  # [K_r]
    draft_probs: torch.Tensor | None  # [K_r, V] processed draft distribution; None: one-hot (or greedy)


@dataclass
class DraftOutput:
    proposals: list[Proposal]  # one per request, in order
    compute_time_s: float  # time in the draft forwards and sampling (excludes any call overhead)


class Drafter:
    def __init__(self, runner: ModelRunner, proposals: str = "one_hot") -> None:
        if proposals not in PROPOSALS:
            raise ValueError(f"draft proposals must be one of {PROPOSALS}, got {proposals!r}")
        self.runner = runner
        self.sends_distributions = proposals == "distribution"
        self._generators: dict[int, torch.Generator] = {}

    def propose(self, requests: Sequence[DraftRequest]) -> DraftOutput:
        start = time.perf_counter()
        self._sync(requests)
        proposals = [Proposal([], None) for _ in requests]
        probs: list[list[torch.Tensor]] = [[] for _ in requests]
        fed = [i for i, r in enumerate(requests) if r.token_ids]
        num_steps = max([r.num_spec_tokens for r in requests] + [1 if fed else 0])
        for step in range(num_steps):  # step s produces draft token s+1
            if step == 0:  # catch-up / prefill: each request's unseen history, ending at its last token
                active, feeds = fed, [requests[i].token_ids for i in fed]
            else:
                active = [i for i, r in enumerate(requests) if r.num_spec_tokens > step]
                feeds = [proposals[i].draft_ids[-1:] for i in active]
            logits = self.runner.forward(
                [requests[i].seq_id for i in active], feeds, logits_for="last"
            ).logits
            for row, i in enumerate(active):
                request = requests[i]
                if request.num_spec_tokens <= step:
                    continue  # prefill only
                row_logits = self._penalized(logits[row : row + 1], request, proposals[i].draft_ids)  # [1, V]
                if request.params.is_greedy or not self.sends_distributions:
                    proposals[i].draft_ids.append(int(row_logits[0].argmax()))
                else:
                    q = probs_from_logits(row_logits.cpu(), request.params)[0]  # host, as the target
                    probs[i].append(q)
                    proposals[i].draft_ids.append(sample(q, self._generators[request.seq_id]))
        for i in range(len(requests)):
            if probs[i]:
                proposals[i].draft_probs = torch.stack(probs[i])
        return DraftOutput(proposals, time.perf_counter() - start)

    @staticmethod
    def _penalized(logits: torch.Tensor, request: DraftRequest, draft_ids: list[int]) -> torch.Tensor:
        """The same penalties the target applies at this position (not needed for exactness: for acceptance)."""
        if not request.params.has_penalties or request.penalty is None:
            return logits
        context = PenaltyContext(request.penalty.prompt_ids, request.penalty.output_ids + draft_ids)
        return apply_penalties(logits, request.params, context, [])

    @property
    def vocab_size(self) -> int:
        return self.runner.config.vocab_size

    def free(self, seq_ids: Sequence[int]) -> None:
        for seq_id in seq_ids:
            self.runner.free(seq_id)
            self._generators.pop(seq_id, None)

    def _sync(self, requests: Sequence[DraftRequest]) -> None:
        """Add new sequences and roll each cache back to the caller's `start`."""
        for request in requests:
            if request.num_spec_tokens > 0 and not request.token_ids:
                raise ValueError(f"sequence {request.seq_id}: proposing needs at least its last token")
            if request.seq_id not in self.runner.cache:
                if request.start > 0:
                    raise DraftCacheMiss(f"sequence {request.seq_id} is not in the draft cache")
                self.runner.add_sequence(request.seq_id)
                seed = request.params.seed
                self._generators[request.seq_id] = make_generator(None if seed is None else seed + 1)
            cached = self.runner.seq_len(request.seq_id)
            if cached < request.start:
                raise DraftCacheMiss(
                    f"draft cache holds {cached} tokens of sequence {request.seq_id}, "
                    f"expected at least {request.start}"
                )
            self.runner.cache.truncate(request.seq_id, request.start)
