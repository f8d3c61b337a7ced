"""The shipped demo pair: loads unchanged in transformers with equal logits, and generates with speculation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from policy.baselines import OffChooser, StaticChooser
from workers.drafter import Drafter
from workers.engine import SpecEngine
from workers.kv_cache import CacheConfig
from workers.runner import ModelRunner
from workers.sampling import SamplingParams
from workers.target import Target
from workers.tokenizer import Tokenizer

transformers = pytest.importorskip("transformers")
MODELS = Path(__file__).resolve().parents[2] / "models"
PROMPTS = Path(__file__).resolve().parents[2] / "bench" / "prompts"


@pytest.mark.parametrize("name", ["demo-moe", "demo-draft"])
def test_demo_checkpoint_matches_transformers(name: str) -> None:
    path = MODELS / name
    tokenizer = Tokenizer(path)
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    prompt = json.loads((PROMPTS / "code.jsonl").read_text().splitlines()[0])["prompt"]  # whole, ~100 tokens
    ids = tokenizer.encode(prompt)
    assert ids[1:] == reference_tokenizer(prompt, add_special_tokens=False)["input_ids"]
    reference = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        expected = reference(torch.tensor([ids])).logits[0]
    runner = ModelRunner.from_checkpoint(path, CacheConfig(2, 512), dtype=torch.float32)
    runner.add_sequence(0)
    actual = runner.forward([0], [ids]).logits
    assert actual.shape == expected.shape  # one row per prompt position; the subtraction would broadcast
    assert (actual - expected).abs().max() < 1e-4 * max(1.0, float(expected.abs().max()))


def test_the_shipped_pair_generates_with_speculation() -> None:
    tokenizer = Tokenizer(MODELS / "demo-moe")
    cache = CacheConfig(4, 256)
    target = Target(ModelRunner.from_checkpoint(MODELS / "demo-moe", cache, dtype=torch.float32))
    drafter = Drafter(ModelRunner.from_checkpoint(MODELS / "demo-draft", cache, dtype=torch.float32))
    prompts = [tokenizer.encode("def add(a, b):\n"), tokenizer.encode("import os\n")]
    greedy = SamplingParams(temperature=0.0, max_tokens=16)
    plain = SpecEngine(target, None, OffChooser(), tokenizer=tokenizer).generate(prompts, greedy)
    engine = SpecEngine(target, drafter, StaticChooser(3), tokenizer=tokenizer)
    assert engine.generate(prompts, greedy) == plain
    assert all(len(out) >= 1 for out in plain)
