"""The speculative loop without Ray: continuous batching over a target, an optional drafter and a K chooser.

`step()` is one iteration: admit, choose K, propose, verify, commit, observe. `generate()` runs a list of
requests to completion (the offline API). The serving router drives the same `step()`.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from policy.stats import IterationStats, KChooser, OutlookAware, RequestIterationStats, RequestOutlook
from workers.backends import DraftBackend, TargetBackend
from workers.drafter import Proposal
from workers.kv_cache import CacheCapacityError
from workers.proposer import Proposer
from workers.recovery import restore_target
from workers.sampling import SamplingParams, TokenLogprob
from workers.sequence import FINISH_ABORT, RequestOutput, Sequence
from workers.target import VerifyRequest
from workers.tokenizer import IncrementalDetokenizer, Tokenizer
from workers.validation import validate_request

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineConfig:
    max_batch_size: int = 32  # running requests per iteration
    max_spec_tokens: int = 8  # upper bound on any request's K
    max_waiting: int = 1024  # queued requests before add_request refuses
    drafter_retry_s: float = 0.0  # after a drafter failure, speculation pauses this long
    target_recovery_s: float = 0.0  # after a target failure, retry re-prefilling the batch this long

    def __post_init__(self) -> None:
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_spec_tokens < 0:
            raise ValueError(f"max_spec_tokens must be >= 0, got {self.max_spec_tokens}")


class QueueFullError(RuntimeError):
    """The engine's waiting queue is at max_waiting."""


