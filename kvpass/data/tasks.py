"""Long-context tasks in the style of RULER (Hsieh et al., arXiv 2404.06654), generated locally from
a seed: the answers are planted in the context, so nothing needs downloading and every sample can
be checked and reproduced.

- ``niah_single``: one "special magic number" for a key, hidden in text; asked for.
- ``niah_multikey``: four keys with a number each; one of them is asked for.
- ``niah_multivalue``: four numbers for the same key; all are asked for.
- ``vt`` (variable tracking): ``VAR A = 12345``, then ``VAR B = VAR A`` and so on, scattered in
  the text; asked which variables hold the value.
- ``cwe`` (common words): a numbered list of words in which ten appear far more often; asked for them.
- ``fwe`` (frequent words): coded text drawn from a Zipf distribution; asked for the three most frequent.
- ``passkey``: the classic pass key in repeated filler (:mod:`kvpass.data.passkey`).

The haystack is the CPython documentation shipped with Python (``pydoc_data.topics``). Lengths
are in tokens of the tokenizer given; a generated context is within a few percent of the target.
"""

from __future__ import annotations

import itertools
import random
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache


@dataclass
class Sample:
    task: str
    context: str  # the long text, answers planted in it
    question: str  # asked after the context
    answers: list[str]  # every one should appear in the model's answer
    seed: int


@cache
def _sentences() -> tuple[str, ...]:
    from pydoc_data.topics import topics

    text = " ".join(topics[name] for name in sorted(topics))
    text = re.sub(r"\s+", " ", text)
    return tuple(s.strip() + "." for s in text.split(". ") if 40 <= len(s) <= 250)


def _haystack(rng: random.Random, n: int) -> list[str]:
    """``n`` consecutive documentation sentences from a random starting point."""
    s = _sentences()
    start = rng.randrange(len(s))
    return [s[(start + i) % len(s)] for i in range(n)]


def _number(rng: random.Random) -> str:
    return str(rng.randint(1_000_000, 9_999_999))


def _word(rng: random.Random, syllables: int = 3) -> str:
    return "".join(rng.choice("bdfgklmnprstvz") + rng.choice("aeiou") for _ in range(syllables))


def _words(rng: random.Random, n: int) -> list[str]:
    out: list[str] = []
    while len(out) < n:
        w = _word(rng)
        if w not in out:
            out.append(w)
    return out


def _plant(rng: random.Random, hay: list[str], needles: list[str]) -> str:
    """Insert each needle at a random sentence boundary, keeping the needles' order."""
    spots = sorted(rng.randrange(len(hay) + 1) for _ in needles)
    out, last = [], 0
    for spot, needle in zip(spots, needles, strict=True):
        out += [*hay[last:spot], needle]
        last = spot
    return " ".join(out + hay[last:])


def niah_single(rng: random.Random, units: int) -> tuple[str, str, list[str]]:
    key, value = _word(rng), _number(rng)
    needle = f"One of the special magic numbers for {key} is: {value}."
    question = f"What is the special magic number for {key} mentioned in the provided text? Answer with the number."
    return _plant(rng, _haystack(rng, units), [needle]), question, [value]


def niah_multikey(rng: random.Random, units: int) -> tuple[str, str, list[str]]:
    keys, values = _words(rng, 4), [_number(rng) for _ in range(4)]
    needles = [f"One of the special magic numbers for {k} is: {v}." for k, v in zip(keys, values, strict=True)]
    rng.shuffle(needles)
    i = rng.randrange(4)
    question = f"What is the special magic number for {keys[i]} mentioned in the provided text? Answer with the number."
    return _plant(rng, _haystack(rng, units), needles), question, [values[i]]


def niah_multivalue(rng: random.Random, units: int) -> tuple[str, str, list[str]]:
    key, values = _word(rng), [_number(rng) for _ in range(4)]
    needles = [f"One of the special magic numbers for {key} is: {v}." for v in values]
    question = f"What are all the special magic numbers for {key} mentioned in the provided text? List them all."
    return _plant(rng, _haystack(rng, units), needles), question, values


