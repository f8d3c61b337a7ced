"""MoESD iteration-time model: predicts plain and speculative iteration times for any batch and K vector.

Fitted by non-negative least squares (`policy.cost_fit`) on a calibration run, then refitted online as
iterations arrive: early and often while the model still rests on its prior, every `refit_interval`
iterations after that (and `refit_min_seconds` of them; `plain_refit_min_seconds` where none of them drafted).

The shape correction. The parametric form's shape of time against verification tokens was off by more than
the choices it decides, so after each refit the model corrects each batch-size bucket's predictions by a
factor per verification tokens per sequence, fitted against time (`policy.shape_correction`). The factor
covers the whole iteration, the drafter's time included (less a catch-up's, which the fitted prefill cost
charges): vLLM's draft model feeds its first pass every token of the step, the drafts just verified
included, and each later pass one token a sequence, which draft steps times a cost per step cannot follow.

New requests' prompts. An engine that schedules prompts into decode steps (vLLM) runs the drafter over them
too when the step drafts: its first pass feeds every token of the step to the draft model, a prompt chunk
included, and a request that starts drafting later is caught up over its whole history instead. So while the
traffic drafts, the drafter prefills every prompt that arrives. The model keeps, per batch-size bucket, the
prompt tokens the engine reports per iteration (`IterationStats.num_prefill_tokens`, a mean over about the
last `prompt_window` iterations) and charges a drafting iteration that many tokens at the drafter's fitted
prefill cost. Without it, served on the regime pair (prose at concurrency 4-32: 14-36 prompt tokens an
iteration, the drafter at about 0.1 ms a token, 3-6% of a drafting iteration), the model put its drafting
choices at 1.04-1.18x plain decoding (medians per cell), where our scheduler at K = 0 throughout ran
1.00-1.12x auto's throughput.

Steps with prompts. Drafts verified in a step that carries prompts cost there what they do not in a decode
step. The model keeps those steps apart and fits, per bucket, a verification token's cost in them beyond a
decode step's; a prediction adds it at the bucket's recent share of steps with prompts, or at the share after
the choice's prompt cue, a request ending, where the engine gives one (`policy.prompt_steps`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike, NDArray

from policy.cost_fit import ROW_SIZE, CostFit
from policy.cost_model_config import CostModelConfig
from policy.prompt_steps import NO_CUE, PromptSteps
from policy.routing import ExpertCounts
from policy.shape_correction import ShapeCorrection, correction_keys, drafts_per_sequence
from policy.stats import IterationStats

Array = NDArray[np.float64]


def batch_bucket(batch_size: int) -> int:
    """The batch-size bucket of per-bucket figures (here and in `policy.guard`): 1, 2, 3-4, 5-8, 9-16, 17-32,
    ... A power of two (a full batch at a usual max_num_seqs or client concurrency) shares its bucket with
    the sizes just below it: with buckets 4-7, 8-15, 16-31 instead, a batch of 16 that shrank to 15 while a
    request was prefilling changed bucket, and the vLLM backend's guard, learning each bucket's plain rate
    apart, ran every fifth step plain throughout a 127-step cell at concurrency 16."""
    return (batch_size - 1).bit_length()


@dataclass(frozen=True)
class CostParams:
    """Seconds. Derive from hardware and model specs (`policy.presets`) or fit from measurements."""

    fixed_s: float  # verify forward, independent of tokens: dense weights read, launches
    per_expert_s: float  # verify forward, per distinct expert touched in a layer (all MoE layers together)
    per_token_s: float  # verify forward, compute per token
    draft_fixed_s: float  # one draft step, independent of the sequences in it
    draft_per_token_s: float  # one draft step, per sequence drafting in it
    other_s: float = 0.0  # per iteration, outside the forwards
    other_per_token_s: float = 0.0  # per verification token, outside the forwards
    per_seq_s: float = 0.0  # verify forward, per sequence whatever its K: attention over its cache, ragged
    # batch bookkeeping. Without it a fit on plain iterations (tokens = sequences) puts this cost on every
    # token and overestimates what speculation adds at large batches.
    draft_call_s: float = 0.0  # per iteration that drafts at all, outside the draft forward: the call to
    # the drafter (an actor call when served), its catch-up bookkeeping
    draft_prefill_per_token_s: float = 0.0  # draft forward, per token fed beyond one per request: catch-ups
    # of requests that start drafting, prompts in the step (fitted so that they do not read as the cost of K;
    # predictions charge it for the prompts arriving per iteration, not for catch-ups, which K does not repeat)
    draft_first_pass_s: float = 0.0  # draft forward, per iteration that drafts: its first pass beyond a later
    # one's cost. vLLM's draft model feeds the first pass every token of the step (the drafts just verified
    # among them) and each later pass one token a sequence: served on the regime pair at batch 16 the drafter
    # took 14.8 ms for one pass and 23.9 ms for four. Without it the form priced each draft step alike, and a K
    # never measured was priced from that (the shape correction holds the nearest measured K's factor): after
    # tests at K = 1-3, K = 8 came out dearer than drafting cost, and the test budget's verdict on traffic
    # that pays only at large K said K = 0 (`tests/policy/test_batch_aware.py`). Where the K were measured it
    # changes little: replayed over a served record, predictions at batch 16 / 32 moved by 1% at most, and
    # served against the form without it, 0.985 paired over 12 runs (standard error 0.011, unresolved).

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not (math.isfinite(value) and value >= 0.0):
                raise ValueError(f"{field.name}={value} must be a finite time >= 0 seconds")

    def as_array(self) -> Array:
        return np.array(dataclasses.astuple(self), dtype=np.float64)


class CostModel:
    """The shared iteration-time model: predictions from the current params, refitted online.

    T = draft + verify + other, with t = batch + sum K_r verification tokens and m = max K_r draft steps:
      draft  = m * draft_fixed + draft_per_token * sum K_r + draft_first_pass * [m > 0]
                                      (step j drafts the requests with K_r >= j; padded drafts beyond
                                      them by `draft_padding`: batch * m in all for "batch", m for each
                                      request at K_r > 0 for "drafting", charged per K vector outside the
                                      shape correction, `padded_draft_s`)
      verify = fixed + per_seq * batch + per_expert * N(t) + per_token * t
                                      (weights read, per-sequence attention, distinct experts, compute)
      other  = other + draft_call * [m > 0] + other_per_token * t
                                      (sampling, verification bookkeeping, the call to the drafter)
    Memory and compute times add: a smooth upper bound of the roofline max(memory, compute). Fits use
    relative residuals and a weak pull toward the prior (the calibrated params once `calibrate` ran).
    """

    def __init__(self, config: CostModelConfig, prior: CostParams) -> None:
        self.config = config
        self.prior = prior
        self.params = prior
        self.expert_counts = ExpertCounts(config.routing)
        # One row per measured iteration (see `_record`): calibration anchors and the most recent ones.
        self._anchors: list[tuple[float, ...]] = []
        # The most recent iterations per batch-size bucket: a ring of max_samples_per_bucket rows each (refits
        # read them without converting rows), and how many each has ever recorded (row i at i % the ring).
        self._samples: dict[int, Array] = {}
        self._num_samples: dict[int, int] = {}
        self._num_new_samples = 0
        self._new_seconds = 0.0  # the new iterations' measured time
        self._new_drafting = False  # some new iteration drafted (`CostModelConfig.plain_refit_min_seconds`)
        self.num_refits = 0
        # Set by an owner that calls `refit_if_due` where a refit delays nothing (vLLM's scheduler: while the
        # worker runs a step): `observe` then leaves a due refit to it. A refit took 0.7-1 ms of CPU at batch
        # 16-32 on the vLLM backend, every 16 or so iterations, between two steps.
        self.defers_refits = False
        self.is_refit_due = False
        # Changes whenever predictions may (a refit, a calibration, a measured expert count): a caller may keep
        # predictions while it stays the same (`BatchAwareChooser`'s time tables).
        self.version = 0
        # Drafting iterations measured (anchors included) per batch-size bucket (`batch_bucket`): where there
        # are none, predictions of what drafting costs rest on the prior alone (`num_drafting_iterations`).
        self._num_drafting: dict[int, int] = {}
        self._correction = ShapeCorrection(
            config.correction_block, config.correction_pseudo_count, config.max_archived_blocks
        )
        self._num_rows = 0  # rows ever recorded: each row's number orders the shape correction's time blocks
        # Per batch-size bucket: the steps that carried prompts, their share and their cost (module docstring).
        self._prompt_steps = PromptSteps(
            ring_size=config.max_samples_per_bucket,
            window=config.prompt_window,
            min_steps=config.min_samples,
            pseudo_count=config.prompt_pseudo_count,
        )
        self._fit = CostFit(
            draft_padding=config.draft_padding,
            min_samples=config.min_samples,
            prior_weight=config.prior_weight,
        )

    # -- predictions ----------------------------------------------------------------------------------------

    def phase_times(
        self, batch_size: int, max_steps: ArrayLike, total_spec: ArrayLike, prompt_cue: int = NO_CUE
    ) -> tuple[Array, ...]:
        """(draft, verify, other) seconds for a batch whose K vector has this max and this sum, chosen under
        this prompt cue (`policy.prompt_steps.prompt_cue`)."""
        spec = np.asarray(total_spec, dtype=np.float64)
        steps = np.asarray(max_steps, dtype=np.float64)
        bucket = batch_bucket(batch_size)
        draft, verify, other = self._decode_times(bucket, batch_size, steps, spec)
        prompt_tokens = self._prompt_steps.prompt_tokens_per_iteration(bucket)
        if prompt_tokens:  # the drafter's prefill of arriving prompts (module docstring)
            draft = draft + (steps > 0) * (self.params.draft_prefill_per_token_s * prompt_tokens)
        spec_token_s = self._prompt_steps.expected_spec_token_s(bucket, prompt_cue)
        if spec_token_s:  # verification tokens in the steps with prompts (module docstring)
            # A discount at most what the verification tokens add to a decode step's verification: in a step
            # with prompts they may cost nothing, but the drafter's steps cost what they do. Bounded by the
            # whole step's added time, one fit over a few steps that drafted a token each, the catch-up of a
            # wave of new requests among them, put a verification token at -23.6 ms (a decode step's: about
            # 1 ms), and K = 4 for every request at batch 32 cost what plain decoding did in the model: served
            # on the regime pair at prose 32 (session 58), the batch drafted so for 25 steps of 175-380 ms
            # where plain ones took 60-150.
            _, plain_verify, _ = self._decode_times(bucket, batch_size, 0.0, 0.0)
            verify = verify + np.maximum(spec_token_s * spec, -np.maximum(verify - plain_verify, 0.0))
        return draft, verify, other

    def _decode_times(
        self, bucket: int, batch_size: ArrayLike, max_steps: ArrayLike, total_spec: ArrayLike
    ) -> tuple[Array, ...]:
        """(draft, verify, other) of a decode step at this bucket: the parametric form, shape-corrected."""
        draft, verify, other = self._model_times(batch_size, max_steps, total_spec)
        scale = self._correction.factors(
            bucket, drafts_per_sequence(np.asarray(max_steps), np.asarray(total_spec), batch_size)
        )
        if scale is not None:
            draft, verify, other = draft * scale, verify * scale, other * scale
        return draft, verify, other

    def _model_times(
        self, batch_size: ArrayLike, max_steps: ArrayLike, total_spec: ArrayLike
    ) -> tuple[Array, ...]:
        """`phase_times` of the parametric form alone, elementwise (batch sizes may be an array too)."""
        p = self.params
        batch = np.asarray(batch_size, dtype=np.float64)
        steps = np.asarray(max_steps, dtype=np.float64)
        spec = np.asarray(total_spec, dtype=np.float64)
        tokens = batch + spec
        drafted = steps * batch if self.config.draft_padding == "batch" else spec
        draft = steps * p.draft_fixed_s + drafted * p.draft_per_token_s + (steps > 0) * p.draft_first_pass_s
        verify = (
            p.fixed_s
            + p.per_seq_s * batch
            + p.per_expert_s * self.expert_counts.predict(tokens)
            + p.per_token_s * tokens
        )
        other = p.other_s + p.draft_call_s * (steps > 0) + p.other_per_token_s * tokens
        return draft, verify, other

    def time_grid(
        self, batch_size: int, max_steps: ArrayLike, total_spec: ArrayLike, prompt_cue: int = NO_CUE
    ) -> Array:
        draft, verify, other = self.phase_times(batch_size, max_steps, total_spec, prompt_cue)
        return draft + verify + other

    def iteration_time(self, num_spec_tokens: Sequence[int], prompt_cue: int = NO_CUE) -> float:
        """Seconds for one iteration of a batch with these K_r (one entry per request), chosen under this
        prompt cue."""
        if not num_spec_tokens:
            return 0.0
        top, total = max(num_spec_tokens), sum(num_spec_tokens)
        grid = self.time_grid(len(num_spec_tokens), top, total, prompt_cue)
        return float(grid) + self.padding_time(num_spec_tokens)

    def padding_time(self, num_spec_tokens: Sequence[int]) -> float:
        """Seconds of the padded drafts of a batch with these K_r (`padded_draft_s`), in `iteration_time`."""
        k = np.asarray(num_spec_tokens)
        return float(self._padding_s(k.max(initial=0), k.sum(), np.count_nonzero(k)))

    def padded_draft_s(self) -> float:
        """Seconds for each draft the drafter runs beyond its request's K where it drafts max K for every
        request at K > 0 (`draft_padding` "drafting"; 0 otherwise): what `time_grid`'s (max K, sum K) leaves out,
        charged per K vector (`iteration_time`, `policy.k_search.StepTimes`). Outside the shape correction, like
        a catch-up: each row's own padded drafts are taken off its time before the correction is fitted
        (`_measured`)."""
        return self.params.draft_per_token_s if self.config.draft_padding == "drafting" else 0.0

    def num_drafting_iterations(self, batch_size: int) -> int:
        """Drafting iterations measured at this batch size's bucket (`batch_bucket`). Plain iterations alone
        cannot tell a fixed per-iteration cost from the cost of a token (every row has one token per
        sequence), so where this is 0 what drafting costs is the prior's guess (the vLLM backend's batch 1:
        half of a served step was outside the forward, and the prior put drafting at a loss where static
        K = 1 paid 1.28x)."""
        return self._num_drafting.get(batch_bucket(batch_size), 0)

    def num_shape_rows(self, batch_size: int, per_seq: int) -> int:
        """Iterations the shape correction measured at this batch size's bucket and drafts per sequence
        (`policy.shape_correction.drafts_per_sequence`, rounded), as of the last refit."""
        return self._correction.num_rows(batch_bucket(batch_size), per_seq)

    def prompt_tokens_per_iteration(self, batch_size: int) -> float:
        """Prompt tokens the engine scheduled per iteration at this batch size's bucket, as of the last refit
        (the drafter prefills them while the traffic drafts)."""
        return self._prompt_steps.prompt_tokens_per_iteration(batch_bucket(batch_size))

    def prompt_step_costs(self, batch_size: int) -> tuple[float, float, float]:
        """At this batch size's bucket, as of the last refit: the share of iterations with prompts, what a
        prompt token adds to a step and what a verification token costs in a step with prompts beyond a decode
        step's (seconds; `policy.prompt_steps`)."""
        bucket = batch_bucket(batch_size)
        steps = self._prompt_steps
        return steps.share(bucket), steps.prompt_token_s(bucket), steps.spec_token_s(bucket)

    def plain_time(self, batch_size: int) -> float:
        return self.iteration_time([0] * batch_size)

    def spec_time(self, batch_size: int, num_spec_tokens: int) -> float:
        return self.iteration_time([num_spec_tokens] * batch_size)

    def target_efficiency(self, batch_size: int, num_spec_tokens: int) -> float:
        """MoESD: T_target(B, 1 token) / T_target(B, K+1 tokens per sequence)."""
        _, plain, _ = self.phase_times(batch_size, 0, 0)
        _, spec, _ = self.phase_times(batch_size, num_spec_tokens, batch_size * num_spec_tokens)
        return float(plain / spec)

    # -- fitting ------------------------------------------------------------------------------------------------

    def calibrate(self, measured: Sequence[IterationStats]) -> CostParams:
        """Fit a calibration run (about 20 iterations across batch sizes and K) and keep it as anchors.

        The fitted params become the prior that online refits are pulled toward, and the anchors stay in
        every refit, so that the fit stays determined at batch sizes and K that live traffic does not visit.
        """
        self._anchors.extend(row for stats in measured if (row := self._record(stats)) is not None)
        self.prior = self._fit_and_correct(np.array(self._anchors).reshape(-1, ROW_SIZE))
        return self.params

    def observe(self, stats: IterationStats) -> None:
        """Add a measured iteration; refit once there are `min_samples`, then whenever the new iterations
        reach the number already fitted (doubling), or `refit_interval` of them."""
        if stats.requests:
            self._prompt_steps.count(
                batch_bucket(stats.batch_size), stats.num_prefill_tokens, stats.prompt_cue
            )
            if stats.num_prefill_tokens:
                self._record_prompt_step(stats)
            self._new_drafting |= any(r.num_spec_tokens for r in stats.requests)
        row = self._record(stats)
        if row is None:
            return
        bucket, size = batch_bucket(int(row[0])), self.config.max_samples_per_bucket  # row[0]: its batch size
        samples = self._samples.get(bucket)
        if samples is None:
            samples = self._samples[bucket] = np.empty((size, ROW_SIZE))
        elif not samples.flags.writeable:  # unpickled zero-copy (a Ray object): take a private copy
            samples = self._samples[bucket] = samples.copy()
        count = self._num_samples.get(bucket, 0)
        if count >= size and count % self.config.correction_block == 0:  # the oldest block starts leaving
            block = samples[count % size : count % size + self.config.correction_block]
            self._correction.archive(bucket, block, correction_keys(block))
        samples[count % size] = row
        self._num_samples[bucket] = count + 1
        self._num_new_samples += 1
        self._new_seconds += stats.iteration_time_s
        num_rows = len(self._anchors) + sum(min(n, size) for n in self._num_samples.values())
        num_fitted = num_rows - self._num_new_samples
        min_seconds = (
            self.config.refit_min_seconds if self._new_drafting else self.config.plain_refit_min_seconds
        )
        is_due = self._num_new_samples >= max(num_fitted, 1) or (
            self._num_new_samples >= self.config.refit_interval and self._new_seconds >= min_seconds
        )
        if is_due and num_rows >= self.config.min_samples:
            if self.defers_refits:
                self.is_refit_due = True
            else:
                self.refit()

    def refit_if_due(self) -> bool:
        """The refit that `observe` left (`defers_refits`), if any; whether there was one."""
        if not self.is_refit_due:
            return False
        self.refit()
        return True

    def refit(self) -> CostParams:
        """Fit on the anchors and the recent iterations, pulled weakly toward the prior."""
        self._num_new_samples, self._new_seconds, self._new_drafting = 0, 0.0, False
        self.is_refit_due = False
        self.num_refits += 1
        size = self.config.max_samples_per_bucket
        recent = [samples[: min(self._num_samples[b], size)] for b, samples in self._samples.items()]
        return self._fit_and_correct(np.vstack([np.array(self._anchors).reshape(-1, ROW_SIZE), *recent]))

    def _fit_and_correct(self, rows: Array) -> CostParams:
        """New params and shape correction from these rows (a new `version`)."""
        self.params = CostParams(**self._fit.fit(rows, self.params, self.prior, self.expert_counts.predict))
        self._correct(np.vstack([rows, *self._correction.archived_blocks()]))
        for bucket in self._prompt_steps.buckets():
            batch, steps, spec, _, drafter_prefill, _, row_number, drafting = self._prompt_steps.recorded(
                bucket
            ).T
            decode = sum(self._decode_times(bucket, batch, steps, spec))
            decode = decode + drafter_prefill * self.params.draft_prefill_per_token_s
            decode = decode + self._padding_s(steps, spec, drafting)
            self._prompt_steps.fit(bucket, decode * self._local_levels(bucket, row_number))
        self._prompt_steps.freeze_means()
        self.version += 1
        return self.params

    def _local_levels(self, bucket: int, row_numbers: Array) -> Array:
        """The machine's speed at each of these row numbers, relative to the predictions' (the latest time
        block's, `policy.shape_correction`): measured over predicted time of the bucket's decode steps recorded
        nearest to each, a median of `correction_block` of them (1 where the bucket has none). A step with
        prompts minutes old is compared with the decode steps of its minute: this machine's speed drifts
        10-60% from minute to minute, which would otherwise read as the prompts' cost."""
        count = self._num_samples.get(bucket, 0)
        if not count:
            return np.ones_like(row_numbers)
        rows = self._samples[bucket][: min(count, self.config.max_samples_per_bucket)]
        rows = rows[np.argsort(rows[:, 8])]
        predicted = sum(self._decode_times(bucket, rows[:, 0], rows[:, 1], rows[:, 2]))
        log_ratio = np.log(np.maximum(self._measured(rows), 1e-9) / np.maximum(predicted, 1e-9))
        size = min(self.config.correction_block, len(rows))
        medians = np.median(np.lib.stride_tricks.sliding_window_view(log_ratio, size), axis=1)
        start = np.clip(np.searchsorted(rows[:, 8], row_numbers) - size // 2, 0, len(rows) - size)
        return np.exp(medians[start])

    def _correct(self, rows: Array) -> None:
        """The shape correction (`policy.shape_correction`) from these rows, under the current params."""
        # Each row once (an archived block's rows may be in the ring still), in the order recorded.
        rows = rows[np.unique(rows[:, 8], return_index=True)[1]]
        batch, steps, spec = rows[:, 0], rows[:, 1], rows[:, 2]
        draft, verify, other = self._model_times(batch, steps, spec)
        predicted, measured = draft + verify + other, self._measured(rows)
        valid = (predicted > 0.0) & (measured > 0.0)
        log_ratio = np.log(measured[valid] / predicted[valid])
        buckets = np.frexp(batch[valid] - 1.0)[1]  # batch_bucket, elementwise: (b - 1).bit_length()
        self._correction.fit(buckets, correction_keys(rows[valid]), log_ratio)

    def _measured(self, rows: Array) -> Array:
        """Each row's measured time less its drafter's catch-up and padded drafts (`padded_draft_s`): the row's
        own, which no factor corrects."""
        catch_up = rows[:, 4] * self.params.draft_prefill_per_token_s
        return (
            rows[:, 5]
            + rows[:, 6]
            + rows[:, 7]
            - catch_up
            - self._padding_s(rows[:, 1], rows[:, 2], rows[:, 9])
        )

    def _padding_s(self, max_k: ArrayLike, total: ArrayLike, num_drafting: ArrayLike) -> Array:
        """Seconds of the padded drafts that `time_grid` leaves out (`padded_draft_s`), elementwise."""
        padded = np.asarray(max_k) * np.asarray(num_drafting) - np.asarray(total)
        return self.padded_draft_s() * np.maximum(padded, 0.0)

    def _record(self, stats: IterationStats) -> tuple[float, ...] | None:
        """(batch, max K, sum K, mean experts or nan, draft prefill tokens, draft s, verify s, other s, the
        number of rows recorded before it, requests at K > 0); feeds the expert counts and the drafting
        iterations per bucket."""
        if not stats.requests:
            return None
        ks = [r.num_spec_tokens for r in stats.requests]
        if stats.is_near_drafting and max(ks) == 0:
            return None  # a plain iteration carrying the drafter's switching costs: not plain decoding's time
        if stats.num_prefill_tokens:
            return None  # other requests' prompts in the forward: not decoding's time
        experts = float(np.mean(stats.experts_touched)) if stats.experts_touched else math.nan
        if stats.experts_touched:
            self.expert_counts.record(stats.num_target_tokens, experts)
            self.version += 1
        if max(ks) > 0:
            bucket = batch_bucket(len(ks))
            self._num_drafting[bucket] = self._num_drafting.get(bucket, 0) + 1
        return (
            len(ks),
            max(ks),
            sum(ks),
            experts,
            stats.num_draft_prefill_tokens,
            stats.draft_time_s,
            stats.verify_time_s,
            stats.other_time_s,
            self._next_row_number(),
            sum(k > 0 for k in ks),
        )

    def _record_prompt_step(self, stats: IterationStats) -> None:
        """A step with prompts, for `PromptSteps` (a plain one near drafting carries switching costs: left out)."""
        ks = [r.num_spec_tokens for r in stats.requests]
        if stats.is_near_drafting and max(ks) == 0:
            return
        step = (
            len(ks),
            max(ks),
            sum(ks),
            stats.num_prefill_tokens,
            stats.num_draft_prefill_tokens,
            stats.draft_time_s + stats.verify_time_s + stats.other_time_s,
            float(self._num_rows),  # where it falls among the decode steps (`_local_levels`)
            sum(k > 0 for k in ks),
        )
        self._prompt_steps.add(batch_bucket(len(ks)), step)

    def _next_row_number(self) -> float:
        self._num_rows += 1
        return float(self._num_rows - 1)
