"""The shapes of the demo pair: a small Mixtral target and a one- or two-layer Llama draft.

Both share the tokenizer (same `vocab_size`, BOS = 0, EOS = 1, PAD = 2) and the hidden size, so the draft
starts from the target's embeddings, final norm and LM head (`init_draft_from_target`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, MixtralConfig, MixtralForCausalLM

from training.tokenizer import BOS_ID, EOS_ID, MODEL_MAX_LENGTH, PAD_ID


@dataclass(frozen=True)
class PairShape:
    vocab_size: int = 4096
    hidden_size: int = 256
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    target_num_layers: int = 4
    num_experts: int = 8
    top_k: int = 2  # experts per token (num_experts_per_tok)
    expert_intermediate_size: int = 512
    router_aux_loss_coef: float = 0.05  # weight of the per-layer load-balancing loss (training.py)
    draft_num_layers: int = 2
    draft_intermediate_size: int = 768

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by {self.num_attention_heads} heads"
            )
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"{self.num_attention_heads} heads are not divisible by {self.num_key_value_heads} KV heads"
            )
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k = {self.top_k} must be in 1..num_experts = {self.num_experts}")


def _shared(shape: PairShape) -> dict[str, Any]:
    return {
        "vocab_size": shape.vocab_size,
        "hidden_size": shape.hidden_size,
        "num_attention_heads": shape.num_attention_heads,
        "num_key_value_heads": shape.num_key_value_heads,
        "head_dim": shape.hidden_size // shape.num_attention_heads,  # explicit for runtimes that need it
        "max_position_embeddings": MODEL_MAX_LENGTH,
        "tie_word_embeddings": False,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }


def target_config(shape: PairShape) -> MixtralConfig:
    return MixtralConfig(
        **_shared(shape),
        num_hidden_layers=shape.target_num_layers,
        intermediate_size=shape.expert_intermediate_size,
        num_local_experts=shape.num_experts,
        num_experts_per_tok=shape.top_k,
        router_aux_loss_coef=shape.router_aux_loss_coef,
        router_jitter_noise=0.0,
    )


def draft_config(shape: PairShape) -> LlamaConfig:
    return LlamaConfig(
        **_shared(shape),
        num_hidden_layers=shape.draft_num_layers,
        intermediate_size=shape.draft_intermediate_size,
    )


def build_target(shape: PairShape) -> MixtralForCausalLM:
    # grouped_mm runs the experts about 2x faster than the per-expert loop on CPU; it is a runtime choice,
    # not part of the checkpoint.
    return MixtralForCausalLM._from_config(
        target_config(shape), experts_implementation="grouped_mm", attn_implementation="sdpa"
    )


def build_draft(shape: PairShape) -> LlamaForCausalLM:
    return LlamaForCausalLM._from_config(draft_config(shape), attn_implementation="sdpa")


@torch.no_grad()
def init_draft_from_target(draft: LlamaForCausalLM, target: MixtralForCausalLM) -> None:
    """Copy the embeddings, final norm and LM head: the draft then starts in the target's token space."""
    draft.model.embed_tokens.weight.copy_(target.model.embed_tokens.weight)
    draft.model.norm.weight.copy_(target.model.norm.weight)
    draft.lm_head.weight.copy_(target.lm_head.weight)


def num_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
