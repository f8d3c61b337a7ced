"""Batch-aware K: the vector of K_r that maximizes expected committed tokens per second for the whole batch.

Objective: sum_r E[ETR_r(K_r)] / T(batch, K vector), with per-request acceptance estimates and the shared
cost model. A new request's estimate starts from the acceptance of the traffic so far (not from an
uninformed 0.5), pooled over recent request-iterations. Requests are probed in Cascade-style test phases
(`policy.test_phase`: new ones at once, ones at K = 0 with back-off) so that every estimate stays fresh; a
batch size at which no drafting was measured yet gets tests too, since its cost of drafting is only the
prior's guess. A probe only guarantees K >= probe_num_spec_tokens on top of the optimum, and probes that
would make a K = 0 batch draft wait to go together, so that testing costs little where speculation does not
pay; such forced tests also spend at most a budget's share of the time (`BatchAwareConfig.test_budget`).
Hysteresis keeps a request's K unless changing it clearly pays. A request whose drafter lags behind it (new,
or back from K = 0) starts drafting only where the rest of its life repays the drafter's catch-up
(`RequestOutlook`, `BatchAwareConfig.weighs_catch_up`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
from numpy.typing import NDArray

from policy.batch_aware_config import BatchAwareConfig
from policy.cost_model import CostModel
from policy.k_search import (
    StepTimes,
    best_k_vector,
    could_beat_plain,
    expected_etrs,
    max_of_others,
    with_hysteresis,
)
from policy.openings import Openings
from policy.prompt_steps import NO_CUE, prompt_cue
from policy.stats import IterationStats, RequestOutlook, SameBatchSkips
from policy.test_budget import TestBudget
from policy.test_phase import RequestState, TestPhases
from policy.traffic_prior import TrafficPrior
from policy.utility import AcceptanceConfig, AcceptanceEstimator, rejections

Array = NDArray[np.float64]
# Per drafting request-iteration (each request's counts apart): remembers about 200 of them, a few requests'
# lives at batch 1 and a few iterations at batch 32. No phase changes (fast = slow): at batch 1 every new
# request looks like a change of phase, and the traffic's acceptance was then the last request's alone (fed
# per iteration over 20 iterations, it was too): one request at 0.3 put every later one at K = 0, untested
# for its life, where the traffic's mean was 0.58 and static K = 1 paid (tests/cluster/vllm_backend).
# Each request feeds it with its first `test_iterations` drafting iterations only: a request that drafts on
# is one that accepts well, and counted per iteration they set the acceptance a new request starts from.
# Served on the demo pair's prose at batch 1 (requests at 0.2-0.6), every new request drafted its first
# iterations at K = 2 on the few that kept drafting, where the pair only pays at 0.8 and above.
POPULATION_ACCEPTANCE = AcceptanceConfig(decay=0.995, fast_decay=0.995)
# `choose` builds the time tables of this many batch sizes above and below its batch's, if the cost model's
# version has none yet, for the next step's batch once requests join it and leave it (`choose_joined`): an engine
# that chooses ahead (vLLM's scheduler, while the worker runs the step before) asks `choose_joined` on the step's
# path, and a table built there took 0.2-0.7 ms of CPU and 2-7 ms of wall time served on the demo pair at batch
# 32 (2 cores, the API server handling the joining request), in a third of the steps that a request joined. One
# request joined in 80% of those steps and two in 16% (session 64's record).
JOINING_TABLES = 2


class BatchAwareChooser:
    """A `KChooser` for one batch (one router); the cost model may be shared between choosers."""

    def __init__(self, config: BatchAwareConfig, cost_model: CostModel) -> None:
        self.config = config
        self.cost_model = cost_model
        self._states: dict[str, RequestState] = {}
        # Acceptance of all requests together, updated once per iteration: new requests start from it.
        self._population = AcceptanceEstimator(POPULATION_ACCEPTANCE)
        self._num_population_requests = 0  # requests whose drafts fed it
        # The acceptance of requests' opening verifications (`BatchAwareConfig.opening_apart`).
        self._openings = Openings(
            POPULATION_ACCEPTANCE, config.acceptance.change_z, config.opening_sample_every
        )
        self._phases = TestPhases(config, cost_model)
        # Each request's acceptance for choosing its K, leaning on the traffic's (`policy.traffic_prior`).
        self._traffic_prior = TrafficPrior(config)
        # The last choice, for `gauges`: its predicted tokens per second over plain decoding's.
        self._predicted_speedup = 1.0
        # A steady all-plain batch (`BatchAwareConfig.steady_iterations`): its choices before the next search.
        self._steady = SameBatchSkips()
        self.num_searches = 0
        # `_time_table`s of the cost model's current version, by batch size and prompt cue (`set_outlook`; and so
        # are the two verdicts below, computed from them).
        self._time_tables: dict[tuple[int, int], StepTimes] = {}
        self._time_tables_version = -1
        # `_could_pay`, of the same version, by batch size, how many requests may draft and cue: the highest
        # acceptance found not to pay and the lowest found to pay.
        self._could_pay_bounds: dict[tuple[int, int, int], tuple[float, float]] = {}
        # `_plain_shape_probe`'s K not measured yet and whether one could be cheap, of the same version, by batch
        # size and cue (`_unmeasured_plain_shapes`).
        self._unmeasured_shapes: dict[tuple[int, int], tuple[list[int], bool]] = {}
        # The last optimum with hysteresis, and what it was computed from: the batch, the cost model's version
        # and `_num_changes`, a count of changes to what else it reads (a rate, a previous choice). Reused,
        # exactly, while none of them changes: while tests wait for a drafting iteration (up to
        # `max_test_wait`), or a batch of fixed requests decodes plain with a test pending, every search was
        # the last one again. Offline at batch 32 on the demo pair (vLLM backend), in batches that drafted
        # nothing, `choose` took 1 ms of a 20 ms plain step.
        self._num_changes = 0
        self.num_reused_optima = 0
        self._optimum_key: tuple[tuple[str, ...], int, int, int] | None = None
        self._optimum: tuple[int, ...] = ()
        self._probe = 0  # ... and the plain optimum's shape probe (`_plain_shape_probe`; 0: none)
        self._outlook: Mapping[str, RequestOutlook] = {}  # `set_outlook`
        self._prompt_cue = NO_CUE  # the outlook's (`policy.prompt_steps.prompt_cue`): the time tables' key
        self.num_unrepaid = 0  # choices where `_repaid` set a lagging request's K to 0

    def choose(self, request_ids: Sequence[str]) -> dict[str, int]:
        if not request_ids:
            return {}
        for size in range(max(1, len(request_ids) - JOINING_TABLES), len(request_ids) + JOINING_TABLES + 1):
            self._time_table(size)
        if self._steady.skip(request_ids):
            return dict.fromkeys(request_ids, 0)
        self.num_searches += 1
        states = [self._state(r) for r in request_ids]
        num = len(states)
        times = self._time_table(num)
        # The requests' rates are read by the search, the catch-up and shape rules and the gauge, none of which
        # an all-plain choice reused needs: the rates were a quarter of `choose` at batch 32, replayed over a
        # served record of the demo pair (vLLM backend), where most choices are that.
        rates: Array | None = None
        key = (
            tuple(request_ids),
            self.cost_model.version,
            self._num_changes + self._phases.num_changes,
            self._prompt_cue,
        )
        if key == self._optimum_key:
            self.num_reused_optima += 1
            chosen, probe = list(self._optimum), self._probe
        else:
            if any(s.set_k for s in states) or self._could_pay(num, times):
                rates = self._rates(states)
                chosen = self._optimum_with_hysteresis(states, rates, times)
            else:  # plain at any acceptance (`_optimum_with_hysteresis`'s bound at its highest): no rates read
                chosen = [0] * num
            probe = 0
            if not max(chosen) and self._unmeasured_plain_shapes(num, times)[1]:
                rates = self._rates(states) if rates is None else rates
                probe = self._plain_shape_probe(request_ids, rates, times)
            self._optimum_key, self._optimum, self._probe = key, tuple(chosen), probe
        unrepaid: frozenset[int] = frozenset()
        if max(chosen):  # (all plain: no lagging request drafts, no K to probe above)
            rates = self._rates(states) if rates is None else rates
            if self.config.weighs_catch_up and self._outlook:
                chosen, unrepaid = self._repaid(request_ids, rates, chosen, times)
            chosen = self._shape_probe(rates, chosen, times)
        opening = (
            frozenset(i for i, s in enumerate(states) if s.is_opening)
            if self._are_openings_apart()
            else frozenset()
        )
        for i in self._phases.testers(states, chosen, unrepaid, self._could_pay(num, times), opening):
            chosen[i] = max(chosen[i], self.config.probe_num_spec_tokens)
        if probe:  # (after the tests, which it does not start: they follow the optimum and the test budget)
            chosen = [probe] * num
        self._phases.settle(states, chosen, lambda estimator: self._pays_alike(estimator, num, times))
        self._predicted_speedup = 1.0  # the gauge is the model's own: all plain, plain decoding's rate
        if max(chosen):
            # (the phases' choices change no count or estimate that the rates read)
            rates = self._rates(states) if rates is None else rates
            plain_rate = num / float(times.grid[0, 0])
            bar = 1.0 + self.config.min_predicted_gain
            self._predicted_speedup = bar * self.tokens_per_second(rates, chosen, times) / plain_rate
        is_steady = not any(chosen) and all(s.test_remaining == 0 and s.set_k == 0 for s in states)
        self._steady.arm(request_ids, self.config.steady_iterations - 1 if is_steady else 0)
        self._count_choice(states)
        return dict(zip(request_ids, chosen, strict=True))

    def choose_joined(self, joined: Sequence[str], chosen: Mapping[str, int]) -> dict[str, int]:
        """(`JoinAware`) Each joined request's K: the batch's optimum with the others' K kept at `chosen`.

        A request joins where its prompt completes in a step whose K were chosen before it came (vLLM's
        scheduler chooses ahead, while the step before runs), and it drafts at the end of that step. Left at
        K = 0 there, every new request verified nothing in its first decode step, where static K verifies
        K_max: served on the regime pair (synthetic at concurrency 16 / 32, 64-token requests of about 17
        steps at K = 4), our scheduler at static K = 4 ran 0.99-1.05x vLLM's K = 4, and auto 0.93-0.95x with
        each request's first step at K = 0. Where the step drafts anyway, the joined request's drafts cost
        their verification and its prompt's pass through the drafter in the step (paid later as a catch-up
        were it to draft then); where it does not, the search charges the whole batch's draft steps, as it
        does a test. The request stays new for the next `choose`: its test phase and the test budget's rules
        apply from there.

        It drafts only where the optimum of the whole batch, every K free, drafts it too: the next `choose`
        searches the whole batch, and a request that joined drafting where that search puts it at K = 0 fed
        its prompt through the drafter for one step's drafts. Beside others kept at K > 0, drafting looks
        cheap (the draft steps are paid), and those others are often tests, or were chosen for the smaller
        batch before the joined requests came. Served on the demo pair (vLLM backend, the draft half a target
        step) at synthetic 16, two requests tested at batch 2 and the 14 prompts of the wave that came next
        all joined at K = 4, the drafter fed their 936 prompt tokens in a 171 ms step (a plain one: 10 ms),
        and the next choice put all 14 at K = 0; over that run's 4 cells at 16 / 32, 130 of the 272 requests
        that drafted in their prompt's step were at K = 0 in the step after.

        Beside others all at K = 0, the joined requests draft only if drafting them alone could pay were every
        draft accepted (`_could_pay`, its bound capped at their number), then were every draft accepted at the
        highest of their acceptances (the rates read); where it could not, they get K = 0 without the search,
        which is what the search would give them. The call runs on the step's path (vLLM's
        scheduler asks it while scheduling the step), and served on the demo pair at batch 28-32 (session 63's
        record, 2 cores) the steps that carried a joined request's prompt in a plain batch took about 3 ms
        more with auto than with our scheduler at K = 0, at every prompt size, where decode steps took the same
        (15.4 ms, median): the search's 0.14 ms of CPU replayed, 1-3 ms of wall time served beside the API
        server handling the new request."""
        size = len(chosen) + len(joined)
        times = self._time_table(size)
        is_plain = not any(chosen.values())
        best = [0] * len(joined)
        if is_plain and not self._could_pay(size, times, len(joined)):
            joined_states = [self._state(r) for r in joined]  # (no rates needed: the bound is acceptance 1)
        else:
            states = [self._state(r) for r in [*chosen, *joined]]
            joined_states = states[len(chosen) :]
            rates = self._rates(states)
            # The same bound at the joined requests' highest acceptance (`_optimum_with_hysteresis`).
            if not is_plain or self._could_pay(size, times, len(joined), float(rates[len(chosen) :].max())):
                forced = np.array([*chosen.values(), *[-1] * len(joined)], dtype=np.int64)
                best = self.best_spec_tokens(rates, forced, times)[len(chosen) :]
                if any(best):
                    free = self.best_spec_tokens(rates, np.full(size, -1), times)[len(chosen) :]
                    best = [k if k_free else 0 for k, k_free in zip(best, free, strict=True)]
        self._num_changes += 1  # new states (the next search is not the last one again)
        self._count_choice(joined_states)
        return dict(zip(joined, best, strict=True))

    def _rates(self, states: Sequence[RequestState]) -> Array:
        """Each request's acceptance for choosing its K (`policy.traffic_prior`); for a request's opening, the
        openings' acceptance where openings are counted apart (`BatchAwareConfig.opening_apart`), but in one
        request of `opening_sample_every`."""
        rates = self._traffic_prior.rates(states)
        if self._are_openings_apart():
            opening = [i for i, s in enumerate(states) if s.is_opening and not s.samples_opening]
            rates[opening] = self._openings.rate
        return rates

    def _are_openings_apart(self) -> bool:
        """Whether requests' openings are counted apart now (`BatchAwareConfig.opening_apart`)."""
        return self.config.opening_apart and self._openings.are_apart(self._population)

    def _count_choice(self, states: Sequence[RequestState]) -> None:
        """Count a choice made for these requests: after its first, a request's rate is its own."""
        if any(s.is_opening for s in states):
            self._num_changes += 1
        for state in states:
            state.num_chosen += 1

    def set_outlook(self, outlook: Mapping[str, RequestOutlook]) -> None:
        """(`OutlookAware`) Each request's catch-up and remaining tokens, for the next `choose`; and the prompt
        cue they give, under which the next choices price their steps (`CostModel.phase_times`)."""
        self._outlook = outlook
        self._prompt_cue = prompt_cue(outlook.values())

    def observe(self, stats: IterationStats) -> None:
        self.cost_model.observe(stats)
        is_drafting = any(r.num_spec_tokens > 0 for r in stats.requests)
        if is_drafting:
            self._steady.reset()
        states = [self._state(r.request_id) for r in stats.requests]
        # Read by the drafting requests alone: a plain iteration (most of them where drafting does not pay)
        # skips it.
        prior_means = self._traffic_prior.means(states) if is_drafting else np.zeros(len(states))
        for r, state, prior_mean in zip(stats.requests, states, prior_means, strict=True):
            is_opening = state.num_observed == 0
            state.num_observed += 1
            if r.num_spec_tokens > 0:
                rejected = rejections(r.num_spec_tokens, r.num_accepted_tokens)
                self._num_changes += 1
                if is_opening and self.config.opening_apart:
                    self._openings.record(r.num_accepted_tokens, rejected)
                    if self._are_openings_apart():
                        state.is_opening_apart = True
                        continue
                state.estimator.record_counts(r.num_accepted_tokens, rejected)
                if state.num_drafting_iterations < self.config.test_iterations:
                    self._population.record_counts(r.num_accepted_tokens, rejected)
                self._num_population_requests += state.num_drafting_iterations == 0
                state.num_drafting_iterations += 1
                self._traffic_prior.count(state, r.num_accepted_tokens, rejected, float(prior_mean))
        if self._phases.observe(stats, states, self._outlook):
            self._steady.reset()

    def release(self, request_id: str) -> None:
        self._states.pop(request_id, None)
        self._num_changes += 1  # (its id might come back, with a new state)

    def gauges(self) -> dict[str, float]:
        """Why it drafts or not: the traffic's acceptance (and its openings', `BatchAwareConfig.opening_apart`)
        and what the cost model predicts the last choice gains over plain decoding; and the requests it keeps
        state for (finished ones are released)."""
        return {
            "policy_tracked_requests": float(len(self._states)),
            "policy_acceptance": self._population.rate,
            "policy_opening_acceptance": self._openings.rate,
            "policy_predicted_speedup": self._predicted_speedup,
            "policy_test_cost_share": self._phases.budget.spent_share(),
        }

    @property
    def test_budget(self) -> TestBudget:
        return self._phases.budget

    def tokens_per_second(
        self, rates: Array, num_spec_tokens: Sequence[int], times: StepTimes | None = None
    ) -> float:
        """Expected committed tokens per second of the batch at this K vector (one entry per request);
        `times` as in `best_spec_tokens` (None: the cost model's time under the outlook's prompt cue, drafting
        not charged its bar)."""
        etr = float(expected_etrs(rates, np.asarray(num_spec_tokens)).sum())
        if times is None:
            return etr / self.cost_model.iteration_time([int(k) for k in num_spec_tokens], self._prompt_cue)
        return etr / times.of(num_spec_tokens)

    def best_spec_tokens(
        self, rates: Array, forced: NDArray[np.int_], times: StepTimes | None = None
    ) -> list[int]:
        """The K vector of most expected tokens per second (`policy.k_search.best_k_vector`); `forced[r] >= 0`
        fixes K_r, -1 leaves it free. `times` is `_time_table(len(rates))` if the caller has it."""
        if times is None:
            times = self._time_table(len(rates))
        return best_k_vector(rates, forced, times, self.config.max_spec_tokens)

    def _optimum_with_hysteresis(
        self, states: list[RequestState], rates: Array, times: StepTimes
    ) -> list[int]:
        """The K vector of most expected tokens per second (`best_spec_tokens`), kept from the requests' set
        K where it gains too little (`with_hysteresis`).

        Where no request is set above K = 0 and drafting could not beat plain decoding were every request's
        acceptance the batch's highest (`_could_pay`), that is plain decoding, without the search. The
        search ran at every change of the batch, most of them where it stays plain at batch 13-32 on the demo
        pair, and served there a choice's CPU, made while the worker ran the step before, cost that step
        nearly as much (session 64). Replayed over session 64's demo record, the bound decided 85-90% of the
        searches that found plain decoding at 13-16 and 28-32, and `choose` took 0.14 ms of CPU at 28-32 (mean)
        against 0.21, with the same choice at every step."""
        if not any(s.set_k for s in states) and not self._could_pay(
            len(states), times, acceptance=float(rates.max())
        ):
            return [0] * len(states)
        best = np.array(self.best_spec_tokens(rates, np.full(len(rates), -1), times))
        # Requests in or just out of a test phase have no previous choice (set_k is None).
        previous = np.fromiter(
            (k if s.set_k is None else s.set_k for k, s in zip(best.tolist(), states, strict=True)),
            np.int64,
            len(states),
        )
        return with_hysteresis(rates, best, previous, times, self.config.hysteresis)

    def _pays_alike(self, estimator: AcceptanceEstimator, batch_size: int, times: StepTimes) -> bool:
        """Whether a batch of this size whose every request accepts at the estimate less one standard error
        would draft: some uniform K >= 1 commits more tokens per second than plain decoding in `times` (its
        `_time_table`), drafting charged its bar (`TestPhases.settle`)."""
        rate = max(estimator.rate - estimator.standard_error, 0.0)
        ks = np.arange(self.config.max_spec_tokens + 1)
        per_second = expected_etrs(np.full(len(ks), rate), ks) / times.grid[ks, batch_size * ks]
        return bool(per_second[1:].max() > per_second[0])

    def _could_pay(
        self, batch_size: int, times: StepTimes, num_drafting: int | None = None, acceptance: float = 1.0
    ) -> bool:
        """Whether drafting could beat plain decoding in a batch of this size were every draft accepted at
        `acceptance` (`policy.k_search.could_beat_plain`; 1: every draft accepted), `num_drafting` requests
        that may draft, the whole batch if None (`times`: its `_time_table`, drafting charged its bar). Kept per
        version of the cost model: by batch size and drafting requests, the highest acceptance found not to pay
        and the lowest found to pay. At acceptance 1: where it could not, no acceptance a test might measure makes
        the batch draft (`TestPhases.testers`). Served on the demo pair (vLLM backend, the draft half a target
        step) at prose 32, forced tests ran in 17-20 steps a cell, one of them a whole wave of new requests at once
        that caught up 2 846 prompt tokens in a 290 ms step (a plain step: 16 ms); with this rule 3, and auto ran
        1.12x the version before (three rounds). The bound is acceptance 1, not the traffic's: a test is how a
        shift to traffic that accepts better is found."""
        num = batch_size if num_drafting is None else min(num_drafting, batch_size)
        key = (batch_size, num, self._prompt_cue)
        fails, pays = self._could_pay_bounds.get(key, (-1.0, math.inf))
        if acceptance <= fails or acceptance >= pays:  # (the bound grows with the acceptance)
            return acceptance >= pays
        could = could_beat_plain(times, batch_size, num, acceptance)
        self._could_pay_bounds[key] = (fails, acceptance) if could else (acceptance, pays)
        return could

    def _time_table(self, batch_size: int) -> StepTimes:
        """Predicted iteration seconds of this batch (`policy.k_search.StepTimes`): by (max K, sum K), shape
        (max_k + 1, R * max_k + 1), and the padded drafts' (`CostModel.padded_draft_s`), drafting charged
        `min_predicted_gain` above the cost model's time.

        Kept until the cost model's predictions change (`CostModel.version`; a refit every 16 iterations on the
        vLLM backend): computing it was a third of a search, and searches took 0.25-0.35 ms of a 4.6 ms plain
        step served at batch 1 on the demo pair."""
        if self._time_tables_version != self.cost_model.version:
            self._time_tables.clear()
            self._could_pay_bounds.clear()
            self._unmeasured_shapes.clear()
            self._time_tables_version = self.cost_model.version
        key = (batch_size, self._prompt_cue)
        table = self._time_tables.get(key)
        if table is None:
            max_k, bar = self.config.max_spec_tokens, 1.0 + self.config.min_predicted_gain
            grid = self.cost_model.time_grid(
                batch_size,
                np.arange(max_k + 1)[:, None],
                np.arange(batch_size * max_k + 1)[None, :],
                self._prompt_cue,
            )
            grid[1:] *= bar
            table = self._time_tables[key] = StepTimes(grid, bar * self.cost_model.padded_draft_s())
        return table

    def _repaid(
        self, request_ids: Sequence[str], rates: Array, chosen: list[int], times: StepTimes
    ) -> tuple[list[int], frozenset[int]]:
        """`chosen`, less the drafting of lagging requests that would not repay their drafter's catch-up, and
        the indices of those (`TestPhases.testers` lets them probe only as forced tests, under the test budget).

        The catch-up costs `draft_prefill_per_token_s` per lagging token, once. Drafting saves, per
        iteration, the time the batch would take to commit the same tokens without it; it lasts about
        remaining tokens / E[ETR] iterations. First together: the optimum with every lagging request at
        K = 0 against `chosen` (where all of them start, the drafter's cost per iteration is shared, which
        one request taken out alone would not show). Then each lagging request alone, the others as
        chosen: one that joins a drafting batch near its end. A tie keeps drafting."""
        per_token_s = self.cost_model.params.draft_prefill_per_token_s
        outlook = [self._outlook.get(r) for r in request_ids]
        catch_up = np.array([0 if o is None else o.num_catch_up_tokens for o in outlook], np.float64)
        remaining = np.array([0 if o is None else o.num_remaining_tokens for o in outlook], np.float64)
        k = np.array(chosen)
        lagging = (k > 0) & (catch_up > 0)
        if per_token_s <= 0.0 or not lagging.any():
            return chosen, frozenset()
        etr = expected_etrs(rates, k)
        total_etr, time_s = float(etr.sum()), times.of(k)
        steps = remaining / etr  # iterations a request drafts until it ends
        alt = np.array(self.best_spec_tokens(rates, np.where(lagging, 0, -1), times))
        alt_time_s = times.of(alt)
        saving_s = alt_time_s * total_etr / float(expected_etrs(rates, alt).sum()) - time_s
        if saving_s * float(steps[lagging].mean()) < per_token_s * float(catch_up[lagging].sum()):
            self.num_unrepaid += 1
            return [int(v) for v in alt], frozenset(np.flatnonzero(lagging & (alt == 0)).tolist())
        # Each alone: r at K = 0, the others as chosen.
        alone_time_s = times.at(max_of_others(k), int(k.sum()) - k, np.count_nonzero(k) - (k > 0))
        alone_saving_s = alone_time_s * total_etr / (total_etr - etr + 1.0) - time_s
        unrepaid = lagging & (alone_saving_s * steps < per_token_s * catch_up)
        if not unrepaid.any():
            return chosen, frozenset()
        self.num_unrepaid += 1
        return [int(v) for v in np.where(unrepaid, 0, k)], frozenset(np.flatnonzero(unrepaid).tolist())

    def _plain_shape_probe(self, request_ids: Sequence[str], rates: Array, times: StepTimes) -> int:
        """Where the optimum is plain decoding: a K for the whole batch whose shape the correction has not
        measured in the batch's bucket (`shape_probe_rows`), the one the model rates best, if the model puts the
        probe's cost (what its iterations take beyond plain decoding's time for their tokens, and the drafter's
        catch-up of the requests that lag, `RequestOutlook`) within `shape_probe_margin` of its iterations'
        time; 0 otherwise (and until plain decoding's shape is measured). The probe runs each choice it holds
        at (a request tested then tests at its K); it starts no test: tests follow the optimum and the test
        budget (`TestPhases.testers`), so that where the traffic does not pay, a probe costs each new request
        one iteration at most, until the shape is measured.

        `_shape_probe` measures one K up from a drafting optimum; a plain one measured nothing above the K of
        its tests. Served on the regime pair at code 1 as a launch's first cell, the tests had measured K = 1
        at batch 1, and the model, its shape for K = 2-4 resting on K = 1's, put batch 1 at K = 1 / 4 at 23.1
        / 38.4 ms where K = 4 measured 33.7 later in the cell: at the traffic's 0.75, K = 2 / 3 / 4 came to 80
        / 81 / 79 tokens a second against plain's 82, 681 of the cell's 867 steps were plain, and auto ran
        0.98-1.02x off where static K = 3 ran 1.12-1.13x. With the probe, served against the version before
        (code and prose at 1 / 4 / 16, code 1 each launch's first cell): 1.019 over 12 runs (standard error
        0.010), code 1's plain steps 230 / 167 against 424 / 418 and its steps at K = 4 168 / 243 against 147 /
        61 (`bench/results/vllm_policy_s60_regime_plain_probe_ab_side_by_side.json`)."""
        rows = self.config.shape_probe_rows
        num = len(request_ids)
        unmeasured, could_be_cheap = self._unmeasured_plain_shapes(num, times)
        if not could_be_cheap:
            return 0
        probe = max(unmeasured, key=lambda k: self.tokens_per_second(rates, [k] * num, times))
        etr = float(expected_etrs(rates, np.full(num, probe)).sum())
        excess_s, time_s = self._probe_excess(times, num, probe, etr)
        loss_s = rows * excess_s
        catch_up = sum(o.num_catch_up_tokens for o in map(self._outlook.get, request_ids) if o is not None)
        catch_up_s = self.cost_model.params.draft_prefill_per_token_s * catch_up
        is_cheap = loss_s + catch_up_s <= self.config.shape_probe_margin * rows * time_s
        return probe if is_cheap else 0

    def _unmeasured_plain_shapes(self, num: int, times: StepTimes) -> tuple[list[int], bool]:
        """The K that `_plain_shape_probe` may probe in a batch of this size (`times`: its `_time_table`), and
        whether any of them could be cheap: within the margin were every draft accepted and no request lagging,
        where its cost is least. Where none could, the probe is 0 whatever the requests' rates, which `choose`
        then need not read (a third of a plain choice's CPU at batch 28-32 on the demo pair, replayed, session
        67). As of the last refit: `_time_table`, called first, clears them at a new version."""
        kept = self._unmeasured_shapes.get((num, self._prompt_cue))
        if kept is not None:
            return kept
        rows = self.config.shape_probe_rows
        num_rows = self.cost_model.num_shape_rows
        is_plain_measured = num_rows(num, 0) >= rows
        unmeasured = [
            k
            for k in range(1, self.config.max_spec_tokens + 1)
            if is_plain_measured and num_rows(num, k) < rows
        ]
        margin = self.config.shape_probe_margin
        could_be_cheap = rows > 0 and any(
            excess_s <= margin * time_s
            for excess_s, time_s in (self._probe_excess(times, num, k, num * (k + 1)) for k in unmeasured)
        )
        kept = self._unmeasured_shapes[num, self._prompt_cue] = (unmeasured, could_be_cheap)
        return kept

    def _probe_excess(self, times: StepTimes, num: int, k: int, etr: float) -> tuple[float, float]:
        """A plain-shape probe's iteration at K for the whole batch (`times`: its `_time_table`) committing `etr`
        tokens: what it takes beyond plain decoding's time for them, and its time (the drafting rows' bar off)."""
        time_s = float(times.grid[k, k * num]) / (1.0 + self.config.min_predicted_gain)
        return max(0.0, time_s - etr / (num / float(times.grid[0, 0]))), time_s

    def _shape_probe(self, rates: Array, chosen: list[int], times: StepTimes) -> list[int]:
        """`chosen` with its largest K one higher where the shape correction has not measured that many drafts
        per sequence in the batch's bucket (`shape_probe_rows`) and the model puts it within
        `shape_probe_margin` of `chosen` (`times`: `_time_table`), once `chosen`'s own is measured.

        An unmeasured K rests on the parametric form's ratio to the nearest measured one, and the form can be
        far off: served on the regime pair at synthetic 32, with K = 2 alone measured at batch 32 the model put
        K = 3 / 4 at 1.30 / 1.57x a K = 2 step, where they ran 1.13 / 1.17x (191 / 197 ms against 169), and a
        batch whose requests accepted alike stayed at K = 2 (0.91-0.98x the version before, whose requests'
        noisier estimates had spread their K over 1-4 and so measured K = 3 and 4). Greedy on the model
        alone, the chooser never measures what would correct it; the probe costs at most the margin for the
        iterations until the next refit counts them."""
        top = max(chosen)
        if top == 0 or top >= self.config.max_spec_tokens or not self.config.shape_probe_rows:
            return chosen
        probe = [k + 1 if k == top else k for k in chosen]
        key = max(1, round(sum(chosen) / len(chosen)))  # the correction's key (`correction_keys`)
        probe_key = max(1, round(sum(probe) / len(probe)))
        rows = self.config.shape_probe_rows
        num_rows = self.cost_model.num_shape_rows
        if num_rows(len(chosen), key) < rows or num_rows(len(chosen), probe_key) >= rows:
            return chosen  # the K chosen not measured yet (one K up at a time), or the next one measured
        ratio = self.tokens_per_second(rates, probe, times) / self.tokens_per_second(rates, chosen, times)
        return probe if ratio >= 1.0 - self.config.shape_probe_margin else chosen

    def _state(self, request_id: str) -> RequestState:
        state = self._states.get(request_id)
        if state is None:
            rate = self._population.rate
            if self._num_population_requests < self.config.min_population_requests:
                uninformed = self.config.acceptance.prior_accepted / (
                    self.config.acceptance.prior_accepted + self.config.acceptance.prior_rejected
                )
                rate = max(rate, uninformed)
            state = self._states[request_id] = RequestState(self.config, rate)
            state.samples_opening = self._openings.samples_new()
        return state
