"""Speculative decoding is lossless: greedy output equals the target's, for any K per request."""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch

from policy.baselines import OffChooser, StaticChooser
from policy.batch_aware import BatchAwareChooser, BatchAwareConfig
from policy.cost_model import CostModel
from policy.cost_model_config import CostModelConfig
from policy.presets import PRESETS
from policy.stats import IterationStats, RequestOutlook
from tests.workers.checkpoints import make_checkpoint
from workers.drafter import PROPOSALS, Drafter, DraftRequest
from workers.engine import EngineConfig, SpecEngine
from workers.kv_cache import CacheConfig
from workers.runner import ModelRunner
from workers.sampling import SamplingParams
from workers.target import Target


@pytest.fixture(scope="module")
def target_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("target"), "MixtralForCausalLM", num_local_experts=4)


@pytest.fixture(scope="module")
def good_draft_path(tmp_path_factory: pytest.TempPathFactory, target_path: Path) -> Path:
    """The target itself with slightly perturbed weights: agrees most of the time, not always."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("good_draft")
    for file in target_path.iterdir():
        (path / file.name).write_bytes(file.read_bytes())
    tensors = load_file(path / "model.safetensors")
    generator = torch.Generator().manual_seed(3)
    tensors = {k: v + 0.005 * torch.randn(v.shape, generator=generator) for k, v in tensors.items()}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    return path


@pytest.fixture(scope="module")
def random_draft_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(
        tmp_path_factory.mktemp("random_draft"), "LlamaForCausalLM", seed=11, num_hidden_layers=1
    )


class ScriptedChooser:
    """K per request from a function of (request index, iteration): K changes between iterations."""

    def __init__(self, pattern: Sequence[Sequence[int]]) -> None:
        self.pattern = pattern
        self.iteration = 0

    def choose(self, request_ids: Sequence[str]) -> dict[str, int]:
        return {
            r: self.pattern[int(r.rsplit("-", 1)[1]) % len(self.pattern)][self.iteration % 5]
            for r in request_ids
        }

    def observe(self, stats: IterationStats) -> None:
        self.iteration += 1

    def release(self, request_id: str) -> None:
        pass

    def gauges(self) -> dict[str, float]:
        return {}


def _engine(
    target_path: Path,
    draft_path: Path | None,
    chooser: object,
    max_batch_size: int = 8,
    drafter_retry_s: float = 0.0,
) -> SpecEngine:
    cache = CacheConfig(max_seqs=8, max_seq_len=128)
    target = Target(ModelRunner.from_checkpoint(target_path, cache, dtype=torch.float32))
    drafter = (
        Drafter(ModelRunner.from_checkpoint(draft_path, cache, dtype=torch.float32)) if draft_path else None
    )
    config = EngineConfig(max_batch_size=max_batch_size, drafter_retry_s=drafter_retry_s)
    return SpecEngine(target, drafter, chooser, config)  # type: ignore[arg-type]


def _prompts(n: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(96) for _ in range(rng.randint(2, 12))] for _ in range(n)]


GREEDY = SamplingParams(temperature=0.0, max_tokens=20)


@pytest.fixture(scope="module")
def reference(target_path: Path) -> list[list[int]]:
    return _engine(target_path, None, OffChooser()).generate(_prompts(6), GREEDY)


@pytest.mark.parametrize("num_spec_tokens", range(7))
@pytest.mark.parametrize("draft", ["good", "random"])
def test_greedy_static_k_equals_target_only(
    target_path: Path,
    good_draft_path: Path,
    random_draft_path: Path,
    reference: list[list[int]],
    num_spec_tokens: int,
    draft: str,
) -> None:
    draft_path = good_draft_path if draft == "good" else random_draft_path
    engine = _engine(target_path, draft_path, StaticChooser(num_spec_tokens))
    assert engine.generate(_prompts(6), GREEDY) == reference


@pytest.mark.parametrize("draft", ["good", "random"])
def test_greedy_mixed_k_per_request_and_iteration(
    target_path: Path, good_draft_path: Path, random_draft_path: Path, reference: list[list[int]], draft: str
) -> None:
    pattern = [[0, 0, 3, 1, 6], [2, 5, 0, 4, 1], [6, 6, 6, 0, 0], [1, 0, 2, 0, 3]]
    draft_path = good_draft_path if draft == "good" else random_draft_path
    engine = _engine(target_path, draft_path, ScriptedChooser(pattern), max_batch_size=4)  # joins mid-way
    assert engine.generate(_prompts(6), GREEDY) == reference
    assert engine.target.runner.cache.num_used_slots == 0
    assert engine.proposer.drafter is not None and engine.proposer.drafter.runner.cache.num_used_slots == 0


def test_good_draft_is_accepted_more_than_random(
    target_path: Path, good_draft_path: Path, random_draft_path: Path
) -> None:
    rates = {}
    for name, path in [("good", good_draft_path), ("random", random_draft_path)]:
        engine = _engine(target_path, path, StaticChooser(4))
        accepted = proposed = 0
        engine.add_request("r-0", _prompts(1)[0], SamplingParams(temperature=0.0, max_tokens=40))
        while engine.has_unfinished:
            engine.step()
            stats = engine.last_stats
            if stats is not None:
                accepted += sum(r.num_accepted_tokens for r in stats.requests)
                proposed += sum(r.num_spec_tokens for r in stats.requests)
        rates[name] = accepted / proposed
    assert rates["good"] > 0.5 > rates["random"]


def test_catch_up_after_k0_iterations(
    target_path: Path, good_draft_path: Path, reference: list[list[int]]
) -> None:
    pattern = [[0, 0, 0, 0, 3]] * 4  # four plain iterations, then K = 3 after a catch-up prefill
    chooser = ScriptedChooser(pattern)
    engine = _engine(target_path, good_draft_path, chooser)
    caught_up: list[int] = []
    observe = chooser.observe
    chooser.observe = lambda stats: (caught_up.append(stats.num_draft_prefill_tokens), observe(stats))  # type: ignore[method-assign]
    assert engine.generate(_prompts(6), GREEDY) == reference
    # The drafter first sees each request at its first K > 0 (iteration 4): prompt + 5 tokens, less the
    # one it feeds anyway; later catch-ups are the few tokens committed during the next four K = 0 steps.
    assert caught_up[:4] == [0, 0, 0, 0]
    assert caught_up[4] == sum(len(p) + 5 - 1 for p in _prompts(6))


class OutlookRecorder(ScriptedChooser):
    """A scripted chooser that is outlook-aware: keeps the outlook given before each choice."""

    def __init__(self, pattern: Sequence[Sequence[int]]) -> None:
        super().__init__(pattern)
        self.outlooks: list[dict[str, RequestOutlook]] = []
        self.caught_up: list[int] = []  # per iteration, the tokens the drafter was fed beyond one a request

    def set_outlook(self, outlook: Mapping[str, RequestOutlook]) -> None:
        self.outlooks.append(dict(outlook))

    def observe(self, stats: IterationStats) -> None:
        self.caught_up.append(stats.num_draft_prefill_tokens)
        super().observe(stats)


def test_the_chooser_is_told_each_catch_up_before_it_happens(
    target_path: Path, good_draft_path: Path, reference: list[list[int]]
) -> None:
    """The outlook before each choice names the history a request's drafter would catch up if it drafted
    (what the drafter is then fed beyond its one token) and the tokens the request may still generate."""
    chooser = OutlookRecorder([[0, 0, 0, 0, 3]] * 4)
    engine = _engine(target_path, good_draft_path, chooser)
    assert engine.generate(_prompts(6), GREEDY) == reference
    # Iterations 4 and 9 draft for every request: the first catches up each whole history, the second the
    # tokens of the four plain iterations between.
    told = [sum(o.num_catch_up_tokens for o in chooser.outlooks[i].values()) for i in (4, 9)]
    assert told == [chooser.caught_up[4], chooser.caught_up[9]] and told[0] > told[1] > 0
    first = chooser.outlooks[4].values()
    assert {o.num_remaining_tokens for o in first} == {GREEDY.max_tokens - 5}  # 5 generated


class ReleaseRecorder(ScriptedChooser):
    """A scripted chooser that keeps the requests released, and those observed after their release."""

    def __init__(self, pattern: Sequence[Sequence[int]]) -> None:
        super().__init__(pattern)
        self.released: list[str] = []
        self.observed_after_release: list[str] = []

    def observe(self, stats: IterationStats) -> None:
        gone = set(self.released)
        self.observed_after_release += [r.request_id for r in stats.requests if r.request_id in gone]
        super().observe(stats)

    def release(self, request_id: str) -> None:
        self.released.append(request_id)


def test_a_finished_request_is_released_after_its_last_iteration_is_observed(
    target_path: Path, good_draft_path: Path
) -> None:
    """The chooser keeps state per request (`BatchAwareChooser._state` makes it for any request it observes):
    released before the iteration that finished it was observed, a request's state was made again there and
    kept for good."""
    chooser = ReleaseRecorder([[1, 2, 0, 3, 1]] * 4)
    engine = _engine(target_path, good_draft_path, chooser)
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in (3, 9, 14, 20, 6, 11)]
    engine.generate(_prompts(6), params)
    assert len(set(chooser.released)) == 6 and not engine.running
    assert chooser.observed_after_release == []


def test_our_chooser_keeps_no_state_for_finished_requests(target_path: Path, good_draft_path: Path) -> None:
    """The batch-aware chooser, served: once every request finished, it tracks none (its gauge for /metrics);
    with the release before the last observation it kept one state per request."""
    preset = PRESETS["mixtral-8x7b-h100"]  # any prior: what it chooses does not matter here
    chooser = BatchAwareChooser(
        BatchAwareConfig(max_spec_tokens=4), CostModel(CostModelConfig(preset.routing), preset.cost_params())
    )
    engine = _engine(target_path, good_draft_path, chooser)
    params = [SamplingParams(temperature=0.0, max_tokens=n) for n in (3, 9, 14, 20, 6, 11)]
    engine.generate(_prompts(6), params)
    assert chooser.gauges()["policy_tracked_requests"] == 0.0


class FlakyDrafter(Drafter):
    """Fails every third call, and once forgets everything (as a restarted replica would)."""

    def __init__(self, runner: ModelRunner) -> None:
        super().__init__(runner)
        self.calls = 0

    def propose(self, requests):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls % 3 == 0:
            raise ConnectionError("drafter replica unavailable")
        if self.calls == 7:  # a restart: the cache is empty, the caller must resend every history
            for seq_id in list(self.runner.cache.seq_ids):
                self.runner.free(seq_id)
        return super().propose(requests)


def test_drafter_failures_lose_nothing(
    target_path: Path, good_draft_path: Path, reference: list[list[int]]
) -> None:
    engine = _engine(target_path, good_draft_path, StaticChooser(3))
    assert engine.proposer.drafter is not None
    engine.proposer.drafter = FlakyDrafter(engine.proposer.drafter.runner)
    assert engine.generate(_prompts(6), GREEDY) == reference
    assert engine.num_draft_failures >= 3


class DyingTarget(Target):
    """Counts its calls; `crash` loses every KV cache and fails, as a restarted replica would."""

    def __init__(self, runner: ModelRunner) -> None:
        super().__init__(runner)
        self.calls = 0

    def crash(self) -> None:
        for seq_id in list(self.runner.cache.seq_ids):
            self.runner.free(seq_id)
        raise ConnectionError("target replica died")


class CrashingTarget(DyingTarget):
    """Crashes on its 4th verification."""

    def verify(self, requests):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == 4:
            self.crash()
        return super().verify(requests)


def test_target_failure_is_recovered_from_the_token_history(
    target_path: Path, good_draft_path: Path, reference: list[list[int]]
) -> None:
    engine = _engine(target_path, good_draft_path, StaticChooser(2))
    engine.target = CrashingTarget(engine.target.runner)  # type: ignore[attr-defined]
    assert engine.generate(_prompts(6), GREEDY) == reference
    assert engine.num_target_recoveries == 1


class PrefillCrashingTarget(DyingTarget):
    """Crashes on the prefill of its 2nd admission (others are running by then), or on every later one."""

    def __init__(self, runner: ModelRunner, always: bool = False) -> None:
        super().__init__(runner)
        self.always = always

    def prefill(self, seq_ids, prompts, params):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == 2 or (self.always and self.calls > 2):
            self.crash()
        return super().prefill(seq_ids, prompts, params)


def test_target_failure_during_admission_requeues_the_new_requests(
    target_path: Path, good_draft_path: Path, reference: list[list[int]]
) -> None:
    engine = _engine(target_path, good_draft_path, StaticChooser(2), max_batch_size=3)
    engine.target = PrefillCrashingTarget(engine.target.runner)  # type: ignore[attr-defined]
    assert engine.generate(_prompts(6), GREEDY) == reference
    assert engine.num_target_recoveries == 1
    assert engine.target.runner.cache.num_used_slots == 0  # type: ignore[attr-defined]


def test_a_prefill_that_keeps_failing_raises_instead_of_looping(
    target_path: Path, good_draft_path: Path
) -> None:
    engine = _engine(target_path, good_draft_path, StaticChooser(2), max_batch_size=3)
    engine.target = PrefillCrashingTarget(engine.target.runner, always=True)  # type: ignore[attr-defined]
    with pytest.raises((ConnectionError, RuntimeError), match="target replica died"):
        engine.generate(_prompts(6), GREEDY)


class ReplacedDrafter(Drafter):
    """Its replica dies on the second call; the replacement starts with an empty cache."""

    def __init__(self, runner: ModelRunner) -> None:
        super().__init__(runner)
        self.calls = 0
        self.num_drafted_after_replacement = 0

    def propose(self, requests):  # type: ignore[no-untyped-def]
        self.calls += 1
        if self.calls == 2:
            for seq_id in list(self.runner.cache.seq_ids):
                self.runner.free(seq_id)
            raise ConnectionError("drafter replica died")
        out = super().propose(requests)
        if self.calls > 2:
            self.num_drafted_after_replacement += sum(len(p.draft_ids) for p in out.proposals)
        return out


def test_speculation_resumes_after_a_drafter_replacement(
    target_path: Path, good_draft_path: Path, reference: list[list[int]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A clock that advances 10 ms per reading: the 100 ms pause after the failure spans several iterations,
    # during which K stays 3 but nothing is drafted. The engine must not count those drafts as cached.
    clock = iter(range(10**6))
    monkeypatch.setattr("workers.proposer.time.monotonic", lambda: next(clock) * 0.01)
    engine = _engine(target_path, good_draft_path, StaticChooser(3), drafter_retry_s=0.1)
    assert engine.proposer.drafter is not None
    drafter = engine.proposer.drafter = ReplacedDrafter(engine.proposer.drafter.runner)
    assert engine.generate(_prompts(6), GREEDY) == reference
    assert engine.num_draft_failures == 1  # no DraftCacheMiss after the replacement answers
    assert drafter.num_drafted_after_replacement > 0


def _fill_with_foreign_sequences(engine: SpecEngine, num_free: int) -> None:
    """Slots held by sequences the engine does not run (a predecessor's leak)."""
    cache = engine.target.runner.cache  # type: ignore[attr-defined]
    for seq_id in range(10_000, 10_000 + cache.num_free_slots - num_free):
        engine.target.runner.add_sequence(seq_id)  # type: ignore[attr-defined]


def test_requests_wait_for_slots_while_others_run(
    target_path: Path, good_draft_path: Path, reference: list[list[int]]
) -> None:
    engine = _engine(target_path, good_draft_path, StaticChooser(2))
    _fill_with_foreign_sequences(engine, num_free=1)
    assert engine.generate(_prompts(6), GREEDY) == reference  # one at a time, through the one free slot


def test_a_cache_that_refuses_with_nothing_running_is_an_error(
    target_path: Path, good_draft_path: Path
) -> None:
    from workers.kv_cache import CacheCapacityError

    engine = _engine(target_path, good_draft_path, StaticChooser(2))
    _fill_with_foreign_sequences(engine, num_free=0)
    engine.add_request("r-0", [5, 6, 7], GREEDY)
    with pytest.raises(CacheCapacityError, match="sequence slots are in use"):
        engine.step()
    assert [s.request_id for s in engine.waiting] == ["r-0"]  # not lost: the caller decides what to do
    assert not isinstance(CacheCapacityError("x"), ValueError)  # a server fault, never a client error (400)


PENALIZED = SamplingParams(
    temperature=0.0, max_tokens=20, presence_penalty=0.8, frequency_penalty=0.5, repetition_penalty=1.5
)


@pytest.fixture(scope="module")
def penalized_reference(target_path: Path) -> list[list[int]]:
    return _engine(target_path, None, OffChooser()).generate(_prompts(6), PENALIZED)


def test_penalties_change_greedy_output(
    reference: list[list[int]], penalized_reference: list[list[int]]
) -> None:
    assert penalized_reference != reference
    # Repetition is what the penalties push against: fewer repeated tokens than without them.
    repeats = [sum(len(o) - len(set(o)) for o in outs) for outs in (reference, penalized_reference)]
    assert repeats[1] < repeats[0]


@pytest.mark.parametrize("draft", ["good", "random"])
def test_greedy_with_penalties_is_identical_with_and_without_speculation(
    target_path: Path,
    good_draft_path: Path,
    random_draft_path: Path,
    penalized_reference: list[list[int]],
    draft: str,
) -> None:
    """Each position inside a verified draft is penalized given the drafts before it."""
    draft_path = good_draft_path if draft == "good" else random_draft_path
    pattern = [[0, 0, 3, 1, 6], [2, 5, 0, 4, 1], [6, 6, 6, 0, 0], [1, 0, 2, 0, 3]]
    for chooser in (StaticChooser(4), ScriptedChooser(pattern)):
        engine = _engine(target_path, draft_path, chooser, max_batch_size=4)
        assert engine.generate(_prompts(6), PENALIZED) == penalized_reference


def test_the_draft_applies_the_penalties_too(target_path: Path, good_draft_path: Path) -> None:
    """The good draft is the target plus noise: with the same penalties it keeps being accepted."""
    engine = _engine(target_path, good_draft_path, StaticChooser(4))
    accepted = proposed = 0
    engine.add_request("r-0", _prompts(1)[0], PENALIZED)
    while engine.has_unfinished:
        engine.step()
        stats = engine.last_stats
        if stats is not None:
            accepted += sum(r.num_accepted_tokens for r in stats.requests)
            proposed += sum(r.num_spec_tokens for r in stats.requests)
    assert accepted / proposed > 0.5


@pytest.mark.parametrize("proposals", PROPOSALS)
def test_sampled_drafts_send_only_what_their_proposals_need(
    target_path: Path, good_draft_path: Path, proposals: str
) -> None:
    """One-hot proposals are the draft's argmax, sent without a distribution; distribution proposals send
    [K, V]. Either way sampled requests run to completion at K = 3 (exactness: tests/workers/test_rejection)."""
    cache = CacheConfig(max_seqs=8, max_seq_len=128)
    drafter = Drafter(ModelRunner.from_checkpoint(good_draft_path, cache, dtype=torch.float32), proposals)
    sampled = SamplingParams(temperature=0.8, seed=1, max_tokens=12, ignore_eos=True)
    prompt = _prompts(1)[0]
    proposal = drafter.propose([DraftRequest(0, 0, prompt, 3, sampled)]).proposals[0]
    greedy = drafter.propose([DraftRequest(1, 0, prompt, 3, GREEDY)]).proposals[0]
    if proposals == "one_hot":
        assert proposal.draft_probs is None and proposal.draft_ids == greedy.draft_ids
    else:
        assert proposal.draft_probs is not None and proposal.draft_probs.shape == (3, drafter.vocab_size)
    target = Target(ModelRunner.from_checkpoint(target_path, cache, dtype=torch.float32))
    engine = SpecEngine(target, drafter, StaticChooser(3), EngineConfig(max_batch_size=4))
    # A low temperature: the random test models' distributions are nearly flat at 0.8, where a one-hot
    # proposal (accepted with probability p(x)) is rarely accepted.
    outputs = engine.generate(
        _prompts(4), SamplingParams(temperature=0.2, seed=1, max_tokens=12, ignore_eos=True)
    )
    assert [len(o) for o in outputs] == [12] * 4
    assert engine.iteration < 11  # drafts were accepted: plain decoding takes 11 iterations after prefill


def test_an_unknown_proposal_kind_is_refused(good_draft_path: Path) -> None:
    cache = CacheConfig(max_seqs=1, max_seq_len=16)
    runner = ModelRunner.from_checkpoint(good_draft_path, cache, dtype=torch.float32)
    with pytest.raises(ValueError, match="one_hot"):
        Drafter(runner, "full")
