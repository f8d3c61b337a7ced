"""Request validation: whether a request could ever run on a target, checked before it is queued (by the
engine, or by a router in front of it). Nothing changes state."""

from __future__ import annotations

from workers.sampling import SamplingParams
from workers.target import TargetInfo


def validate_request(
    info: TargetInfo, has_tokenizer: bool, prompt_ids: list[int], params: SamplingParams
) -> None:
    """What `SpecEngine.validate` checks, for a caller that holds only the target's `info` (a router whose
    engine runs in another process)."""
    vocab_size = info.vocab_size
    if not prompt_ids:
        raise ValueError("the prompt is empty")
    bad = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if bad:
        raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})")
    max_seq_len = info.max_seq_len
    if len(prompt_ids) + params.max_tokens > max_seq_len:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
            f"length {max_seq_len}"
        )
    if params.stop and not has_tokenizer:
        raise ValueError("stop strings need an engine with a tokenizer")
