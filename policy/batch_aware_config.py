"""The batch-aware chooser's settings (`policy.batch_aware`), each with the measurement that set it."""

from __future__ import annotations

from dataclasses import dataclass, field

from policy.utility import AcceptanceConfig


@dataclass(frozen=True)
class BatchAwareConfig:
    max_spec_tokens: int = 8  # every K_r is in [0, max_spec_tokens]
    probe_num_spec_tokens: int = 1  # the least K during a test phase (the optimum if it is larger)
    # Acceptance trials per test phase (`TestPhases._trials`): iterations at the probe's K = 1. 4 misjudged
    # requests at K = 1: few samples.
    test_iterations: int = 8
    set_iterations: int = 16  # iterations at K = 0 before a retest (doubled per consecutive K = 0 verdict)
    max_set_iterations: int = 128  # back-off cap: a request at K = 0 is retested at least this often
    hysteresis: float = 0.02  # switch only for more than this gain per request (relative, / batch size)
    # A test waits at most this many iterations for others to probe with. A request alone in the batch does
    # not wait: no one in the batch can share its draft steps, and waiting only delays its verdict. Served
    # on the regime pair (vLLM backend, synthetic at batch 1 after prose), each request tested so ran its
    # first 8 steps plain, where its drafting then ran 1.7x plain decoding's tokens per second.
    max_test_wait: int = 8
    # ... and up to twice that while the last iteration's prompt tokens would cost the drafter more than this
    # share of a plain iteration: a step that drafts feeds the drafter every token in it (vLLM's first pass),
    # prompts included, and a closed loop's wave of prompts arrives over several steps. Served on the regime
    # pair (prose at concurrency 32, session 45), each wave's new requests were force-tested while the
    # wave's last prompts prefilled: those steps took 390-580 ms against 150-170 ms for the same prefill
    # without drafting, 6-8% of the cell, and auto ran 0.95x off where our scheduler at K = 0 ran 0.99x.
    max_test_prompt_share: float = 0.25
    # A new request for which speculation would not pay at the traffic's acceptance starts at K = 0 as if
    # this many tests had said K = 0: its first test comes after set_iterations * 2**n iterations (capped).
    # A first test costs the drafter the request's whole history (its catch-up prefill) besides the draft
    # steps, which short requests rarely repay where the traffic does not speculate. That rests on
    # measurement only where drafting was measured at the batch's size (a test_iterations' worth) and some
    # request drafted within max_set_iterations: otherwise the new request is tested (and backs off from
    # there as if tested n times before). At the vLLM backend's batch 1 the prior put drafting at a loss,
    # no request was ever tested, and auto never drafted where static K = 1 paid 1.28x.
    new_request_zero_verdicts: int = 3
    # Where new requests start untested so (within the test budget), one in this many is tested all the same:
    # the traffic's acceptance is fed by tests alone, and a shift to traffic that accepts well went unseen
    # while every new request started from the old figure. Served on the regime pair (vLLM backend),
    # synthetic at batch 4 after prose (traffic figure 0.54, where the model put drafting at a loss) started
    # its first 4 requests untested and ran 71 of its 137 steps plain; once a test came, requests drafted at
    # 0.65-0.91 at K = 3-4. The forced tests this adds stay within the test budget. A request alone in the
    # batch is tested every time (within the budget): an untested request's life is its batch's share of the
    # throughput, so alone, each one left untested is all of it for its whole life. Served on the regime pair
    # (vLLM backend, session 36), synthetic at batch 1 after prose ran its first three requests untested at
    # K = 0 (139 of the cell's 432 steps plain) where the fourth, tested, drafted at 0.82-0.92 and K = 3-4,
    # and auto ran 0.89x of static K = 4 in that cell.
    new_request_test_every: int = 4
    # Until this many requests have drafted, a new request starts from no less than the uninformed rate
    # (acceptance's prior): one low-acceptance request must not set every later request's start at K = 0,
    # untested for its whole life (the vLLM backend's mixed batch-4 miss: the first request of the traffic
    # accepted 0.3, the mean was 0.58).
    min_population_requests: int = 4
    # Requests' opening verifications (the drafts proposed with the prompt, verified in the first decode step:
    # generated positions 1 to K) count in the openings' acceptance, and where that differs from the traffic's
    # by more than `acceptance.change_z` standard errors (4 requests' openings at least,
    # `policy.openings.MIN_REQUESTS`), not in the request's own estimate or the traffic's: a
    # request's first choice (its opening's K) is then made at the openings' acceptance, and its test starts
    # after it. On the regime pair's served records (session 59) the requests' opening verifications accepted less
    # than their later ones in 15 of 16 cells: code 1 0.02 a draft against 0.61, code / prose / synthetic /
    # mixed at other sizes 0.23-0.75 against 0.36-0.87; the draft's argmax matches the target's token at
    # generated position 1 in 17% of the code prompts, 92-96% at positions 2-4 (teacher-forced: the prompts
    # end at a line's end, and a line's first token is the hard one). Counted as the request's own, with the
    # estimator's 2 pseudo-counts, one rejected opening took a code request at batch 1 from the traffic's
    # 0.84-0.89 to 0.55-0.59, its test ran on at K = 1 and about half the requests were set at K = 0, where
    # static K = 3 ran 1.12x off and auto 0.89x of it. Where openings accept as later drafts do, they count as
    # before: apart, each request's estimate lost its first verification, and a request drafted its opening
    # and its test's first step at the traffic's K where its opening had said otherwise.
    opening_apart: bool = True
    # Where openings are counted apart, one new request in this many (0: none) makes its first choice at the
    # traffic's acceptance all the same, so that the openings' figure goes on learning: an opening chosen at a
    # low figure is mostly plain and verifies nothing. Replayed over session 60's first matrix launch (regime
    # pair), openings were apart from the first cell on at 0.12-0.49, and only 67 requests' openings were
    # verified over the launch's 16 cells; were openings to come to accept well later, the figure would have
    # learnt it only from openings that drafted beside a drafting batch. In a closed loop at batch 1
    # (`tests/policy/test_opening.py`, the regime pair's batch-1 costs), openings at 0.05 turning to 0.85 after
    # 16 requests were drafted again from request 25 on, and never without the samples; where openings stay at
    # 0.05, the samples cost 0.5% of tokens per second over 8 seeds at 8 (1.1% at 4).
    opening_sample_every: int = 8
    # Tests that make a batch draft where the optimum would not (forced tests) start only while the tests'
    # net cost so far is within this share of the time observed (both over about the last
    # `test_budget_iterations` of the batch's size bucket; `policy.test_budget`). The vLLM backend at prose
    # concurrency 32: each forced test there paid the whole batch's drafter catch-up (240-300 ms, against a
    # 130 ms step) and 8 verifying steps at +50%, and auto ran 0.88x of off where the launch that hardly
    # tested ran 0.96x.
    test_budget: float = 0.02
    test_budget_iterations: int = 1000
    # A test iteration counts in the test budget for at most this many times the cost model's time for it
    # (its drafter's catch-up included): a step far beyond that is something other than the test's cost. In
    # a served record on the regime pair (vLLM backend), 99% of decode steps measured within 1.9x of their
    # predicted time (2.8x those with a catch-up), but a lone request's test took 292 ms for its catch-up
    # step and 459 ms for the next, where 26 ms was predicted; charged whole, that test spent 3% of batch
    # 1's budget window on its own, and synthetic at batch 1 after it (static K = 4: 1.3x off) ran its 1071
    # steps untested at K = 0.
    max_test_time_over_predicted: float = 3.0
    # The budget halves per consecutive forced test in a bucket that ended at K = 0, at most this many times,
    # and is whole again when one ends at K > 0, or once the batch has been out of the bucket for
    # test_budget_backoff_away iterations (`policy.test_budget`).
    test_budget_backoff: int = 2
    # Over the test budget's backed-off share, a test still starts (new requests are tested as within it)
    # once nothing has drafted for this many iterations, within the budget's whole share: the traffic's
    # acceptance is learned through tests alone, and a budget backed off and spent by tests that found nothing
    # left a shift to traffic that accepts well unseen. Served on the
    # regime pair (session 40), synthetic at batch 32 after prose ran a whole cell plain, prose's tests having
    # spent the backed-off budget; simulated on the demo pair's measured costs (prose-like then
    # synthetic-like cells of 64-token requests, one chooser throughout), synthetic at batch 16 / 32 ran
    # 0.82 / 0.86 of the best static K without the floor and 0.94 / 0.89 with it at 128, for 0.975-0.983
    # against 0.991-0.993 on prose; on the H200's measured presets it changed nothing.
    test_floor_iterations: int = 128
    test_budget_backoff_away: int = 128
    # A measured verdict that drafting could not pay at a batch size even at full acceptance
    # (`BatchAwareChooser._could_pay`) stops forced tests there only until nothing has drafted in this many
    # iterations at that size (its bucket; drafting at other sizes does not refresh it); then a test may start
    # again, within the test budget, and its drafting iterations measure the cost anew. Kept for good, the
    # verdict was a ratchet: without tests nothing drafts, so nothing corrects the model. Served on the demo
    # pair (vLLM backend, 2 cores), three drafting steps at batch 1 slowed tenfold in one contended second put
    # a K = 1 step at 4x a plain one in the model, and batch 1 ran plain for the server's life, synthetic
    # included (1.00x off; 1.12x in the next launch, which drafted). Where drafting truly cannot pay, each
    # expiry costs a test: at batch 32 on the demo pair, the whole batch at about 6x a plain step for a test's
    # 9 iterations, about 1% of 4096. In a closed loop at batch 1 on the policy's tests (drafting measured at
    # 21x, then at 1.2x with every draft accepted), the second test after the verdict turned it
    # (`tests/policy/test_batch_aware.py`). Not measured served.
    could_not_pay_expiry_iterations: int = 4096
    # A batch where every request is set at K = 0, none testing, is searched again at most every this many
    # iterations (and at once when its requests change, a retest falls due or anything drafts): in between,
    # the choice is K = 0 again without the search. Nothing the search reads changes in such iterations but
    # the cost model's fit, by one plain iteration each. Served at batch 1 on the demo pair (vLLM backend,
    # 2 cores), the search took 0.6 ms of a 4.5 ms plain step, where vLLM without speculation took 3.5 ms.
    steady_iterations: int = 8
    # A request whose drafter lags (a new one: its whole prompt; one back from K = 0: what it generated
    # meanwhile) drafts only if what its drafting saves over the tokens it may still generate repays the
    # drafter's catch-up over that lag (`RequestOutlook`, set by the engine; `_repaid`). The search alone
    # weighs one iteration, where a catch-up paid once looks free. Served on the demo pair (vLLM backend,
    # 64-token requests, 6 per slot), auto drafted code at concurrency 16 where a drafting step gained 5-8%
    # on plain ones, and its drafter caught up 6-8 thousand prompt tokens per cell (5-10% of the cell's
    # time): auto ran 0.73x of k0 there.
    weighs_catch_up: bool = True
    # A batch leaves plain decoding only for a predicted gain above this share: the search charges every
    # drafting iteration (max K >= 1) this much above the cost model's time (`_time_table`), which leaves the
    # choice between drafting vectors as it was. What the model cannot see is larger than the gains it
    # predicts at the margin: replayed over a served record on the demo pair (vLLM backend, code and mixed at
    # concurrency 16 / 32), its time for drafting steps was 0.83-1.16x the measured one and for plain steps
    # 0.89-1.08x from cell to cell, while half of auto's drafting choices were predicted at 0.92-1.05x plain
    # decoding (median 1.02) and its decode steps ran 0.93-0.96x its own plain ones; the guard, whose noise
    # there was +-7-12% of plain decoding's figure, did not resolve that loss. Where the model is right (the
    # simulator's demo-pair preset), a bar of 0.1 gave up gains of 5-10%: auto fell to 0.94-0.95x of the
    # best static K at batch 4 / 32, and to 1.08x plain at batch 1 where speculation paid 1.1-1.2x
    # (tests/policy); 0.05 kept those. The gauge of the predicted gain stays the model's own.
    min_predicted_gain: float = 0.05
    # Where the batch drafts at a K whose next one up the shape correction has measured in fewer than this
    # many iterations of the batch's bucket, the batch drafts one K higher if the model puts that within
    # `shape_probe_margin` of its choice (`BatchAwareChooser._shape_probe`; 0: never).
    shape_probe_rows: int = 8
    shape_probe_margin: float = 0.05
    # A request's estimate for choosing its K leans on the traffic's acceptance as much as the traffic's
    # requests accept alike (`policy.traffic_prior`): the prior's strength is read from the first tests of
    # the last this many requests (0: the estimator's own prior alone), between the estimator's prior counts
    # and `traffic_prior_max_strength`. Served records of the regime pair put it at 20-100 within one
    # workload and 4-6 on mixed; the estimator's own prior is 2.
    traffic_prior_requests: int = 32
    traffic_prior_max_strength: float = 64.0
    # The prior's mean: the traffic's acceptance when the request came, worth this many counts beside the
    # batch's own counts now (`TrafficPrior._prior`).
    traffic_prior_weight: float = 16.0
    acceptance: AcceptanceConfig = field(default_factory=AcceptanceConfig)

    def __post_init__(self) -> None:
        if self.max_spec_tokens < 1:
            raise ValueError(f"max_spec_tokens={self.max_spec_tokens} must be >= 1")
        if not 1 <= self.probe_num_spec_tokens <= self.max_spec_tokens:
            raise ValueError(
                f"probe_num_spec_tokens={self.probe_num_spec_tokens} must be in [1, max_spec_tokens]"
            )
        if self.test_iterations < 1 or self.set_iterations < 1:
            raise ValueError(f"test_iterations={self.test_iterations}, set_iterations must be >= 1")
        if self.max_set_iterations < self.set_iterations:
            raise ValueError(f"max_set_iterations={self.max_set_iterations} must be >= set_iterations")
        if self.hysteresis < 0.0:
            raise ValueError(f"hysteresis={self.hysteresis} must be >= 0")
        if self.max_test_wait < 0:
            raise ValueError(f"max_test_wait={self.max_test_wait} must be >= 0")
        if self.max_test_prompt_share < 0.0:
            raise ValueError(f"max_test_prompt_share={self.max_test_prompt_share} must be >= 0")
        if self.new_request_zero_verdicts < 0 or self.new_request_test_every < 1:
            raise ValueError(
                f"new_request_zero_verdicts={self.new_request_zero_verdicts} must be >= 0, "
                f"new_request_test_every={self.new_request_test_every} >= 1"
            )
        if self.opening_sample_every < 0:
            raise ValueError(f"opening_sample_every={self.opening_sample_every} must be >= 0")
        if self.min_population_requests < 0:
            raise ValueError(f"min_population_requests={self.min_population_requests} must be >= 0")
        if (
            self.traffic_prior_requests < 0
            or min(self.traffic_prior_max_strength, self.traffic_prior_weight) <= 0
        ):
            raise ValueError(
                f"traffic_prior_requests={self.traffic_prior_requests} must be >= 0, "
                f"traffic_prior_max_strength={self.traffic_prior_max_strength}, "
                f"traffic_prior_weight={self.traffic_prior_weight} > 0"
            )
        if self.shape_probe_rows < 0 or not 0.0 <= self.shape_probe_margin < 1.0:
            raise ValueError(
                f"shape_probe_rows={self.shape_probe_rows} must be >= 0, "
                f"shape_probe_margin={self.shape_probe_margin} in [0, 1)"
            )
        if self.min_predicted_gain < 0.0:
            raise ValueError(f"min_predicted_gain={self.min_predicted_gain} must be >= 0")
        if self.steady_iterations < 1:
            raise ValueError(f"steady_iterations={self.steady_iterations} must be >= 1")
        if self.max_test_time_over_predicted < 1.0:
            raise ValueError(f"max_test_time_over_predicted={self.max_test_time_over_predicted} must be >= 1")
        if self.test_floor_iterations < 1:
            raise ValueError(f"test_floor_iterations={self.test_floor_iterations} must be >= 1")
        if self.could_not_pay_expiry_iterations < 1:
            raise ValueError(
                f"could_not_pay_expiry_iterations={self.could_not_pay_expiry_iterations} must be >= 1"
            )
        if self.test_budget_backoff < 0 or self.test_budget_backoff_away < 0:
            raise ValueError(
                f"test_budget_backoff={self.test_budget_backoff}, "
                f"test_budget_backoff_away={self.test_budget_backoff_away} must be >= 0"
            )
        if not 0.0 <= self.test_budget <= 1.0 or self.test_budget_iterations < 1:
            raise ValueError(
                f"test_budget={self.test_budget} must be in [0, 1], "
                f"test_budget_iterations={self.test_budget_iterations} >= 1"
            )