def vt(rng: random.Random, units: int) -> tuple[str, str, list[str]]:
    names = [w.upper()[:5] for w in _words(rng, 5)]
    value = str(rng.randint(10000, 99999))
    chain = [f"VAR {names[0]} = {value}."] + [f"VAR {b} = VAR {a}." for a, b in itertools.pairwise(names)]
    question = f"Find all variables that are assigned the value {value} in the text above. Answer with their names."
    return _plant(rng, _haystack(rng, units), chain), question, names


def cwe(rng: random.Random, units: int) -> tuple[str, str, list[str]]:
    vocab = _words(rng, 10 + units)
    common, rare = vocab[:10], vocab[10:]
    words = [w for w in common for _ in range(max(4, units // 12))] + rare
    rng.shuffle(words)
    listing = " ".join(f"{i + 1}. {w}" for i, w in enumerate(words))
    question = "What are the 10 most common words in the numbered list above? Answer with the words."
    return listing, question, common


def fwe(rng: random.Random, units: int) -> tuple[str, str, list[str]]:
    vocab = _words(rng, 40)
    weights = [1 / (i + 1) ** 2 for i in range(len(vocab))]  # Zipf, alpha 2
    n = 6 * units
    while True:
        words = rng.choices(vocab, weights, k=n)
        top = Counter(words).most_common(4)
        if top[2][1] > top[3][1]:  # the top three are well defined
            break
    question = "What are the three most frequently appearing coded words in the text above? Answer with the words."
    return " ".join(words) + ".", question, [w for w, _ in top[:3]]


def passkey(rng: random.Random, units: int) -> tuple[str, str, list[str]]:
    from kvpass.data.passkey import FILLER, QUESTION, needle

    key = str(rng.randint(10000, 99999))
    at = rng.randrange(units + 1)
    return FILLER * at + needle(key) + FILLER * (units - at), QUESTION, [key]


def documentation(tokenizer, tokens: int, seed: int) -> str:
    """About ``tokens`` tokens of running documentation text (for perplexity), from a seeded start."""
    rng = random.Random(f"perplexity/{seed}")
    units = max(1, tokens // 20)
    for _ in range(6):
        text = " ".join(_haystack(random.Random(rng.random()), units))
        n = len(tokenizer(text, add_special_tokens=False).input_ids)
        if n >= tokens:
            return text
        units = int(units * tokens / n) + 2
    raise ValueError(f"could not make {tokens} tokens of text")


TASKS: dict[str, Callable[[random.Random, int], tuple[str, str, list[str]]]] = {
    "niah_single": niah_single,
    "niah_multikey": niah_multikey,
    "niah_multivalue": niah_multivalue,
    "vt": vt,
    "cwe": cwe,
    "fwe": fwe,
    "passkey": passkey,
}


def make(task: str, tokenizer, tokens: int, seed: int) -> Sample:
    """A sample of ``task`` whose context is about ``tokens`` tokens long, reproducible from ``seed``."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if tokens < 64:
        raise ValueError(f"a context of {tokens} tokens is too short for a long-context task")
    units, best = 8, None
    for _ in range(8):  # grow or shrink the number of sentences / words until the length fits
        context, question, answers = TASKS[task](random.Random(f"{task}/{seed}"), units)
        n = len(tokenizer(context, add_special_tokens=False).input_ids)
        if best is None or abs(n - tokens) < best[0]:
            best = (abs(n - tokens), Sample(task, context, question, answers, seed))
        if abs(n - tokens) <= 0.02 * tokens:
            break
        units = (
            max(1, round(units * tokens / n)) if round(units * tokens / n) != units else units + (n < tokens) * 2 - 1
        )
    return best[1]
