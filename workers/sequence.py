"""One request's state inside an engine: its token history (the truth every cache is rebuilt from),
its sampling state, its output text, and why it finished."""

from __future__ import annotations

from dataclasses import dataclass, field

from workers.sampling import PenaltyContext, SamplingParams, TokenLogprob
from workers.tokenizer import IncrementalDetokenizer

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_ABORT = "abort"


@dataclass
class RequestOutput:
    request_id: str
    new_token_ids: list[int]  # committed this iteration
    new_text: str  # text released this iteration ("" without a tokenizer)
    num_prompt_tokens: int
    num_output_tokens: int
    finish_reason: str | None  # None while running; stop | length | abort
    new_logprobs: list[TokenLogprob] = field(default_factory=list)  # per new token, if the request asked

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    stop_token_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer | None = None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""  # the whole output text so far (stop strings removed)
    num_text_released: int = 0  # characters of `text` already released to the caller
    finish_reason: str | None = None
    num_draft_cached: int = 0  # history tokens the drafter's cache holds (its valid prefix)
    num_failed_prefills: int = 0  # admissions whose target prefill raised (retried once)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_remaining(self) -> int:
        return self.params.max_tokens - len(self.output_ids)

    def penalty_context(self) -> PenaltyContext | None:
        """What the target and the drafter need to penalize the next positions (None: no penalties)."""
        return PenaltyContext(self.prompt_ids, self.output_ids) if self.params.has_penalties else None

    def append(self, token_ids: list[int]) -> list[int]:
        """Commit tokens up to the first stop condition; returns the tokens actually committed."""
        committed: list[int] = []
        for token in token_ids:
            committed.append(token)
            self.output_ids.append(token)
            if token in self.stop_token_ids:
                self.finish_reason = FINISH_STOP
                break
            if len(self.output_ids) >= self.params.max_tokens:
                self.finish_reason = FINISH_LENGTH
                break
        if self.detokenizer is not None:
            self._update_text(committed)
        return committed

    def release_text(self) -> str:
        """Text that can be streamed now: all of it once finished, else all but a possible stop-string
        prefix at the end."""
        hold = 0 if self.finish_reason else max((len(s) - 1 for s in self.params.stop), default=0)
        end = max(self.num_text_released, len(self.text) - hold)
        delta = self.text[self.num_text_released : end]
        self.num_text_released = end
        return delta

    def _update_text(self, committed: list[int]) -> None:
        assert self.detokenizer is not None
        ends_with_stop_token = self.finish_reason == FINISH_STOP and committed[-1] in self.stop_token_ids
        text_ids = committed[:-1] if ends_with_stop_token else committed  # a stop token is not text
        longest_stop = max((len(s) for s in self.params.stop), default=0)
        searched_from = max(0, len(self.text) - longest_stop + 1)
        self.text += self.detokenizer.step(text_ids)
        found = [i for i in (self.text.find(s, searched_from) for s in self.params.stop) if i >= 0]
        if found:
            self.text = self.text[: min(found)]
            self.finish_reason = FINISH_STOP
