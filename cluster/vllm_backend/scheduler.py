"""`PolicyScheduler`: a vLLM V1 scheduler whose K (num_spec_tokens) is set per request, every step, by our
policy. Use it with `--scheduler-cls cluster.vllm_backend.scheduler.PolicyScheduler` and our worker (see
settings.py).

How a V1 step runs with a draft model (vLLM 0.32/0.33, synchronous scheduling), and where we act:
1. `schedule()` verifies the drafts each request holds (`request.spec_token_ids`, proposed at the end of
   the previous step). We cut them first to the K_r decided last step: vLLM's ragged verification then
   checks K_r drafts for request r (0 included) in one target forward.
2. `_update_after_schedule()` ends `schedule()`: we take K_r of every request that drafts at the end of
   this step and set `SchedulerOutput.num_spec_tokens_to_schedule` (the drafter's number of steps at the
   end of this step) to max K_r. The drafter drafts that many tokens for every request; step 1 of the next
   step cuts them. The output also names the requests with K_r > 0 (`settings.DRAFTING_REQUESTS_ATTR`): our
   worker catches up the drafter's KV for those alone.
   While the worker runs the step, the engine core calls `get_grammar_bitmask()` and then only waits for
   it: we do there what no decision waits for (the cost model's refit, writing the step record) and, for
   the choosers that learn, ask the chooser for the next step's K (`choose_ahead`); otherwise, and when
   nothing was chosen ahead, the chooser is asked here.
3. `update_from_output()`: per request, drafted = len(scheduled drafts), accepted = sampled tokens - 1. The
   step's `IterationStats` go to the chooser (inside the measured guard) and, through it, to the central
   SpecPolicy actor when the engine runs under our Serve app.

What the scheduler alone cannot change (see the README's vllm section):
- vLLM's model runner runs the drafter's "first pass" every step, even at `num_spec_tokens_to_schedule ==
  0`: it keeps the drafter's KV cache in step with the target's. Our worker (`runner.py`, `--worker-cls
  cluster.vllm_backend.runner.CatchUpWorker`) skips it on steps where this scheduler sets 0 draft steps
  and catches the drafter up when a request drafts again; without it, K = 0 everywhere still costs one
  draft forward over the batch per step.
- After every step, vLLM's engine core fetches the step's drafts from the worker, a round trip to the
  worker process when workers run in processes, even when the step drafted nothing. Our executor
  (`executor.py`, `--distributed-executor-backend`) skips it on steps where this scheduler sets 0 draft steps.
- Every request that drafts (K_r > 0) gets the batch's max K drafts (our worker drafts for those alone; vLLM's
  runner, for every request); we only cut what is verified. K never exceeds the
  `num_speculative_tokens` given at launch (K_max: KV slots are reserved for it).
- The scheduler times each step (schedule() to update_from_output()); our worker measures the drafter's
  part and sends it with the step's output (`runner.DraftMeasurement`). An iteration of the policy is a
  step's verification plus the drafting for it, which ran at the end of the step before: the scheduler
  reports the previous step's draft time and catch-up tokens with this step's verified drafts, and this
  step's wall time less its own drafting as verify time. Without our worker the whole step is verify time.
  There are no expert counts (the cost model falls back to N(t)).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.core.sched.scheduler import Scheduler

from cluster.vllm_backend.chooser import (
    DrafterLag,
    NearDrafting,
    build_chooser,
    decoding_requests,
    drafts_requests_alone,
    iteration_stats,
    measures_draft_time,
)
from cluster.vllm_backend.compat import check_vllm
from cluster.vllm_backend.counters import SchedulerCounters
from cluster.vllm_backend.k_plan import KPlan
from cluster.vllm_backend.settings import (
    DRAFT_MEASUREMENT_ATTR,
    DRAFTING_REQUESTS_ATTR,
    NUM_SPEC_TOKENS_ARG,
    DraftMeasurement,
    SchedulerSettings,
)
from cluster.vllm_backend.step_record import StepLog, StepRecord
from policy.prompt_steps import NO_CUE, prompt_cue
from policy.stats import KChooser, RequestIterationStats

logger = logging.getLogger(__name__)


class PolicyScheduler(Scheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_vllm()
        super().__init__(*args, **kwargs)
        if self.scheduler_config.async_scheduling:
            # Async scheduling schedules step t+1 before step t's drafts exist (placeholders): untested here.
            raise RuntimeError("PolicyScheduler runs with synchronous scheduling: pass --no-async-scheduling")
        # Typed as a hashable in vLLM; a dict in practice.
        additional: Any = self.vllm_config.additional_config
        self.settings = SchedulerSettings.from_additional_config(additional)
        self.max_spec_tokens = self.num_spec_tokens  # K_max, fixed at launch by --speculative-config
        if self.max_spec_tokens == 0:
            logger.warning("PolicyScheduler without --speculative-config: every request runs plain")
        source = self.settings.source or f"vllm-{uuid.uuid4().hex[:8]}"
        chooser, self._cost_model = build_chooser(
            self.settings, self.vllm_config, self.max_spec_tokens, source
        )
        # Where each request's draft KV is missing (our worker catches it up when the request drafts).
        self._lag = DrafterLag(
            skips_drafter=measures_draft_time(self.vllm_config),
            drafts_alone=drafts_requests_alone(self.vllm_config),
        )
        # Choosing ahead (`get_grammar_bitmask`) for the choosers that learn.
        chooses_ahead = self.settings.choose_ahead and self.settings.policy.kind not in ("off", "static")
        self.k_plan = KPlan(chooser, self.max_spec_tokens, self._lag, chooses_ahead, self._tell_chooser)
        # Choosing ahead, the chooser's observe() of a step and release() of the requests it finished wait (in
        # order) until the chooser is next asked: while the worker runs the next step (`get_grammar_bitmask`),
        # or on the path before it where a request joins it (`KPlan.before_choosing`). See `_tell_chooser`.
        self._defers_observing = chooses_ahead
        self._untold: list[tuple[str, Any]] = []  # (the chooser's method, its argument)
        self._untold_record: StepRecord | None = None  # the last step's record, completed when it is told
        # vLLM pads a resumed single-token decode with K_max placeholder drafts unless a dynamic-K table is
        # set; a table (K_max everywhere, overridden every step below) turns that padding off.
        if self.max_spec_tokens:
            self.dynamic_sd_lookup = [self.max_spec_tokens] * (self.max_num_running_reqs + 1)
        self.log = StepLog(self.settings)
        self.counters = SchedulerCounters()
        self._step_start = 0.0
        self._step_end = 0.0  # perf_counter() after the last update_from_output()
        # The requests that vLLM freed in the step being observed (None between steps: released at once).
        self._finishing: list[str] | None = None
        # What the drafter did at the end of the last step: its drafts are verified in this step.
        self._last_draft = DraftMeasurement(0.0, 0)
        self._near_drafting = NearDrafting()
        # The prompt cue of the choice whose drafts this step verifies (`IterationStats.prompt_cue`).
        self._verified_cue = NO_CUE
        self._measures_draft = False  # a measurement has arrived (logged once)
        self._refits_between_steps = False  # a refit ran in `_observe` (logged once)
        self._refit_cpu_s = 0.0  # CPU in refits since the last step's record (`StepRecord.refit_cpu_s`)

    # -- vLLM's hooks ----------------------------------------------------------------------------------------

    @property
    def chooser(self) -> KChooser:
        return self.k_plan.chooser

    @chooser.setter
    def chooser(self, chooser: KChooser) -> None:
        self.k_plan.chooser = chooser

    def add_request(self, request: Any) -> None:
        extra = request.sampling_params.extra_args if request.sampling_params is not None else None
        self.k_plan.add(request.request_id, (extra or {}).get(NUM_SPEC_TOKENS_ARG))
        super().add_request(request)

    def schedule(self, *args: Any, **kwargs: Any) -> SchedulerOutput:
        self._step_start = time.perf_counter()
        chosen = self.k_plan.chosen
        for request in self.running:  # cut each request's held drafts to its K
            limit = chosen.get(request.request_id, 0)
            if len(request.spec_token_ids) > limit:
                request.spec_token_ids = request.spec_token_ids[:limit]
        return super().schedule(*args, **kwargs)

    def _update_after_schedule(self, scheduler_output: SchedulerOutput) -> None:
        if self.max_spec_tokens:
            # This step verifies the drafts of the choice made for the step before: its prompt cue.
            self._verified_cue = prompt_cue(self.k_plan.chosen_outlook.values())
            chosen = self.k_plan.decide(self._drafting_ids(scheduler_output), self.requests)
            scheduler_output.num_spec_tokens_to_schedule = max(chosen.values(), default=0)
            drafting = frozenset(r for r, k in chosen.items() if k > 0)
            scheduled = scheduler_output.num_scheduled_tokens  # (before vLLM advances num_computed_tokens)
            self._lag.step({r: self.requests[r].num_computed_tokens for r in scheduled}, drafting)
            setattr(scheduler_output, DRAFTING_REQUESTS_ATTR, drafting)  # pickled with it to the worker
        super()._update_after_schedule(scheduler_output)

    def get_grammar_bitmask(self, scheduler_output: SchedulerOutput) -> Any:
        """vLLM's engine core calls this between sending a step to the worker and waiting for its output: our
        work that no decision waits for runs here, where the engine core would only wait for the worker (on
        CPU it spins on the worker's message queue). Between two steps it would delay the next one:
        - the cost model's refit (0.7-1 ms of CPU at batch 16-32, every 16 or so steps);
        - writing the step record (the benchmarks keep one): 0.2 ms of CPU at batch 32.
        Served, the engine core's work between steps took 5-15x its CPU time (session 19: the chooser on the
        demo pair, 2 cores shared with the API server and the client). The refit runs here alone, so that
        `bench.replay_record` replays it at the same point: after the step's choice.

        Choosing ahead: the next step's K are chosen here too, for this step's drafting requests, which are the
        next step's decoding requests less those that finish in this step (`choose_ahead`). Chosen between
        steps, `choose` took 1.3-2.8 ms of wall time for 0.4-0.6 ms of CPU on the regime pair (vLLM's CPU
        build, 2 cores: the engine core shares its core with the API server streaming the step just done), 2-4%
        of a step. The cost: the choice misses this step's outcome (vLLM's asynchronous scheduling misses it
        too), and a request whose prompt completes in the next step is not in it: the chooser gives it its K
        when that step is scheduled, the others' kept (`KPlan.decide`)."""
        bitmask = super().get_grammar_bitmask(scheduler_output)
        self._tell_chooser()
        self.k_plan.choose_ahead(self.requests)
        self._refit_if_due()
        self.log.write()
        return bitmask

    def update_from_output(self, scheduler_output: SchedulerOutput, model_runner_output: Any) -> Any:
        requests = decoding_requests(scheduler_output, model_runner_output, self.requests)
        self._finishing = []  # vLLM frees the requests that finish in this step: released after `_observe`
        try:
            outputs = super().update_from_output(scheduler_output, model_runner_output)
            draft = getattr(model_runner_output, DRAFT_MEASUREMENT_ATTR, None)
            self._observe(scheduler_output, requests, draft)
        finally:
            finishing, self._finishing = self._finishing, None
            for request_id in finishing:
                self._to_chooser("release", request_id)
        if not self.has_unfinished_requests():  # idle next: nothing waits for these
            self._tell_chooser()
            if self.log.file is not None:
                self.log.write()
        return outputs

    def shutdown(self) -> None:
        self.log.close()
        super().shutdown()

    def _free_request(self, request: Any, *args: Any, **kwargs: Any) -> Any:
        request_id = request.request_id
        # A request at a fixed K is observed too (the policy learns the traffic from it): its state goes, after
        # its last step is observed where that step finishes it (`_finishing`). Released before, its state was
        # made again by that observation and kept for good: one `RequestState` per request served, and every
        # finished request's last step counted again as a new request's first in the traffic's acceptance.
        if self._finishing is None:
            self._tell_chooser()  # (what it was not told yet happened before)
            self.chooser.release(request_id)
        else:
            self._finishing.append(request_id)
        self.k_plan.forget(request_id)
        return super()._free_request(request, *args, **kwargs)

    # -- the policy ------------------------------------------------------------------------------------------

    def _drafting_ids(self, scheduler_output: SchedulerOutput) -> list[str]:
        """Requests that will have a sampled token after this step (prefill done): the drafter drafts for them.
        Called before vLLM advances num_computed_tokens for this step."""
        ids = []
        for request_id, num_tokens in scheduler_output.num_scheduled_tokens.items():
            request = self.requests[request_id]
            if request.num_computed_tokens + num_tokens >= request.num_tokens:
                ids.append(request_id)
        return ids

    def _observe(
        self,
        scheduler_output: SchedulerOutput,
        requests: list[RequestIterationStats],
        draft: DraftMeasurement | None,
    ) -> None:
        """`draft`: the drafter at the end of this step, measured by our worker (None without it)."""
        now = time.perf_counter()
        step_time_s = now - self._step_start
        gap_s = self._step_start - self._step_end if self._step_end else 0.0
        counters = self.counters
        counters.num_steps += 1
        counters.num_drafting_steps += scheduler_output.num_spec_tokens_to_schedule > 0
        if draft is not None and not self._measures_draft:
            self._measures_draft = True
            logger.info(
                "PolicyScheduler: the worker measures the drafter; steps split into draft and verify time"
            )
        previous, self._last_draft = self._last_draft, draft or DraftMeasurement(0.0, 0)
        counters.draft_time_s += self._last_draft.time_s
        drafts_next = scheduler_output.num_spec_tokens_to_schedule > 0
        verified = any(r.num_spec_tokens for r in requests)
        is_near = self._near_drafting.step(drafts_at_end=drafts_next, verified=verified)
        scheduled = scheduler_output.num_scheduled_tokens
        num_tokens = sum(scheduled.values())
        num_prefill_tokens = num_tokens - sum(scheduled.get(r.request_id, 0) for r in requests)
        # Still due from the last step: this vLLM did not call get_grammar_bitmask in between.
        if self._refit_if_due() and not self._refits_between_steps:
            self._refits_between_steps = True
            logger.warning("PolicyScheduler: vLLM did not call get_grammar_bitmask; refits run between steps")
        if requests:
            stats = iteration_stats(
                counters.num_steps,
                requests,
                step_time_s,
                draft,
                previous,
                is_near_drafting=is_near,
                num_prefill_tokens=num_prefill_tokens,
                gap_s=gap_s,
                prompt_cue=self._verified_cue,
            )
            self._to_chooser("observe", stats)
        counters.count_step(requests, step_time_s)
        if self.log.takes_steps:
            record = self._step_record(
                scheduler_output,
                requests,
                draft,
                step_time_s=step_time_s,
                num_prefill_tokens=num_prefill_tokens,
                observe_s=time.perf_counter() - now,
                gap_s=gap_s,
                is_near=is_near,
                start_s=time.time() - (now - self._step_start),
            )
            self.log.keep(record)
            self._untold_record = record if self._untold else None
        self._refit_cpu_s = 0.0
        self.log.write_metrics(self.counters, self.chooser)
        self._step_end = time.perf_counter()

    def _to_chooser(self, method: str, argument: Any) -> None:
        """The chooser's observe() or release(): now, or where it is deferred, in order when next told."""
        if self._defers_observing:
            self._untold.append((method, argument))
        else:
            getattr(self.chooser, method)(argument)

    def _tell_chooser(self) -> None:
        """What the chooser was not told yet (`_to_chooser`), in order; its time goes in the step's record
        (`StepRecord.observe_ahead_s`) with the guard's verdicts after it.

        Why: these calls ran between a step and the next, where the worker waits for the engine core: auto's
        observe() took 0.14 ms a step there served on the demo pair at 16 / 32 (session 68), our scheduler at K
        = 0 0.03, beside a 12-17 ms step. Deferred, the chooser sees the same calls in the same order as
        before: nothing asks it in between but a request joining the next step (`KPlan.before_choosing`
        tells it first), and the choice made ahead for the step after is made after them, as it was. What
        reads it between steps without asking (the gauges, written once a second) sees it a step late. Served
        (session 68, demo pair at 16 / 32), the chooser's time on the path fell from 0.26 to 0.20 ms a step:
        most steps there have a request joining, whose `choose_joined` now tells the chooser first."""
        if not self._untold:
            return
        start = time.perf_counter()
        untold, self._untold = self._untold, []
        for method, argument in untold:
            getattr(self.chooser, method)(argument)
        record, self._untold_record = self._untold_record, None
        if record is not None:
            record.observe_ahead_s = time.perf_counter() - start
            record.guard_holds = getattr(self.chooser, "num_holds", 0)

    def _refit_if_due(self) -> bool:
        """The cost model's refit, if due (`CostModel.refit_if_due`); its CPU goes in the step's record."""
        start = time.thread_time()
        is_refit = self._cost_model.refit_if_due()
        if is_refit:
            self._refit_cpu_s += time.thread_time() - start
        return is_refit

    def _step_record(
        self,
        scheduler_output: SchedulerOutput,
        requests: list[RequestIterationStats],
        draft: DraftMeasurement | None,
        *,
        step_time_s: float,
        num_prefill_tokens: int,
        observe_s: float,
        gap_s: float,
        is_near: bool,
        start_s: float,
    ) -> StepRecord:
        """The step as the record keeps it (`bench.vllm_policy`, `bench.replay_record`)."""
        scheduled = scheduler_output.num_scheduled_tokens
        return StepRecord(
            step=self.counters.num_steps,
            num_drafts={r.request_id: r.num_spec_tokens for r in requests},
            num_accepted={r.request_id: r.num_accepted_tokens for r in requests},
            chosen=dict(self.k_plan.chosen),
            num_draft_steps=scheduler_output.num_spec_tokens_to_schedule,
            step_time_s=step_time_s,
            draft_time_s=None if draft is None else draft.time_s,
            guard_holds=getattr(self.chooser, "num_holds", 0),
            num_scheduled=len(scheduled),
            num_tokens=sum(scheduled.values()),
            num_prefill_tokens=num_prefill_tokens,
            draft_prefill_tokens=None if draft is None else draft.num_prefill_tokens,
            choose_s=self.k_plan.choose_s,
            choose_cpu_s=self.k_plan.choose_cpu_s,
            is_chosen_ahead=self.k_plan.is_chosen_ahead,
            join_s=self.k_plan.join_s,
            join_cpu_s=self.k_plan.join_cpu_s,
            outlook={
                r: [o.num_catch_up_tokens, o.num_remaining_tokens]
                for r, o in self.k_plan.chosen_outlook.items()
            },
            observe_s=observe_s,
            refit_cpu_s=self._refit_cpu_s,
            gap_s=gap_s,
            is_near_drafting=is_near,
            start_s=start_s,
        )
