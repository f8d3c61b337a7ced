"""Tiny random Hugging Face checkpoints for tests, made with transformers' own config and model classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

COMMON: dict[str, Any] = dict(
    vocab_size=96,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)


def make_checkpoint(path: Path, architecture: str, seed: int = 0, **overrides: Any) -> Path:
    """Save a random model of `architecture` to `path` (fp32) and return the path."""
    import transformers

    config_cls, model_cls = _classes(architecture)
    kwargs = {**COMMON, **_family_defaults(architecture), **overrides}
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).eval()
    with torch.no_grad():  # larger weights than the default init so that logits are not all near zero
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() >= 2:
                p.normal_(0.0, 0.08)
            else:
                p.normal_(0.0, 0.02)
    model.save_pretrained(path)
    return path


def _classes(architecture: str) -> tuple[str, str]:
    prefix = architecture.removesuffix("ForCausalLM")
    return f"{prefix}Config", architecture


def _family_defaults(architecture: str) -> dict[str, Any]:
    if architecture == "MixtralForCausalLM":
        return dict(intermediate_size=48, num_local_experts=4, num_experts_per_tok=2)
    if architecture == "Qwen2MoeForCausalLM":
        return dict(
            intermediate_size=80,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=False,
        )
    if architecture == "Qwen3MoeForCausalLM":
        return dict(
            intermediate_size=80, moe_intermediate_size=32, num_experts=6, num_experts_per_tok=2, head_dim=16
        )
    if architecture == "OlmoeForCausalLM":
        return dict(intermediate_size=32, num_experts=6, num_experts_per_tok=2)
    return dict(intermediate_size=80)
