"""`CatchUpWorker`: a vLLM worker whose model runner skips the drafter on steps where every K is 0, and
catches the drafter's KV cache up when a request drafts again (as our native engine does).
Use it beside the scheduler: `--worker-cls cluster.vllm_backend.runner.CatchUpWorker`.

Why (see the README's vllm section): vLLM's model runner calls the draft model's "first pass" every step,
even at `num_spec_tokens_to_schedule == 0`: it feeds the tokens the target just computed through the draft
model, which is how the draft's KV cache stays in step. At K = 0 that pass only writes KV, and it cost
1.2-1.5x a plain step on our pairs. This runner, on a step with 0 draft steps for the whole batch:
- does not run the drafter (its bookkeeping of the sampled tokens still runs, as vLLM's does at K = 0);
- records, per request, the first position whose draft KV is missing (`lag_from`).
On the next step that drafts, before vLLM's own first pass, one catch-up pass runs the draft model over each
lagging request's missed span (its committed tokens, read from the input batch, at their positions, into the
request's own KV blocks): the draft KV is then what it would have been without the skips, and vLLM's pass
drafts from it. Spans longer than the drafter's token buffers are split into several passes.

Only the requests whose K is above 0 at that step are caught up (our scheduler names them on its output,
`settings.DRAFTING_REQUESTS_ATTR`; without the name, all are), and vLLM's pass drafts for them alone
(`drafter_rows`, where `settings.drafts_alone`): a request at K = 0 in a drafting step lags from that step on,
as in a step without the drafter, and the catch-up of the step it drafts at writes everything from there.
Catching the whole batch up for one request's test was most of what a test cost at large batches: served on
the regime pair at concurrency 32 (prose), a step that started drafting after plain ones spent 70-100 ms in
the drafter, against 7-8 ms when drafting went on, and 54-58 ms for a plain step. Drafting the whole batch for
it was most of the rest (10.9 ms in the drafter at batch 17-32 against 3.4 ms at batch 1). Where vLLM's pass
still runs over the whole batch (probabilistic drafts), a lagging request at K = 0 gets drafts from its
incomplete draft KV, cut before verification, and stays lagging from the same position.

Drafts never change the output (verification is exact), so the catch-up is about acceptance: the tests check
that drafts after skipped steps are accepted exactly as often as without skipping.

A batch with no draft to verify (every request at K = 0 in the step before) is prepared and sampled as vLLM
without speculation does it:
- sampled by vLLM's plain sampler instead of its rejection sampler: with 0 drafts the rejection sampler only
  samples the bonus token, through the same sampler, but around it builds the target logits, applies the
  constraints and runs the rejection kernel over nothing. Served at concurrency 1 on the demo pair that took
  about 3x the plain sampler's time, 0.6 ms a token (py-spy, `bench.vllm_k0_served --profile`);
- prepared without spec-decode metadata: with a speculative config, vLLM's `_prepare_inputs` builds it for
  every step, drafts or none (per-request draft counts, logits and bonus indices, copied to the device).
  Offline at batch 16 on the demo pair (py-spy, one engine at a time, every K = 0), that was about 0.17 ms
  of a 15 ms step (1%). It is vLLM's own path when a step has no metadata (its drafter handles that); taken
  only where every KV cache group is attention: recurrent layers (Mamba, GDN) read a decode step's state at
  an offset that only the spec-decode path sets.

The runner also measures the drafter: each step's `ModelRunnerOutput` carries a `DraftMeasurement` (seconds
in the drafter, catch-up included, and the history tokens the catch-up fed) in its `moespec_draft` attribute,
which reaches the scheduler's `update_from_output` in the engine-core process (pickled with the output when
the worker is a process of its own). The scheduler splits each step's wall time into draft and verify time
with it, so that the cost model fits the drafter's terms instead of folding them into the target's.

Scope: vLLM's V1 model runner (`GPUModelRunner`, which the CPU runner extends) with a draft model
(`method: draft_model`) and the padded drafter batch (vLLM's default). Anything else (EAGLE, whose catch-up
would need the target's hidden states of the missed tokens; the V2 runner) runs vLLM's runner unchanged,
with a warning.

Prefix caching. A request that finishes while lagging leaves up to its lag of draft KV unwritten in its blocks
(a request that never drafted: its prompt's too), and a later prompt that shares those blocks (a multi-turn
chat, a common system prompt, a benchmark's prompts sent again) reads them from the cache. So the runner keeps
the blocks whose draft KV is written for every position they hold (`draft_blocks.DraftBlocks`), and a request
whose first step starts from cached blocks lags from the first of them not written: the catch-up writes the
rest when it drafts. Without that it drafted from KV never written (or a block's earlier content): acceptance
lower, output unchanged (`test_a_prefix_cache_hit_drafts_from_draft_kv_written_for_it`). The scheduler's copy
of the lag (`chooser.DrafterLag`) does not see these blocks: its outlook leaves such a request's prefix out of
the catch-up it names.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from typing import Any

import numpy as np
import torch
from vllm.platforms import current_platform
from vllm.v1.attention.backend import CommonAttentionMetadata
from vllm.v1.kv_cache_interface import AttentionSpec
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, ModelRunnerOutput
from vllm.v1.spec_decode.draft_model import DraftModelProposer
from vllm.v1.worker.gpu_model_runner import GPUModelRunner
from vllm.v1.worker.gpu_worker import Worker

from cluster.vllm_backend.draft_blocks import DraftBlocks
from cluster.vllm_backend.drafter_rows import drafting_rows_alone
from cluster.vllm_backend.settings import (
    DRAFT_MEASUREMENT_ATTR,
    DRAFT_TOKEN_IDS_ATTR,
    DRAFTING_REQUESTS_ATTR,
    DraftMeasurement,
    drafts_alone,
)

logger = logging.getLogger(__name__)
# What the runner relies on, checked when the worker starts.
_RUNNER_HOOKS = (
    "_prepare_inputs",
    "propose_draft_token_ids",
    "_copy_valid_sampled_token_count",
    "_sample",
    "take_draft_token_ids",
)
_PROPOSER_HOOKS = ("propose", "prepare_next_token_ids_padded", "max_num_tokens", "hidden_states")


class CatchUpRunnerMixin:
    """Added to vLLM's V1 model runner class (see `_enable`); its state lives in `_catch_up_*` attributes."""

    # Attributes of GPUModelRunner this mixin reads (declared for type checkers).
    drafter: Any
    input_batch: Any
    requests: dict[str, Any]
    speculative_config: Any
    kv_cache_config: Any
    device: torch.device
    discard_request_mask: Any
    take_draft_token_ids: Any

    def _init_catch_up(self) -> None:
        # False: vLLM's path at K = 0 (the drafter's pass every step, the rejection sampler); tests flip it
        self.skips_drafter = True
        # True: a step that drafts runs the drafter for the requests at K > 0 alone (`drafter_rows`); False:
        # for the whole batch, as vLLM does (`settings.drafts_alone`).
        self.drafts_alone = drafts_alone(self.speculative_config)
        self.lag_from: dict[str, int] = {}  # request -> first position whose draft KV is missing
        self.draft_blocks = DraftBlocks()  # prefix caching: the blocks holding draft KV (module docstring)
        self._draft_group: tuple[int, int] | None = None  # `draft_cache_group`
        self.num_skipped_steps = 0
        self.num_catch_up_passes = 0
        self.num_catch_up_tokens = 0
        self._draft_measurement: DraftMeasurement | None = None
        self._drafted = False  # the drafter ran at this step (not skipped)
        self._attention_only: bool | None = None  # `_is_attention_only`, once the KV cache exists

    def sample_tokens(self, *args: Any, **kwargs: Any) -> Any:
        """vLLM's, with this step's `DraftMeasurement` attached to its output (see the module docstring), and
        on a step that drafted, its drafts: what `take_draft_token_ids` would answer the engine core's fetch
        after the step (nothing runs in the worker in between), so that our executor hands them over without
        a round trip to this process (executor.py)."""
        parent: Any = super()
        self._draft_measurement, self._drafted = None, False
        output = parent.sample_tokens(*args, **kwargs)
        measured = self._draft_measurement
        if (
            measured is not None
            and isinstance(output, ModelRunnerOutput)
            and output is not EMPTY_MODEL_RUNNER_OUTPUT
        ):
            setattr(output, DRAFT_MEASUREMENT_ATTR, measured)
            if self._drafted:
                setattr(output, DRAFT_TOKEN_IDS_ATTR, self.take_draft_token_ids())
        return output

    def _prepare_inputs(self, scheduler_output: Any, *args: Any, **kwargs: Any) -> Any:
        """vLLM's, on a step with no draft to verify in the whole batch prepared as vLLM without speculation
        prepares it: no spec-decode metadata (see the module docstring)."""
        parent: Any = super()
        if (
            not self.skips_drafter
            or any(scheduler_output.scheduled_spec_decode_tokens.values())
            or not self._is_attention_only()
        ):
            return parent._prepare_inputs(scheduler_output, *args, **kwargs)
        config, self.speculative_config = self.speculative_config, None  # vLLM's switch for that branch alone
        try:
            return parent._prepare_inputs(scheduler_output, *args, **kwargs)
        finally:
            self.speculative_config = config

    def _is_attention_only(self) -> bool:
        """Every KV cache group holds attention layers: recurrent ones (vLLM's `MambaSpec`: Mamba, GDN,
        linear attention) read a decode step's state at an offset that only the spec-decode path sets."""
        if self._attention_only is None:
            specs = []
            for group in self.kv_cache_config.kv_cache_groups:
                layers = getattr(group.kv_cache_spec, "kv_cache_specs", None)  # several layers' specs in one
                specs += list(layers.values()) if layers else [group.kv_cache_spec]
            self._attention_only = all(isinstance(spec, AttentionSpec) for spec in specs)
        return self._attention_only

    def _sample(self, logits: Any, spec_decode_metadata: Any) -> Any:
        """A batch with no draft to verify samples as vLLM without speculation does (see the module
        docstring); any other batch goes through vLLM's rejection sampler."""
        parent: Any = super()
        has_drafts = spec_decode_metadata is not None and spec_decode_metadata.max_spec_len > 0
        if has_drafts or not self.skips_drafter or self.speculative_config is None:
            return parent._sample(logits, spec_decode_metadata)  # (no speculative config: vLLM's own path)
        output = parent._sample(logits, None)
        # The rejection sampler's dtype, which the drafter's bookkeeping of the sampled tokens receives.
        output.sampled_token_ids = output.sampled_token_ids.to(torch.int32)
        return output

    def propose_draft_token_ids(
        self,
        scheduler_output: Any,
        sampled_token_ids: Any,
        sampling_metadata: Any,
        hidden_states: Any,
        sample_hidden_states: Any,
        aux_hidden_states: Any,
        spec_decode_metadata: Any,
        common_attn_metadata: CommonAttentionMetadata,
        slot_mappings: Any,
    ) -> Any:
        parent: Any = super()
        rows = self._rows()
        if rows is None:  # not a drafting setup we handle: vLLM's own path
            return parent.propose_draft_token_ids(
                scheduler_output, sampled_token_ids, sampling_metadata, hidden_states, sample_hidden_states,
                aux_hidden_states, spec_decode_metadata, common_attn_metadata, slot_mappings,
            )  # fmt: skip
        self._note_cached_prefix(rows)
        if scheduler_output.num_spec_tokens_to_schedule == 0 and self.skips_drafter:
            self._draft_measurement = DraftMeasurement(0.0, 0)
            skipped = self._skip(rows, sampled_token_ids)
            self._track_blocks(rows, scheduler_output)
            return skipped
        self._synchronize()  # the target's forward and sampling are not the drafter's time
        start, tokens = time.perf_counter(), self.num_catch_up_tokens
        drafting = getattr(scheduler_output, DRAFTING_REQUESTS_ATTR, None)
        self._catch_up(rows, common_attn_metadata, drafting)
        kept = rows
        if self.skips_drafter and self.drafts_alone and drafting is not None:
            kept = [row for row in rows if row[1] in drafting]
            for _, request_id, start_position in rows:  # left out: lagging from this step on
                if request_id not in drafting:
                    self._lag(request_id, start_position)
        num_prefill = self.num_catch_up_tokens - tokens + _prompt_tokens(scheduler_output, kept)
        alone = (
            drafting_rows_alone(self.drafter, [r for r, _, _ in kept]) if 0 < len(kept) < len(rows) else None
        )
        with alone or nullcontext():
            drafts = parent.propose_draft_token_ids(
                scheduler_output, sampled_token_ids, sampling_metadata, hidden_states, sample_hidden_states,
                aux_hidden_states, spec_decode_metadata, common_attn_metadata, slot_mappings,
            )  # fmt: skip
        self._synchronize()
        self._draft_measurement = DraftMeasurement(time.perf_counter() - start, num_prefill)
        self._drafted = True
        self._track_blocks(rows, scheduler_output)
        return drafts

    def _synchronize(self) -> None:
        """Waits for the device (a no-op on CPU, where forwards run synchronously)."""
        if self.device.type != "cpu":
            torch.accelerator.synchronize(self.device)

    # -- the two halves ----------------------------------------------------------------------------------------

    def _rows(self) -> list[tuple[int, str, int]] | None:
        """(batch row, request id, positions the target had computed before this step) of every request in
        the batch; None when the drafter is not one this runner can catch up."""
        if (
            not isinstance(self.drafter, DraftModelProposer)
            or self.speculative_config.disable_padded_drafter_batch
        ):
            return None
        computed = self.input_batch.num_computed_tokens_cpu
        rows = [(i, r, int(computed[i])) for i, r in enumerate(self.input_batch.req_ids) if r is not None]
        for request_id in [r for r in self.lag_from if r not in self.requests]:  # finished or preempted
            del self.lag_from[request_id]
        self.draft_blocks.forget(self.requests)
        return rows

    def _skip(self, rows: list[tuple[int, str, int]], sampled_token_ids: torch.Tensor) -> torch.Tensor:
        """A step with no drafting at all: no draft forward, and vLLM's bookkeeping of the sampled tokens only
        where something reads it (as vLLM does on a step whose batch does not fit the drafter): the valid
        counts feed async scheduling alone. With synchronous scheduling (what the scheduler requires) that
        bookkeeping is dropped: it cost about 0.8 ms a step on 2 CPU cores, 5% of a regime-pair step."""
        if getattr(self, "valid_sampled_token_count_event", None) is not None:
            next_token_ids, valid_counts = self.drafter.prepare_next_token_ids_padded(
                sampled_token_ids, self.requests, self.input_batch, self.discard_request_mask.gpu
            )
            copy: Any = getattr(self, "_copy_valid_sampled_token_count")  # noqa: B009 (vLLM's private hook)
            copy(next_token_ids, valid_counts)
        for _, request_id, start in rows:
            self._lag(request_id, start)
        self.num_skipped_steps += 1
        return torch.empty(len(rows), 0, dtype=torch.int64, device=self.device)

    def _lag(self, request_id: str, start: int) -> None:
        """The request's draft KV misses this step: positions from `start` on are (re)computed by the target
        now, and the draft KV is valid below it (or below an earlier lag)."""
        self.lag_from[request_id] = min(self.lag_from.get(request_id, start), start)

    def _note_cached_prefix(self, rows: list[tuple[int, str, int]]) -> None:
        """A request seen for the first time with positions already computed (a prefix-cache hit) lags from its
        first block whose draft KV was never written: the request that computed that block did not draft over
        it, so the catch-up writes it when this one drafts."""
        for _, request_id, start in rows:
            missing = self.draft_blocks.first_missing(request_id, *self._draft_blocks(request_id), start)
            if missing is not None:
                self._lag(request_id, missing)

    def _track_blocks(self, rows: list[tuple[int, str, int]], scheduler_output: Any) -> None:
        """After a step: what the target wrote in it, and where each request's draft KV is written to."""
        scheduled = scheduler_output.num_scheduled_tokens
        for _, request_id, start in rows:
            end = start + scheduled.get(request_id, 0)
            valid_to = min(self.lag_from.get(request_id, start), start)
            self.draft_blocks.after_step(request_id, *self._draft_blocks(request_id), start, end, valid_to)

    def draft_cache_group(self) -> tuple[int, int]:
        """The drafter's KV cache group and that group's block size (read once the KV cache exists)."""
        if self._draft_group is None:
            group = max(int(getattr(self.drafter, "kv_cache_gid", 0)), 0)
            spec = self.kv_cache_config.kv_cache_groups[group].kv_cache_spec
            self._draft_group = group, int(spec.block_size)
        return self._draft_group

    def _draft_blocks(self, request_id: str) -> tuple[list[int], int]:
        """The request's block ids in the drafter's KV cache group, and that group's block size."""
        group, block_size = self.draft_cache_group()
        return self.requests[request_id].block_ids[group], block_size

    def _catch_up(
        self, rows: list[tuple[int, str, int]], cad: CommonAttentionMetadata, drafting: Any = None
    ) -> None:
        """Runs the draft model over each lagging request's missed positions [lag, start], before vLLM's own
        first pass (which covers this step's tokens from `start` on); `drafting`: the requests to catch up
        (None: all)."""
        spans = []  # (row, first position, last position): the tokens [a, b) and the next token at b
        for row, request_id, start in rows:
            if drafting is not None and request_id not in drafting:
                continue  # stays lagging from where it was (see the module docstring)
            lag = self.lag_from.pop(request_id, None)
            if lag is not None and lag < start:
                spans.append((row, lag, start))
        if not spans:
            return
        capacity = int(self.drafter.max_num_tokens)
        batch: list[tuple[int, int, int]] = []
        used = 0
        for row, first, last in spans:
            while first < last:  # a span too long for one pass is split along its positions
                end = min(last, first + capacity - 1 - used)
                if end <= first:
                    self._catch_up_pass(batch, cad)
                    batch, used = [], 0
                    continue
                batch.append((row, first, end))
                used += end - first + 1
                first = end
        if batch:
            self._catch_up_pass(batch, cad)

    def _catch_up_pass(self, spans: list[tuple[int, int, int]], cad: CommonAttentionMetadata) -> None:
        """One draft forward, with vLLM's first-pass machinery at 0 draft steps: each span (row, a, b) is
        presented as a target step that computed tokens [a, b) (the proposer appends the token at b), so the
        draft writes its KV for positions a..b into the request's blocks."""
        token_ids = self.input_batch.token_ids_cpu
        ids = np.concatenate([token_ids[row, a:b] for row, a, b in spans]).astype(np.int32)
        positions = np.concatenate([np.arange(a, b, dtype=np.int64) for _, a, b in spans])
        next_ids = np.array([token_ids[row, b] for row, _, b in spans], dtype=np.int32)
        lengths = np.array([b - a for _, a, b in spans], dtype=np.int32)
        query_start = np.zeros(len(spans) + 1, dtype=np.int32)
        np.cumsum(lengths, out=query_start[1:])
        seq_lens = np.array([b for _, _, b in spans], dtype=np.int32)
        rows = torch.tensor([row for row, _, _ in spans], dtype=torch.long, device=self.device)
        device = self.device
        query_start_cpu = torch.from_numpy(query_start)
        seq_lens_cpu = torch.from_numpy(seq_lens)
        num_tokens = int(query_start[-1])
        sub = CommonAttentionMetadata(
            query_start_loc=query_start_cpu.to(device),
            query_start_loc_cpu=query_start_cpu,
            seq_lens=seq_lens_cpu.to(device),
            num_reqs=len(spans),
            num_actual_tokens=num_tokens,
            max_query_len=int(lengths.max()),
            max_seq_len=int(seq_lens.max()),
            block_table_tensor=cad.block_table_tensor[rows],
            slot_mapping=torch.zeros(num_tokens, dtype=torch.int64, device=device),  # recomputed by the pass
            causal=True,
            seq_lens_cpu_upper_bound=seq_lens_cpu,
        )
        self.drafter.propose(
            num_speculative_tokens=0,
            target_token_ids=torch.from_numpy(ids).to(device),
            target_positions=torch.from_numpy(positions).to(device),
            target_hidden_states=self.drafter.hidden_states[:num_tokens],  # unused by a draft model
            next_token_ids=torch.from_numpy(next_ids).to(device),
            token_indices_to_sample=None,
            common_attn_metadata=sub,
            sampling_metadata=None,
            num_rejected_tokens_gpu=None,
            slot_mappings=None,
        )
        self.num_catch_up_passes += 1
        self.num_catch_up_tokens += num_tokens + len(spans)


