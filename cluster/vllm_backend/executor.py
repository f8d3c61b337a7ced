"""Executors that spare the engine core its per-step fetch of draft tokens from the worker.
Use one beside the scheduler and the worker: `--distributed-executor-backend` with the qualname that
`settings.executor_backend` gives (the multiprocess one on CPU).

Why (measured in session 19, `docs/vllm-backend-measurements.md`): with synchronous scheduling and a
speculative config, vLLM's engine core asks the worker for the step's drafts after every step
(`EngineCore.post_step` → `Executor.take_draft_token_ids`). With the multiprocess executor (vLLM's on CPU, and
with several GPUs) that is a round trip through the worker's message queue: 9.0-9.5% of the engine core's busy
loop at concurrency 1 on the demo pair, on steps where every K is 0 as much as on others. vLLM without
speculation makes no such call. Served on the demo pair at batch 4, the engine core spent 1.5-2.4 ms between
two steps after a step that drafted, 0.1 ms after one that did not (session 20's step record): 10-15% of a
drafting step there.

- On a step whose scheduler output set 0 draft steps (`num_spec_tokens_to_schedule`: our scheduler's max K_r
  over the batch), the drafts are empty for every request. vLLM's `schedule()` has already emptied the held
  drafts of every request it scheduled, and only those are in a step's drafts, so the fetch would change
  nothing in the scheduler: these executors return None instead of making it (as vLLM does when it has no
  drafts).
- On a step that drafts, our worker (`runner.CatchUpWorker`) attaches the drafts to the step's output
  (`settings.DRAFT_TOKEN_IDS_ATTR`), computed as the fetch computes them and after everything the worker
  does in the step: the executors hand those to the engine core. The output travels back anyway; the drafts
  add a few hundred integers to it. Without our worker (no attribute), they fetch as before.

Scope: synchronous scheduling without pipeline parallelism (one step in flight, what PolicyScheduler runs).
With a batch queue (pipeline parallelism), a later step's output could be scheduled before an earlier step's
fetch, so the executors fetch every step there, as vLLM does.
"""

from __future__ import annotations

from concurrent.futures import Future
from typing import Any

from vllm.v1.executor.multiproc_executor import MultiprocExecutor
from vllm.v1.executor.uniproc_executor import UniProcExecutor

from cluster.vllm_backend.settings import DRAFT_TOKEN_IDS_ATTR

_NOT_ATTACHED = object()  # the step's output carried no drafts: fetch them


class SkipsEmptyDraftFetch:
    """Mixed into a vLLM executor: remembers whether the last step drafts and the drafts its output carried,
    and fetches drafts only when it drafts and they did not come with the output."""

    def __init__(self, vllm_config: Any, *args: Any, **kwargs: Any) -> None:
        parallel, scheduler = vllm_config.parallel_config, vllm_config.scheduler_config
        self.skips_empty_fetch = parallel.pipeline_parallel_size == 1 and not scheduler.async_scheduling
        self.num_skipped_fetches = 0  # steps that drafted nothing
        self.num_drafts_from_output = 0  # steps whose drafts came with the output
        self._step_drafts = True  # until a step says otherwise: fetch
        self._attached_drafts: Any = _NOT_ATTACHED
        parent: Any = super()
        parent.__init__(vllm_config, *args, **kwargs)

    def execute_model(self, scheduler_output: Any, non_block: bool = False) -> Any:
        self._step_drafts = scheduler_output.num_spec_tokens_to_schedule > 0
        self._attached_drafts = _NOT_ATTACHED
        parent: Any = super()
        return parent.execute_model(scheduler_output, non_block=non_block)

    def sample_tokens(self, grammar_output: Any, non_block: bool = False) -> Any:
        parent: Any = super()
        output = parent.sample_tokens(grammar_output, non_block=non_block)
        if not isinstance(output, Future):  # (the engine core's synchronous step waits for the output)
            self._attached_drafts = getattr(output, DRAFT_TOKEN_IDS_ATTR, _NOT_ATTACHED)
        return output

    def take_draft_token_ids(self) -> Any:
        if self.skips_empty_fetch:
            if not self._step_drafts:
                self.num_skipped_fetches += 1
                return None
            drafts, self._attached_drafts = self._attached_drafts, _NOT_ATTACHED
            if drafts is not _NOT_ATTACHED:
                self.num_drafts_from_output += 1
                return drafts
        parent: Any = super()
        return parent.take_draft_token_ids()


class PolicyMultiprocExecutor(SkipsEmptyDraftFetch, MultiprocExecutor):
    """vLLM's multiprocess executor (workers in their own processes: vLLM's choice on CPU and for several
    GPUs), without the draft fetch on steps that draft nothing."""


class PolicyUniProcExecutor(SkipsEmptyDraftFetch, UniProcExecutor):
    """vLLM's in-process executor (one GPU, or an engine core without multiprocessing), without the draft
    fetch on steps that draft nothing."""
