"""What the served API must return, computed with `transformers` on the demo target (a reference nobody here
wrote): greedy decoding with vLLM's penalty semantics and the raw logprobs of the chosen tokens. Both
backends' API tests check against it."""

from __future__ import annotations

from typing import Any

import torch

PENALTIES = {"presence_penalty": 0.6, "frequency_penalty": 0.4, "repetition_penalty": 1.3}
NO_PENALTIES = {"presence_penalty": 0.0, "frequency_penalty": 0.0, "repetition_penalty": 1.0}
OPENAI_PENALTIES = {"presence_penalty": 0.6, "frequency_penalty": 0.4}  # repetition_penalty: in extra_body


def reference_greedy(
    model: Any, prompt_ids: list[int], num_tokens: int, num_top: int, penalties: dict[str, float]
) -> tuple[list[int], list[float], list[list[int]]]:
    """Greedy decoding with vLLM's penalty semantics, written against transformers' logits: token ids,
    their raw logprobs, and the top `num_top` ids at each position."""
    import transformers

    processor = transformers.RepetitionPenaltyLogitsProcessor(penalties["repetition_penalty"])
    ids, out, logprobs, tops = list(prompt_ids), [], [], []
    for _ in range(num_tokens):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].float()
        penalized = processor(torch.tensor([ids]), logits[None].clone())[0]  # prompt + output tokens
        for token in set(out):
            count = out.count(token)
            penalized[token] -= penalties["frequency_penalty"] * count + penalties["presence_penalty"]
        token = int(penalized.argmax())
        raw = torch.log_softmax(logits, dim=-1)
        out.append(token)
        logprobs.append(float(raw[token]))
        tops.append(raw.topk(num_top).indices.tolist())
        ids.append(token)
    return out, logprobs, tops
