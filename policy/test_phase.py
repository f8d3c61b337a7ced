"""Cascade's test and set phases for `policy.batch_aware`: per request, a test phase of `test_iterations`
acceptance trials (drafting iterations at K = 1), then set-phase choices; a request set at K = 0 is retested
after a back-off. `TestPhases` decides which requests probe each iteration and keeps the forced tests within
the test budget (`policy.test_budget`). Its rules and their reasons are `BatchAwareConfig`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from policy.batch_aware_config import BatchAwareConfig
from policy.cost_model import CostModel, batch_bucket
from policy.stats import IterationStats, RequestIterationStats, RequestOutlook
from policy.test_budget import TestBudget
from policy.utility import AcceptanceEstimator, expected_etr, rejections


class RequestState:
    def __init__(self, config: BatchAwareConfig, prior_rate: float) -> None:
        self.estimator = AcceptanceEstimator(config.acceptance, prior_rate)
        # For the traffic's prior (`policy.traffic_prior`): the rate it started from, its own counts (decayed as
        # the estimator's), those of its first test, and whether it proved unlike the traffic.
        self.prior_rate = self.estimator.rate
        self.own_accepted = self.own_rejected = 0.0
        self.first_accepted = self.first_rejected = 0.0
        self.is_unlike_traffic = False
        # Acceptance trials left in its test phase (`TestPhases._trials`); > 0: in one (new requests start
        # there).
        self.test_remaining = config.test_iterations
        # Its test has drafted (been chosen to probe): it continues back to back. Set at the choice, not at
        # the verification: vLLM verifies a choice one step later, and a test counted from its verification
        # left the batch plain in the step between, with a second catch-up after it.
        self.test_started = False
        # Its test started where the optimum put it below the probe (a forced test): the test budget counts
        # those alone. A test the optimum covers is the model's own choice, and the guard answers for it.
        self.is_forced_test = False
        self.set_k: int | None = None  # the last set-phase choice; None right after a test
        self.zero_iterations = 0  # iterations run at K = 0 since the last test
        self.num_zero_verdicts = 0  # consecutive tests followed by K = 0: the back-off exponent
        self.is_new = True  # not chosen for yet
        self.test_wait = 0  # iterations a pending test has waited for a drafting iteration
        self.num_drafting_iterations = 0  # its first test_iterations feed the population's acceptance
        # Choices made for it and its iterations observed: its first choice sets the drafts that its first
        # observed iteration verifies, the opening (`BatchAwareConfig.opening_apart`).
        self.num_chosen = 0
        self.num_observed = 0
        self.is_opening_apart = False  # its opening was counted apart from its estimate
        # Its opening is chosen at the traffic's acceptance where openings are apart
        # (`BatchAwareConfig.opening_sample_every`).
        self.samples_opening = False

    @property
    def is_opening(self) -> bool:
        """Its next choice sets the drafts of its opening verification (its first decode step's)."""
        return self.num_chosen == 0 and self.num_observed == 0

    @property
    def ends_forced_test(self) -> bool:
        """Its forced test has run its iterations, and this choice is its verdict."""
        return self.test_remaining == 0 and self.set_k is None and self.is_forced_test


class TestPhases:
    """The batch's test and set phases. `num_changes` counts the changes it made to what the chooser's search
    reads (a set-phase choice, a retest falling due), for the chooser's reuse of its last optimum."""

    __test__ = False  # not a pytest class

    def __init__(self, config: BatchAwareConfig, cost_model: CostModel) -> None:
        self.config = config
        self.cost_model = cost_model
        self.budget = TestBudget(
            config.test_budget,
            config.test_budget_iterations,
            config.test_budget_backoff,
            config.test_budget_backoff_away,
        )
        self.num_plain_iterations = 0  # observed iterations since one drafted
        # Per batch-size bucket, its observed iterations since one drafted there (`testers`' verdict expiry).
        self.num_plain_in: dict[int, int] = {}
        self.last_test_drafted = False  # the last test's verdict was K > 0 (`testers`)
        self.num_untested_new = 0  # new requests started untested since one was tested
        self.num_changes = 0
        self.num_prompt_tokens = 0  # prompt tokens the engine scheduled in the last observed iteration

    def testers(
        self,
        states: list[RequestState],
        chosen: list[int],
        unrepaid: frozenset[int],
        could_pay: bool = True,
        opening: frozenset[int] = frozenset(),
    ) -> list[int]:
        """Indices of the requests that probe this iteration. `opening`: requests whose choice is their opening
        verification's, counted apart from their acceptance (`BatchAwareConfig.opening_apart`): neither tested
        nor judged as new until their next choice, made at their own rate.

        A test that the optimum already covers (K >= probe) costs nothing. Otherwise a probe makes the whole
        batch run a draft step, so such tests wait (up to `max_test_wait` iterations; a request alone in the
        batch does not) for an iteration that drafts anyway, and then go together. A probe of a request whose
        catch-up its drafting would not repay (`unrepaid`, from `BatchAwareChooser._repaid`) is never free:
        it runs only where the waiting tests are forced, under the test budget, which counts its catch-up in
        the forced tests' cost. A new request for which speculation would not pay even at the traffic's
        acceptance starts at K = 0 and is first tested as if `new_request_zero_verdicts` tests had said K = 0,
        since most short requests would never pay back a test (and its catch-up prefill); within the test
        budget, one in `new_request_test_every` (every one, alone in the batch) is tested all the same.
        `could_pay` (`BatchAwareChooser._could_pay`): whether drafting could pay at this batch size were every
        draft accepted. Where it could not, and drafting's cost is measured at this size, no forced test starts
        and new requests start untested, as over the budget: no acceptance a test measures makes the batch
        draft. That verdict holds until nothing has drafted in `could_not_pay_expiry_iterations` iterations
        at this size (its batch-size bucket).
        """
        probe, num_test = self.config.probe_num_spec_tokens, self.config.test_iterations
        # A started test runs its iterations back to back.
        is_drafting = max(chosen) > 0 or any(s.test_started and s.test_remaining > 0 for s in states)
        waiting = []
        # Skipping a new request's test rests on measurement only if drafting's cost has been measured at this
        # batch size, the traffic's acceptance is fresh (some request drafted within the longest back-off) and
        # the last test did not end in drafting. The traffic's figure is fed by tests alone, so without the
        # last condition a shift to a workload that accepts well was learned only through the occasional test:
        # served on the regime pair, synthetic at batch 1 after prose (traffic figure about 0.55, break-even
        # 0.63) ran 15 of 16 requests untested at K = 0, while the one tested drafted its life at 0.85, where
        # static K = 4 paid 1.32x. Over the test budget, a new request starts untested too: kept pending, its
        # test would wait for the budget, and the batch's tests would pile up and go all at once. Once nothing
        # has drafted for `test_floor_iterations`, the budget's back-off is waived until a test starts.
        is_drafting_measured = self.cost_model.num_drafting_iterations(len(states)) >= num_test
        # (`BatchAwareConfig.could_not_pay_expiry_iterations`)
        num_plain_here = self.num_plain_in.get(batch_bucket(len(states)), 0)
        is_verdict_stale = num_plain_here >= self.config.could_not_pay_expiry_iterations
        within_budget = (could_pay or not is_drafting_measured or is_verdict_stale) and (
            self.budget.allows(len(states))
            or (
                self.num_plain_iterations >= self.config.test_floor_iterations
                and self.budget.allows(len(states), is_backed_off=False)
            )
        )
        is_alone = len(states) == 1  # nobody to wait for, and an untested request is all of the throughput
        is_measured = not within_budget or (
            is_drafting_measured
            and self.num_plain_iterations < self.config.max_set_iterations
            and not self.last_test_drafted
        )
        for i, state in enumerate(states):
            if i in opening:
                continue
            if state.is_new and state.test_remaining > 0 and chosen[i] == 0:
                state.num_zero_verdicts = self.config.new_request_zero_verdicts  # as if tested
                test_every = 1 if is_alone else self.config.new_request_test_every
                is_sampled = within_budget and self.num_untested_new + 1 >= test_every
                if is_measured and not is_sampled:
                    state.test_remaining, state.set_k, state.zero_iterations = 0, 0, 0
                    self.num_changes += 1
                    self.num_untested_new += 1
                else:
                    self.num_untested_new = 0
            state.is_new = False
            if state.test_remaining > 0 and chosen[i] < probe:
                waiting.append(i)
        max_wait = 0 if is_alone else self.config.max_test_wait
        if max_wait and waiting and self._is_prompt_burst(len(states)):
            max_wait *= 2  # (`BatchAwareConfig.max_test_prompt_share`)
        is_forcing = within_budget and any(states[i].test_wait >= max_wait for i in waiting)
        is_drafting = is_drafting or is_forcing
        for i in waiting:
            states[i].test_wait = 0 if is_drafting else states[i].test_wait + 1
        testers = [
            i
            for i, s in enumerate(states)
            if s.test_remaining > 0
            and i not in opening
            and (is_drafting or chosen[i] >= probe)
            and (is_forcing or i not in unrepaid)
        ]
        for i in testers:
            if not states[i].test_started:
                states[i].is_forced_test = chosen[i] < probe
            states[i].test_started = True
        return testers

    def settle(
        self,
        states: list[RequestState],
        chosen: list[int],
        pays_alike: Callable[[AcceptanceEstimator], bool],
    ) -> None:
        """Record the choice: forced tests that end now give their verdicts together to the test budget's
        back-off (one that drafts is enough to restore it), and requests out of their test phase are set.

        A test's verdict for the traffic (the budget's back-off, `last_test_drafted`) is that its request
        drafts, or that a batch of this size whose every request accepted as it did would draft
        (`pays_alike` of its acceptance): in a batch of others that do not draft, one request alone rarely
        repays the batch's draft step, however well it accepts. Served on the regime pair (vLLM backend),
        synthetic at batch 16 after prose: the one request tested in the first wave accepted 0.91 and was set
        at K = 0 among 15 untested ones; read as a failed test, it kept the budget backed off to a quarter,
        and the cell's 47 later requests started untested at K = 0 (auto 0.95x off, static K = 4 1.28x).
        `pays_alike` weighs the estimate one standard error low: after a test's 8 drafts at K = 1 that is
        about 0.15, and at the estimate itself prose's requests (0.4-0.8 at batch 16) passed often enough to
        keep later prose requests tested (served at the estimate, prose at batch 16 ran 0.98 of the version
        before over 7 runs, unresolved; synthetic 1.06 over 7)."""
        # The traffic's verdict of each test that ends now (forced ones among them).
        verdicts = {
            i: k > 0 or pays_alike(s.estimator)
            for i, (s, k) in enumerate(zip(states, chosen, strict=True))
            if s.test_remaining == 0 and s.set_k is None
        }
        forced_verdicts = [verdicts[i] for i, s in enumerate(states) if s.ends_forced_test]
        if forced_verdicts:
            self.budget.verdict(len(states), any(forced_verdicts))
        for i, (state, k) in enumerate(zip(states, chosen, strict=True)):
            if state.test_remaining == 0 and state.set_k != k:  # (the same set-phase choice again: no change)
                self._set(state, k, verdicts.get(i, False))

    def observe(
        self,
        stats: IterationStats,
        states: list[RequestState],
        outlook: Mapping[str, RequestOutlook] | None = None,
    ) -> bool:
        """Advance each request's phase by the iteration (`states`: its requests', in order) and count it in
        the test budget; whether a retest fell due.

        `outlook`: the last outlooks the chooser was given (`RequestOutlook`), where known: a request's tokens
        left to generate are its outlook's less what this iteration committed. A retest falls due only where
        they are at least twice what the test itself would commit (`test_iterations` at the probe's K, at the
        request's acceptance): a retest informs only its own request (the traffic's acceptance is fed by first
        tests), so one that takes half its request's remaining life has little left to pay back. Served on the
        regime pair (prose at concurrency 16 after synthetic, 64-token requests), a wave set at K = 0 was
        retested for its last 5-6 tokens, and the batch drafted those iterations for nothing."""
        is_drafting = any(r.num_spec_tokens > 0 for r in stats.requests)
        self.num_plain_iterations = 0 if is_drafting else self.num_plain_iterations + 1
        bucket = batch_bucket(stats.batch_size)
        self.num_plain_in[bucket] = 0 if is_drafting else self.num_plain_in.get(bucket, 0) + 1
        self.num_prompt_tokens = stats.num_prefill_tokens
        self._account(stats, states)
        is_retest_due = False
        for r, state in zip(stats.requests, states, strict=True):
            if state.test_remaining > 0:  # a test waiting for a probe is still pending
                # (not its opening verification where its estimate did not count it either: `opening_apart`)
                is_apart = state.num_observed == 1 and state.is_opening_apart
                state.test_remaining = max(0, state.test_remaining - (0 if is_apart else self._trials(r)))
            elif r.num_spec_tokens > 0:
                state.zero_iterations = 0
            else:
                state.zero_iterations += 1
                backoff = self.config.set_iterations * 2**state.num_zero_verdicts
                is_due = state.zero_iterations >= min(backoff, self.config.max_set_iterations)
                num_left = self._remaining_tokens(r, outlook) if is_due else None
                if is_due and num_left is not None and num_left < 2 * self._test_tokens(state):
                    state.zero_iterations = 0  # too late to pay back: wait another back-off
                elif is_due:
                    state.test_remaining = self.config.test_iterations  # retest from the next choice
                    state.set_k = None
                    self.num_changes += 1
                    is_retest_due = True
            if state.test_remaining == 0:
                state.test_started = False
        return is_retest_due

    @staticmethod
    def _trials(request: RequestIterationStats) -> int:
        """The acceptance trials its iteration observed (`AcceptanceEstimator`): each accepted draft, and the
        rejection that ended its drafts if one did. A test phase lasts `test_iterations` of them, one per
        iteration at the probe's K = 1.

        A test at a higher K (the optimum's, where it covers the test) measures as much in fewer iterations,
        and one counted in iterations ran on alone at the probe's K after the optimum let its batch go plain.
        Served on the demo pair (vLLM backend, the draft half a target step) at mixed 4, each wave of 4 new
        requests drafted at K = 4 for 3-4 steps, the batch's optimum then put all at K = 0, and the one
        request tested went on at K = 1 for 5-7 more steps alone, each 11-13 ms against 7 plain for at most
        one more token: about 30 ms a wave, 1.5-3.4% of the cell's time in two launches."""
        if request.num_spec_tokens <= 0:
            return 0
        return request.num_accepted_tokens + int(
            rejections(request.num_spec_tokens, request.num_accepted_tokens)
        )

    def _is_prompt_burst(self, batch_size: int) -> bool:
        """Whether the last iteration's prompt tokens would cost the drafter more than
        `max_test_prompt_share` of a plain iteration, were it to draft (vLLM's drafter feeds them all)."""
        if not self.num_prompt_tokens:
            return False
        model = self.cost_model
        drafter_s = model.params.draft_prefill_per_token_s * self.num_prompt_tokens
        return drafter_s > self.config.max_test_prompt_share * model.plain_time(batch_size)

    @staticmethod
    def _remaining_tokens(
        request: RequestIterationStats, outlook: Mapping[str, RequestOutlook] | None
    ) -> int | None:
        """Tokens the request may still generate after this iteration, from its outlook (None without one)."""
        found = None if outlook is None else outlook.get(request.request_id)
        return None if found is None else max(0, found.num_remaining_tokens - request.num_committed_tokens)

    def _test_tokens(self, state: RequestState) -> float:
        """Tokens a test of this request commits: `test_iterations` at the probe's K, at its acceptance."""
        return self.config.test_iterations * expected_etr(
            state.estimator.rate, self.config.probe_num_spec_tokens
        )

    def _account(self, stats: IterationStats, states: list[RequestState]) -> None:
        """Add the iteration to the test budget's sums: its time, and if only forced tests drafted in it, its
        net cost (its time, at most `max_test_time_over_predicted` times the cost model's, less plain
        decoding's predicted time for the tokens it committed), the drafter's catch-up for tests that start
        verifying in the next iteration included. In a step that carried other requests' prompts the cost
        model's time stands for its time. Both went uncharged: served on the demo pair (vLLM backend) at
        concurrency 16 / 32, where new requests come every step or two, 4-14% of the tests' steps had prompts,
        and the catch-up of a test of a whole wave, 2 000-3 000 tokens in one step of 130-500 ms against a
        16.5 ms plain one, was charged only where another test was verifying. The budget read 2.3-2.4% spent
        where the tests' steps took about 6.5% of the time beyond plain ones."""
        seconds = stats.iteration_time_s
        if seconds <= 0.0:
            return
        # Requests that verified drafts, and tests whose drafter ran at the end of the iteration (its catch-up)
        # for drafts verified in the next.
        drafting = [
            s for r, s in zip(stats.requests, states, strict=True) if r.num_spec_tokens > 0 or s.test_started
        ]
        net_cost_s = None
        if (
            drafting
            and all(s.test_started and s.is_forced_test for s in drafting)
            and (stats.num_draft_prefill_tokens > 0 or any(r.num_spec_tokens > 0 for r in stats.requests))
        ):
            model = self.cost_model
            predicted_s = model.iteration_time([r.num_spec_tokens for r in stats.requests]) + (
                model.params.draft_prefill_per_token_s * stats.num_draft_prefill_tokens
            )
            if stats.num_prefill_tokens:  # the prompts' time is no test's: the model's stands for the step's
                cost_s = predicted_s
            else:
                cost_s = seconds = min(seconds, self.config.max_test_time_over_predicted * predicted_s)
            committed = sum(r.num_committed_tokens for r in stats.requests)
            net_cost_s = cost_s - model.plain_time(stats.batch_size) * committed / stats.batch_size
        self.budget.add(stats.batch_size, seconds, net_cost_s)

    def _set(self, state: RequestState, num_spec_tokens: int, is_traffic_drafting: bool) -> None:
        """Record a set-phase choice; the first one after a test sets the back-off (`is_traffic_drafting`: that
        test's verdict for the traffic, `settle`)."""
        if state.set_k is None:  # a test's verdict
            self.last_test_drafted = is_traffic_drafting
            state.num_zero_verdicts = state.num_zero_verdicts + 1 if num_spec_tokens == 0 else 0
            state.zero_iterations = 0
        self.num_changes += state.set_k != num_spec_tokens
        state.set_k = num_spec_tokens
