"""The engine's side of the drafter: each iteration's draft requests, one drafter call, and what it cost.

A sequence's request carries the part of its token history that its draft cache lacks (from
`Sequence.num_draft_cached` on) and its K. The drafter may fail: speculation then pauses (K = 0) for
`retry_s` and nothing is lost, since the next successful call catches up from the token history.
"""

from __future__ import annotations

import logging
import time

from workers.backends import DraftBackend
from workers.drafter import DraftRequest, Proposal
from workers.sequence import Sequence

logger = logging.getLogger(__name__)


class Proposer:
    def __init__(self, drafter: DraftBackend | None, retry_s: float) -> None:
        self.drafter = drafter
        self.retry_s = retry_s  # after a drafter failure, speculation pauses this long
        self.num_failures = 0
        self.compute_s = 0.0  # draft forward time within the current iteration
        self.num_prefill_tokens = 0  # history tokens the drafter caught up on in the current iteration
        self._retry_at = 0.0  # after a drafter failure, run at K = 0 until then

    def propose(self, batch: list[Sequence], num_spec: list[int]) -> list[Proposal]:
        """One iteration's proposals for the running batch: `num_spec[i]` drafts for `batch[i]`, or none
        (K = 0, no drafter, or a paused or failed drafter)."""
        self.compute_s, self.num_prefill_tokens = 0.0, 0
        proposals = [Proposal([], None) for _ in batch]
        speculating = [i for i, n in enumerate(num_spec) if n > 0]
        if self.drafter is None or not speculating:
            return proposals
        requests = []
        for i in speculating:
            seq = batch[i]
            start = seq.num_draft_cached
            requests.append(
                DraftRequest(
                    seq.seq_id, start, seq.token_ids[start:], num_spec[i], seq.params, seq.penalty_context()
                )
            )
        drafted = self._draft(requests, [batch[i] for i in speculating], batch)
        for i, proposal in zip(speculating, drafted, strict=True):
            proposals[i] = proposal
        return proposals

    def _draft(
        self, requests: list[DraftRequest], seqs: list[Sequence], batch: list[Sequence]
    ) -> list[Proposal]:
        """Call the drafter. If it fails, speculation pauses (K = 0) and nothing is lost: every draft cache
        position is forgotten, and the next successful call catches up from the token history."""
        if self.drafter is None or time.monotonic() < self._retry_at:
            return [Proposal([], None) for _ in requests]
        try:
            drafted = self.drafter.propose(requests)
        except Exception as error:  # noqa: BLE001 (any drafter failure degrades to plain decoding)
            self.num_failures += 1
            self._retry_at = time.monotonic() + self.retry_s
            logger.warning("drafter failed (%s); continuing without speculation this iteration", error)
            for seq in batch:
                seq.num_draft_cached = 0
            return [Proposal([], None) for _ in requests]
        self.compute_s += drafted.compute_time_s
        self.num_prefill_tokens += sum(max(0, len(r.token_ids) - 1) for r in requests)
        for request, seq in zip(requests, seqs, strict=True):
            seq.num_draft_cached = request.start + len(request.token_ids)
        return drafted.proposals

    def free(self, seq_ids: list[int]) -> None:
        """Free the sequences' draft cache slots; a lost drafter has nothing left to free."""
        if self.drafter is not None:
            try:
                self.drafter.free(seq_ids)
            except Exception as error:  # noqa: BLE001 (a lost drafter has nothing left to free)
                logger.warning("drafter free failed: %s", error)
