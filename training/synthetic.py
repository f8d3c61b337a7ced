"""Synthetic chat text for the demo pair: record-to-JSON extraction and integer arithmetic.

Every conversation is rendered with the same chat format as the tokenizer's `chat_template`
(`render_chat`). Held-out conversations use only held-out first names and held-out arithmetic problems
(`is_heldout` on the name or the problem), so no held-out record or problem is ever trained on.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

from training.split import is_heldout

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
ROLE_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>"}
SPECIAL_TOKENS = [BOS, EOS, PAD, *ROLE_TOKENS.values()]  # ids 0..5, in this order

# The Jinja twin of `render_chat`; tokenizer.py writes it into tokenizer_config.json.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{{ '\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


FIRST_NAMES = _words("""
Ada Alan Grace Linus Guido Barbara Donald Edsger Margaret Dennis Ken Bjarne John Tim Vint Frances
Niklaus Leslie Radia Sophie Katherine Dorothy Mary Annie Hedy Claude Richard Larry Sergey Susan
Anita Shafi Silvio Judea Yoshua Geoffrey Yann Fei Andrew Daphne Cynthia Ivan Jean Marie Pierre Lucia
Mateo Sofia Hugo Elena Omar Amara Kenji Yuki Aiko Ravi Priya Arjun Meera Chen Wei Li Mei Olga Dmitri
Anya Boris Ingrid Lars Freya Nils Astrid Pablo Carmen Diego Rosa Luis Ana Jose Paolo Giulia Marco
Chiara Ahmed Fatima Layla Youssef Zara Kofi Ama Kwame Abena Tariq Noor Hana Emil Clara Felix Greta
Oskar Lena Jonas Mila Theo Nora Iris Owen Ruby Felipe Ines Tomas Eva Adam Maya
""")
LAST_NAMES = _words("""
Lovelace Turing Hopper Torvalds Rossum Liskov Knuth Dijkstra Hamilton Ritchie Thompson Stroustrup
McCarthy Berners Cerf Allen Wirth Lamport Perlman Wilson Johnson Vaughan Jackson Easley Lamarr
Shannon Stallman Page Brin Kare Borg Goldwasser Micali Pearl Bengio Hinton LeCun Ng Koller Dwork
Sutherland Bartik Curie Laurent Garcia Rossi Novak Kim Tanaka Sato Patel Singh Wang Zhang Ivanova
Petrov Larsen Berg Nilsen Lopez Moreno Silva Costa Bianchi Romano Haddad Mensah Owusu Diallo Khan
Nakamura Schmidt Weber Fischer Meyer Wagner Becker Hoffmann Dubois Moreau Martin Brown Taylor
""")
CITIES = _words("""
London Paris Berlin Madrid Rome Lisbon Vienna Prague Warsaw Oslo Stockholm Helsinki Dublin Athens
Cairo Lagos Nairobi Accra Tokyo Osaka Seoul Beijing Shanghai Mumbai Delhi Dhaka Jakarta Manila
Sydney Auckland Toronto Montreal Boston Chicago Denver Seattle Austin Lima Bogota Santiago Quito
Havana Zurich Geneva Munich Hamburg Milan Naples Porto Seville Krakow Riga Tallinn Vilnius Kyiv
""")
JOBS = _words("""
engineer teacher nurse pilot chef farmer doctor lawyer artist writer baker plumber architect
designer analyst librarian musician painter scientist student translator carpenter editor mechanic
pharmacist surveyor tailor gardener
""")
OPTIONAL_FIELDS = ("age", "city", "job", "email")


def render_chat(messages: list[tuple[str, str]], add_generation_prompt: bool, add_bos: bool = True) -> str:
    """The text `CHAT_TEMPLATE` renders for `messages` (role, content); without BOS for prompt files."""
    parts = [BOS] if add_bos else []
    for role, content in messages:
        parts.append(f"{ROLE_TOKENS[role]}\n{content}{EOS if role == 'assistant' else ''}\n")
    if add_generation_prompt:
        parts.append(f"{ROLE_TOKENS['assistant']}\n")
    return "".join(parts)


@dataclass(frozen=True)
class Task:
    """One user request and the assistant's exact answer."""

    key: str  # what decides the split: the first name, or the arithmetic problem
    question: str
    answer: str


def extraction_task(rng: random.Random, first: str) -> Task:
    fields: dict[str, str | int] = {"name": f"{first} {rng.choice(LAST_NAMES)}"}
    for field in OPTIONAL_FIELDS:
        if rng.random() < 0.7:
            if field == "age":
                fields[field] = rng.randint(18, 90)
            elif field == "city":
                fields[field] = rng.choice(CITIES)
            elif field == "job":
                fields[field] = rng.choice(JOBS)
            else:
                fields[field] = f"{first.lower()}{rng.randint(1, 99)}@example.org"
    record = "; ".join(f"{field.capitalize()}: {value}" for field, value in fields.items())
    return Task(key=f"name:{first}", question=f"Extract JSON: {record}", answer=json.dumps(fields))


def arithmetic_task(rng: random.Random) -> Task:
    op = rng.choice("+-*")
    a, b = (
        (rng.randint(2, 99), rng.randint(2, 20)) if op == "*" else (rng.randint(0, 999), rng.randint(0, 999))
    )
    value = a + b if op == "+" else a - b if op == "-" else a * b
    problem = f"{a} {op} {b}"
    return Task(key=f"math:{problem}", question=f"Compute {problem}.", answer=f"{problem} = {value}")


def sample_task(rng: random.Random, heldout: bool) -> Task:
    """A task whose key is on the requested side of the split (rejection sampling)."""
    while True:
        task = extraction_task(rng, rng.choice(FIRST_NAMES)) if rng.random() < 0.6 else arithmetic_task(rng)
        if is_heldout(task.key) == heldout:
            return task


def conversation(rng: random.Random, heldout: bool, num_turns: int) -> list[tuple[str, str]]:
    messages: list[tuple[str, str]] = []
    for _ in range(num_turns):
        task = sample_task(rng, heldout)
        messages += [("user", task.question), ("assistant", task.answer)]
    return messages


def training_documents(num_documents: int, seed: int) -> list[str]:
    """Rendered training conversations (1-4 turns each), without BOS; deterministic in `seed`."""
    rng = random.Random(f"synthetic-train:{seed}")
    return [
        render_chat(conversation(rng, False, rng.randint(1, 4)), add_generation_prompt=False, add_bos=False)
        for _ in range(num_documents)
    ]


def heldout_documents(num_documents: int, seed: int) -> list[str]:
    """Held-out conversations rendered like `training_documents`, for measuring held-out loss."""
    rng = random.Random(f"synthetic-heldout-eval:{seed}")
    return [
        render_chat(conversation(rng, True, rng.randint(1, 4)), add_generation_prompt=False, add_bos=False)
        for _ in range(num_documents)
    ]


def heldout_prompts(num_prompts: int, seed: int) -> list[str]:
    """Held-out chat prompts without BOS: 1-3 solved turns, then a question and the assistant header."""
    rng = random.Random(f"synthetic-heldout:{seed}")
    prompts = []
    for _ in range(num_prompts):
        messages = conversation(rng, True, rng.randint(2, 4))
        prompts.append(render_chat(messages[:-1], add_generation_prompt=True, add_bos=False))
    return prompts