class SpecEngine:
    def __init__(
        self,
        target: TargetBackend,
        drafter: DraftBackend | None,
        chooser: KChooser,
        config: EngineConfig | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        self.info = target.info
        if drafter is not None and drafter.vocab_size != self.info.vocab_size:
            raise ValueError(
                f"draft vocabulary ({drafter.vocab_size}) differs from the target's "
                f"({self.info.vocab_size}); they must share a tokenizer"
            )
        self.target, self.chooser = target, chooser
        self.config = config or EngineConfig()
        self.tokenizer = tokenizer
        self.eos_token_ids = frozenset(self.info.eos_token_ids)
        self.proposer = Proposer(drafter, self.config.drafter_retry_s)
        self.num_target_recoveries = 0
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.iteration = 0
        self.last_stats: IterationStats | None = None
        self._next_seq_id = 0

    # -- requests --------------------------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: list[int], params: SamplingParams) -> None:
        """Queue a request; raises ValueError if it can never fit, QueueFullError if the queue is full."""
        self.validate(prompt_ids, params)
        if len(self.waiting) >= self.config.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests are waiting (max_waiting)")
        stop_ids = set(params.stop_token_ids) | (set() if params.ignore_eos else set(self.eos_token_ids))
        detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids) if self.tokenizer else None
        self.waiting.append(
            Sequence(
                seq_id=self._next_seq_id,
                request_id=request_id,
                prompt_ids=list(prompt_ids),
                params=params,
                stop_token_ids=frozenset(stop_ids),
                detokenizer=detokenizer,
            )
        )
        self._next_seq_id += 1

    def abort(self, request_id: str) -> bool:
        """Stop a request and free its cache slots; True if it was known."""
        for seq in list(self.waiting):
            if seq.request_id == request_id:
                self.waiting.remove(seq)
                return True
        for seq in self.running:
            if seq.request_id == request_id:
                seq.finish_reason = FINISH_ABORT
                self._finish([seq])
                self.running.remove(seq)
                return True
        return False

    @property
    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    @property
    def num_draft_failures(self) -> int:
        return self.proposer.num_failures

    # -- the loop --------------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """One iteration for the running batch; returns what each request gained."""
        outputs = self._admit()
        if not self.running:
            return outputs
        start = time.perf_counter()
        batch = list(self.running)
        num_spec = self._choose_num_spec_tokens(batch)
        proposals = self.proposer.propose(batch, num_spec)
        requests = [
            VerifyRequest(
                s.seq_id, s.output_ids[-1], p.draft_ids, p.draft_probs, s.params, s.penalty_context()
            )
            for s, p in zip(batch, proposals, strict=True)
        ]
        try:
            verified = self.target.verify(requests)
        except Exception as error:
            self._recover_target(batch, error)  # re-prefill from the token histories, or raise
            verified = self.target.verify(requests)
        committed, experts_touched = verified.committed_ids, verified.experts_touched
        # What was drafted, not what was chosen: a paused or failed drafter drafts nothing, and the draft
        # cache bookkeeping must not advance for tokens it never fed.
        num_drafted = [len(p.draft_ids) for p in proposals]
        outputs += self._commit(batch, num_drafted, committed, verified.logprobs)
        # Finished requests are released after the observation: the chooser keeps state per request, and an
        # observation after the release made a finished request's state again, for good.
        try:
            self._observe(
                batch,
                proposals,
                committed,
                experts_touched,
                draft_time=self.proposer.compute_s,
                verify_time=verified.compute_time_s,
                total_time=time.perf_counter() - start,
            )
        finally:
            self._reap()
        return outputs

    def generate(
        self, prompts: Iterable[list[int]], params: SamplingParams | list[SamplingParams]
    ) -> list[list[int]]:
        """Offline API: run every prompt to completion; returns the output token ids in prompt order."""
        prompts = list(prompts)
        per_request = params if isinstance(params, list) else [params] * len(prompts)
        ids = [f"offline-{self._next_seq_id + i}" for i in range(len(prompts))]
        for request_id, prompt, p in zip(ids, prompts, per_request, strict=True):
            self.add_request(request_id, prompt, p)
        results: dict[str, list[int]] = {i: [] for i in ids}
        while self.has_unfinished:
            for out in self.step():
                if out.request_id in results:
                    results[out.request_id].extend(out.new_token_ids)
        return [results[i] for i in ids]

    # -- steps -----------------------------------------------------------------------------------------------

    def _admit(self, max_admitted: int | None = None) -> list[RequestOutput]:
        capacity = min(self.config.max_batch_size, self.info.max_seqs)
        if max_admitted is not None:
            capacity = min(capacity, len(self.running) + max_admitted)
        admitted: list[Sequence] = []
        while self.waiting and len(self.running) + len(admitted) < capacity:
            admitted.append(self.waiting.popleft())
        if not admitted:
            return []
        try:
            first = self.target.prefill(
                [s.seq_id for s in admitted], [s.prompt_ids for s in admitted], [s.params for s in admitted]
            )
        except CacheCapacityError:
            # Slots held by sequences this engine does not run. While some run, their frees make room: wait.
            # With none running, try one request alone; if even that cannot get a slot, nothing ever will:
            # raise, so the waiting requests end with a 503 and the health check reports the replica.
            self.waiting.extendleft(reversed(admitted))
            if self.running:
                return []
            if len(admitted) > 1:
                return self._admit(max_admitted=1)
            raise
        except Exception as error:
            self._requeue_after_failed_prefill(admitted, error)
            return []
        # No draft prefill here: the first proposal for a sequence catches its draft cache up from the history
        # (in the iteration's one drafter call), and a sequence that never speculates never costs the drafter.
        outputs = []
        for seq, token, logprob in zip(admitted, first.token_ids, first.logprobs, strict=True):
            self.running.append(seq)
            outputs.append(self._output(seq, seq.append([token]), [] if logprob is None else [logprob]))
        self._reap()
        return outputs

    def _requeue_after_failed_prefill(self, admitted: list[Sequence], error: Exception) -> None:
        """The target failed while prefilling new requests: restore the running ones and queue the new ones
        again (in order, at the front). A request whose prefill already failed once re-raises instead, so a
        prefill that fails for a reason other than a lost target cannot loop forever."""
        if any(s.num_failed_prefills > 0 for s in admitted):
            raise error
        for seq in admitted:
            seq.num_failed_prefills += 1
        self.waiting.extendleft(reversed(admitted))
        self._recover_target(self.running, error)
        self.target.free([s.seq_id for s in admitted])  # if the call failed after the target took them

    def _choose_num_spec_tokens(self, batch: list[Sequence]) -> list[int]:
        if self.proposer.drafter is None:
            return [0] * len(batch)
        auto = [s for s in batch if s.params.num_spec_tokens is None]
        if auto and isinstance(self.chooser, OutlookAware):
            self.chooser.set_outlook({s.request_id: _outlook(s) for s in auto})
        chosen = self.chooser.choose([s.request_id for s in auto]) if auto else {}
        max_seq_len = self.info.max_seq_len
        result = []
        for seq in batch:
            wanted = seq.params.num_spec_tokens
            num = chosen.get(seq.request_id, 0) if wanted is None else wanted
            # No more drafts than the request can still emit, or than its cache can hold.
            limit = min(self.config.max_spec_tokens, seq.num_remaining - 1, max_seq_len - seq.num_tokens)
            result.append(max(0, min(num, limit)))
        return result

    def _recover_target(self, batch: list[Sequence], error: Exception) -> None:
        """The target lost its caches (a rank or replica died): rebuild them from the token histories."""
        restore_target(self.target, batch, error, self.config.target_recovery_s)
        self.num_target_recoveries += 1

    def _commit(
        self,
        batch: list[Sequence],
        num_drafted: list[int],
        committed: list[list[int]],
        logprobs: list[list[TokenLogprob]] | None,
    ) -> list[RequestOutput]:
        outputs = []
        for i, (seq, proposed, tokens) in enumerate(zip(batch, num_drafted, committed, strict=True)):
            if proposed > 0:  # the draft cache fed d_1..d_{K-1}; it stays valid up to the accepted ones
                num_accepted = len(tokens) - 1
                seq.num_draft_cached = min(seq.num_draft_cached + proposed - 1, seq.num_tokens + num_accepted)
            new_ids = seq.append(tokens)
            outputs.append(self._output(seq, new_ids, logprobs[i][: len(new_ids)] if logprobs else []))
        return outputs

    def _observe(
        self,
        batch: list[Sequence],
        proposals: list[Proposal],
        committed: list[list[int]],
        experts_touched: list[int],
        draft_time: float,
        verify_time: float,
        total_time: float,
    ) -> None:
        requests = [
            RequestIterationStats(
                request_id=s.request_id,
                num_spec_tokens=len(p.draft_ids),
                num_accepted_tokens=len(c) - 1,
                num_committed_tokens=len(c),
                context_len=s.num_tokens - len(c),
            )
            for s, p, c in zip(batch, proposals, committed, strict=True)
        ]
        self.last_stats = IterationStats(
            iteration=self.iteration,
            batch_size=len(batch),
            requests=requests,
            num_target_tokens=sum(len(p.draft_ids) + 1 for p in proposals),
            draft_time_s=draft_time,
            verify_time_s=verify_time,
            other_time_s=max(0.0, total_time - draft_time - verify_time),
            experts_touched=experts_touched,
            num_experts=self.info.num_experts,
            num_draft_prefill_tokens=self.proposer.num_prefill_tokens,
        )
        self.iteration += 1
        self.chooser.observe(self.last_stats)

    def _reap(self) -> None:
        finished = [s for s in self.running if s.finish_reason is not None]
        if finished:
            self._finish(finished)
            self.running = [s for s in self.running if s.finish_reason is None]

    def _finish(self, seqs: list[Sequence]) -> None:
        """Free the sequences' cache slots (one call per backend) and forget them in the policy."""
        seq_ids = [s.seq_id for s in seqs]
        try:
            self.target.free(seq_ids)
        except Exception as error:  # noqa: BLE001 (a lost target has nothing left to free)
            logger.warning("target free failed: %s", error)
        self.proposer.free(seq_ids)
        for seq in seqs:
            self.chooser.release(seq.request_id)

    def _output(self, seq: Sequence, new_ids: list[int], new_logprobs: list[TokenLogprob]) -> RequestOutput:
        return RequestOutput(
            request_id=seq.request_id,
            new_token_ids=new_ids,
            new_logprobs=new_logprobs,
            new_text=seq.release_text(),
            num_prompt_tokens=len(seq.prompt_ids),
            num_output_tokens=len(seq.output_ids),
            finish_reason=seq.finish_reason,
        )

    def validate(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise ValueError (naming the problem) for a request that could never run; no state changes."""
        validate_request(self.info, self.tokenizer is not None, prompt_ids, params)


def _outlook(seq: Sequence) -> RequestOutlook:
    """What drafting `seq` next would cost its drafter beyond the one token it feeds per drafting step (the
    history its cache misses, as the proposer feeds it), and the tokens `seq` may still generate."""
    return RequestOutlook(max(0, seq.num_tokens - seq.num_draft_cached - 1), seq.num_remaining)
