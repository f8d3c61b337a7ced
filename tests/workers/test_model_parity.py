"""Our runtime's logits against transformers' on tiny random checkpoints of every supported architecture."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.workers.checkpoints import make_checkpoint
from workers.kv_cache import CacheConfig
from workers.runner import ModelRunner

transformers = pytest.importorskip("transformers")

CASES: list[tuple[str, dict[str, Any]]] = [
    ("LlamaForCausalLM", {}),
    ("LlamaForCausalLM", dict(tie_word_embeddings=True, num_key_value_heads=1)),
    (
        "LlamaForCausalLM",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 5e5,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 64,
            }
        ),
    ),
    ("LlamaForCausalLM", dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0})),
    ("Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
    ("Qwen3ForCausalLM", dict(head_dim=32, num_key_value_heads=4)),
    ("MixtralForCausalLM", {}),
    ("MixtralForCausalLM", dict(num_key_value_heads=1, num_experts_per_tok=1)),
    ("MixtralForCausalLM", dict(sliding_window=7)),
    ("Qwen2MoeForCausalLM", {}),
    ("Qwen2MoeForCausalLM", dict(norm_topk_prob=True, decoder_sparse_step=2, num_hidden_layers=3)),
    ("Qwen2MoeForCausalLM", dict(mlp_only_layers=[0], tie_word_embeddings=True)),
    ("Qwen3MoeForCausalLM", dict(norm_topk_prob=True)),
    ("Qwen3MoeForCausalLM", dict(norm_topk_prob=False, num_key_value_heads=4)),
    ("OlmoeForCausalLM", {}),
    ("OlmoeForCausalLM", dict(norm_topk_prob=True, clip_qkv=0.5)),
]


def _ids(case: tuple[str, dict[str, Any]]) -> str:
    arch, overrides = case
    return arch.removesuffix("ForCausalLM") + ("-" + "-".join(sorted(overrides)) if overrides else "")


def _tolerance(reference: torch.Tensor) -> float:
    return 1e-4 * max(1.0, float(reference.abs().max()))


@pytest.mark.parametrize("case", CASES, ids=[_ids(c) for c in CASES])
def test_prefill_then_decode_matches_transformers(tmp_path: Path, case: tuple[str, dict[str, Any]]) -> None:
    arch, overrides = case
    path = make_checkpoint(tmp_path / "ckpt", arch, **overrides)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    runner = ModelRunner.from_checkpoint(path, CacheConfig(max_seqs=2, max_seq_len=64), dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, 96, (12,), generator=generator)
    continuation = torch.randint(0, 96, (6,), generator=generator)
    full = torch.cat([prompt, continuation])
    with torch.no_grad():
        expected = reference(full[None]).logits[0]  # [18, vocab]

    runner.add_sequence(7)
    got = [runner.forward([7], [prompt.tolist()]).logits]
    for token in continuation.tolist():  # decode one token at a time against the cache
        got.append(runner.forward([7], [[token]]).logits)
    actual = torch.cat(got)
    assert actual.shape == expected.shape
    assert (actual - expected).abs().max() < _tolerance(expected)


def test_moe_reports_experts_touched(tmp_path: Path) -> None:
    path = make_checkpoint(
        tmp_path / "ckpt", "MixtralForCausalLM", num_local_experts=8, num_experts_per_tok=2
    )
    runner = ModelRunner.from_checkpoint(path, CacheConfig(max_seqs=2, max_seq_len=64))
    runner.add_sequence(0)
    out = runner.forward([0], [[1]])
    assert out.experts_touched == [2, 2]  # one token, top-2, in each of the two layers
    assert out.tokens_per_expert.sum(dim=1).tolist() == [2, 2]
    out = runner.forward([0], [list(range(40))])
    assert all(2 < n <= 8 for n in out.experts_touched)
    assert out.tokens_per_expert.sum(dim=1).tolist() == [80, 80]
