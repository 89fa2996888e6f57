"""Scoring, prompt rendering, the eval grid on a tiny model, and the report writer."""

import json
import math
import random
import statistics

import pytest
import torch
from transformers import DynamicCache

import kvpass
from kvpass.data import tasks
from kvpass.eval import report
from kvpass.eval.evaluate import Context, Record, answer, answers, ask, evaluate, fork, read, render, score
from kvpass.runtime import hf
from tests.conftest import tiny_llama
from tests.eval.stub import WordTokenizer


def test_score_is_string_match_all():
    assert score("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert score("Only 123 here", ["123", "456"]) == 0.5
    assert score("TOZOF and mukig", ["tozof", "MUKIG", "ZEKOP"]) == pytest.approx(2 / 3)
    assert score("nothing", ["1"]) == 0.0
    with pytest.raises(ValueError):
        score("x", [])


def test_agnostic_rendering_splits_before_the_question():
    tok = WordTokenizer()
    s = tasks.make("niah_single", tok, 200, 3)
    (whole,) = render(tok, s, "aware")
    context, question = render(tok, s, "agnostic")
    assert torch.equal(torch.cat([context, question], dim=1), whole)
    assert question.shape[1] < 40 < context.shape[1]
    with pytest.raises(ValueError, match="unknown mode"):
        render(tok, s, "sideways")


@pytest.mark.parametrize("mode", ["aware", "agnostic"])
def test_eval_grid_on_a_tiny_model(llama, mode):
    tok = WordTokenizer()
    records = evaluate(
        llama, tok, task_names=["niah_single", "vt"], lengths=[150], policies=["tova", "full"], budgets=[0.5],
        samples=2, mode=mode, max_new_tokens=5, chunk=64, progress=False,
    )  # fmt: skip
    assert len(records) == 2 * 2 * 3  # (task x sample) x (original, tova@0.5, full@0.5)
    assert {(r.policy, r.budget) for r in records} == {("full", None), ("tova", 0.5), ("full", 0.5)}
    assert all(0 <= r.score <= 1 and r.mode == mode for r in records)
    by = {(r.task, r.seed, r.policy, r.budget): r.output for r in records}
    for task, seed in {(r.task, r.seed) for r in records}:  # kvpass's full policy answers like the original
        assert by[(task, seed, "full", 0.5)] == by[(task, seed, "full", None)]


def test_answer_matches_generate(llama):
    ids = torch.randint(3, 97, (1, 30), generator=torch.Generator().manual_seed(1))
    want = llama.generate(ids, max_new_tokens=6, do_sample=False)[0, 30:]
    torch.testing.assert_close(answer(llama, [ids[:, :20], ids[:, 20:]], 6), want)


@pytest.mark.parametrize("policy", [None, "tova", "kvzip"])
def test_compress_once_ask_anything(llama, policy):
    g = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    ctx = torch.randint(3, 97, (1, 70), generator=g)
    questions = [torch.randint(3, 97, (1, n), generator=g) for n in (5, 9, 3)]
    model = llama if policy is None else kvpass.transform(llama, policy, 0.25, chunk=16, evict_during_decode=False)
    got = answers(model, ctx, questions, 6)
    for q, a in zip(questions, got, strict=True):  # each as if it were the only question
        assert torch.equal(a, answer(model, [ctx, q], 6))
    at = read(model, ctx, 20)

    def state(cache):
        return [t.clone() for t in (cache.tables if policy else [x for layer in cache.layers for x in layer.keys])]

    before = state(at.cache)
    ask(model, Context(at.logits, fork(at.cache), at.seen), [questions[0]], 6)
    assert all(torch.equal(a, b) for a, b in zip(before, state(at.cache), strict=True))  # the context's is untouched
    assert policy is None or at.cache.seen == 70


def test_bad_budget_is_an_error(llama):
    with pytest.raises(ValueError, match="fractions"):
        evaluate(llama, WordTokenizer(), task_names=["vt"], lengths=[100], policies=["tova"], budgets=[64])


def rec(policy, budget, task, s):
    return Record(task, 1000, 0, "aware", policy, budget, s, "", ["x"], 0.1)


def test_report_table_json_and_plot(tmp_path):
    records = [
        rec("full", None, "vt", 1.0), rec("full", None, "cwe", 0.5),
        rec("tova", 0.5, "vt", 0.0), rec("tova", 0.5, "vt", 1.0), rec("tova", 0.5, "cwe", 0.25),
        rec("tova", 0.25, "vt", 0.0), rec("tova", 0.25, "cwe", 0.0),
        rec("h2o", 0.5, "vt", 0.0), rec("h2o", 0.5, "vt", 1.0),
        rec("h2o", 0.5, "cwe", 0.5), rec("h2o", 0.5, "cwe", 0.0), rec("h2o", 0.5, "cwe", 0.25),
    ]  # fmt: skip
    header, rows = report.table(records)
    assert header == ["policy", "budget", "cwe", "vt", "average", "± s.e.", "vs full (s.e.)"]
    # h2o: task means 0.25 (3 samples) and 0.5 (2); sample variances 0.0625 and 0.5:
    # s.e. = sqrt(0.0625 / 3 + 0.5 / 2) / 2 = 0.2602. Every case has seed 0, so each pairs with the
    # one full-cache case of its task: the differences are the scores shifted by 0.5 and 1.0.
    assert rows == [
        ["full", "100 %", "50.0", "100.0", "75.0", "", ""],
        ["h2o", "50%", "25.0", "50.0", "37.5", "26.0", "-37.5 (26.0)"],
        ["tova", "50%", "25.0", "50.0", "37.5", "", ""],
        ["tova", "25%", "0.0", "0.0", "0.0", "", ""],
    ]
    paths = report.write(records, tmp_path / "out", {"model": "tiny", "title": "t"})
    data = json.loads(paths["json"].read_text())
    assert data["meta"]["model"] == "tiny" and len(data["records"]) == 12
    assert paths["markdown"].read_text().splitlines()[2] == "| full | 100 % | 50.0 | 100.0 | 75.0 |  |  |"
    assert paths["plot"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and paths["plot"].stat().st_size > 10_000


def test_the_difference_from_the_full_cache_is_paired_by_case():
    g = random.Random(int(torch.randint(0, 2**31, ())))
    full = {(t, seed): seed / 11 for t in ("vt", "cwe") for seed in range(12)}  # easy and hard cases
    lost = {case: g.uniform(0.0, 0.05) for case in full}  # what the policy loses on each

    def case(policy, budget, t, seed, score):
        return Record(t, 1000, seed, "aware", policy, budget, score, "", ["x"], 0.1)

    records = [case("full", None, t, seed, s) for (t, seed), s in full.items()]
    records += [case("h2o", 0.5, t, seed, s - lost[t, seed]) for (t, seed), s in full.items()]
    records += [case("h2o", 0.5, "vt", 99, 0.0)]  # no full-cache run of this case: left out
    records += [case("tova", 0.5, "vt", seed, 0.5) for seed in range(6)] + [case("tova", 0.5, "cwe", 0, 0.5)]
    rows = {row[0]: row for row in report.table(records)[1]}
    d = {t: [-lost[t, seed] for seed in range(12)] for t in ("vt", "cwe")}
    mean = sum(statistics.mean(v) for v in d.values()) / 2
    se = math.sqrt(sum(statistics.variance(v) / 12 for v in d.values())) / 2
    assert rows["h2o"][-1] == f"{100 * mean:+.1f} ({100 * se:.1f})"
    assert float(rows["h2o"][-2]) > 5 * 100 * se  # unpaired, how hard each case is stays in the noise
    assert rows["tova"][-1] == ""  # one pair of cwe: no variance


def test_plot_gives_a_policys_variants_its_colour(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn = {}
    monkeypatch.setattr(Axes, "plot", lambda self, xs, ys, label, **style: drawn.__setitem__(label, style))
    policies = ["snapkv", "h2o", "tova", "h2o+alloc", "kvpress:h2o", "aha", "gate", "knorm", "observed", "random"]
    policies += ["streaming", "tova+alloc"]  # twelve runs of nine policies: a colour per run would repeat
    report.plot([rec("full", None, "vt", 1.0)] + [rec(p, 0.5, "vt", 0.5) for p in policies], tmp_path / "p.png")
    assert drawn["h2o"]["color"] == drawn["h2o+alloc"]["color"] == drawn["kvpress:h2o"]["color"]
    assert [drawn[p]["linestyle"] for p in ("h2o", "h2o+alloc", "kvpress:h2o")] == ["-", "--", ":"]
    bases = [p for p in policies if "+" not in p and ":" not in p]
    assert len({drawn[p]["color"] for p in bases}) == len(bases) == 9


def test_perplexity_full_budget_matches_and_small_budget_differs(llama):
    from kvpass import transform
    from kvpass.eval.evaluate import perplexity

    ids = torch.randint(3, 97, (1, 120), generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))
    logits = llama(ids).logits[0, :-1]
    want = float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).exp())
    assert perplexity(llama, ids) == pytest.approx(want, rel=1e-5)
    assert perplexity(transform(llama, "full", chunk=32), ids) == pytest.approx(want, rel=1e-4)
    assert perplexity(transform(llama, "streaming", 16, chunk=32), ids) != pytest.approx(want, rel=1e-4)


