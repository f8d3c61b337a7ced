"""The demo pair's data (deterministic split, held-out prompts) and the shipped checkpoints (tokenizer, load).

No training here: the data tests read the stdlib and bench/prompts; the checkpoint tests load models/
(logits against transformers: test_demo_models.py).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from jinja2.sandbox import ImmutableSandboxedEnvironment

from training import corpus, synthetic
from training.prompts import normalize, read_prompt_set
from training.split import is_heldout

REPO = Path(__file__).resolve().parents[2]
PROMPTS = REPO / "bench" / "prompts"
TARGET, DRAFT = REPO / "models" / "demo-moe", REPO / "models" / "demo-draft"


def test_split_is_a_fixed_function_of_the_name() -> None:
    # Pinned: changing the hash would silently move held-out prompts into training.
    assert [is_heldout(k) for k in ("bisect.py", "copy.py", "os.py", "json/decoder.py")] == [1, 1, 0, 0]
    assert is_heldout("pydoc_data/topics.py::for") and not is_heldout("name:Ada")


def test_stdlib_split_is_deterministic_and_disjoint() -> None:
    root = corpus.stdlib_root()
    files = corpus.source_files(root, (".py",))
    assert files == corpus.source_files(root, (".py",)) and len(files) > 100
    train, heldout = corpus.split_sources(files, False), corpus.split_sources(files, True)
    assert not set(train) & set(heldout) and sorted(train + heldout) == files
    assert 0.02 < len(heldout) / len(files) < 0.15
    assert not any(part in corpus.SKIPPED_DIRS for f in files for part in f.split("/")[:-1])


def test_synthetic_text_is_deterministic_and_matches_the_chat_template() -> None:
    assert synthetic.training_documents(20, seed=0) == synthetic.training_documents(20, seed=0)
    assert synthetic.training_documents(5, seed=0) != synthetic.training_documents(5, seed=1)
    messages = [("user", "Compute 2 + 2."), ("assistant", "2 + 2 = 4"), ("user", "Compute 3 + 3.")]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # as transformers renders
    rendered = env.from_string(synthetic.CHAT_TEMPLATE).render(
        messages=[{"role": r, "content": c} for r, c in messages],
        add_generation_prompt=True,
        bos_token=synthetic.BOS,
        eos_token=synthetic.EOS,
    )
    assert rendered == synthetic.render_chat(messages, add_generation_prompt=True)
    assert rendered.endswith("<|user|>\nCompute 3 + 3.\n<|assistant|>\n")


def _prompt_sets() -> dict[str, list]:
    return {
        name: read_prompt_set(PROMPTS / f"{name}.jsonl") for name in ("code", "prose", "synthetic", "mixed")
    }


def test_prompt_sets_have_the_documented_shape() -> None:
    sets = _prompt_sets()
    for name, prompts in sets.items():
        assert 64 <= len(prompts) <= 128, name
        assert len({p.prompt for p in prompts}) == len(prompts), f"duplicate prompts in {name}"
        if name != "mixed":
            assert {p.workload for p in prompts} == {name}
    third = len(sets["mixed"]) // 3
    expected = [p for t in zip(sets["code"], sets["prose"], sets["synthetic"], strict=False) for p in t]
    assert sets["mixed"] == expected[: 3 * third]


def test_code_and_prose_prompts_never_appear_in_training_text() -> None:
    root = corpus.stdlib_root()
    texts = [
        corpus.read_text(root, rel)
        for rel in corpus.split_sources(corpus.source_files(root, (".py",)), False)
    ]
    texts += [corpus.read_text(root, rel) for rel in corpus.split_sources(corpus.source_files(root, (".txt", ".rst")), False)]  # fmt: skip
    texts += [t for k, t in corpus.pydoc_topics().items() if not is_heldout(f"pydoc_data/topics.py::{k}")]
    training = "\n".join(normalize(t) for t in texts)  # docstrings are substrings of their files, normalised
    sets = _prompt_sets()
    for prompt in sets["code"] + sets["prose"]:
        assert is_heldout(prompt.source), prompt.source
        assert normalize(prompt.prompt) not in training, prompt.prompt[:80]


def test_synthetic_prompts_use_only_held_out_names_and_problems() -> None:
    for prompt in _prompt_sets()["synthetic"]:
        names = re.findall(r"Name: (\w+) ", prompt.prompt)
        problems = re.findall(r"Compute (.+?)\.\n", prompt.prompt)
        assert names or problems
        assert all(is_heldout(f"name:{n}") for n in names) and all(is_heldout(f"math:{p}") for p in problems)
    training = "".join(synthetic.training_documents(2000, seed=0))
    heldout_names = [n for n in synthetic.FIRST_NAMES if is_heldout(f"name:{n}")]
    assert heldout_names and not any(f"Name: {n} " in training for n in heldout_names)


# -- the shipped checkpoints ---------------------------------------------------------------------------------


def test_shipped_tokenizer_round_trips_every_held_out_prompt() -> None:
    from workers.tokenizer import Tokenizer

    tokenizer = Tokenizer(TARGET)
    assert (TARGET / "tokenizer.json").read_bytes() == (DRAFT / "tokenizer.json").read_bytes()
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.vocab_size) == (0, 1, 4096)
    for prompts in _prompt_sets().values():
        for p in prompts:
            ids = tokenizer.encode(p.prompt, add_bos=False)
            assert tokenizer.decode(ids, skip_special_tokens=False) == p.prompt
            assert 16 <= len(ids) <= 256


def test_shipped_pair_loads_in_transformers_and_generates() -> None:
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(TARGET)
    target = transformers.AutoModelForCausalLM.from_pretrained(TARGET).eval()
    draft = transformers.AutoModelForCausalLM.from_pretrained(DRAFT).eval()
    assert type(target).__name__ == "MixtralForCausalLM" and type(draft).__name__ == "LlamaForCausalLM"
    assert target.config.vocab_size == draft.config.vocab_size == len(tokenizer)
    assert json.loads((TARGET / "config.json").read_text())["dtype"] == "bfloat16"
    ids = tokenizer("def fibonacci(n):\n", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == tokenizer.bos_token_id == 0
    for model in (target, draft):
        out = model.generate(ids, max_new_tokens=8, do_sample=False)
        assert out.shape[1] == ids.shape[1] + 8 or out[0, -1].item() == tokenizer.eos_token_id
