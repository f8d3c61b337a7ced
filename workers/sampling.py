"""Per-request sampling parameters and the processed distribution that both draft and target sample from.

Speculative decoding is exact only if the target's verification processes every position as plain decoding
would (penalties given the tokens before that position, then temperature, top_k, top_p); the draft uses the
same functions, `apply_penalties` and `probs_from_logits`, so that its proposals are accepted more often.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MAX_LOGPROBS = 20  # the most alternatives OpenAI's `top_logprobs` allows


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k truncation (this top_k is the sampling one, not experts per token)
    seed: int | None = None
    max_tokens: int = 16
    stop_token_ids: tuple[int, ...] = ()
    stop: tuple[str, ...] = ()  # stop strings; the text ends before the first one
    ignore_eos: bool = False
    num_spec_tokens: int | None = None  # None = the policy decides; 0 = off; n = always n
    presence_penalty: float = 0.0  # subtracted from the logit of every token already in the output
    frequency_penalty: float = 0.0  # subtracted once per occurrence in the output
    repetition_penalty: float = 1.0  # divides positive / multiplies negative logits of prompt + output tokens
    num_logprobs: int | None = None  # None: no logprobs; n: the chosen token's and the n most likely

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (math.isfinite(self.top_p) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.num_spec_tokens is not None and self.num_spec_tokens < 0:
            raise ValueError(f"num_spec_tokens must be >= 0 or None (auto), got {self.num_spec_tokens}")
        if any(not s for s in self.stop):
            raise ValueError("stop strings must not be empty")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not (math.isfinite(value) and -2 <= value <= 2):
                raise ValueError(f"{name} must be in [-2, 2], got {value}")
        if not (math.isfinite(self.repetition_penalty) and 0 < self.repetition_penalty <= 2):
            raise ValueError(f"repetition_penalty must be in (0, 2], got {self.repetition_penalty}")
        if self.num_logprobs is not None and not 0 <= self.num_logprobs <= MAX_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {MAX_LOGPROBS}], got {self.num_logprobs}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty or self.repetition_penalty != 1.0)


@dataclass
class PenaltyContext:
    """The tokens penalties look at: the prompt (repetition only) and the output so far (all three)."""

    prompt_ids: list[int]
    output_ids: list[int]


@dataclass
class TokenLogprob:
    """The model's log-probability of a chosen token and of the most likely tokens at its position."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]  # (token id, logprob), most likely first; `num_logprobs` of them


def apply_penalties(
    logits: torch.Tensor, params: SamplingParams, context: PenaltyContext, next_ids: list[int]
) -> torch.Tensor:
    """logits [n, V] -> penalized logits [n, V] (fp32), as vLLM applies them.

    Row j is the position after the output plus next_ids[:j] (the drafts before it in a verification), so
    every position is penalized exactly as plain decoding would penalize it.
    """
    n, vocab_size = logits.shape
    device = logits.device
    counts = torch.zeros(n, vocab_size, device=device)  # [n, V] occurrences in the output before row j
    if context.output_ids:
        output = torch.tensor(context.output_ids, device=device)
        counts += torch.bincount(output, minlength=vocab_size)[None, :vocab_size].float()
    if n > 1:
        steps = torch.zeros(n, vocab_size, device=device)
        steps[torch.arange(1, n, device=device), torch.tensor(next_ids[: n - 1], device=device)] = 1.0
        counts += steps.cumsum(dim=0)
    logits = logits.float()
    if params.repetition_penalty != 1.0:
        seen = counts > 0
        if context.prompt_ids:
            seen[:, torch.tensor(context.prompt_ids, device=device)] = True
        penalized = torch.where(
            logits > 0, logits / params.repetition_penalty, logits * params.repetition_penalty
        )
        logits = torch.where(seen, penalized, logits)
    return logits - params.frequency_penalty * counts - params.presence_penalty * (counts > 0).float()


def token_logprobs(logits: torch.Tensor, token_ids: list[int], num_top: int) -> list[TokenLogprob]:
    """logits [n, V] (the model's raw output, as vLLM reports by default), n >= len(token_ids): row i's
    log-probability of token_ids[i] and its num_top most likely tokens."""
    n = len(token_ids)
    logprobs = torch.log_softmax(logits[:n].float(), dim=-1).cpu()  # [n, V]
    chosen = logprobs[torch.arange(n), torch.tensor(token_ids, dtype=torch.long)].tolist()
    top_values, top_ids = logprobs.topk(num_top, dim=-1) if num_top else (logprobs[:, :0], logprobs[:, :0])
    return [
        TokenLogprob(
            token_ids[i],
            chosen[i],
            list(zip(top_ids[i].long().tolist(), top_values[i].tolist(), strict=True)),
        )
        for i in range(n)
    ]


def probs_from_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [n, V] -> probabilities [n, V] after temperature, top_k and top_p (fp32). Not for greedy."""
    logits = logits.float() / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (always at least the most likely token).
        mass_before = torch.cumsum(sorted_probs, dim=-1) - sorted_probs
        sorted_probs = sorted_probs.masked_fill(mass_before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
        probs = probs / probs.sum(dim=-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator) -> int:
    """One token from probs [V]."""
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None) -> torch.Generator:
    generator = torch.Generator()
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator
