"""The offline engine: seeds, stop tokens and strings, limits, aborts, and the tokenizer it streams with."""

from __future__ import annotations

import json
import string
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from policy.baselines import OffChooser, StaticChooser
from tests.workers.checkpoints import make_checkpoint
from workers.drafter import Drafter
from workers.engine import EngineConfig, SpecEngine
from workers.kv_cache import CacheConfig
from workers.runner import ModelRunner
from workers.sampling import SamplingParams
from workers.target import Target
from workers.tokenizer import IncrementalDetokenizer, Tokenizer

CHARS = string.printable[:96]


@pytest.fixture(scope="module")
def paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    target = make_checkpoint(tmp_path_factory.mktemp("t"), "Qwen3MoeForCausalLM")
    draft = make_checkpoint(tmp_path_factory.mktemp("d"), "Qwen3ForCausalLM", num_hidden_layers=1)
    tok = HFTokenizer(models.BPE(vocab={c: i for i, c in enumerate(CHARS)}, merges=[]))
    tok.decoder = decoders.Fuse()
    for path in (target, draft):
        tok.save(str(path / "tokenizer.json"))
    return target, draft


def _engine(paths: tuple[Path, Path], chooser: object, with_tokenizer: bool = False) -> SpecEngine:
    cache = CacheConfig(max_seqs=4, max_seq_len=64)
    target = Target(ModelRunner.from_checkpoint(paths[0], cache, dtype=torch.float32))
    drafter = Drafter(ModelRunner.from_checkpoint(paths[1], cache, dtype=torch.float32))
    tokenizer = Tokenizer(paths[0]) if with_tokenizer else None
    return SpecEngine(target, drafter, chooser, EngineConfig(max_batch_size=4), tokenizer)  # type: ignore[arg-type]


PROMPTS = [[1, 2, 3, 4], [50, 40, 30], [7] * 9]


def test_same_seed_same_output(paths: tuple[Path, Path]) -> None:
    params = [SamplingParams(temperature=1.0, top_p=0.9, seed=s, max_tokens=24) for s in (1, 2, 3)]
    first = _engine(paths, StaticChooser(3)).generate(PROMPTS, params)
    second = _engine(paths, StaticChooser(3)).generate(PROMPTS, params)
    assert first == second
    other_seed = _engine(paths, StaticChooser(3)).generate(
        PROMPTS[:1], [SamplingParams(seed=9, max_tokens=24)]
    )
    assert other_seed[0] != first[0]


def test_stop_token_ends_the_request_there(paths: tuple[Path, Path]) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=30)
    reference = _engine(paths, OffChooser()).generate(PROMPTS[:1], greedy)[0]
    stop_at = next(i for i in range(5, 30) if reference[i] not in reference[:i])
    engine = _engine(paths, StaticChooser(4))
    params = SamplingParams(temperature=0.0, max_tokens=30, stop_token_ids=(reference[stop_at],))
    assert engine.generate(PROMPTS[:1], params)[0] == reference[: stop_at + 1]
    assert engine.target.runner.cache.num_used_slots == 0


def test_stop_string_cuts_the_text(paths: tuple[Path, Path]) -> None:
    greedy = SamplingParams(temperature=0.0, max_tokens=30)
    engine = _engine(paths, OffChooser(), with_tokenizer=True)
    engine.add_request("a", PROMPTS[0], greedy)
    full = ""
    while engine.has_unfinished:
        full += "".join(o.new_text for o in engine.step())
    assert len(full) == 30  # one character per token
    stop = full[10:13]
    cut = full.find(stop)
    engine = _engine(paths, StaticChooser(3), with_tokenizer=True)
    engine.add_request("b", PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=30, stop=(stop,)))
    outputs = []
    while engine.has_unfinished:
        outputs += engine.step()
    assert "".join(o.new_text for o in outputs) == full[:cut]
    assert outputs[-1].finish_reason == "stop"


def test_max_tokens_and_usage(paths: tuple[Path, Path]) -> None:
    engine = _engine(paths, StaticChooser(5))
    outputs = engine.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True))
    assert [len(o) for o in outputs] == [7, 7, 7]


def test_abort_frees_slots(paths: tuple[Path, Path]) -> None:
    engine = _engine(paths, StaticChooser(2))
    engine.add_request("x", PROMPTS[0], SamplingParams(max_tokens=50))
    engine.add_request("y", PROMPTS[1], SamplingParams(max_tokens=50))
    engine.step()
    assert engine.abort("x") and not engine.abort("nope")
    assert engine.target.runner.cache.num_used_slots == 1
    assert engine.proposer.drafter is not None and engine.proposer.drafter.runner.cache.num_used_slots <= 1
    while engine.has_unfinished:
        engine.step()
    assert engine.target.runner.cache.num_used_slots == 0


def test_bad_requests_are_refused_clearly(paths: tuple[Path, Path]) -> None:
    engine = _engine(paths, OffChooser())
    with pytest.raises(ValueError, match="exceeds the context length 64"):
        engine.add_request("long", [1] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        engine.add_request("bad", [1, 500], SamplingParams())
    with pytest.raises(ValueError, match="prompt is empty"):
        engine.add_request("empty", [], SamplingParams())
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("nan"))
    assert not engine.has_unfinished


def test_draft_with_another_vocabulary_is_refused(paths: tuple[Path, Path], tmp_path: Path) -> None:
    other = make_checkpoint(tmp_path / "other", "LlamaForCausalLM", vocab_size=128)
    cache = CacheConfig(max_seqs=2, max_seq_len=32)
    target = Target(ModelRunner.from_checkpoint(paths[0], cache))
    with pytest.raises(ValueError, match=r"draft vocabulary \(128\) differs from the target's \(96\)"):
        SpecEngine(target, Drafter(ModelRunner.from_checkpoint(other, cache)), OffChooser())


def test_incremental_detokenizer_never_splits_a_character(tmp_path: Path) -> None:
    text = "héllo wörld, 日本語のテキスト and ünïcödé 🙂 done"
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(
        ["plain ascii words"] * 10,
        trainers.BpeTrainer(
            vocab_size=300,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=["<s>", "</s>"],
        ),
    )
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    tokenizer = Tokenizer(tmp_path)
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_token_id and tokenizer.decode(ids) == text
    detok = IncrementalDetokenizer(tokenizer, ids[:1])
    deltas = [detok.step([t]) for t in ids[1:]]
    assert "".join(deltas) == text
    assert not any("\ufffd" in d for d in deltas)