def test_eval_with_perplexity_and_its_column(llama, tmp_path):
    tok = WordTokenizer()
    records = evaluate(
        llama, tok, task_names=["vt"], lengths=[150], policies=["tova"], budgets=[0.5],
        samples=1, max_new_tokens=3, chunk=64, ppl=True, progress=False,
    )  # fmt: skip
    ppl = [r for r in records if r.task == "perplexity"]
    assert [(r.policy, r.tokens) for r in ppl] == [("full", 150), ("tova", 150)] and all(r.score > 1 for r in ppl)
    header, rows = report.table(records)
    assert header == ["policy", "budget", "vt", "average", "± s.e.", "vs full (s.e.)", "perplexity"]
    assert rows[0][-1] == f"{ppl[0].score:.2f}" and rows[0][-4] == f"{100 * records[0].score:.1f}"
    report.write(records, tmp_path, {"title": "t"})  # the plot leaves perplexity out
    assert len(tasks.documentation(tok, 500, 1).split()) >= 500


class DropOldest:
    """A stand-in for a kvpress press: after prefill, keep only the last ``keep`` entries of every layer."""

    def __init__(self, keep):
        self.keep = keep

    def __call__(self, model):
        press = self

        class Hooked:
            def __enter__(self):
                self.handle = model.register_forward_hook(self.crop, with_kwargs=True)

            def crop(self, module, args, kwargs, out):
                for layer in next(kwargs[n] for n in hf.CACHE_NAMES if n in kwargs).layers:
                    layer.keys, layer.values = layer.keys[:, :, -press.keep :], layer.values[:, :, -press.keep :]

            def __exit__(self, *exc):
                self.handle.remove()

        return Hooked()


