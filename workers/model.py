"""One decoder-only transformer for every supported architecture, dense or MoE.

Module names follow the Hugging Face checkpoints (`model.layers.N.self_attn.q_proj`, `...mlp.gate`) so the
loader maps tensors by name; routed experts are stacked per layer (see `experts.py`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from workers.attention import Attention
from workers.batch import BatchLayout
from workers.config import ModelConfig
from workers.experts import MoEBlock
from workers.kv_cache import KVCache
from workers.layers import RMSNorm, Rotary, SwiGLU


@dataclass
class ForwardOutput:
    logits: torch.Tensor  # [num_selected_tokens, vocab] fp32
    tokens_per_expert: (
        torch.Tensor
    )  # [num_moe_layers, num_experts] routed (token, expert) pairs; [0, 0] if dense

    @property
    def experts_touched(self) -> list[int]:
        """Distinct experts touched per MoE layer."""
        return (self.tokens_per_expert > 0).sum(dim=1).tolist()


class DecoderLayer(nn.Module):
    def __init__(
        self, config: ModelConfig, layer_idx: int, rotary: Rotary, expert_ids: Sequence[int] | None
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer_idx, rotary)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.is_moe = config.is_moe_layer(layer_idx)
        self.mlp: MoEBlock | SwiGLU
        if self.is_moe:
            self.mlp = MoEBlock(config, expert_ids)
        else:
            self.mlp = SwiGLU(config.hidden_size, config.intermediate_size)

    def forward(
        self, x: torch.Tensor, layout: BatchLayout, cache: KVCache
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        x = x + self.self_attn(self.input_layernorm(x), layout, cache)
        h = self.post_attention_layernorm(x)
        if isinstance(self.mlp, MoEBlock):
            out, tokens_per_expert = self.mlp(h)
            return x + out, tokens_per_expert
        return x + self.mlp(h), None


class _Backbone(nn.Module):
    def __init__(self, config: ModelConfig, rotary: Rotary, expert_ids: Sequence[int] | None) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DecoderLayer(config, i, rotary, expert_ids) for i in range(config.num_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class Transformer(nn.Module):
    def __init__(
        self, config: ModelConfig, max_positions: int | None = None, expert_ids: Sequence[int] | None = None
    ) -> None:
        super().__init__()
        self.config = config
        rotary = Rotary(config.rope, config.head_dim, max_positions or config.max_position_embeddings)
        self.rotary = rotary  # shared by every attention layer
        self.model = _Backbone(config, rotary, expert_ids)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    @torch.inference_mode()
    def forward(
        self,
        input_ids: torch.Tensor,
        layout: BatchLayout,
        cache: KVCache,
        logits_index: torch.Tensor | None = None,
    ) -> ForwardOutput:
        """input_ids: [T] new tokens of the ragged batch; logits_index: rows of T to compute logits for."""
        x = self.model.embed_tokens(input_ids)  # [T, hidden]
        counts = []
        for layer in self.model.layers:
            x, tokens_per_expert = layer(x, layout, cache)
            if tokens_per_expert is not None:
                counts.append(tokens_per_expert)
        if logits_index is not None:
            x = x[logits_index]
        logits = self.lm_head(self.model.norm(x)).float()
        stacked = torch.stack(counts) if counts else torch.zeros(0, 0, dtype=torch.long, device=x.device)
        return ForwardOutput(logits=logits, tokens_per_expert=stacked)
