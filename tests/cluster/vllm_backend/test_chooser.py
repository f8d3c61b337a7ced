"""The scheduler's chooser on steps reported as the scheduler reports them, without vLLM: a step-cost truth
shaped like the regime pair (a memory-bound MoE target: its cost follows the distinct experts a step touches;
a draft model whose every step costs about a tenth of a plain target step), traffic at concurrency 1 and
then 4, as `bench.vllm_policy` sends it to one server.

Found by replaying the served benchmark's miss (auto at off's speed at mixed concurrency 4, where static
K = 3 ran 1.7x off) on this truth:
- the lock: the traffic's acceptance, which new requests start from, rested on the first request tested
  (at batch 1 only it is tested); one request at 0.3 started every later request at K = 0, untested for its
  64 tokens. Now new requests start from the uninformed rate until 4 requests have drafted
  (`BatchAwareConfig.min_population_requests`);
- what made it likelier: the drafter's terms were folded into the target's and the whole step reported as
  verify time, so the fit on concurrency 1's steps charged the draft steps to each verified token and
  predicted drafting at batch 4 at twice its cost. Now the worker measures the drafter and the prior keeps
  its draft terms (batch-4 predictions within 10% of this truth).
With neither change 4 of these 6 seeds ran batch 4 at mean K 0-0.4 and 0.98-1.0x off (2 at K = 0
throughout); with the measured drafter alone 2 ran at 1.0x off (mean K 0.6-0.8); with the population rule
alone none (1.05-1.29x off, its model still 2x off on drafting's cost)."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from cluster.choosers import GPU_HARDWARE, Hardware
from cluster.config import AppConfig, PolicySettings
from cluster.vllm_backend.chooser import (
    DrafterLag,
    NearDrafting,
    build_chooser,
    iteration_stats,
    prior_hardware,
    step_prior,
)
from cluster.vllm_backend.settings import WORKER_CLS, DraftMeasurement, SchedulerSettings
from policy.routing import expected_experts
from policy.stats import RequestIterationStats

MAX_SPEC_TOKENS = 4
MAX_TOKENS = 64
ACCEPTANCE = (0.85, 0.6, 0.3)  # per-token acceptance of the requests (mixed traffic), drawn per request


class _Fake:
    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)


def _vllm_config(worker_cls: str, method: str | None = None) -> Any:
    """What the chooser reads of vLLM's config: the regime-pair-shaped demo checkpoints' shapes, our worker;
    no speculative `method` (as the truth here: vLLM's pass drafts for the whole batch, `_draft_s`) unless
    given."""
    config = AppConfig.from_args(None)
    hf = _Fake(num_local_experts=8, num_experts_per_tok=2, eos_token_id=None)
    return _Fake(
        model_config=_Fake(
            model=config.model.target,
            dtype="float32",
            hf_text_config=hf,
            max_model_len=1024,
            get_vocab_size=lambda: 4096,
        ),
        scheduler_config=_Fake(max_num_seqs=32),
        speculative_config=_Fake(method=method, draft_model_config=_Fake(model=config.model.draft)),
        parallel_config=_Fake(worker_cls=worker_cls),
    )


def _verify_s(batch: int, num_tokens: int) -> float:
    """The target's step: off costs 30 ms at batch 1 and 81 ms at batch 4 (the regime pair served here)."""
    return 1.5e-3 + 0.5e-3 * batch + 14e-3 * float(expected_experts(num_tokens, 8, 2)) + 0.3e-3 * num_tokens


def _draft_s(batch: int, num_steps: int, num_prefill: int) -> float:
    """vLLM's drafter: `num_steps` forwards over the whole batch, after a catch-up of `num_prefill` tokens."""
    return (num_steps * (2.5e-3 + 0.3e-3 * batch) + 1e-3 + 0.05e-3 * num_prefill) if num_steps else 0.0


def _served_verify_s(batch: int, num_tokens: int) -> float:
    """The target's step as the served benchmark measured it at mixed concurrency 1 (off 32 ms a token, static
    K = 1 1.28x off): a large per-step part outside the forward (the API server and the engine core share
    2 cores), so that verifying a second token adds far less than a plain-only fit scaled from the prior."""
    return 18e-3 + 0.5e-3 * batch + 4e-3 * float(expected_experts(num_tokens, 8, 2)) + 0.3e-3 * num_tokens


def _serve(
    seed: int,
    phases: tuple[tuple[int, int], ...],
    verify_s: Any = _verify_s,
    settings: SchedulerSettings | None = None,
) -> list[tuple[float, float]]:
    """Runs each (concurrency, requests) phase on one chooser the way PolicyScheduler drives it: the K chosen
    at a step is drafted at its end and verified in the next step. Returns (mean K, tokens/s) per phase.
    The traffic (each request's acceptance) depends on the seed alone, not on the chooser's choices, so
    that choosers compare on the same requests."""
    rng, traffic = np.random.default_rng(seed), np.random.default_rng([seed, 1])
    vllm_config = _vllm_config(WORKER_CLS)
    chooser, cost_model = build_chooser(settings or SchedulerSettings(), vllm_config, MAX_SPEC_TOKENS, "test")
    step, results = 0, []
    last_draft, near_drafting = DraftMeasurement(0.0, 0), NearDrafting()
    chosen: dict[str, int] = {}  # drafts held for the next step
    lag: dict[str, int] = {}  # tokens the drafter has not seen (it skips steps where every K is 0)
    for concurrency, num_requests in phases:
        waiting, running, rates = num_requests, {}, {}
        drafted, seconds, tokens = [], 0.0, 0
        while waiting or running:
            while waiting and len(running) < concurrency:
                request_id = f"r{step}-{waiting}"
                running[request_id], rates[request_id], lag[request_id] = (
                    MAX_TOKENS,
                    traffic.choice(ACCEPTANCE),
                    100,
                )
                chosen[request_id] = 0
                waiting -= 1
            ids = list(running)
            ks = [chosen[r] for r in ids]
            requests = []
            for request_id, k in zip(ids, ks, strict=True):
                accepted = 0
                while accepted < k and rng.random() < rates[request_id]:
                    accepted += 1
                running[request_id] -= accepted + 1
                tokens += accepted + 1
                requests.append(RequestIterationStats(request_id, k, accepted, accepted + 1, 100))
            # The step: verify what was drafted, then draft what the chooser decides now.
            step += 1
            decided = chooser.choose(ids)
            cost_model.refit_if_due()  # while the worker runs the step
            num_steps = max(decided.values())
            num_prefill = sum(lag.values()) if num_steps else 0
            for request_id in ids:
                lag[request_id] = 0 if num_steps else lag[request_id] + 1
            noise = float(np.exp(rng.normal(0.0, 0.05)))
            draft = DraftMeasurement(_draft_s(len(ids), num_steps, num_prefill) * noise, num_prefill)
            step_s = verify_s(len(ids), len(ids) + sum(ks)) * noise + draft.time_s
            is_near = near_drafting.step(drafts_at_end=num_steps > 0, verified=any(ks))  # as PolicyScheduler
            chooser.observe(
                iteration_stats(step, requests, step_s, draft, last_draft, is_near_drafting=is_near)
            )
            last_draft = draft
            seconds += step_s
            drafted += ks
            chosen.update(decided)
            for request_id in [r for r in ids if running[r] <= 0]:
                del running[request_id], chosen[request_id], lag[request_id]
                chooser.release(request_id)
        results.append((float(np.mean(drafted)), tokens / seconds))
    return results


def _static(
    seed: int, phases: tuple[tuple[int, int], ...], verify_s: Any = _verify_s
) -> list[list[tuple[float, float]]]:
    """`_serve` at static K = 0..K_max on the same traffic (vLLM without speculation is K = 0)."""
    return [
        _serve(seed, phases, verify_s, SchedulerSettings(PolicySettings(kind="static", num_spec_tokens=k)))
        for k in range(MAX_SPEC_TOKENS + 1)
    ]


def test_the_chooser_drafts_at_batch_4_after_a_batch_1_phase() -> None:
    # Against the best static K per seed, within 0.9 on each and 0.98 on average over the seeds: the best of
    # five static runs of 12 requests is a noisy, upward-biased figure (each K draws its own acceptances), and
    # over seeds 0-19 the chooser's ratio spread 0.91-1.11 around a mean of 1.02-1.03.
    phases = ((1, 8), (4, 12))
    ratios, mean_ks = [], []
    for seed in range(6):
        (_, batch_1), (mean_k, batch_4) = _serve(seed, phases)
        static = _static(seed, phases)
        off_batch_1, off_batch_4 = 1 / _verify_s(1, 1), static[0][1][1]
        best_batch_4 = max(phase[1][1] for phase in static)
        assert (
            batch_1 >= 0.95 * off_batch_1
        )  # drafting does not pay at batch 1 here: the chooser must not lose
        # It drafts there. (With the test budget's back-off, seed 3 ran mean K 0.98, not 1.21, at 1.10x off and
        # 1.05x the best static K; over seeds 0-19 the ratio's mean was 1.021 with it and 1.023 without. Since
        # a request alone in the batch is tested at once and every time, seed 3 runs mean K 0.33 at 1.02x off
        # and 0.97x the best static K, where static K = 1-3 ran 1.04-1.05x off: per seed, mean K is the
        # traffic's, and the seeds' mean is 1.6.)
        assert mean_k > 0.0, f"seed {seed}: mean K {mean_k:.2f} at batch 4"
        # Where some static K pays, the chooser drafts its way above off. Where none does (seed 1: static
        # K = 1-4 at 0.92-0.96x off), it must not lose to off either: it ran 1.001x off there until session
        # 42's cost model, 0.999x after it, against a strict `> off` that asked it to beat the best by chance.
        if best_batch_4 > 1.05 * off_batch_4:
            assert batch_4 > off_batch_4, f"seed {seed}: {batch_4 / off_batch_4:.3f}x off at batch 4"
        else:
            assert batch_4 >= 0.98 * off_batch_4, f"seed {seed}: {batch_4 / off_batch_4:.3f}x off at batch 4"
        ratios.append(batch_4 / best_batch_4)
        mean_ks.append(mean_k)
    assert min(ratios) >= 0.9 and float(np.mean(ratios)) >= 0.98, [round(r, 3) for r in ratios]
    assert float(np.mean(mean_ks)) >= 0.9, [round(k, 2) for k in mean_ks]


def test_step_stats_pair_each_verification_with_the_drafting_before_it() -> None:
    requests = [RequestIterationStats("a", 3, 2, 3, 10)]
    before, now = DraftMeasurement(0.02, 40), DraftMeasurement(0.01, 0)
    stats = iteration_stats(7, requests, 0.1, now, before)
    assert (stats.draft_time_s, stats.num_draft_prefill_tokens) == (0.02, 40)
    assert stats.verify_time_s == pytest.approx(0.09)  # this step's own drafting is the next iteration's
    assert stats.num_target_tokens == 4 and stats.batch_size == 1
    whole = iteration_stats(7, requests, 0.1, None, before)  # vLLM's runner: nothing measured apart
    assert (whole.draft_time_s, whole.verify_time_s, whole.num_draft_prefill_tokens) == (0.0, 0.1, 0)
    # The engine core's time before the step (the draft fetch) is the verification's, unless the step took
    # prompts in (then the gap may be the engine's idle time before them).
    fetched = iteration_stats(7, requests, 0.1, now, before, gap_s=0.002)
    assert fetched.iteration_time_s == pytest.approx(stats.iteration_time_s + 0.002)
    with_prompt = iteration_stats(7, requests, 0.1, now, before, gap_s=0.2, num_prefill_tokens=30)
    assert with_prompt.iteration_time_s == pytest.approx(stats.iteration_time_s)


def test_step_prior_keeps_the_draft_terms_apart_when_our_worker_measures_them() -> None:
    measured = step_prior(_vllm_config(WORKER_CLS))
    assert measured.draft_fixed_s > 0 and measured.draft_per_token_s > 0
    assert measured.other_s == measured.draft_call_s == 0.0  # no time outside the two is measured
    folded = step_prior(_vllm_config("auto"))  # vLLM's runner: its drafter pass runs every step
    assert folded.draft_fixed_s == folded.draft_per_token_s == folded.other_s == folded.draft_call_s == 0.0
    assert folded.fixed_s == pytest.approx(measured.fixed_s + measured.draft_fixed_s)


def test_step_prior_starts_from_a_gpus_figures_where_vllm_runs_on_one() -> None:
    cpu = _vllm_config(WORKER_CLS)
    gpu = _Fake(**{**vars(cpu), "device_config": _Fake(device_type="cuda")})
    assert prior_hardware(cpu) == Hardware() and prior_hardware(gpu) == GPU_HARDWARE
    # Tensor parallel over 2 GPUs (cluster/configs/gpu.yaml): each reads half the weights.
    parallel = _Fake(worker_cls=WORKER_CLS, tensor_parallel_size=2)
    two = prior_hardware(_Fake(**{**vars(gpu), "parallel_config": parallel}))
    assert two.bandwidth_bytes_s == 2 * GPU_HARDWARE.bandwidth_bytes_s and two.flops == 2 * GPU_HARDWARE.flops
    assert two.layer_overhead_s == GPU_HARDWARE.layer_overhead_s
    on_cpu, on_gpu = step_prior(cpu), step_prior(gpu)
    # Weight reads, GEMMs and attention per sequence each at the GPU's rate (the call overhead in fixed_s stays
    # the CPU's: not measured on a GPU).
    cpu_hw = Hardware()
    assert on_gpu.per_expert_s == pytest.approx(on_cpu.per_expert_s * cpu_hw.bandwidth_bytes_s / 2.4e12)
    assert on_gpu.per_token_s == pytest.approx(on_cpu.per_token_s * cpu_hw.flops / 3.5e14)
    assert on_gpu.per_seq_s == pytest.approx(on_cpu.per_seq_s * 3e-6 / cpu_hw.sequence_overhead_s)


@pytest.mark.parametrize("seed", range(3))
def test_the_chooser_drafts_at_batch_1_where_a_per_step_overhead_makes_it_pay(seed: int) -> None:
    """Mixed concurrency 1 served: static K = 1 paid 1.28x off and auto never drafted (0 of 520 steps). Here
    (session 6) auto ran at mean K 0.1-0.45 and 0.85-0.93x of the best static K: the traffic's acceptance was
    the last drafted request's alone, and one request at 0.3 put every later one at K = 0, untested for its
    64 tokens. Now it is pooled over about 200 request-iterations without phase changes, a new request is
    tested where the model's K = 0 rests on no measured drafting (or on stale acceptance), and a guard
    baseline is one plain step, not two (policy/)."""
    phases = ((1, 16),)
    ((mean_k, batch_1),) = _serve(seed, phases, _served_verify_s)
    static = [phase[0][1] for phase in _static(seed, phases, _served_verify_s)]
    assert max(static) >= 1.1 * static[0]  # drafting pays on this truth
    assert mean_k > 0.5, f"seed {seed}: mean K {mean_k:.2f}"
    assert batch_1 >= 0.95 * max(static), f"seed {seed}: {batch_1 / max(static):.2f}x the best static K"


@pytest.mark.parametrize("worker_cls", [WORKER_CLS, "auto"])
def test_the_vllm_cost_model_charges_max_k_drafts_for_every_request_the_drafter_runs(worker_cls: str) -> None:
    """vLLM's pass drafts the batch's max K for every request; the scheduler only cuts what is verified. Charged
    as sum K (before), the chooser mixed K = 0-4 in one batch at concurrency 16, where 45% of the drafts vLLM
    computed were cut (the served record); in the batch-1-then-4 replay, batch 4 rose from 1.09-1.22x to
    1.16-1.46x off on the 6 seeds with this charge. Our worker with a draft model drafts for the requests at
    K > 0 alone, max K for each (`drafts_requests_alone`): charged as sum K, the chooser mixed K = 1-4 among
    them at synthetic 16 (served, session 46) and ran 0.94x the whole batch's charge; charged as the whole
    batch's, drafting for a few requests was priced as for all (session 68). So: max K for each request that
    drafts."""
    _, model = build_chooser(
        SchedulerSettings(), _vllm_config(worker_cls, "draft_model"), MAX_SPEC_TOKENS, "test"
    )
    per_draft = model.params.draft_per_token_s
    one, each = (float(model.phase_times(4, 4, total)[0]) for total in (4, 16))  # the drafter's time
    if worker_cls == WORKER_CLS:  # one request at K = 4 drafts 4, all four 16, (4, 1, 0, 0) 8
        assert model.config.draft_padding == "drafting" and per_draft > 0.0
        assert each - one == pytest.approx(12 * per_draft)
        assert model.padding_time([4, 1, 0, 0]) == pytest.approx(3 * per_draft)
        assert model.iteration_time([4, 1, 0, 0]) == pytest.approx(
            float(model.time_grid(4, 4, 5)) + 3 * per_draft
        )
    else:  # vLLM's pass: 16 drafts whatever the K vector
        assert model.config.draft_padding == "batch"
        assert one == pytest.approx(each) and model.padding_time([4, 1, 0, 0]) == 0.0


def test_the_drafter_lags_from_the_first_step_it_skipped_until_the_request_drafts() -> None:
    """`DrafterLag`, the outlook's catch-up: what our worker would catch up if the request drafted next, where
    vLLM's pass over a drafting step covers the whole batch."""
    lag = DrafterLag(skips_drafter=True)
    lag.step({"a": 39, "new": 0}, frozenset({"a"}))  # vLLM's pass keeps both whole (new's prompt too)
    assert lag.catch_up_tokens("a", 40) == lag.catch_up_tokens("new", 12) == 0
    # No drafter: from these positions on, the draft KV is missing.
    lag.step({"a": 40, "new": 12}, frozenset())
    lag.step({"a": 41, "new": 13}, frozenset())
    assert (lag.catch_up_tokens("a", 43), lag.catch_up_tokens("new", 14)) == (3, 2)
    lag.step({"a": 42, "new": 14}, frozenset({"new"}))  # the worker catches up new; a stays behind at K = 0
    assert lag.lag_from == {"a": 40}
    lag.forget("a")
    assert lag.lag_from == {}
    under_vllms_runner = DrafterLag(skips_drafter=False, drafts_alone=True)  # its pass runs every step
    under_vllms_runner.step({"a": 40}, frozenset())
    assert under_vllms_runner.catch_up_tokens("a", 50) == under_vllms_runner.catch_up_tokens("b", 9) == 0


def test_where_the_drafter_drafts_alone_every_request_out_of_it_lags() -> None:
    """Where our worker drafts for the requests at K > 0 alone (`settings.drafts_alone`), a request at K = 0
    in a drafting step lags from it on, and one whose prompt came in at K = 0 lags from its first position."""
    lag = DrafterLag(skips_drafter=True, drafts_alone=True)
    assert lag.catch_up_tokens("new", 12) == 0  # its prompt completes in this step: fed if it drafts
    lag.step({"a": 0, "b": 0}, frozenset({"a"}))  # both prompts in; a drafts at its end, b does not
    assert lag.lag_from == {"b": 0}
    assert (lag.catch_up_tokens("a", 13), lag.catch_up_tokens("b", 13)) == (0, 13)
    lag.step({"a": 13, "b": 13}, frozenset({"b"}))  # now b drafts (caught up) and a does not
    assert lag.lag_from == {"a": 13}
    assert (lag.catch_up_tokens("a", 16), lag.catch_up_tokens("b", 16)) == (3, 0)
    lag.step({"a": 14, "b": 14}, frozenset())  # no drafter: b lags from here, a from before
    assert lag.lag_from == {"a": 13, "b": 14}
    lag.forget("b")
    assert lag.lag_from == {"a": 13}
