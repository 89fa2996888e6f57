import itertools
import random
import re

import pytest

from kvpass.data import corpus


class _Chars:
    """A lossless tokenizer: one id per character."""

    def __call__(self, text, add_special_tokens=False):
        return type("E", (), {"input_ids": [ord(c) for c in text]})()

    def apply_chat_template(self, chat, tokenize=False):
        return "".join(f"<{m['role']}>{m['content']}</>" for m in chat)


def _text(ids):
    return "".join(map(chr, ids))


@pytest.mark.parametrize("kind", list(corpus.RETRIEVAL))
def test_retrieval_chats_plant_what_their_answer_retrieves(kind):
    seed = random.randrange(1 << 30)
    ids, answer = corpus.RETRIEVAL[kind](_Chars(), 3000, random.Random(seed))
    assert len(ids) <= 3000 and 0 < answer < 120
    text, reply = _text(ids), _text(ids[-answer:])
    prompt = text[: text.rindex("<assistant>")]
    items = re.findall(r"\d{6}-[A-Z]|[A-Z][a-z]+", reply.removesuffix(".</>"))
    assert items, reply
    for item in items:  # every retrieved item is in the prompt: planted in the context
        assert item in prompt, (kind, seed, item)
    if kind == "tallies":
        counts = {name: prompt.count(f": {name}.") for name in corpus.NAMES}
        assert len(items) == 3 and min(counts[n] for n in items) > max(c for n, c in counts.items() if n not in items)


def test_samples_alternate_documentation_and_each_retrieval_kind_in_turn():
    kinds = ("shelves", "relays")
    got = list(itertools.islice(corpus.samples(_Chars(), 2000, seed=3, retrieval=kinds), 6))
    assert [a > 0 for _, a in got] == [False, True] * 3
    assert "shelf" in _text(got[1][0]) and "message" in _text(got[3][0]) and "shelf" in _text(got[5][0])
    assert got == list(itertools.islice(corpus.samples(_Chars(), 2000, seed=3, retrieval=kinds), 6))
    with pytest.raises(ValueError, match="unknown retrieval samples \\['ledgers'\\]"):
        next(corpus.samples(_Chars(), 2000, retrieval=("ledgers",)))
