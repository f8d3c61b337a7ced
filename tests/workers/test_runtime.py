"""Ragged batches, rollback, capacity limits, greedy generation and checkpoint errors of the runtime."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.workers.checkpoints import make_checkpoint
from workers.batch import BatchLayout
from workers.checkpoint import load_model
from workers.kv_cache import CacheCapacityError, CacheConfig, KVCache
from workers.runner import ModelRunner

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def moe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("moe"), "Qwen2MoeForCausalLM")


def _runner(path: Path, max_seqs: int = 8, max_seq_len: int = 128) -> ModelRunner:
    return ModelRunner.from_checkpoint(path, CacheConfig(max_seqs, max_seq_len), dtype=torch.float32)


def _tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 96, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@pytest.mark.parametrize(
    ("slots", "order", "in_place"),
    [
        ([0, 1, 2, 3], [0, 1, 2, 3], True),  # dense: attention reads the cache in place
        ([0, 1, 2, 3], [3, 1, 0, 2], True),  # dense, batch order != slot order
        ([0, 2, 4, 6], [0, 1, 2, 3], True),  # holes: idle rows in the range
        ([0, 5, 10, 15], [2, 0, 3, 1], False),  # sparse: keys gathered per sequence
    ],
)
def test_ragged_batch_equals_each_sequence_alone(
    moe_path: Path, slots: list[int], order: list[int], in_place: bool
) -> None:
    prompts = [_tokens(n, seed) for seed, n in enumerate([3, 17, 9, 1])]
    news = [_tokens(n, 100 + seed) for seed, n in enumerate([1, 5, 2, 4])]  # decode, verify, ... shapes

    alone = []
    for prompt, new in zip(prompts, news, strict=True):
        runner = _runner(moe_path)
        runner.add_sequence(0)
        runner.forward([0], [prompt])
        alone.append(runner.forward([0], [new]).logits)

    batched = _runner(moe_path, max_seqs=16)
    for placeholder in range(16):  # occupy every slot, then free the ones the batch should get
        batched.add_sequence(100 + placeholder)
    for slot in slots:
        batched.free(100 + slot)
    for i in range(4):
        batched.add_sequence(10 + i)
    assert [batched.cache.slot(10 + i) for i in range(4)] == slots
    layout = BatchLayout.build([slots[i] for i in order], [0] * 4, [1] * 4)
    assert (layout.key_start is not None) == in_place

    ids = [10 + i for i in order]
    batched.forward(ids, [prompts[i] for i in order])  # ragged prefill
    together = batched.forward(ids, [news[i] for i in order]).logits  # ragged append
    assert torch.allclose(together, torch.cat([alone[i] for i in order]), atol=1e-5)
    last = batched.forward([13, 11], [[5], [6, 7]], logits_for="last").logits
    assert last.shape == (2, 96) and torch.isfinite(last).all()


def test_rollback_equals_never_appending(moe_path: Path) -> None:
    prompt, rejected, accepted = _tokens(10, 1), _tokens(5, 2), _tokens(3, 3)
    runner = _runner(moe_path)
    runner.add_sequence(0)
    runner.forward([0], [prompt])
    runner.forward([0], [rejected])  # K+1 = 5 tokens, then all but the first rejected
    runner.rollback(0, 4)
    assert runner.seq_len(0) == 11
    after_rollback = runner.forward([0], [accepted]).logits

    clean = _runner(moe_path)
    clean.add_sequence(0)
    clean.forward([0], [prompt + rejected[:1]])
    assert torch.allclose(after_rollback, clean.forward([0], [accepted]).logits, atol=1e-5)


def test_capacity_is_enforced_with_clear_errors(moe_path: Path) -> None:
    runner = _runner(moe_path, max_seqs=2, max_seq_len=16)
    runner.add_sequence(0)
    runner.add_sequence(1)
    with pytest.raises(CacheCapacityError, match="sequence slots"):
        runner.add_sequence(2)
    with pytest.raises(CacheCapacityError, match="max_seq_len is 16"):
        runner.forward([0], [_tokens(17, 0)])
    assert runner.seq_len(0) == 0  # the failed forward changed nothing
    runner.free(1)
    runner.add_sequence(2)  # a freed slot is reused
    assert runner.cache.num_free_slots == 0


@pytest.mark.skipif(not Path("/proc/meminfo").exists(), reason="host memory is read on Linux")
def test_a_cache_larger_than_free_memory_is_refused_before_allocating() -> None:
    config = CacheConfig(max_seqs=4096, max_seq_len=1 << 20)  # 2 x 4096 x 2^20 x 2 layers x 128 x 4 B = 8 TiB
    with pytest.raises(ValueError, match=r"KV cache \(4096 sequences x 1048576 tokens x 2 layers\) needs"):
        KVCache(config, num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32)
    KVCache(CacheConfig(4, 64), num_layers=2, num_kv_heads=2, head_dim=64, dtype=torch.float32)  # fits


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "LlamaForCausalLM"])
def test_greedy_generation_equals_transformers_generate(tmp_path: Path, arch: str) -> None:
    path = make_checkpoint(tmp_path / "ckpt", arch)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompt = _tokens(8, 5)
    expected = reference.generate(
        torch.tensor([prompt]),
        max_new_tokens=32,
        do_sample=False,
        min_new_tokens=32,
        pad_token_id=0,
        eos_token_id=None,
    )[0, len(prompt) :].tolist()

    runner = _runner(path)
    runner.add_sequence(0)
    logits = runner.forward([0], [prompt], logits_for="last").logits
    generated: list[int] = []
    for _ in range(32):
        generated.append(int(logits[-1].argmax()))
        logits = runner.forward([0], [generated[-1:]]).logits
    assert generated == expected


@pytest.mark.parametrize("arch", ["MixtralForCausalLM", "Qwen3ForCausalLM"])
def test_bf16_matches_transformers_bf16(tmp_path: Path, arch: str) -> None:
    path = make_checkpoint(tmp_path / "ckpt", arch)
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    prompt = _tokens(12, 9)
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0].float()
    runner = ModelRunner.from_checkpoint(path, CacheConfig(2, 32), dtype=torch.bfloat16)
    runner.add_sequence(0)
    actual = runner.forward([0], [prompt]).logits
    assert actual.dtype == torch.float32  # logits are always returned in fp32
    # bf16 rounding can flip a near-tie in the router for a token, so compare per position: almost all
    # positions must agree to bf16 precision.
    row_error = (actual - expected).abs().amax(dim=1) / expected.abs().max()
    print("bf16 per-position relative error", row_error)
    assert float((row_error < 0.02).float().mean()) >= 0.9


def _copy_checkpoint(src: Path, dst: Path) -> Path:
    dst.mkdir()
    for file in src.iterdir():
        (dst / file.name).write_bytes(file.read_bytes())
    return dst


def test_missing_tensor_is_named(moe_path: Path, tmp_path: Path) -> None:
    bad = _copy_checkpoint(moe_path, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"missing tensors: .*model\.layers\.1\.self_attn\.k_proj\.weight"):
        load_model(bad)


def test_missing_expert_is_named(moe_path: Path, tmp_path: Path) -> None:
    bad = _copy_checkpoint(moe_path, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.0.mlp.experts.3.up_proj.weight"]
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.3\.up_proj\.weight"):
        load_model(bad)


def test_misshaped_tensor_is_named(moe_path: Path, tmp_path: Path) -> None:
    bad = _copy_checkpoint(moe_path, tmp_path / "bad")
    tensors = load_file(bad / "model.safetensors")
    tensors["model.layers.0.mlp.gate.weight"] = torch.zeros(5, 64)
    save_file(tensors, bad / "model.safetensors")
    with pytest.raises(
        ValueError, match=r"'model\.layers\.0\.mlp\.gate\.weight' has shape \(5, 64\), expected \(6, 64\)"
    ):
        load_model(bad)


def test_unknown_architecture_is_refused(moe_path: Path, tmp_path: Path) -> None:
    bad = _copy_checkpoint(moe_path, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["architectures"] = ["GPT2LMHeadModel"]
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unknown architecture 'GPT2LMHeadModel'"):
        load_model(bad)


def test_sharded_checkpoint_loads(tmp_path: Path) -> None:
    path = tmp_path / "sharded"
    import transformers as tf

    config = tf.MixtralConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
    )
    model = tf.MixtralForCausalLM(config).eval()
    model.save_pretrained(path, max_shard_size="100KB")
    assert (path / "model.safetensors.index.json").is_file()
    runner = _runner(path)
    runner.add_sequence(0)
    ids = _tokens(6, 0)
    with torch.no_grad():
        expected = model(torch.tensor([ids])).logits[0]
    assert torch.allclose(runner.forward([0], [ids]).logits, expected, atol=1e-5)