def _prompt_tokens(scheduler_output: Any, rows: list[tuple[int, str, int]]) -> int:
    """Tokens of the step's prompt chunks beyond one per request, for these rows of the batch (those the
    drafter's first pass feeds): vLLM's first pass feeds every token of the step to the drafter, a new
    request's prompt included. They count as the drafter's prefill with the catch-up's
    (`DraftMeasurement.num_prefill_tokens`): read as what drafting costs, the regime pair's steps that took a
    prompt in (22-25 ms in the drafter at concurrency 32, against 8-9 ms at a decode step) made the next
    iteration's drafting look dear."""
    drafts = scheduler_output.scheduled_spec_decode_tokens
    scheduled = scheduler_output.num_scheduled_tokens
    return sum(max(0, scheduled.get(r, 0) - 1 - len(drafts.get(r, ()))) for _, r, _ in rows)


def _enable(runner: Any) -> None:
    """Gives a freshly built V1 model runner the catch-up (a subclass made for its class; it adds methods and
    state, no __init__), or leaves vLLM's runner as it is, with a warning naming why."""
    if not isinstance(runner, GPUModelRunner):
        logger.warning(
            "CatchUpWorker: %s is not vLLM's V1 model runner; the drafter runs every step", type(runner)
        )
        return
    missing = [f"GPUModelRunner.{name}" for name in _RUNNER_HOOKS if not hasattr(runner, name)]
    drafter = getattr(runner, "drafter", None)
    if isinstance(drafter, DraftModelProposer):
        missing += [f"DraftModelProposer.{name}" for name in _PROPOSER_HOOKS if not hasattr(drafter, name)]
    if missing:
        raise RuntimeError(
            f"CatchUpWorker: this vLLM lacks what the catch-up relies on: {', '.join(missing)}"
        )
    if drafter is not None and not isinstance(drafter, DraftModelProposer):
        logger.warning("CatchUpWorker: drafter %s has no catch-up here; it runs every step", type(drafter))
    cls = type(runner)
    runner.__class__ = type(f"CatchUp{cls.__name__}", (CatchUpRunnerMixin, cls), {})
    enabled: Any = runner
    enabled._init_catch_up()


def _base_worker() -> type[Any]:
    if current_platform.is_cpu():
        from vllm.v1.worker.cpu_worker import CPUWorker

        return CPUWorker
    return Worker


class CatchUpWorker(_base_worker()):  # type: ignore[misc]  # vLLM's worker for this platform
    """vLLM's worker (CPU or GPU) whose model runner skips the drafter on all-K = 0 steps (`--worker-cls`)."""

    def init_device(self) -> None:
        super().init_device()
        _enable(self.model_runner)
