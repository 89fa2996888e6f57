"""Training text for gates, made locally from seeds: no download, nothing shared with the evaluation.

- ``documentation``: running text of the CPython documentation (``pydoc_data``).
- retrieval chats: facts scattered in documentation text, then a question and its answer.
  ``lockers``: one of four facts ("the teal locker of Mira holds 482193-Q") is asked for;
  ``shelves``: every code put on one shelf (multi-value); ``relays``: everyone a message passed
  through (a chain); ``tallies``: the three names that come back most often in a visit log
  (counting). Their templates, names and number formats differ from every evaluation task
  (:mod:`kvpass.data.tasks`), and their seeds have their own namespace.

Each sample is ``(ids, answer)``: the token ids and how many of the last ones are an answer that
needs a distant fact (0 for plain text), so training can weigh those positions more.
"""

from __future__ import annotations

import itertools
import random
from collections import Counter
from collections.abc import Iterator

from kvpass.data.tasks import _haystack, _plant

COLOURS = ("teal", "amber", "crimson", "olive", "violet", "silver", "indigo", "coral")
NAMES = ("Mira", "Tobias", "Ines", "Kofi", "Anouk", "Ravi", "Lena", "Oskar", "Yara", "Emeka", "Sora", "Pavel")


def documentation(tokenizer, tokens: int, rng: random.Random) -> tuple[list[int], int]:
    """``tokens`` token ids of documentation text from a random start."""
    ids = tokenizer(" ".join(_haystack(rng, tokens // 12)), add_special_tokens=False).input_ids
    return ids[:tokens], 0


def _chat(tokenizer, tokens: int, build) -> tuple[list[int], int]:
    """A chat of at most ``tokens`` ids from ``build(units) -> (context, question, reply, answer)``,
    ``answer`` being where the reply's retrieved part starts; shrinks the context until it fits."""
    units = max(4, tokens // 30)
    while True:
        context, question, reply, start = build(units)
        chat = [{"role": "user", "content": f"{context}\n\n{question}"}, {"role": "assistant", "content": reply}]
        text = tokenizer.apply_chat_template(chat, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False).input_ids
        if len(ids) <= tokens or units == 4:
            answer = len(tokenizer(text[text.rindex(start) :], add_special_tokens=False).input_ids)
            return ids[-tokens:], answer
        units = max(4, int(units * tokens / len(ids)) - 1)


def _planted(tokenizer, tokens: int, rng: random.Random, facts, question: str, reply: str, start: str):
    """A :func:`_chat` whose context is documentation text with ``facts`` planted in it."""
    return _chat(tokenizer, tokens, lambda units: (_plant(rng, _haystack(rng, units), facts), question, reply, start))


def _code(rng: random.Random) -> str:
    return f"{rng.randint(100000, 999999)}-{rng.choice('ABCDEFGHJKLMNPQRSTUVWXYZ')}"


def lockers(tokenizer, tokens: int, rng: random.Random) -> tuple[list[int], int]:
    """Facts ("the teal locker of Mira holds 482193-Q") in documentation text; one is asked for."""
    keys = rng.sample([(c, n) for c in COLOURS for n in NAMES], 4)
    codes = [_code(rng) for _ in keys]
    facts = [f"Remember: the {c} locker of {n} holds {code}." for (c, n), code in zip(keys, codes, strict=True)]
    c, n = keys[asked := rng.randrange(len(keys))]
    question = f"What does the {c} locker of {n} hold?"
    reply = f"The {c} locker of {n} holds {codes[asked]}."
    return _planted(tokenizer, tokens, rng, facts, question, reply, codes[asked])


def shelves(tokenizer, tokens: int, rng: random.Random) -> tuple[list[int], int]:
    """Several items put on one shelf (and one on another) in documentation text; all are asked for."""
    (c, n), (c2, n2) = rng.sample([(c, n) for c in COLOURS for n in NAMES], 2)
    items = [_code(rng) for _ in range(rng.randint(2, 5))]
    facts = [f"Note: {code} was put on the {c} shelf of {n}." for code in items]
    facts.insert(rng.randrange(len(facts) + 1), f"Note: {_code(rng)} was put on the {c2} shelf of {n2}.")
    question = f"Which codes were put on the {c} shelf of {n}? List every one."
    reply = f"On the {c} shelf of {n}: {', '.join(items)}."
    return _planted(tokenizer, tokens, rng, facts, question, reply, items[0])


def relays(tokenizer, tokens: int, rng: random.Random) -> tuple[list[int], int]:
    """A message passed along people ("Mira passed the message to Ravi") in documentation text; who
    had it is asked for (a chain, as in variable tracking, with other words)."""
    people = rng.sample(NAMES, rng.randint(3, 5))
    word = rng.choice(["harbor", "lantern", "meadow", "quartz", "saffron", "tundra", "violet", "walnut"])
    facts = [f"Log: {people[0]} received the message {word}."]
    facts += [f"Log: {a} passed the message to {b}." for a, b in itertools.pairwise(people)]
    question = f"Who had the message {word} at some point? Name everyone."
    reply = f"The message {word} went through {', '.join(people)}."
    return _planted(tokenizer, tokens, rng, facts, question, reply, people[0])


def tallies(tokenizer, tokens: int, rng: random.Random) -> tuple[list[int], int]:
    """A log of visits in which a few names come back far more often; the most frequent are asked for."""
    frequent = rng.sample(NAMES, 3)
    others = [n for n in NAMES if n not in frequent]

    def build(units: int):
        rare = rng.choices(others, k=3 * units)
        often = max(Counter(rare).values()) + max(2, units // 4)  # clearly more often than any other
        visits = [n for n in frequent for _ in range(often)] + rare
        rng.shuffle(visits)
        log = " ".join(f"Visit {i + 1}: {name}." for i, name in enumerate(visits))
        return log, "Which three visitors came most often?", f"Most often: {', '.join(frequent)}.", frequent[0]

    return _chat(tokenizer, tokens, build)


RETRIEVAL = {"lockers": lockers, "shelves": shelves, "relays": relays, "tallies": tallies}


def samples(
    tokenizer, tokens: int, seed: int = 0, retrieval: tuple[str, ...] = ("lockers",)
) -> Iterator[tuple[list[int], int]]:
    """Endless training sequences, reproducible from ``seed``: documentation text, then a chat of
    each ``retrieval`` kind in turn, and so on."""
    if unknown := [k for k in retrieval if k not in RETRIEVAL]:
        raise ValueError(f"unknown retrieval samples {unknown}; choose from {', '.join(RETRIEVAL)}")
    for i in range(1 << 62):
        rng = random.Random(f"gate-train/{seed}/{i}")
        kind = documentation if i % 2 == 0 else RETRIEVAL[retrieval[(i // 2) % len(retrieval)]]
        yield kind(tokenizer, tokens, rng)
