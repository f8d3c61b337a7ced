"""A measured guard around any K chooser: speculation must beat plain decoding by measurement, not only in
the chooser's model.

It judges the chooser's decisions as a whole, not its drafting iterations one by one: per batch-size bucket it
keeps the committed tokens per second per request of every iteration the chooser decided (its plain ones and
its test probes included) and of every plain iteration (EWMAs; not those next to drafting ones where the
engine says they carry the drafter's costs, `IterationStats.is_near_drafting`), each at its time scaled to the
bucket's full batch by how the bucket's plain steps grow with the batch (`policy.guard_figures.PlainShape`: a
bucket spans batch sizes whose plain rates differ by up to twice). While the chooser speculates,
a baseline of `baseline_length` plain iterations runs every `baseline_every` iterations to keep the plain
figure fresh (a bucket's first, once the batch drafted `first_baseline_after` iterations there, as long as its
missing samples and only while the batch is in it; `wide_lead_spacing` times less often while the chooser
measures far above plain, once a later baseline agreed with the plain figure). A plain sample far faster than
the figure restarts it (`_add_plain`: a figure learned in a slow spell). When the chooser's iterations measure
worse than plain ones by more than `margin`, the guard runs that bucket plain for `hold_iterations` (doubled
per consecutive verdict there, capped), then lets the chooser try again. A verdict holds only its own bucket:
drafting that loses at batch 1 says nothing about batch 4, where verification costs far less relative to a
plain step (the vLLM backend's replay of a batch-1 phase followed by a batch-4 one: a global hold kept batch 4
plain on one seed). A baseline whose plain iteration carried another request's prompt
(`IterationStats.num_prefill_tokens`, which the plain figure does not count) yields no sample, so it runs again
at the chooser's next drafting iteration in its bucket, up to `baseline_retries` times in a row. The chooser's
iterations that carried prompts count in its figure at their time less what the prompts add to a plain
iteration, as measured in the bucket's plain iterations with prompts (`MeasuredGuard._add_prompt_step`).

Why the decisions as a whole: the guard controls one thing, the chooser's decisions against plain decoding,
so that is what it measures; a chooser that runs plain and tests one request in a batch now and then is
within the margin of plain (`tests/policy/test_guard.py`), although its drafting iterations alone are not.
Each figure's first samples are averaged evenly before the EWMA takes over: seeded by its first sample alone,
one drafting iteration that paid a batch's catch-up prefill kept the chooser's figure low for dozens of
iterations, and the guard held plain for most of a run where the chooser paid (the simulator's policy table
at batch 16-64 went from 0.86-0.89 to ~0.99 of the chooser alone with this change; judging as a whole
changed none of those cells). The chooser sees every iteration and is asked while held too, so that a
central policy client keeps reporting (and reconnecting): every `held_ask_every` iterations and whenever the
batch's requests change, not every iteration, since nothing it decides then runs. Asked every iteration, a
search took 0.34 ms of a 4.8 ms plain step in a held vLLM server on the demo pair (2 cores), 7% of a step
that vLLM without speculation runs at 4.3 ms a token.

An iteration counts as the chooser's only if the chooser decided K for every request in it: requests with a
K fixed through the API (`num_spec_tokens: N`) share the engine, and their drafting is not the chooser's to
answer for. Counting them (the served benchmark's static-K phases ran between its auto ones) made the guard
hold 93 times in one run, so `auto` never drafted where static K = 2 paid 1.19x. For the same reason a hold
lasts engine iterations, whether the chooser was asked in them or not: counted in the chooser's iterations
only, a hold that began at the end of one burst of auto traffic outlived the fixed-K traffic after it and
kept the next burst plain for its whole length (the served benchmark's second auto phase at concurrency 16:
no drafting, while the central policy predicted 1.28x).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import cast

from policy.cost_model import batch_bucket
from policy.guard_figures import PlainShape, Rate
from policy.stats import (
    IterationStats,
    JoinAware,
    KChooser,
    OutlookAware,
    RequestOutlook,
    SameBatchSkips,
)


@dataclass(frozen=True)
class GuardConfig:
    margin: float = 0.05  # the chooser's iterations must not measure more than this much worse than plain
    confidence: float = 2.0  # ... and not by less than this many standard errors of the difference either
    min_samples: int = 8  # iterations of each kind in a bucket before a verdict
    smoothing: float = 0.05  # EWMA weight of the newest iteration (about 20 iterations of memory)
    baseline_every: int = 16  # while drafting, one baseline in this many iterations
    # While the chooser's iterations measure more than `wide_lead` above plain ones in the bucket (by more
    # than `confidence` standard errors of the difference too), baselines run `wide_lead_spacing` times less
    # often: a stale plain figure can then only matter after a fall that the chooser's own figure (about 20
    # iterations of memory) shows long before the next baseline is due. Every baseline is plain steps at a
    # loss where drafting pays most: served on the regime pair at synthetic 4, where static K = 4 ran 1.58x
    # off, one 4-step baseline in 68 steps was about 2% of the cell's tokens.
    wide_lead: float = 0.25
    wide_lead_spacing: int = 4
    # A plain sample whose rate is more than this many times the bucket's plain figure restarts the figure
    # (learned again as a new bucket's, in one baseline); and a lead counts as wide only once a plain sample
    # taken after the chooser drafted in the bucket agreed with the figure (`MeasuredGuard._add_plain`).
    stale_plain_factor: float = 1.5
    # Plain iterations per baseline. An engine whose plain iterations next to drafting ones are not plain
    # decoding's cost (`IterationStats.is_near_drafting`, vLLM) needs 3 for one that is: with vLLM's one-step
    # lag the first follows a verification and the last drafts at its end.
    baseline_length: int = 1
    # A baseline whose plain iteration carried another request's prompt gave no sample; it runs again at the
    # next drafting choice in its bucket, at most this many times in a row. Served on the regime pair under
    # Poisson arrivals (mixed, concurrency 32), 45% of the steps at batch 17-32 carried a prompt; the one
    # baseline of a 145-step cell lost its sample so, the next was due 256 drafting steps later (wide-lead
    # spacing), and the bucket's plain figure got no new sample in that cell.
    baseline_retries: int = 2
    # A bucket's first baseline (as long as its missing samples) runs only while the batch is in the bucket,
    # and starts only after the batch drafted this many iterations there (since the bucket's last first
    # baseline started): a bucket the batch only passes through costs plain steps in proportion to its time
    # there. Served on the regime pair (vLLM backend, synthetic at concurrency 16), a batch that passed
    # through batch 2 or 5-8 between two waves of requests, or in the cell's tail, started there a 10-step
    # first baseline, which then ran plain at batch 14-16 or 3-4, buckets already known: 26 of the cell's 82
    # steps were plain, and auto ran 1.27x off where our path at static K = 4 ran 1.45x. Cut where the batch
    # left, up to twice per bucket and run to its end after that (sessions 32 to 40), the first baseline of
    # batch 5-8 started in every cell's tail (3-4 steps there) and ran on at batch 1-4, where its samples were
    # other buckets': batch 5-8 stayed unknown, and 9-10 of each synthetic cell's last steps ran plain, where
    # drafting pays most (session 41's records, concurrency 16).
    first_baseline_after: int = 32
    hold_iterations: int = 64  # plain iterations after a verdict against drafting
    max_hold_iterations: int = 1024  # cap of the doubling hold
    held_ask_every: int = 8  # while held, the chooser is asked this often (and when the requests change)

    def __post_init__(self) -> None:
        if not 0.0 <= self.margin < 1.0 or not 0.0 < self.smoothing <= 1.0 or self.confidence < 0.0:
            raise ValueError(
                f"margin={self.margin} must be in [0, 1), smoothing={self.smoothing} in (0, 1], "
                f"confidence={self.confidence} >= 0"
            )
        if min(self.min_samples, self.baseline_every, self.hold_iterations, self.baseline_length) < 1:
            raise ValueError("min_samples, baseline_every, baseline_length and hold_iterations must be >= 1")
        if self.stale_plain_factor <= 1.0:
            raise ValueError(f"stale_plain_factor={self.stale_plain_factor} must be > 1")
        if self.wide_lead < 0.0 or self.wide_lead_spacing < 1:
            raise ValueError(
                f"wide_lead={self.wide_lead} must be >= 0, wide_lead_spacing={self.wide_lead_spacing} >= 1"
            )
        if self.baseline_retries < 0 or self.first_baseline_after < 0:
            raise ValueError(
                f"baseline_retries={self.baseline_retries}, first_baseline_after={self.first_baseline_after} "
                "must be >= 0"
            )
        if self.held_ask_every < 1:
            raise ValueError(f"held_ask_every={self.held_ask_every} must be >= 1")
        if self.max_hold_iterations < self.hold_iterations:
            raise ValueError(f"max_hold_iterations={self.max_hold_iterations} must be >= hold_iterations")


# Choices not yet observed that are remembered (engines with one iteration in flight need one; a choice
# whose iteration never ran must not shift the pairing of later ones for long).
_MAX_PENDING_CHOICES = 4


class MeasuredGuard:
    """A `KChooser` wrapping another one (see the module docstring)."""

    def __init__(self, inner: KChooser, config: GuardConfig | None = None) -> None:
        self.inner = inner
        # What the chooser inside takes, read once: a check against a runtime Protocol took 5-15 us, asked
        # every step.
        self._takes_outlook = isinstance(inner, OutlookAware)
        self._takes_joined = isinstance(inner, JoinAware)
        self.config = config or GuardConfig()
        self._plain: dict[int, Rate] = {}
        # Per bucket whose plain figure is known but not yet confirmed: whether the chooser drafted there since
        # it was; and the buckets whose figure a later plain sample agreed with (`_leads_widely`).
        self._drafted_since_known: dict[int, bool] = {}
        self._confirmed: set[int] = set()
        self.num_plain_restarts = 0  # plain figures restarted (`GuardConfig.stale_plain_factor`)
        self._chosen: dict[int, Rate] = {}  # iterations that ran what the chooser decided
        # Per bucket: seconds a prompt token adds to a plain step, from plain steps with prompts
        # (`_add_prompt_step`; `Rate`'s value: extra seconds over prompt tokens).
        self._prompt_cost: dict[int, Rate] = {}
        # Per bucket: how a plain step's time grows with the batch there; every step counts in the figures at
        # its time scaled to the bucket's largest batch (`PlainShape`).
        self._plain_shape: dict[int, PlainShape] = {}
        # Per batch-size bucket, as the figures: plain iterations still to run after a verdict there, and
        # consecutive verdicts there (the hold doubles).
        self._hold_left: dict[int, int] = {}
        self._num_verdicts: dict[int, int] = {}
        self._num_drafting = 0  # drafting iterations since the last plain one
        self._baseline_left = 0  # plain iterations of the current baseline still to choose
        # The bucket of the current baseline if it is the bucket's first (None: a later one), and per bucket
        # the drafting iterations since its last first baseline started (`first_baseline_after`).
        self._baseline_bucket: int | None = None
        self._drafting_in: dict[int, int] = {}
        # Per choice not yet observed: the requests the chooser decided for (None: a forced plain iteration),
        # and whether it is a baseline's.
        self._pending: deque[tuple[frozenset[str] | None, bool]] = deque(maxlen=_MAX_PENDING_CHOICES)
        # The bucket where a baseline's sample was lost to a prompt (None: none), and the baselines run again
        # in a row so far.
        self._missed_bucket: int | None = None
        self._num_retries = 0
        self.num_holds = 0
        # While held: the choices until the chooser is asked again.
        self._held_skips = SameBatchSkips()

    def set_outlook(self, outlook: Mapping[str, RequestOutlook]) -> None:
        """(`OutlookAware`) For the chooser inside, if it weighs outlooks."""
        if self._takes_outlook:
            cast(OutlookAware, self.inner).set_outlook(outlook)

    def choose(self, request_ids: Sequence[str]) -> dict[str, int]:
        if not request_ids:
            return self.inner.choose(request_ids)
        bucket = batch_bucket(len(request_ids))
        if self._hold_left.get(bucket, 0) > 0:
            if not self._held_skips.skip(request_ids):
                self.inner.choose(request_ids)
                self._held_skips.arm(request_ids, self.config.held_ask_every - 1)
            return self._plain_iteration(request_ids)
        self._held_skips.reset()
        chosen = self.inner.choose(request_ids)
        if self._baseline_left > 0 and self._baseline_bucket not in (None, bucket):
            self._baseline_left = 0  # a first baseline's plain steps here would be another bucket's
        if self._baseline_left > 0:
            self._baseline_left -= 1
            self._num_drafting = 0
            return self._plain_iteration(request_ids, is_baseline=True)
        plain = self._plain.get(bucket)
        num_plain = 0 if plain is None else plain.count
        is_known = num_plain >= self.config.min_samples
        # Learn the plain rate of a new bucket fast (still at least one drafting iteration per baseline), in
        # one baseline that is long enough for the missing samples: each baseline yields one sample for its
        # `baseline_length` plain iterations, and each iteration beyond those one more. Baselines of 4 steps
        # every 8 (the vLLM backend's guard) took 64 steps, half of them plain, to learn a bucket: served on
        # the regime pair, the first cell at batch 4 (synthetic, where static K = 4 ran 1.60x off) ran its
        # first 80 steps 4 drafting, 4 plain, and auto ran 0.80x of static K = 4.
        every = self.config.baseline_every if is_known else max(4, 2 * self.config.baseline_length)
        if is_known and self._leads_widely(bucket):
            every *= self.config.wide_lead_spacing
        is_due = self._num_drafting >= every - self.config.baseline_length and (
            is_known or self._drafting_in.get(bucket, 0) >= self.config.first_baseline_after
        )
        is_retry = self._missed_bucket == bucket and self._num_retries < self.config.baseline_retries
        if any(chosen.values()) and (is_due or is_retry):
            # A baseline. The count restarts now, not when it is observed: an engine that verifies each choice
            # a step later (vLLM) would otherwise be asked again before the baseline is observed, and ran two
            # plain iterations per baseline (1 in 9 at baseline_every 16, the vLLM backend's replay).
            self._num_drafting = 0
            self._num_retries = 0 if is_due else self._num_retries + 1
            self._missed_bucket = None
            missing = 0 if is_known else self.config.min_samples - num_plain - 1
            self._baseline_left = self.config.baseline_length + missing - 1
            self._baseline_bucket = None if is_known else bucket
            if not is_known:
                self._drafting_in[bucket] = 0
            return self._plain_iteration(request_ids, is_baseline=True)
        self._pending.append((frozenset(request_ids), False))
        return chosen

    def choose_joined(self, joined: Sequence[str], chosen: Mapping[str, int]) -> dict[str, int]:
        """(`JoinAware`) The chooser's K for requests that joined the batch of the last choice, unless that
        choice was the guard's plain iteration (a baseline, a hold): then 0. The iteration counts as the
        chooser's with them."""
        asked, is_baseline = self._pending[-1] if self._pending else (None, False)
        if asked is None or not self._takes_joined:
            return dict.fromkeys(joined, 0)
        self._pending[-1] = (asked | frozenset(joined), is_baseline)
        return cast(JoinAware, self.inner).choose_joined(joined, chosen)

    def observe(self, stats: IterationStats) -> None:
        self.inner.observe(stats)
        if not stats.requests:
            return
        # A hold lasts engine iterations, asked or not, at any batch size.
        if self._hold_left:
            self._hold_left = {b: left - 1 for b, left in self._hold_left.items() if left > 1}
        # asked None: nobody asked the chooser.
        asked, is_baseline = self._pending.popleft() if self._pending else (None, False)
        is_chosen = asked is not None and all(r.request_id in asked for r in stats.requests)
        if stats.iteration_time_s <= 0.0:
            return
        bucket = batch_bucket(stats.batch_size)  # batch sizes 1, 2, 3-4, 5-8, 9-16, ...
        per_request = sum(r.num_committed_tokens for r in stats.requests) / stats.batch_size
        is_drafting = any(r.num_spec_tokens > 0 for r in stats.requests)
        self._num_drafting = self._num_drafting + 1 if is_drafting else 0
        if is_drafting:
            self._drafting_in[bucket] = self._drafting_in.get(bucket, 0) + 1
            if bucket in self._drafted_since_known:
                self._drafted_since_known[bucket] = True
        is_plain_decoding = not is_drafting and not stats.is_near_drafting
        shape = self._plain_shape.get(bucket)
        if shape is None:  # (not setdefault: a shape made every step for nothing)
            shape = self._plain_shape[bucket] = PlainShape()
        if is_plain_decoding and not stats.num_prefill_tokens:
            shape.add(stats.batch_size, stats.iteration_time_s, self.config.smoothing)
        seconds = stats.iteration_time_s * shape.scale(stats.batch_size, 1 << bucket)  # at the full batch
        if stats.num_prefill_tokens:
            # Other requests' prompts in the forward: not plain decoding's time, and the chooser's only less
            # what the prompts cost (`_add_prompt_step`).
            if is_baseline and is_plain_decoding:
                self._missed_bucket = bucket  # the baseline's sample is lost: it runs again
            self._add_prompt_step(bucket, stats, per_request, seconds, is_plain_decoding, is_chosen)
            if is_drafting and is_chosen:
                self._judge(bucket)
            return
        if is_plain_decoding:
            self._add_plain(bucket, per_request, seconds)
            if self._missed_bucket == bucket:
                self._missed_bucket = None
        if is_chosen:
            self._chosen.setdefault(bucket, Rate()).add(per_request, seconds, self.config.smoothing)
        if is_drafting and is_chosen:
            self._judge(bucket)

    def release(self, request_id: str) -> None:
        self.inner.release(request_id)

    def gauges(self) -> dict[str, float]:
        return {
            **self.inner.gauges(),
            "policy_guard_holds": self.num_holds,
            "policy_guard_plain_restarts": self.num_plain_restarts,
        }

    def _plain_iteration(self, request_ids: Sequence[str], *, is_baseline: bool = False) -> dict[str, int]:
        self._pending.append((None, is_baseline))
        return dict.fromkeys(request_ids, 0)

    def figures(self, bucket: int) -> tuple[float, float, float] | None:
        """The bucket's (chooser's rate, plain rate, `confidence` standard errors of their difference), once
        each has `min_samples` iterations."""
        plain, chosen = self._plain.get(bucket), self._chosen.get(bucket)
        if plain is None or chosen is None or min(plain.count, chosen.count) < self.config.min_samples:
            return None
        noise = self.config.confidence * math.hypot(chosen.standard_error, plain.standard_error)
        return chosen.value, plain.value, noise

    def _add_plain(self, bucket: int, tokens: float, seconds: float) -> None:
        """A plain decoding sample. A bucket's plain figure is learned from its first `min_samples` plain
        iterations, evenly averaged, and refreshed by one sample per baseline after that; so a figure learned
        while the machine was briefly slowed stayed wrong for as long as the chooser drafted there, and its
        false lead put the baselines that could correct it `wide_lead_spacing` times further apart.

        Served on the demo pair (vLLM backend, 2 cores, the benchmark's servers side by side), the first 8
        plain steps at batch 4 of a cell took 19-35 ms where that batch's plain steps take 6-8 ms (such spells
        of 2-4x slower steps came in 1-5% of plain steps at any time); the cost model and the guard both
        learned batch 4's plain time from them. The chooser then drafted 330 of the cell's 417 steps, at 0.88x
        vLLM without speculation, while the guard read drafting at 3.6x plain decoding (its 21 ms steps for
        2.6 tokens a request against 25 ms for 1).

        A slow spell makes steps slower, never faster: a plain sample more than `stale_plain_factor` times
        faster than the figure says the figure is stale, and it is learned again from that sample, as a new
        bucket's (in one baseline long enough for its samples). A lead counts as wide only once a plain sample
        taken after the chooser drafted in the bucket, one from a later baseline, agreed with the figure."""
        plain = self._plain.get(bucket)
        if plain is not None and plain.count >= self.config.min_samples:
            if tokens / seconds > self.config.stale_plain_factor * plain.value:
                plain = self._plain[bucket] = Rate()
                self._drafted_since_known.pop(bucket, None)
                self._confirmed.discard(bucket)
                self._drafting_in[bucket] = self.config.first_baseline_after  # learned again at once
                self.num_plain_restarts += 1
            elif self._drafted_since_known.get(bucket, False):
                self._confirmed.add(bucket)
                del self._drafted_since_known[bucket]
        if plain is None:
            plain = self._plain[bucket] = Rate()
        plain.add(tokens, seconds, self.config.smoothing)
        if plain.count == self.config.min_samples:
            self._drafted_since_known[bucket] = False

    def _add_prompt_step(
        self,
        bucket: int,
        stats: IterationStats,
        per_request: float,
        step_s: float,
        is_plain: bool,
        is_chosen: bool,
    ) -> None:
        """A step that carried other requests' prompts, `step_s` its time at the bucket's full batch. A plain
        one says what a prompt token adds to a plain step (beside the bucket's plain figure: a ratio of
        smoothed sums, as the figures); once that is known from `min_samples` of them, the chooser's steps
        count in its figure at their time less their prompts' cost, and never faster than a plain step.

        Left out of the chooser's figure, drafting in them went unjudged: served on the regime pair (prose at
        batch 32, session 58), a third to half of the steps carried prompts, and where the cost model priced
        drafting free, the batch drafted K = 4 for 25 steps, most of them with prompts, at 175-380 ms where
        plain ones took 60-150, and the guard held no sooner than after them."""
        plain = self._plain.get(bucket)
        if plain is None or plain.count < self.config.min_samples:
            return
        plain_step_s = 1.0 / plain.value  # a plain step commits one token a request
        if is_plain:
            extra_s = step_s - per_request * plain_step_s
            self._prompt_cost.setdefault(bucket, Rate()).add(
                extra_s, float(stats.num_prefill_tokens), self.config.smoothing
            )
        cost = self._prompt_cost.get(bucket)
        if not is_chosen or cost is None or cost.count < self.config.min_samples:
            return
        seconds = step_s - max(cost.value, 0.0) * stats.num_prefill_tokens
        self._chosen.setdefault(bucket, Rate()).add(
            per_request, max(seconds, plain_step_s), self.config.smoothing
        )

    def _leads_widely(self, bucket: int) -> bool:
        if bucket not in self._confirmed:
            return False
        figures = self.figures(bucket)
        if figures is None:
            return False
        chosen, plain, noise = figures
        return chosen - noise > (1.0 + self.config.wide_lead) * plain

    def _judge(self, bucket: int) -> None:
        figures = self.figures(bucket)
        if figures is None:
            return
        chosen_value, plain_value, noise = figures
        if chosen_value < (1.0 - self.config.margin) * plain_value - noise:
            num_verdicts = self._num_verdicts.get(bucket, 0)
            hold = self.config.hold_iterations * 2**num_verdicts
            self._hold_left[bucket] = min(hold, self.config.max_hold_iterations)
            self._num_verdicts[bucket] = num_verdicts + 1
            self.num_holds += 1
            del self._chosen[bucket]  # the next try is judged on fresh iterations
        elif self._chosen[bucket].count >= 4 * self.config.min_samples:
            self._num_verdicts[bucket] = 0  # the chooser has held its own for a while
