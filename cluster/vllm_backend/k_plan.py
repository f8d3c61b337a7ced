"""`KPlan`: the K each request drafts at the end of the step vLLM is scheduling, as `PolicyScheduler` decides
it. A request's K is the setting it asked for through the API (`num_spec_tokens`), else the chooser's choice,
within [0, K_max]. The choice is made while the worker runs the step before (`choose_ahead`, for the choosers
that learn) or when the step is scheduled; a request whose prompt completes in the step gets its K then, the
others' kept (`JoinAware.choose_joined`). No vLLM import: it reads vLLM's requests by their token counts.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, cast

from cluster.vllm_backend.chooser import DrafterLag
from cluster.vllm_backend.settings import parse_num_spec_tokens
from policy.stats import JoinAware, KChooser, OutlookAware, RequestOutlook

logger = logging.getLogger(__name__)


class KPlan:
    """`requests` below: vLLM's requests by id (`Scheduler.requests`)."""

    def __init__(
        self,
        chooser: KChooser,
        max_spec_tokens: int,
        lag: DrafterLag,
        chooses_ahead: bool,
        before_choosing: Callable[[], None] = lambda: None,
    ) -> None:
        self.chooser = chooser
        # Called before every call that asks the chooser (the scheduler's deferred observations go in first).
        self.before_choosing = before_choosing
        self.max_spec_tokens = max_spec_tokens
        self.lag = lag  # where each request's draft KV is missing: its catch-up, in its outlook
        self.chooses_ahead = chooses_ahead
        self.requested: dict[str, int | None] = {}  # the per-request setting (None: the policy decides)
        self.chosen: dict[str, int] = {}  # K decided for the step last scheduled (its drafts verified next)
        self.choose_s = 0.0  # in the chooser for `chosen` (off the path between steps when chosen ahead)
        self.choose_cpu_s = 0.0  # ... of which this thread ran on a CPU
        # in the chooser for the requests that joined the step (`_choose_joined`: on its path); of that, on a CPU
        self.join_s = self.join_cpu_s = 0.0
        self.is_chosen_ahead = False  # `chosen` was chosen while the worker ran the step before
        # The outlooks the chooser was given with `chosen` (the step record keeps them, so that
        # `bench.replay_record` gives the chooser the same), with the last choice, and with the ahead choice.
        self.chosen_outlook: dict[str, RequestOutlook] = {}
        self._outlook_given: dict[str, RequestOutlook] = {}
        self._ahead_outlook: dict[str, RequestOutlook] = {}
        self._drafting: list[str] = []  # the requests that draft at the end of the step in flight
        self._ahead: dict[str, int] | None = None  # K chosen for them, for the next step
        self._ahead_s = self._ahead_cpu_s = 0.0

    @property
    def chooser(self) -> KChooser:
        return self._chooser

    @chooser.setter
    def chooser(self, chooser: KChooser) -> None:
        # What it takes, read once: a check against a runtime Protocol took 5-15 us, asked every step.
        self._chooser = chooser
        self._takes_outlook = isinstance(chooser, OutlookAware)
        self._takes_joined = isinstance(chooser, JoinAware)

    def add(self, request_id: str, value: Any) -> None:
        """A new request and its `num_spec_tokens` extra argument (None: not given)."""
        try:
            self.requested[request_id] = parse_num_spec_tokens(value, self.max_spec_tokens)
        except ValueError as error:  # the API layer validates; a direct engine user gets the policy's choice
            logger.warning("request %s: %s; the policy decides its K", request_id, error)
            self.requested[request_id] = None

    def forget(self, request_id: str) -> None:
        self.requested.pop(request_id, None)
        self.chosen.pop(request_id, None)
        self.lag.forget(request_id)

    def decide(self, drafting: list[str], requests: Mapping[str, Any]) -> dict[str, int]:
        """K for the requests that draft at the end of the step being scheduled (`chosen`): chosen ahead where
        it was, else now."""
        self._drafting = drafting
        ahead, self._ahead = self._ahead, None
        self.is_chosen_ahead = ahead is not None
        self.join_s = self.join_cpu_s = 0.0
        if ahead is None:
            start, start_cpu = time.perf_counter(), time.thread_time()
            self.chosen = self._choose(drafting, requests)
            self.choose_s = time.perf_counter() - start
            self.choose_cpu_s = time.thread_time() - start_cpu
            self.chosen_outlook = self._outlook_given
        else:
            self.chosen = {r: self._k(r, ahead.get(r, 0)) for r in drafting}
            self.choose_s, self.choose_cpu_s = self._ahead_s, self._ahead_cpu_s
            self.chosen_outlook = self._ahead_outlook
            self._choose_joined(ahead)
        return self.chosen

    def choose_ahead(self, requests: Mapping[str, Any]) -> None:
        """While the worker runs the step: the next step's K for this step's drafting requests, which are the
        next step's decoding requests less those that finish in this step."""
        if not self.chooses_ahead or not self._drafting:
            return
        start, start_cpu = time.perf_counter(), time.thread_time()
        self._ahead = self._choose(self._drafting, requests)
        self._ahead_outlook = self._outlook_given
        self._ahead_s = time.perf_counter() - start
        self._ahead_cpu_s = time.thread_time() - start_cpu

    def outlook(self, request_ids: Sequence[str], requests: Mapping[str, Any]) -> dict[str, RequestOutlook]:
        """Each request's drafter catch-up if it drafted next (`DrafterLag`) and the tokens it may still
        generate (its max_tokens less those generated)."""
        outlook = {}
        for request_id in request_ids:
            request = requests.get(request_id)
            if request is not None:
                outlook[request_id] = RequestOutlook(
                    num_catch_up_tokens=self.lag.catch_up_tokens(request_id, request.num_tokens),
                    num_remaining_tokens=max(0, request.max_tokens - request.num_output_tokens),
                )
        return outlook

    def _choose(self, request_ids: Sequence[str], requests: Mapping[str, Any]) -> dict[str, int]:
        auto = [r for r in request_ids if self.requested.get(r) is None]
        if auto:
            self.before_choosing()
        self._outlook_given = {}
        if auto and self._takes_outlook:
            self._outlook_given = self.outlook(auto, requests)
            cast(OutlookAware, self.chooser).set_outlook(self._outlook_given)
        chosen = self.chooser.choose(auto) if auto else {}
        return {r: self._k(r, chosen.get(r, 0)) for r in request_ids}

    def _choose_joined(self, ahead: dict[str, int]) -> None:
        """K for the requests whose prompts complete in this step, which the choice made ahead did not know
        (`JoinAware.choose_joined`, the others' K kept); without a chooser that takes them, the K they asked
        for through the API, else 0."""
        joined = [r for r in self._drafting if r not in ahead and self.requested.get(r) is None]
        if not joined or not self._takes_joined:
            return
        start, start_cpu = time.perf_counter(), time.thread_time()
        self.before_choosing()
        others = {r: k for r, k in self.chosen.items() if r in ahead and self.requested.get(r) is None}
        for request_id, k in cast(JoinAware, self.chooser).choose_joined(joined, others).items():
            self.chosen[request_id] = self._k(request_id, k)
        self.join_s = time.perf_counter() - start
        self.join_cpu_s = time.thread_time() - start_cpu

    def _k(self, request_id: str, policy_k: int) -> int:
        """A request's K: the K it asked for through the API, else the policy's, within [0, K_max]."""
        wanted = self.requested.get(request_id)
        return max(0, min(policy_k if wanted is None else wanted, self.max_spec_tokens))
