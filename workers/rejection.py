"""Verification of draft tokens against the target: exact for greedy and for sampled decoding.

Vocabulary (as in vLLM's rejection sampler): accepted tokens are draft tokens the target keeps; the
recovered token replaces the first rejected one; the bonus token follows when all drafts are accepted.
Each call returns the committed tokens: accepted + one recovered-or-bonus token. Sampled requests are
verified against the draft's distributions (`verify_sampled`) or against one-hot proposals
(`verify_one_hot`, the default: the drafter then sends token ids only).
"""

from __future__ import annotations

import torch

from workers.sampling import sample


def verify_greedy(target_logits: torch.Tensor, draft_ids: list[int]) -> list[int]:
    """target_logits [K+1, V]: accept the longest prefix of drafts equal to the target's argmax."""
    target_ids = target_logits.argmax(dim=-1).tolist()  # [K+1]
    committed: list[int] = []
    for draft, target in zip(draft_ids, target_ids, strict=False):
        if draft != target:
            break
        committed.append(draft)
    committed.append(target_ids[len(committed)])  # recovered (first mismatch) or bonus (all accepted)
    return committed


def verify_sampled(
    target_probs: torch.Tensor,
    draft_probs: torch.Tensor | None,
    draft_ids: list[int],
    generator: torch.Generator,
) -> list[int]:
    """target_probs [K+1, V], draft_probs [K, V]: standard speculative sampling (Leviathan et al.).

    Accept draft x with probability min(1, p(x) / q(x)); at the first rejection sample from
    normalize(max(0, p - q)); if every draft is accepted, sample a bonus token from p.
    The committed tokens are distributed exactly as if sampled from the target alone.
    draft_probs None means one-hot proposals q = onehot(x) (`verify_one_hot`).
    """
    num_drafts = len(draft_ids)
    committed: list[int] = []
    if num_drafts:
        device = target_probs.device  # the generator's device (the host: see Target._verify_one)
        rows, ids = torch.arange(num_drafts, device=device), torch.tensor(draft_ids, device=device)
        p = target_probs[rows, ids]
        q = draft_probs[rows, ids] if draft_probs is not None else torch.ones_like(p)
        uniform = torch.rand(num_drafts, generator=generator, device=device)
        accepted = uniform * q < p  # q >= p: accept with probability p/q; p > q: always accept
        for i in range(num_drafts):
            if not accepted[i]:
                if draft_probs is not None:
                    residual = (target_probs[i] - draft_probs[i]).clamp_min(0.0)
                else:  # max(0, p - onehot(x)): p with x removed
                    residual = target_probs[i].clone()
                    residual[draft_ids[i]] = 0.0
                total = float(residual.sum())
                # total == 0 only if p == q, where rejection has probability 0; guard rounding anyway.
                recovered = (
                    sample(residual / total, generator) if total > 0 else sample(target_probs[i], generator)
                )
                return committed + [recovered]
            committed.append(draft_ids[i])
    committed.append(sample(target_probs[num_drafts], generator))  # bonus token
    return committed


def verify_one_hot(target_probs: torch.Tensor, draft_ids: list[int], generator: torch.Generator) -> list[int]:
    """target_probs [K+1, V]: speculative sampling against one-hot proposals q = onehot(x) (vLLM's
    draft_sample_method=greedy); only the draft token ids cross from the drafter.

    With q(x) = 1, accept x with probability p(x); at the first rejection, normalize(max(0, p - q)) is p
    with x removed, renormalised. Exact however x was chosen (the draft's argmax here): given x,
    P(commit y) = [y = x] p(x) + (1 - p(x)) p(y) [y != x] / (1 - p(x)) = p(y).
    """
    return verify_sampled(target_probs, None, draft_ids, generator)
