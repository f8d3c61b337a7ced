"""The benchmark target's builder: a wider target with the shipped demo target's logits, in both runtimes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from bench.regime_pair import DEMO_TARGET, WideSpec, build, ensure_built, weight_bytes, wide_config
from workers.kv_cache import CacheConfig
from workers.runner import ModelRunner
from workers.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")

# The same mechanism as the default build (6144), at a width that builds and loads in a second: 2.5x the
# shipped 512, not a multiple of it, so the cyclic row copy wraps part way.
SMALL = WideSpec(intermediate_size=1280)
PROMPT = "def fibonacci(n):\n    "


@pytest.fixture(scope="module")
def wide_target(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("wide") / "demo-moe-wide", DEMO_TARGET, SMALL)


@pytest.fixture(scope="module")
def prompt_ids() -> list[int]:
    return Tokenizer(DEMO_TARGET).encode(PROMPT)


CONTINUATION = [17, 305, 42, 9]


def _ours(path: Path, prompt_ids: list[int], continuation: list[int]) -> torch.Tensor:
    """Logits [prompt + continuation, vocab]: a prefill, then one decode step per continuation token."""
    runner = ModelRunner.from_checkpoint(path, CacheConfig(max_seqs=1, max_seq_len=64), torch.float32)
    runner.add_sequence(0)
    logits = [runner.forward([0], [prompt_ids]).logits]
    logits += [runner.forward([0], [[t]]).logits for t in continuation]
    return torch.cat(logits)


def _transformers(path: Path, ids: list[int]) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def _assert_close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape
    # Only the down-projections' summation order changed: fp32 rounding, far below any logit gap.
    assert (actual - expected).abs().max() <= 1e-5 * expected.abs().max()
    assert torch.equal(actual.argmax(-1), expected.argmax(-1))


def test_wide_target_is_a_wider_mixtral(wide_target: Path) -> None:
    config = json.loads((wide_target / "config.json").read_text())
    assert config["architectures"] == ["MixtralForCausalLM"]
    assert config["intermediate_size"] == SMALL.intermediate_size
    from safetensors import safe_open

    with safe_open(str(wide_target / "model.safetensors"), framework="pt") as f:
        w1 = f.get_tensor("model.layers.2.block_sparse_moe.experts.5.w1.weight")
        w2 = f.get_tensor("model.layers.2.block_sparse_moe.experts.5.w2.weight")
    assert w1.shape == (1280, 256) and w2.shape == (256, 1280)
    assert torch.equal(w1[512:1024], w1[:512]) and torch.equal(w1[1024:], w1[:256])
    assert not w2[:, :512].eq(0).all() and w2[:, 512:].eq(0).all()
    assert (wide_target / "README.md").read_text().startswith("# demo-moe-wide")
    assert (wide_target / "tokenizer.json").read_bytes() == (DEMO_TARGET / "tokenizer.json").read_bytes()


@pytest.fixture(scope="module")
def ours_wide(wide_target: Path, prompt_ids: list[int]) -> torch.Tensor:
    return _ours(wide_target, prompt_ids, CONTINUATION)


def test_logits_equal_shipped_target_in_our_runtime(ours_wide: torch.Tensor, prompt_ids: list[int]) -> None:
    _assert_close(ours_wide, _ours(DEMO_TARGET, prompt_ids, CONTINUATION))


def test_logits_equal_shipped_target_in_transformers(
    wide_target: Path, prompt_ids: list[int], ours_wide: torch.Tensor
) -> None:
    ids = prompt_ids + CONTINUATION
    actual = _transformers(wide_target, ids)
    _assert_close(actual, _transformers(DEMO_TARGET, ids))
    _assert_close(ours_wide, actual)  # and the two runtimes agree on the wide target


def test_default_build_is_memory_bound_sized() -> None:
    """The default width gives >= 300 MB of bf16 weights, >= 90% in routed experts (from the config)."""
    source = json.loads((DEMO_TARGET / "config.json").read_text())
    assert source["dtype"] == "bfloat16"
    shipped, wide = weight_bytes(source), weight_bytes(wide_config(source, WideSpec()))
    assert shipped.total == 2 * 15_476_992  # the shipped card's parameter count
    assert wide.total >= 300e6 and wide.routed_share >= 0.9
    assert wide.total - wide.routed_experts == shipped.total - shipped.routed_experts
    # The draft's whole weights are at most a tenth of what one decode token of the target reads.
    assert (
        DEMO_TARGET.parent / "demo-draft" / "model.safetensors"
    ).stat().st_size <= 0.1 * wide.active_per_token


def test_ensure_built_caches_and_rebuilds(tmp_path: Path) -> None:
    out = tmp_path / "wide"
    ensure_built(out, DEMO_TARGET, WideSpec(intermediate_size=768))
    first = (out / "model.safetensors").stat().st_mtime_ns
    ensure_built(out, DEMO_TARGET, WideSpec(intermediate_size=768))
    assert (out / "model.safetensors").stat().st_mtime_ns == first  # current: reused
    ensure_built(out, DEMO_TARGET, WideSpec(intermediate_size=1024))  # another width: rebuilt
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == 1024


def test_narrowing_is_refused() -> None:
    source = json.loads((DEMO_TARGET / "config.json").read_text())
    with pytest.raises(ValueError, match="only adds neurons"):
        wide_config(source, WideSpec(intermediate_size=256))
