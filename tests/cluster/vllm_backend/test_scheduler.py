"""PolicyScheduler inside vLLM on the demo pair: greedy output unchanged under mixed K, per-request settings
honoured, K = 0 for the whole batch costing no draft forward (and the draft caught up when drafting
resumes), our counts equal to vLLM's own.

One module-scoped pair of engines (vLLM without speculation, and with our scheduler), in this process."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator, Mapping
from types import SimpleNamespace
from typing import Any

import pytest

from cluster.vllm_backend.step_record import RecordFile
from policy.prompt_steps import prompt_cue
from policy.stats import IterationStats, RequestIterationStats, RequestOutlook
from tests.cluster.vllm_backend.conftest import needs_vllm
from tests.cluster.vllm_backend.engines import (
    MAX_SPEC_TOKENS,
    count_calls,
    count_draft_forwards,
    drafter,
    executor,
    make_llm,
    runner,
    scheduler,
)
from tests.policy.regime_loop import regime_chooser

pytestmark = [needs_vllm, pytest.mark.timeout(900)]  # the first test starts two engines

PROMPTS = [
    "def fibonacci(n):",
    "import os\nimport sys\n\n",
    "class Stack:\n    def __init__(self):",
    "for i in range(10):",
    "The module defines",
    "def read_file(path):\n    with open(path) as f:",
    "    return sorted(items, key=",
    "# Parse the command line arguments\n",
]
# Prompts no other test sends: the skipping run's missing draft KV cannot be stale copies of the right values.
FRESH_PROMPTS = [
    "while True:\n    line =",
    "def main():\n    parser = argparse.",
    "        return self._cache[key]\n\n",
    "with open(path, 'w') as out:",
]
SETTINGS: list[Any] = ["off", 1, 2, 3, MAX_SPEC_TOKENS, "auto", 0, "auto"]  # K mixed 0..max in one batch


@pytest.fixture(scope="module")
def engines() -> Iterator[tuple[Any, Any]]:
    plain = make_llm(None)
    ours = make_llm({"kind": "static", "num_spec_tokens": 2})  # "auto" requests get K = 2 from the policy
    yield plain, ours
    for llm in (plain, ours):
        llm.llm_engine.engine_core.shutdown()


def _params(settings: list[Any], max_tokens: int = 48) -> list[Any]:
    from vllm import SamplingParams

    return [
        SamplingParams(
            temperature=0.0, max_tokens=max_tokens, ignore_eos=True, extra_args={"num_spec_tokens": s}
        )
        for s in settings
    ]


def _generate(llm: Any, settings: list[Any]) -> tuple[list[Any], list[Any]]:
    """Outputs, and the scheduler's record with request ids as the outputs name them (vLLM's engine adds a
    suffix to each)."""
    sched = scheduler(llm)
    sched.log.steps.clear()
    outputs = llm.generate(PROMPTS[: len(settings)], _params(settings), use_tqdm=False)
    for step in sched.log.steps:
        step.num_drafts = {k.rsplit("-", 1)[0]: v for k, v in step.num_drafts.items()}
        step.num_accepted = {k.rsplit("-", 1)[0]: v for k, v in step.num_accepted.items()}
    return outputs, list(sched.log.steps)


def test_greedy_output_unchanged_with_mixed_k(engines: tuple[Any, Any]) -> None:
    plain, ours = engines
    expected = [
        o.outputs[0].token_ids
        for o in plain.generate(PROMPTS, _params([None] * len(PROMPTS)), use_tqdm=False)
    ]
    outputs, record = _generate(ours, SETTINGS)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    # K from 0 to max in the same step, as the scheduler saw it.
    mixed = [r for r in record if len(r.num_drafts) == len(PROMPTS)]
    assert mixed, "no step had the whole batch decoding"
    assert any(
        {0, MAX_SPEC_TOKENS} <= set(r.num_drafts.values()) and len(set(r.num_drafts.values())) >= 4
        for r in mixed
    )
    assert sum(sum(r.num_accepted.values()) for r in record) > 0  # speculation did happen
    # Where a step's time went, in the record: the prompts' tokens in the first steps, then K_r + 1 tokens
    # per decoding request; the chooser's hooks timed; the time between steps.
    total_prompt = sum(len(o.prompt_token_ids) for o in outputs)
    assert 0 < sum(r.num_prefill_tokens for r in record) <= total_prompt  # (less: prefix cache hits)
    # The drafter's pass at the end of the step that took the prompts in fed it the prompts of the requests
    # that draft (K > 0) alone: counted as its prefill.
    first = record[0]
    assert first.num_scheduled == len(PROMPTS) and first.num_draft_steps > 0
    drafting_prompts = [o for o, s in zip(outputs, SETTINGS, strict=True) if s not in ("off", 0)]
    assert first.draft_prefill_tokens == sum(len(o.prompt_token_ids) - 1 for o in drafting_prompts)
    assert 0 < first.draft_prefill_tokens < first.num_prefill_tokens - first.num_scheduled
    decode = [r for r in record if r.num_drafts and not r.num_prefill_tokens]
    assert all(r.num_tokens >= sum(k + 1 for k in r.num_drafts.values()) for r in decode)
    assert all(r.choose_s > 0 and r.choose_cpu_s > 0 and r.observe_s > 0 and r.start_s > 0 for r in decode)
    assert all(r.gap_s >= 0 for r in record) and any(r.gap_s > 0 for r in record)


def test_per_request_settings_are_honoured(engines: tuple[Any, Any]) -> None:
    _, ours = engines
    outputs, record = _generate(ours, ["off", 3, "auto"])
    ids = [o.request_id for o in outputs]
    for request_id, expected in zip(ids, (0, 3, 2), strict=True):  # off, fixed K = 3, auto (the policy's 2)
        drafts = [r.num_drafts[request_id] for r in record if request_id in r.num_drafts]
        assert drafts and set(drafts) == {expected}, (request_id, drafts)
    # The request at off decoded one token per step: 47 decode steps after the prefill's first token.
    assert len([r for r in record if ids[0] in r.num_drafts]) == 47


def test_choosing_ahead_keeps_the_output_and_new_requests_get_their_k_at_once(
    engines: tuple[Any, Any],
) -> None:
    """Each step's K chosen while the worker runs the step before (`choose_ahead`, on for the learning
    policies; switched on here for the static one, whose choices are known): greedy output is unchanged, every
    step after one that drafted was chosen ahead, and a request whose prompt completes meanwhile gets from
    its first decode step the K it asked for (3), or, left to the policy, the policy's K (2: `choose_joined`;
    until session 41 it ran that step at 0)."""
    plain, ours = engines
    settings = ["auto", 3, "auto", 3]
    expected = [
        o.outputs[0].token_ids for o in plain.generate(PROMPTS[:4], _params([None] * 4), use_tqdm=False)
    ]
    sched, engine = scheduler(ours), ours.llm_engine
    sched.log.steps.clear()
    sched.k_plan.chooses_ahead = True
    outputs: list[Any] = []
    try:
        for i in range(4):
            if i == 2:  # the other two join while the first two decode
                for _ in range(6):
                    outputs += [o for o in engine.step() if o.finished]
            engine.add_request(f"ahead-{i}", PROMPTS[i], _params(settings)[i])
        while engine.has_unfinished_requests():
            outputs += [o for o in engine.step() if o.finished]
    finally:
        sched.k_plan.chooses_ahead = False
    record = list(sched.log.steps)
    assert [o.outputs[0].token_ids for o in sorted(outputs, key=lambda o: o.request_id)] == expected
    assert all(after.is_chosen_ahead == bool(before.chosen) for before, after in itertools.pairwise(record))
    assert sum(r.is_chosen_ahead for r in record) > len(record) // 2
    for i, first, rest in ((0, 2, 2), (1, 3, 3), (2, 2, 2), (3, 3, 3)):
        drafts = [
            n for r in record for request_id, n in r.num_drafts.items() if request_id.startswith(f"ahead-{i}")
        ]
        assert drafts[0] == first and set(drafts[1:]) == {rest}, (i, drafts)


def test_k_zero_runs_no_draft_forward(engines: tuple[Any, Any]) -> None:
    plain, ours = engines
    sched, worker = scheduler(ours), runner(ours)
    skipped = worker.num_skipped_steps
    assert type(executor(ours)).__name__ == "PolicyUniProcExecutor"
    with (
        count_draft_forwards(ours) as calls,
        count_calls(drafter(ours), "prepare_next_token_ids_padded") as bookkeeping,
        count_calls(executor(ours).driver_worker.worker, "take_draft_token_ids") as fetches,
        count_calls(worker.rejection_sampler, "forward") as rejection_sampling,
        count_calls(worker, "_calc_spec_decode_metadata") as metadata,
    ):
        outputs, record = _generate(ours, ["off"] * 4)
    expected = plain.generate(PROMPTS[:4], _params([None] * 4), use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    assert all(r.num_draft_steps == 0 for r in record)
    assert all(n == 0 for r in record for n in r.num_drafts.values())
    # Every K is 0 on every step: the drafter does not run at all (vLLM's runner would run its first pass),
    # nor its bookkeeping of the sampled tokens, which only async scheduling reads (0.8 ms a step).
    assert calls == []
    assert bookkeeping == []
    # Nor does the engine core fetch the (empty) drafts from the worker after each step: an RPC through the
    # worker's message queue when the executor runs workers in processes (9% of the engine core's loop).
    assert fetches == []
    # A batch with no draft to verify is prepared and sampled as without speculation: no spec-decode metadata,
    # no rejection sampler.
    assert rejection_sampling == []
    assert metadata == []
    assert worker.num_skipped_steps - skipped == len(record) > 0
    # The worker measures the drafter for the scheduler (its cost model fits draft terms from it): 0 here.
    assert all(r.draft_time_s == 0.0 for r in record)
    # No step after the first few is next to drafting (they may follow an earlier test's last drafts).
    from cluster.vllm_backend.chooser import NEAR_DRAFTING_STEPS

    assert not any(r.is_near_drafting for r in record[NEAR_DRAFTING_STEPS + 1 :])
    from_output = executor(ours).num_drafts_from_output
    with (
        count_draft_forwards(ours) as calls,
        count_calls(executor(ours).driver_worker.worker, "take_draft_token_ids") as fetches,
        count_calls(worker, "take_draft_token_ids") as taken,
        count_calls(worker.rejection_sampler, "forward") as rejection_sampling,
        count_calls(worker, "_calc_spec_decode_metadata") as metadata,
    ):
        outputs, record = _generate(ours, [3] * 4)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    assert len(rejection_sampling) == len(metadata) == sum(any(r.num_drafts.values()) for r in record) > 0
    drafting = sum(r.num_draft_steps for r in record)
    # A step that drafts: its drafts come with its output (taken in the worker at the step's end), and the
    # engine core does not fetch them (a second round trip to the worker's process when it has its own).
    num_drafting_steps = sum(r.num_draft_steps > 0 for r in record)
    assert len(taken) == executor(ours).num_drafts_from_output - from_output == num_drafting_steps > 0
    assert fetches == []
    assert sum(sum(r.num_accepted.values()) for r in record) > 0  # they were the drafts (accepted)
    assert all((r.draft_time_s or 0.0) > 0.0 for r in record if r.num_draft_steps > 0)
    assert all(r.draft_time_s is not None and r.draft_time_s < r.step_time_s for r in record)
    # Drafting steps: vLLM's first pass, then one forward per further draft step.
    assert len(calls) == len(record) + sum(max(0, r.num_draft_steps - 1) for r in record) and drafting > 0
    assert all(r.is_near_drafting for r in record if r.num_draft_steps > 0)
    assert sched.counters.num_steps > 0
    # A model with recurrent layers (Mamba, GDN) keeps vLLM's metadata on every step: they read it.
    worker._attention_only = False
    try:
        with count_calls(worker, "_calc_spec_decode_metadata") as metadata:
            outputs, record = _generate(ours, ["off"] * 4)
    finally:
        worker._attention_only = None
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    assert len(metadata) == len(record) > 0
    assert worker._is_attention_only()  # the demo pair: attention only


def _accepted_after_skipping(
    llm: Any, skips: bool, num_plain_steps: int = 12, num_half_steps: int = 8
) -> tuple[list[Any], list[Any], list[int]]:
    """Four requests at K = 0 for their first steps, then two of them at K = 3 for `num_half_steps` steps
    while the other two stay at 0, then all four at K = 3 (set in the scheduler between steps): outputs,
    accepted counts per step, and the runner's catch-up tokens so far at each switch. `skips`: the runner
    skips the drafter at K = 0 (ours) or runs its pass every step (vLLM's behaviour)."""
    sched, worker = scheduler(llm), runner(llm)
    worker.skips_drafter = skips
    engine = llm.llm_engine
    sched.log.steps.clear()
    for i, (prompt, params) in enumerate(zip(FRESH_PROMPTS, _params(["off"] * 4), strict=True)):
        engine.add_request(f"skip{int(skips)}-{i}", prompt, params)
    outputs, step, catch_up_tokens = [], 0, []
    try:
        while engine.has_unfinished_requests():
            outputs += [o for o in engine.step() if o.finished]
            step += 1
            if skips:  # the scheduler's copy of the worker's lag (the outlook's catch-up), step by step
                assert sched._lag.lag_from == {
                    r: n for r, n in worker.lag_from.items() if r in sched.requests
                }
            if step in (num_plain_steps, num_plain_steps + num_half_steps):
                catch_up_tokens.append(worker.num_catch_up_tokens)
                first_half = step == num_plain_steps
                for request_id in sorted(sched.k_plan.requested)[: 2 if first_half else 4]:
                    sched.k_plan.requested[request_id] = 3
    finally:
        worker.skips_drafter = True
    record = list(sched.log.steps)
    assert any(r.num_draft_steps == 0 for r in record[:num_plain_steps])
    return (
        sorted((o.request_id, o.outputs[0].token_ids) for o in outputs),
        [sorted((r.split("-")[1], n) for r, n in step.num_accepted.items()) for step in record],  # by index
        [*catch_up_tokens, worker.num_catch_up_tokens],
    )


def test_drafts_after_skipped_steps_are_as_good_as_without_skipping(engines: tuple[Any, Any]) -> None:
    """The catch-up pass restores the draft's KV cache: after steps without the drafter, its drafts are
    accepted exactly as often, request by request and step by step, as when it ran every step (holes in its
    KV would change them). It drafts for and catches up only the requests that draft: two requests that
    stayed at K = 0 while the others drafted (left out of the drafter meanwhile) are caught up when they draft,
    and accepted as often as without skipping too."""
    _, ours = engines
    worker = runner(ours)
    passes, skipped = worker.num_catch_up_passes, worker.num_skipped_steps
    with count_draft_forwards(ours) as calls:  # first, so that no earlier run wrote these sequences' KV
        out, accepted, catch_up = _accepted_after_skipping(ours, skips=True)
    assert worker.num_skipped_steps > skipped
    assert worker.num_catch_up_passes == passes + 2  # one pass per switch: two requests, then the two others
    first, second = catch_up[1] - catch_up[0], catch_up[2] - catch_up[1]
    # The first pass fed two requests' 12 missed steps, the second the other two's 20.
    assert 0 < first < second
    skipped, passes = worker.num_skipped_steps, worker.num_catch_up_passes
    with count_draft_forwards(ours) as reference_calls:
        reference_out, reference, _ = _accepted_after_skipping(ours, skips=False)
    assert worker.num_skipped_steps == skipped and worker.num_catch_up_passes == passes
    assert [tokens for _, tokens in out] == [tokens for _, tokens in reference_out]
    assert accepted == reference
    assert len(calls) < len(reference_calls)
    assert sum(n for step in accepted for r, n in step if r in ("2", "3")) > 0  # the two that drafted last
    # While two of the four drafted, the drafter drafted for those two alone (`drafter_rows`): its passes after
    # the first fed one token for each of them (2 tokens), where vLLM's fed all four requests (4; a 2 there is
    # a first pass over one request's 2 tokens, at the end).
    half = 8 * (3 - 1)  # the half phase's 8 steps times its 2 passes after the first
    assert calls.count(2) >= reference_calls.count(2) + half


def _after_a_cached_prefix(llm: Any, skips: bool, tracks_blocks: bool = True) -> tuple[list[int], list[int]]:
    """A request at "off" computes a prompt of up to three blocks and more (its KV cached for the target, never
    drafted over where the runner skips the drafter), then a request sharing those blocks drafts at K = 3 from
    the prefix cache: the second request's output and accepted counts per step. `tracks_blocks`: False forgets
    which blocks hold draft KV (as before the runner kept them)."""
    sched, worker = scheduler(llm), runner(llm)
    _, block_size = worker.draft_cache_group()
    num_blocks = min(3, (llm.llm_engine.model_config.max_model_len - 64) // block_size)
    assert num_blocks >= 1
    tokenizer = llm.get_tokenizer()
    prefix = ""
    for i in itertools.count():  # unlike any prompt of the other tests: its blocks are not cached already
        prefix += f"def step_{i}(state):\n    state.count += {i}\n    return state\n\n"
        if len(tokenizer(prefix)["input_ids"]) > num_blocks * block_size + 4:
            break
    assert llm.reset_prefix_cache()
    worker.skips_drafter = skips
    try:
        llm.generate([prefix], _params(["off"], max_tokens=2), use_tqdm=False)
        if not tracks_blocks:
            worker.draft_blocks.written.update(range(worker.kv_cache_config.num_blocks))  # every one written
        sched.log.steps.clear()
        (output,) = llm.generate([prefix + "def main():\n"], _params([3], max_tokens=24), use_tqdm=False)
    finally:
        worker.skips_drafter = True
        if not tracks_blocks:
            worker.draft_blocks.written.clear()
    assert output.num_cached_tokens >= num_blocks * block_size  # the second request read the first's blocks
    accepted = [n for step in sched.log.steps for n in step.num_accepted.values()]
    return list(output.outputs[0].token_ids), accepted


def test_a_prefix_cache_hit_drafts_from_draft_kv_written_for_it(engines: tuple[Any, Any]) -> None:
    """With prefix caching, a request that reads cached blocks drafts from their draft KV. Where the request
    that computed them never drafted (our runner skipped the drafter), that KV was never written; the runner
    keeps which blocks hold it, and the second request catches up from the first block without it. Its drafts
    are then accepted exactly as often, step by step, as where vLLM's drafter ran over the first prompt;
    taking every cached block as written (before), they were not."""
    _, ours = engines
    # First, so that no block holds this prompt's draft KV from an earlier run (stale, but right).
    _, untracked = _after_a_cached_prefix(ours, skips=True, tracks_blocks=False)
    out, accepted = _after_a_cached_prefix(ours, skips=True)
    reference_out, reference = _after_a_cached_prefix(ours, skips=False)
    assert out == reference_out  # drafts never change greedy output
    assert accepted == reference and sum(accepted) > 0
    assert untracked != reference


def test_our_counts_equal_vllm_per_request_metrics(engines: tuple[Any, Any]) -> None:
    _, ours = engines
    outputs, record = _generate(ours, [1, 2, MAX_SPEC_TOKENS, "auto"])
    for out in outputs:
        metrics = out.outputs[0].spec_decode_metrics
        assert metrics is not None
        drafted = [r.num_drafts[out.request_id] for r in record if r.num_drafts.get(out.request_id)]
        accepted = [r.num_accepted[out.request_id] for r in record if r.num_drafts.get(out.request_id)]
        assert drafted == list(metrics.per_step_drafted)
        assert accepted == list(metrics.per_step_accepted)
        assert sum(accepted) > 0


def test_record_file_has_every_step(engines: tuple[Any, Any], tmp_path: Any) -> None:
    """`record_path`: a served engine's step record, one JSON line per step, as the scheduler keeps it."""
    _, ours = engines
    sched = scheduler(ours)
    path = tmp_path / "record.jsonl"
    sched.log.file = RecordFile(path)
    try:
        _, record = _generate(ours, ["off", 2])
    finally:
        sched.log.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["step"] for line in lines] == [r.step for r in record]
    assert [line["num_draft_steps"] for line in lines] == [r.num_draft_steps for r in record]
    assert any(line["num_draft_steps"] == 2 for line in lines)


class _Releases:
    """A chooser wrapper that keeps the ids it is asked to release, and the steps after each release that
    still named a released request."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.released: list[str] = []
        self.observed_after_release: list[str] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    def observe(self, stats: Any) -> None:
        gone = set(self.released)
        self.observed_after_release += [r.request_id for r in stats.requests if r.request_id in gone]
        self.inner.observe(stats)

    def release(self, request_id: str) -> None:
        self.released.append(request_id)
        self.inner.release(request_id)


def test_every_finished_request_is_released_from_the_chooser(engines: tuple[Any, Any]) -> None:
    """Requests at a fixed K are observed too (the chooser learns the traffic from them), so their state is
    released as well: before, only requests the policy decided for were, and the others' states stayed. And
    a request is released after its last step is observed: released as vLLM freed it, in the step that
    finished it, that step's observation made its state again (`BatchAwareChooser._state`), for good."""
    _, ours = engines
    sched = scheduler(ours)
    wrapper = _Releases(sched.chooser)
    sched.chooser = wrapper
    try:
        outputs, _ = _generate(ours, ["off", 3, "auto"])
    finally:
        sched.chooser = wrapper.inner
    assert {r.rsplit("-", 1)[0] for r in wrapper.released} == {o.request_id for o in outputs}
    assert wrapper.observed_after_release == []


class _Calls(_Releases):
    """A chooser wrapper that keeps every call it gets, in order: observations by step, releases and choices
    by request (the prefix of the request ids left out)."""

    def __init__(self, inner: Any, prefix: str) -> None:
        super().__init__(inner)
        self.prefix = prefix
        self.calls: list[tuple[Any, ...]] = []

    def _ids(self, ids: Any) -> tuple[str, ...]:
        return tuple(sorted(r.removeprefix(self.prefix).rsplit("-", 1)[0] for r in ids))

    def observe(self, stats: Any) -> None:
        self.calls.append(("observe", stats.iteration, self._ids(r.request_id for r in stats.requests)))
        super().observe(stats)

    def release(self, request_id: str) -> None:
        self.calls.append(("release", *self._ids([request_id])))
        super().release(request_id)

    def choose(self, request_ids: Any) -> Any:
        self.calls.append(("choose", self._ids(request_ids)))
        return self.inner.choose(request_ids)

    def choose_joined(self, joined: Any, others: Any) -> Any:
        self.calls.append(("joined", self._ids(joined)))
        return self.inner.choose_joined(joined, others)


def test_choosing_ahead_the_chooser_hears_of_a_step_while_the_worker_runs_the_next(
    engines: tuple[Any, Any],
) -> None:
    """Choosing ahead, a step's observation (and its requests' releases) wait off the path between steps,
    until the chooser is next asked: after every step the last one's observation is still untold, and the
    chooser gets exactly the calls, in the same order, as when told at once; each step's record gets the time
    and the guard's verdicts after it."""
    _, ours = engines
    sched, engine = scheduler(ours), ours.llm_engine
    calls = {}
    for defers in (False, True):
        prefix = f"tell-{defers}-"
        wrapper = _Calls(sched.chooser, prefix)
        sched.chooser = wrapper
        sched.k_plan.chooses_ahead, sched._defers_observing = True, defers
        sched.k_plan._ahead = None  # (both runs from a plan with no choice made ahead)
        sched.log.steps.clear()
        untold: list[tuple[int, list[int]]] = []  # after each step: its number, the observations untold

        def step(untold: list[tuple[int, list[int]]] = untold) -> None:
            engine.step()
            if engine.has_unfinished_requests():
                observed = [a.iteration for m, a in sched._untold if m == "observe"]
                untold.append((sched.counters.num_steps, observed))

        try:
            for i in range(4):
                if i == 2:  # the other two join while the first two decode
                    for _ in range(6):
                        step()
                engine.add_request(f"{prefix}{i}", PROMPTS[i], _params(["auto", 3, "auto", 3], 24)[i])
            while engine.has_unfinished_requests():
                step()
        finally:
            sched.chooser = wrapper.inner
            sched.k_plan.chooses_ahead = sched._defers_observing = False
        assert not sched._untold  # told when the engine went idle
        first = next(c[1] for c in wrapper.calls if c[0] == "observe")
        calls[defers] = [(c[0], c[1] - first, *c[2:]) if c[0] == "observe" else c for c in wrapper.calls]
        assert wrapper.observed_after_release == []
        if defers:  # the step just done, where it decoded requests
            assert all(observed in ([], [number]) for number, observed in untold)
            assert sum(observed == [number] for number, observed in untold) > len(untold) // 2
            assert all(r.observe_ahead_s > 0.0 for r in sched.log.steps if r.num_drafts)
        else:
            assert not any(observed for _, observed in untold)
    assert any(c[0] == "joined" for c in calls[True])
    assert calls[True] == calls[False]


class _Outlooks(_Releases):
    """An outlook-aware chooser around the engine's: keeps every outlook it is given."""

    def __init__(self, inner: Any) -> None:
        super().__init__(inner)
        self.outlooks: list[dict[str, RequestOutlook]] = []
        self.prompt_cues: dict[int, int] = {}  # by step: the prompt cue each observed step carried

    def set_outlook(self, outlook: Mapping[str, RequestOutlook]) -> None:
        self.outlooks.append(dict(outlook))

    def observe(self, stats: Any) -> None:
        self.prompt_cues[stats.iteration] = stats.prompt_cue
        super().observe(stats)


def test_the_chooser_is_told_what_each_drafter_missed_and_what_is_left(engines: tuple[Any, Any]) -> None:
    """The outlook (`RequestOutlook`) an outlook-aware chooser gets before each choice: a request that
    drafted at the end of the last step has nothing to catch up; one at K = 0 in a batch that drafted at every
    step has its whole history (our worker drafts for the requests at K > 0 alone, so the drafter has none of
    it; `_accepted_after_skipping` checks the catch-up itself); each, its max_tokens less what it generated.
    The step record keeps each outlook given."""
    _, ours = engines
    sched, engine = scheduler(ours), ours.llm_engine
    wrapper = _Outlooks(sched.chooser)
    sched.chooser = wrapper
    sched.log.steps.clear()
    try:
        engine.add_request("outlook-auto", PROMPTS[0], _params(["auto"], max_tokens=20)[0])  # the policy's 2
        engine.add_request("outlook-off", PROMPTS[1], _params(["off"], max_tokens=20)[0])
        for _ in range(5):
            engine.step()
        auto = next(r for r in sched.requests if r.startswith("outlook-auto"))
        off = next(r for r in sched.requests if r.startswith("outlook-off"))
        prompt_len = len(sched.requests[auto].prompt_token_ids)
        outlook = sched.k_plan.outlook([auto, off], sched.requests)
        assert outlook[auto].num_catch_up_tokens == 0  # drafted at the end of the last step
        assert all(step.num_draft_steps > 0 for step in sched.log.steps)  # for auto, at K = 2
        # Never drafted: its draft KV is missing from its first position, in the worker and in the outlook.
        assert runner(ours).lag_from == {off: 0} == sched._lag.lag_from
        assert outlook[off].num_catch_up_tokens == sched.requests[off].num_tokens
        assert sched.requests[off].num_tokens > len(sched.requests[off].prompt_token_ids)
        for request_id in (auto, off):
            assert (
                outlook[request_id].num_remaining_tokens == 20 - sched.requests[request_id].num_output_tokens
            )
        while engine.has_unfinished_requests():
            engine.step()
    finally:
        sched.chooser = wrapper.inner
    # Only the request the policy decides for is asked about; its first outlook (its prompt in the step, which
    # the drafter is fed if it drafts: the cost model's prompt term charges that), nothing.
    assert wrapper.outlooks and all(list(o) == [auto] for o in wrapper.outlooks)
    assert wrapper.outlooks[0][auto].num_catch_up_tokens == 0 < prompt_len
    # The step record keeps each, with the step whose K it was given for (`bench.replay_record` replays them).
    given = [
        {r: [o.num_catch_up_tokens, o.num_remaining_tokens] for r, o in g.items()} for g in wrapper.outlooks
    ]
    assert [step.outlook for step in sched.log.steps if step.outlook] == given
    assert not sched._lag.lag_from  # forgotten with the requests
    # Each step reports the prompt cue of the choice whose drafts it verifies: the step before's outlook's.
    steps = sched.log.steps
    for before, step in zip(steps, steps[1:], strict=False):
        if step.step in wrapper.prompt_cues:
            expected = prompt_cue(RequestOutlook(*o) for o in before.outlook.values())
            assert wrapper.prompt_cues[step.step] == expected, step.step
    # (cue 1 where the auto request's outlook said one more token at most: at K = 2 it may end without that)
    assert 0 in wrapper.prompt_cues.values()


def test_the_cost_models_refits_are_timed_into_the_steps_record() -> None:
    """The refit the cost model leaves to the scheduler (`defers_refits`) runs while the worker runs a step,
    and its CPU goes in that step's record (`StepRecord.refit_cpu_s`); a call with no refit due adds none."""
    from cluster.vllm_backend.scheduler import PolicyScheduler  # (imports vLLM)

    model = regime_chooser().cost_model
    model.defers_refits = True
    holder = SimpleNamespace(_cost_model=model, _refit_cpu_s=0.0)
    for iteration in range(1, 100):  # plain iterations until the model has enough for a refit
        model.observe(_plain_stats(iteration))
        if model.is_refit_due:
            break
    assert PolicyScheduler._refit_if_due(holder)  # type: ignore[arg-type]
    assert holder._refit_cpu_s > 0.0 and not model.is_refit_due
    spent = holder._refit_cpu_s
    assert not PolicyScheduler._refit_if_due(holder)  # type: ignore[arg-type]
    assert holder._refit_cpu_s == spent


def _plain_stats(iteration: int) -> IterationStats:
    requests = [RequestIterationStats("a", 0, 0, 1, 100)]
    return IterationStats(iteration, 1, requests, 1, 0.0, 0.05, 0.0)
