"""Sampled speculative decoding preserves the target's distribution (chi-square tests at fixed seeds),
penalties included, with distribution proposals (the draft's q sent) and with one-hot ones (ids only)."""

from __future__ import annotations

import itertools

import pytest
import torch
from scipy.stats import chisquare

from workers.rejection import verify_greedy, verify_one_hot, verify_sampled
from workers.sampling import PenaltyContext, SamplingParams, apply_penalties, probs_from_logits, sample
from workers.target import Target, VerifyRequest

VOCAB = 6
NUM_SAMPLES = 20_000  # enough to detect a 2% shift in a token's probability (see the power test)


def _tables(seed: int, scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random logits for position 1 [V], position 2 given token 1 [V, V], position 3 given 1, 2 [V, V, V]."""
    g = torch.Generator().manual_seed(seed)
    return (
        scale * torch.randn(VOCAB, generator=g),
        scale * torch.randn(VOCAB, VOCAB, generator=g),
        scale * torch.randn(VOCAB, VOCAB, VOCAB, generator=g),
    )


def _probs(tables: tuple[torch.Tensor, ...], params: SamplingParams) -> tuple[torch.Tensor, ...]:
    l1, l2, l3 = tables
    return (
        probs_from_logits(l1[None], params)[0],
        probs_from_logits(l2, params),
        probs_from_logits(l3.reshape(-1, VOCAB), params).reshape(VOCAB, VOCAB, VOCAB),
    )


def _one_hot(target: torch.Tensor, draft: torch.Tensor, ids: list[int], g: torch.Generator) -> list[int]:
    return verify_one_hot(target, ids, g)  # the draft's distribution never reaches the verifier


PROPOSALS = {"distribution": verify_sampled, "one_hot": _one_hot}


def _speculative_pairs(  # type: ignore[no-untyped-def]
    p: tuple[torch.Tensor, ...],
    q: tuple[torch.Tensor, ...],
    seed: int,
    n: int,
    algorithm=verify_sampled,
    argmax_drafts: bool = False,
) -> torch.Tensor:
    """First two committed tokens of n speculative iterations with K = 2 drafts; returns counts [V*V].
    With argmax_drafts the drafts are q's argmax, as the drafter's one-hot proposals are."""
    g = torch.Generator().manual_seed(seed)
    counts = torch.zeros(VOCAB * VOCAB)
    for _ in range(n):
        d1 = int(q[0].argmax()) if argmax_drafts else sample(q[0], g)
        d2 = int(q[1][d1].argmax()) if argmax_drafts else sample(q[1][d1], g)
        target = torch.stack([p[0], p[1][d1], p[2][d1, d2]])
        draft = torch.stack([q[0], q[1][d1]])
        committed = algorithm(target, draft, [d1, d2], g)
        if len(committed) < 2:  # first draft rejected: the second token comes from the next iteration
            committed.append(sample(p[1][committed[0]], g))
        counts[committed[0] * VOCAB + committed[1]] += 1
    return counts


def _target_pairs(p: tuple[torch.Tensor, ...]) -> torch.Tensor:
    return (p[0][:, None] * p[1]).flatten()  # [V*V]: P(x1) P(x2 | x1)


PAIRS = [  # (target seed, draft seed, draft scale): a close draft, an unrelated one, a badly wrong one
    (0, 0, 1.0),
    (0, 1, 1.0),
    (2, 3, 4.0),
]
PARAMS = [
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=1.3, top_p=0.9),
    SamplingParams(temperature=1.0, top_k=3),
    SamplingParams(temperature=0.7, top_k=4, top_p=0.8),
]


# Every pair meets every params set; the full grid is `slow`, a diagonal runs by default.
GRID = [
    pytest.param(pair, params, marks=() if (i + j) % 4 == 0 or j == i else pytest.mark.slow)
    for (i, pair), (j, params) in itertools.product(enumerate(PAIRS), enumerate(PARAMS))
]


@pytest.mark.parametrize("proposals", list(PROPOSALS))
@pytest.mark.parametrize(("pair", "params"), GRID)
def test_rejection_sampling_preserves_target_distribution(
    pair: tuple[int, int, float], params: SamplingParams, proposals: str
) -> None:
    target_seed, draft_seed, draft_scale = pair
    p = _probs(_tables(target_seed, 1.0), params)
    if target_seed == draft_seed:  # close draft: the target's logits plus noise
        noise = _tables(100 + draft_seed, 0.3)
        q = _probs(tuple(t + n for t, n in zip(_tables(target_seed, 1.0), noise, strict=True)), params)
    else:
        q = _probs(_tables(draft_seed, draft_scale), params)
    expected = _target_pairs(p)
    algorithm, is_one_hot = PROPOSALS[proposals], proposals == "one_hot"
    counts = _speculative_pairs(p, q, 1234, NUM_SAMPLES, algorithm, argmax_drafts=is_one_hot)
    support = expected > 0
    assert counts[~support].sum() == 0  # never a token that top_k / top_p excluded
    result = chisquare(counts[support].numpy(), expected[support].numpy() * NUM_SAMPLES)
    assert result.pvalue > 1e-3, f"chi-square p-value {result.pvalue}"


def test_the_chi_square_test_detects_a_2_percent_deviation() -> None:
    """Power check: the same test rejects a distribution that moves 2% of probability mass."""
    params = SamplingParams(temperature=1.0)
    p = _probs(_tables(0, 1.0), params)
    expected = _target_pairs(p)
    shifted = expected.clone()
    big, small = int(expected.argmax()), int(expected.argmin())
    shifted[big] -= 0.02
    shifted[small] += 0.02
    g = torch.Generator().manual_seed(7)
    counts = torch.bincount(
        torch.multinomial(shifted, NUM_SAMPLES, replacement=True, generator=g), minlength=VOCAB * VOCAB
    ).float()
    assert chisquare(counts.numpy(), expected.numpy() * NUM_SAMPLES).pvalue < 1e-3


def test_a_wrong_verifier_is_caught() -> None:
    """Accepting every draft (no rejection) follows the draft, not the target: the test must fail it."""

    def accept_all(
        target: torch.Tensor, draft: torch.Tensor, ids: list[int], g: torch.Generator
    ) -> list[int]:
        return [*ids, sample(target[-1], g)]

    params = SamplingParams(temperature=1.0)
    p, q = _probs(_tables(0, 1.0), params), _probs(_tables(1, 1.0), params)
    counts = _speculative_pairs(p, q, seed=5, n=5000, algorithm=accept_all)
    expected = _target_pairs(p)
    assert chisquare(counts.numpy(), expected.numpy() * 5000).pvalue < 1e-6


def test_a_one_hot_verifier_that_keeps_the_rejected_token_is_caught() -> None:
    """One-hot verification must recover from p with the rejected draft removed: recovering from p itself
    over-weights the draft token, and the test must see it."""

    def recover_from_p(
        target: torch.Tensor, draft: torch.Tensor, ids: list[int], g: torch.Generator
    ) -> list[int]:
        committed: list[int] = []
        for i, x in enumerate(ids):
            if float(torch.rand(1, generator=g)) >= float(target[i, x]):
                return [*committed, sample(target[i], g)]
            committed.append(x)
        return [*committed, sample(target[len(ids)], g)]

    params = SamplingParams(temperature=1.0)
    p, q = _probs(_tables(0, 1.0), params), _probs(_tables(1, 1.0), params)
    counts = _speculative_pairs(p, q, seed=5, n=5000, algorithm=recover_from_p, argmax_drafts=True)
    assert chisquare(counts.numpy(), _target_pairs(p).numpy() * 5000).pvalue < 1e-6


def test_greedy_verification() -> None:
    logits = torch.zeros(4, 5)
    logits[0, 2] = logits[1, 4] = logits[2, 1] = logits[3, 3] = 1.0  # target argmax: 2, 4, 1, 3
    assert verify_greedy(logits, [2, 4, 1]) == [2, 4, 1, 3]  # all accepted + bonus
    assert verify_greedy(logits, [2, 0, 1]) == [2, 4]  # second rejected, recovered with the argmax
    assert verify_greedy(logits[:1], []) == [2]  # K = 0: plain decoding


def _penalized_target_pairs(
    tables: tuple[torch.Tensor, ...], params: SamplingParams, context: PenaltyContext
) -> torch.Tensor:
    """P(x1) P(x2 | x1) when each position is penalized given the output before it (plain decoding)."""
    l1, l2, _ = tables
    p1 = probs_from_logits(apply_penalties(l1[None], params, context, []), params)[0]
    rows = []
    for x1 in range(VOCAB):
        after = PenaltyContext(context.prompt_ids, [*context.output_ids, x1])
        rows.append(probs_from_logits(apply_penalties(l2[x1][None], params, after, []), params)[0])
    pairs = (p1[:, None] * torch.stack(rows)).flatten().double()
    return pairs / pairs.sum()  # chisquare wants expected counts that sum to the observed ones


PENALIZED_SAMPLES = 6000  # each sample runs the target's whole verification: fewer than the table tests


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1.0, presence_penalty=1.5, frequency_penalty=0.7, repetition_penalty=1.8),
        pytest.param(
            SamplingParams(temperature=0.8, top_p=0.9, frequency_penalty=-1.0, repetition_penalty=0.6),
            marks=pytest.mark.slow,
        ),
    ],
)
@pytest.mark.parametrize("proposals", list(PROPOSALS))
def test_the_target_verification_with_penalties_preserves_the_penalized_distribution(
    params: SamplingParams, proposals: str
) -> None:
    """The target's own verification (`Target._verify_one`) over 2 unpenalized drafts: each row must be
    penalized given the drafts before it, or P(x2 | x1) is wrong when x1 came from a draft."""
    tables, draft = _tables(0, 1.0), _probs(_tables(1, 1.0), SamplingParams(temperature=1.0))
    context = PenaltyContext(prompt_ids=[0, 5], output_ids=[2, 2, 3])
    target = Target(runner=None)  # type: ignore[arg-type]  # _verify_one needs only the generator
    g = torch.Generator().manual_seed(99)
    target._generators[0] = g
    counts = torch.zeros(VOCAB * VOCAB)
    is_one_hot = proposals == "one_hot"
    for _ in range(PENALIZED_SAMPLES):
        d1 = int(draft[0].argmax()) if is_one_hot else sample(draft[0], g)
        d2 = int(draft[1][d1].argmax()) if is_one_hot else sample(draft[1][d1], g)
        logits = torch.stack([tables[0], tables[1][d1], tables[2][d1, d2]])
        q = None if is_one_hot else torch.stack([draft[0], draft[1][d1]])  # None: one-hot proposals
        request = VerifyRequest(0, 4, [d1, d2], q, params, context)
        committed = target._verify_one(request, logits)
        if len(committed) < 2:  # the second token is a plain decoding step after the first
            after = PenaltyContext(context.prompt_ids, [*context.output_ids, committed[0]])
            penalized = apply_penalties(tables[1][committed[0]][None], params, after, [])
            committed.append(sample(probs_from_logits(penalized, params)[0], g))
        counts[committed[0] * VOCAB + committed[1]] += 1
    expected = _penalized_target_pairs(tables, params, context)
    support = expected > 0
    assert counts[~support].sum() == 0
    result = chisquare(counts[support].numpy(), expected[support].numpy() * PENALIZED_SAMPLES)
    assert result.pvalue > 1e-3, f"chi-square p-value {result.pvalue}"
    unpenalized = _target_pairs(_probs(tables, params))[support].double()  # tell penalties from none
    unpenalized = unpenalized / unpenalized.sum() * PENALIZED_SAMPLES
    assert chisquare(counts[support].numpy(), unpenalized.numpy()).pvalue < 1e-6


def test_penalties_match_transformers_and_the_openai_formula() -> None:
    from transformers import RepetitionPenaltyLogitsProcessor

    g = torch.Generator().manual_seed(4)
    logits = 3 * torch.randn(1, VOCAB, generator=g)
    prompt, output = [0, 1], [1, 3, 3]
    repetition = SamplingParams(repetition_penalty=1.7)
    expected = RepetitionPenaltyLogitsProcessor(1.7)(torch.tensor([prompt + output]), logits.clone())
    torch.testing.assert_close(
        apply_penalties(logits, repetition, PenaltyContext(prompt, output), []), expected
    )
    additive = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    got = apply_penalties(logits, additive, PenaltyContext(prompt, output), [])
    counts = torch.bincount(torch.tensor(output), minlength=VOCAB).float()
    torch.testing.assert_close(got, logits - 0.25 * counts - 0.5 * (counts > 0).float())  # prompt unaffected
