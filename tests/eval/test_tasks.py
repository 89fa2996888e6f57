"""Task generators: answers really are in the context, seeds reproduce, lengths hit their target."""

import pytest

from kvpass.data import tasks
from tests.eval.stub import WordTokenizer


@pytest.mark.parametrize("name", sorted(tasks.TASKS))
@pytest.mark.parametrize("tokens", [600, 2000])
def test_answers_are_planted_and_seeds_reproduce(name, tokens):
    tok = WordTokenizer()
    a, b, c = (tasks.make(name, tok, tokens, seed) for seed in (11, 11, 12))
    assert a == b  # same seed, same sample
    assert (a.context, a.answers) != (c.context, c.answers)
    assert a.answers and all(ans in a.context for ans in a.answers)
    assert a.question and a.question not in a.context
    n = len(tok(a.context).input_ids)
    assert abs(n - tokens) <= 0.05 * tokens, n


def test_task_specific_answers():
    tok = WordTokenizer()
    s = tasks.make("niah_multivalue", tok, 500, 0)
    assert len(s.answers) == 4 and len(set(s.answers)) == 4 and s.context.count(s.answers[0]) == 1
    s = tasks.make("niah_multikey", tok, 500, 0)
    assert s.context.count("special magic numbers for") == 4
    s = tasks.make("vt", tok, 500, 0)
    value = s.question.split("value ")[1].split()[0]
    assert f"VAR {s.answers[0]} = {value}." in s.context
    for a, b in zip(s.answers, s.answers[1:], strict=False):
        assert f"VAR {b} = VAR {a}." in s.context
    s = tasks.make("cwe", tok, 800, 0)
    words = [w for w in s.context.split() if not w.endswith(".")]
    counts = {w: words.count(w) for w in set(words)}
    assert min(counts[a] for a in s.answers) > max(c for w, c in counts.items() if w not in s.answers)
    s = tasks.make("fwe", tok, 800, 0)
    words = s.context.rstrip(".").split()
    top = sorted(set(words), key=words.count, reverse=True)[:3]
    assert sorted(top) == sorted(s.answers)


def test_bad_task_and_length_are_errors():
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make("nope", WordTokenizer(), 500, 0)
    with pytest.raises(ValueError, match="too short"):
        tasks.make("vt", WordTokenizer(), 10, 0)