@pytest.mark.hf
def test_decoding_after_a_shrunken_cache_continues_at_true_positions():
    """A cache that holds fewer entries than tokens seen (as kvpress leaves it) must not renumber the
    next tokens: after the prompt's 50 tokens, the question is at positions 50-59, whatever is held."""
    llama = tiny_llama(seed=3)
    for layer in llama.model.layers:  # sharp attention, so that positions matter
        layer.self_attn.q_proj.weight.mul_(30)
        layer.self_attn.k_proj.weight.mul_(30)
    ids = torch.randint(3, 97, (1, 60), generator=torch.Generator().manual_seed(int(torch.randint(0, 2**31, ()))))
    got = answer(llama, [ids[:, :50], ids[:, 50:]], 6, press=DropOldest(20))
    cache = DynamicCache(config=llama.config)
    hf.call(llama, ids[:, :50], cache)
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys[:, :, -20:], layer.values[:, :, -20:]
    assert cache.get_seq_length() == 20
    logits, cache = hf.call(llama, ids[:, 50:], cache, position_ids=torch.arange(50, 60)[None])
    want = [logits[:, -1:].argmax(-1)]
    for i in range(5):
        logits, cache = hf.call(llama, want[-1], cache, position_ids=torch.tensor([[60 + i]]))
        want.append(logits[:, -1:].argmax(-1))
    assert torch.equal(got, torch.cat(want, dim=1)[0])
