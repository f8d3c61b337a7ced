"""Grouped-query attention over a ragged batch, reading and writing the shared KV cache."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from workers.batch import BatchLayout
from workers.config import ModelConfig
from workers.kv_cache import KVCache
from workers.layers import RMSNorm, Rotary


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int, rotary: Rotary) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.clip_qkv = config.clip_qkv
        self.qk_norm = config.qk_norm
        q_dim, kv_dim = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_dim, bias=config.qkv_bias)
        self.k_proj = nn.Linear(config.hidden_size, kv_dim, bias=config.qkv_bias)
        self.v_proj = nn.Linear(config.hidden_size, kv_dim, bias=config.qkv_bias)
        self.o_proj = nn.Linear(q_dim, config.hidden_size, bias=config.o_bias)
        if config.qk_norm == "per_head":  # Qwen3: over head_dim, each head alike
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps)
        elif config.qk_norm == "full":  # OLMoE: over the whole projection, before splitting heads
            self.q_norm = RMSNorm(q_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(kv_dim, config.rms_norm_eps)
        self.rotary = rotary

    def forward(self, x: torch.Tensor, layout: BatchLayout, cache: KVCache) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]; appends this layer's keys and values to the cache."""
        num_tokens = x.shape[0]
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        q = self.rotary(q, layout.positions)
        k = self.rotary(k, layout.positions)

        # Append: cache[layer, slot, :, position] = k for every new token.
        k_cache, v_cache = cache.k[self.layer_idx], cache.v[self.layer_idx]  # [S, kvh, N, d]
        k_cache[layout.token_slots, :, layout.positions] = k
        v_cache[layout.token_slots, :, layout.positions] = v

        # Attend on the padded rows: queries [R, h, max_new, d], keys [R, kvh, max_ctx, d] (see batch.py).
        q_pad = q.new_zeros(layout.num_rows, layout.max_new, self.num_heads, self.head_dim)
        q_pad[layout.row_index, layout.column_index] = q
        if layout.key_start is not None:  # the batch's slot range, read in place
            rows = slice(layout.key_start, layout.key_start + layout.num_rows)
            keys, values = k_cache[rows, :, : layout.max_ctx], v_cache[rows, :, : layout.max_ctx]
        else:
            keys, values = (
                k_cache[layout.slots, :, : layout.max_ctx],
                v_cache[layout.slots, :, : layout.max_ctx],
            )
        out = F.scaled_dot_product_attention(
            q_pad.transpose(1, 2), keys, values, attn_mask=layout.mask, enable_gqa=True
        )  # [R, h, max_new, d]
        out = out.transpose(1, 2)[layout.row_index, layout.column_index]  # [T, h, d]
        return self.o_proj(out.reshape(num_tokens, self.num_heads * self.head_dim))
