"""The policy's input and output: per-iteration statistics and the K-chooser protocol.

Defined here (not in `workers/`) because imports point one way: `workers` produces these records and
`policy` consumes them. The records cross process boundaries (router -> policy actor), so they are
`msgspec.Struct`s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import msgspec


class RequestIterationStats(msgspec.Struct, frozen=True):
    """What one request did in one iteration."""

    request_id: str
    num_spec_tokens: int  # K proposed for this request this iteration (0 = plain decode)
    num_accepted_tokens: int  # draft tokens accepted by verification, 0 <= accepted <= K
    num_committed_tokens: int  # tokens appended to the output (accepted + 1, fewer if a stop cut it)
    context_len: int  # tokens in the request's sequence before this iteration


class IterationStats(msgspec.Struct, frozen=True):
    """One iteration of the speculative loop for the running batch.

    Times are wall-clock seconds measured by whoever runs the loop. `experts_touched` has one entry per
    MoE layer of the target: the number of distinct experts that the verification forward routed to.
    """

    iteration: int
    batch_size: int  # requests in the batch (decode/verify only; prefill is not counted here)
    requests: list[RequestIterationStats]
    num_target_tokens: int  # tokens in the verification forward = sum over requests of K_r + 1
    draft_time_s: float
    verify_time_s: float
    other_time_s: float  # scheduling, sampling bookkeeping, streaming: everything but the forwards
    experts_touched: list[int] = []
    num_experts: int = 0  # experts per MoE layer of the target (0 for a dense target)
    source: str = ""  # which router produced it (the central aggregator merges many)
    # Tokens the drafter prefilled this iteration beyond the one it feeds per drafting request: the catch-up
    # of requests that start or resume speculating (their whole history) and after a drafter loss, and (vLLM)
    # the prompts of the step before, which its first pass feeds to the drafter with the step's other tokens.
    num_draft_prefill_tokens: int = 0
    # A plain iteration next to drafting ones, whose time is not plain decoding's alone: the vLLM backend sets
    # it when the drafter ran at the end of this step, or one of the last steps drafted or verified
    # (`cluster.vllm_backend.scheduler.NEAR_DRAFTING_STEPS`). On the demo pair such steps measured up to 35%
    # slower than plain steps further from drafting, so the guard's plain figure and the cost model's fit
    # leave them out: a baseline taken from them made drafting look 30% better than it was at batch 4.
    is_near_drafting: bool = False
    # Prompt tokens of other requests (new ones, prefilling) that the target's forward carried besides the
    # decoding requests' tokens: the vLLM backend schedules them into decode steps. Their time is in the
    # iteration's but not in any model of decoding, so the cost model's fit, the guard's figures and the test
    # budget's net cost leave such iterations out. Served on the regime pair at concurrency 16, the ramp's
    # steps (a whole batch of prompts, 1-2 s each) counted as plain decoding: the cost model put a plain step
    # at batch 16 at 120 ms (40 ms measured) and drafting K = 4 for every request at the same cost, and the
    # guard's plain figure stayed below the chooser's while drafting ran at 0.5x plain's speed (session 15).
    num_prefill_tokens: int = 0
    # The prompt cue of the choice whose drafts this iteration verifies (`policy.prompt_steps.prompt_cue`: 1
    # where a request was ending, 0 where none was, -1 where the engine gave no outlooks): the cost model
    # learns how often an iteration carries prompts after each cue.
    prompt_cue: int = -1

    @property
    def iteration_time_s(self) -> float:
        return self.draft_time_s + self.verify_time_s + self.other_time_s


class SameBatchSkips:
    """Lets a chooser answer the same batch again without asking (searching, or asking the chooser inside) for
    a number of calls: `arm` after a call, `skip` before one. Any other batch, or `reset`, ends it."""

    def __init__(self) -> None:
        self._batch: tuple[str, ...] = ()
        self._left = 0

    def skip(self, request_ids: Sequence[str]) -> bool:
        """Whether this call may be skipped (and counts it)."""
        if self._left > 0 and tuple(request_ids) == self._batch:
            self._left -= 1
            return True
        return False

    def arm(self, request_ids: Sequence[str], num_calls: int) -> None:
        """The next `num_calls` calls for this batch may be skipped."""
        self._batch, self._left = tuple(request_ids), num_calls

    def reset(self) -> None:
        self._left = 0


@dataclass(frozen=True)
class RequestOutlook:
    """What drafting a request from now on would cost once and how long it could repay it.

    `num_catch_up_tokens`: tokens its drafter has not seen (a new request's prompt and output so far; a
    request back from K = 0, what it generated meanwhile), which the drafter must run over before its first
    draft. `num_remaining_tokens`: tokens it may still generate (its max_tokens less those generated; an
    upper bound where it can stop earlier)."""

    num_catch_up_tokens: int
    num_remaining_tokens: int


@runtime_checkable
class OutlookAware(Protocol):
    """A chooser that weighs each request's `RequestOutlook`: the engine sets them before asking it."""

    def set_outlook(self, outlook: Mapping[str, RequestOutlook]) -> None:
        """The outlook of the requests of the next `choose` (a request missing from it has none: no cost)."""
        ...


@runtime_checkable
class JoinAware(Protocol):
    """A chooser that also chooses for requests that joined a batch after its K were chosen, the others' K
    kept: an engine that chooses the next step's K while the step before runs (vLLM's scheduler, choosing
    ahead) learns of a request whose prompt completes in the next step only when it schedules that step."""

    def choose_joined(self, joined: Sequence[str], chosen: Mapping[str, int]) -> dict[str, int]:
        """K for each request of `joined` in a batch whose other requests run at `chosen` (decided before)."""
        ...


class KChooser(Protocol):
    """Chooses num_spec_tokens (K) per request. Implemented by every policy, including off and static."""

    def choose(self, request_ids: Sequence[str]) -> dict[str, int]:
        """K for each running request for the next iteration (0 = plain decoding)."""
        ...

    def observe(self, stats: IterationStats) -> None:
        """Feed back what the last iteration did."""
        ...

    def release(self, request_id: str) -> None:
        """Forget a request that finished or was aborted."""
        ...

    def gauges(self) -> dict[str, float]:
        """Counters to export as metrics, by metric name; a wrapper adds those of the chooser it wraps."""
        ...


class Decision(msgspec.Struct, frozen=True):
    """K per request for a window of one router's iterations, published by the central policy."""

    version: int  # increases with every decision the policy publishes (across routers)
    source: str  # the router it is for
    first_iteration: (
        int  # valid for the router's iterations [first_iteration, first_iteration + num_iterations)
    )
    num_iterations: int
    num_spec_tokens: dict[str, int]  # K per request id
    default_num_spec_tokens: int = 0  # for requests admitted after the decision was made
