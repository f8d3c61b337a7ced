"""Held-out prompt sets for the benchmarks and the demo: code, prose, synthetic and an interleaved mix.

    python -m training.prompts --out bench/prompts

Each line of `<workload>.jsonl` is {"prompt": ..., "workload": ..., "source": ...}. Prompts come only from
held-out sources (split.py) and are checked not to occur in any training text (whitespace-normalised);
`mixed.jsonl` interleaves the first third of each of the other three. Deterministic for a given stdlib.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

from training import corpus, synthetic

NUM_PROMPTS = 96
MIN_CHARS, MAX_CHARS = 200, 600  # about 55 to 170 tokens of code or prose
MAX_PROMPTS_PER_SOURCE = 8


@dataclass(frozen=True)
class Prompt:
    prompt: str
    workload: str  # "code", "prose" or "synthetic"
    source: str  # the held-out source it was cut from (split key), or "synthetic"


def normalize(text: str) -> str:
    return " ".join(text.split())


def code_prompts(documents: list[corpus.Document], rng: random.Random) -> list[Prompt]:
    """Beginnings of held-out `def` / `class` blocks, cut at a line end."""
    candidates = []
    for document in documents:
        lines = document.text.splitlines(keepends=True)
        starts = [
            i for i, line in enumerate(lines) if line.lstrip().startswith(("def ", "class ", "async def "))
        ]
        for i in rng.sample(starts, min(len(starts), MAX_PROMPTS_PER_SOURCE)):
            limit, text = rng.randint(MIN_CHARS, MAX_CHARS), ""
            for line in lines[i:]:
                if len(text) + len(line) > limit and len(text) >= MIN_CHARS:
                    break
                text += line
            if MIN_CHARS <= len(text) <= 2 * MAX_CHARS:
                candidates.append(Prompt(text, "code", document.source))
    return candidates


def prose_prompts(documents: list[corpus.Document], rng: random.Random) -> list[Prompt]:
    """Held-out prose from a paragraph start, cut after a word so that the continuation is more prose."""
    candidates = []
    for document in documents:
        text = document.text
        starts = [0] + [
            i + 2 for i in range(len(text) - 2) if text[i : i + 2] == "\n\n" and text[i + 2].isalpha()
        ]
        starts = [s for s in starts if len(text) - s >= MIN_CHARS + 100]
        for start in rng.sample(starts, min(len(starts), MAX_PROMPTS_PER_SOURCE)):
            cut = text.rfind(" ", start, start + rng.randint(MIN_CHARS, MAX_CHARS))
            piece = text[start:cut].rstrip()
            if len(piece) >= MIN_CHARS and corpus.letter_fraction(piece) >= corpus.MIN_LETTER_FRACTION:
                candidates.append(Prompt(piece, "prose", document.source))
    return candidates


def pick(candidates: list[Prompt], training_text: str, rng: random.Random) -> list[Prompt]:
    """NUM_PROMPTS distinct prompts absent from `training_text`, spread evenly over the sources."""
    unseen = [c for c in dict.fromkeys(candidates) if normalize(c.prompt) not in training_text]
    rng.shuffle(unseen)
    by_source: dict[str, list[Prompt]] = {}
    for prompt in unseen:
        by_source.setdefault(prompt.source, []).append(prompt)
    picked: list[Prompt] = []
    while len(picked) < NUM_PROMPTS and any(by_source.values()):
        for source in sorted(by_source):
            if by_source[source] and len(picked) < NUM_PROMPTS:
                picked.append(by_source[source].pop())
    if len(picked) < NUM_PROMPTS:
        raise ValueError(f"only {len(picked)} held-out prompts found, need {NUM_PROMPTS}")
    return picked


def build_prompt_sets(seed: int = 0) -> dict[str, list[Prompt]]:
    root = corpus.stdlib_root()
    rng = random.Random(f"prompts:{seed}")
    training = corpus.training_corpus(root, num_synthetic=0, seed=seed)
    training_text = "\n".join(normalize(d.text) for kind in ("code", "prose") for d in training[kind])
    code = pick(code_prompts(corpus.code_documents(root, heldout=True), rng), training_text, rng)
    prose = pick(prose_prompts(corpus.prose_documents(root, heldout=True), rng), training_text, rng)
    synthetic_prompts = [
        Prompt(p, "synthetic", "synthetic") for p in synthetic.heldout_prompts(NUM_PROMPTS, seed)
    ]
    third = NUM_PROMPTS // 3
    mixed = [
        p
        for triple in zip(code[:third], prose[:third], synthetic_prompts[:third], strict=True)
        for p in triple
    ]
    return {"code": code, "prose": prose, "synthetic": synthetic_prompts, "mixed": mixed}


def write_prompt_sets(sets: dict[str, list[Prompt]], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, prompts in sets.items():
        lines = (json.dumps(asdict(p), ensure_ascii=False) for p in prompts)
        (out / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")


def read_prompt_set(path: Path) -> list[Prompt]:
    lines = path.read_text(encoding="utf-8").splitlines()
    return [Prompt(**json.loads(line)) for line in lines if line.strip()]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=Path("bench/prompts"))
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    sets = build_prompt_sets(args.seed)
    write_prompt_sets(sets, args.out)
    print({name: len(prompts) for name, prompts in sets.items()})


if __name__ == "__main__":
    main()
