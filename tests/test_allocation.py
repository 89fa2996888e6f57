"""Per-layer budgets: the policy's allocation, the cache and the exported step that follow it, and
the calibration that measures one."""

import math

import numpy as np
import pytest
import torch

import kvpass
from kvpass import policies
from kvpass.eval import sensitivity
from kvpass.runtime import allocation
from kvpass.runtime.step import PureStep
from tests.conftest import tiny_llama
from tests.eval.stub import WordTokenizer
from tests.test_export import greedy_with_step


def test_bad_allocations_are_refused():
    for bad in ([], [1.0, 0.0], [1.0, -2.0], [1.0, math.nan], [1.0, math.inf], [True, 1.0], "1,1", 2.0):
        with pytest.raises(ValueError, match="allocation"):
            policies.get("tova", budget=8, allocation=bad)
    with pytest.raises(ValueError, match="keeps every token"):
        policies.get("full", allocation=[1.0, 1.0])
    with pytest.raises(ValueError, match="3 multipliers, this model has 2 attention layers"):
        kvpass.transform(tiny_llama(), "tova", 8, allocation=[1.0, 1.0, 1.0])


def test_layer_slots_scale_the_budget_within_bounds():
    p = policies.get("h2o", budget=0.5, window=3, allocation=[2.0, 0.5, 0.01, 1.3])
    assert [p.layer_slots(40, i) for i in range(4)] == [80, 20, 4, 52]  # at least window + 1
    assert [p.layer_slots(40, i, most=50) for i in range(4)] == [50, 20, 4, 50]  # never more than the prompt
    assert policies.get("h2o", budget=0.5).layer_slots(40, 3, most=50) == 40


@pytest.mark.parametrize("name, knobs", [("tova", {}), ("aha", {"recent": 8}), ("snapkv", {"window": 4})])
def test_each_layer_keeps_its_share_of_the_prompt(name, knobs):
    model = tiny_llama(seed=5, layers=3)
    torch.manual_seed(11)
    ids = torch.randint(3, 97, (2, 60))
    small = kvpass.transform(
        model, name, 0.25, chunk=16, evict_during_decode=False, allocation=[2.0, 0.5, 0.5], **knobs
    )
    small(ids)
    cache = small.kvpass_cache
    held = [int(cache.slots[i].valid.sum()) // (2 * 2) for i in range(3)]  # per batch row and KV head
    assert held == [30, 8, 8]  # ceil(15 * 2), ceil(15 * 0.5)
    assert [cache.slots[i].capacity - cache.capacity + cache.budget for i in range(3)] == [30, 8, 8]


def test_all_ones_is_the_uniform_budget():
    model = tiny_llama(seed=6)
    ids = torch.randint(3, 97, (1, 50))
    plain = kvpass.transform(model, "snapkv", 0.3, chunk=16, window=4)
    ones = kvpass.transform(model, "snapkv", 0.3, chunk=16, window=4, allocation=[1.0, 1.0])
    a, b = plain(ids).logits, ones(ids).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.equal(plain.generate(ids, max_new_tokens=8), ones.generate(ids, max_new_tokens=8))


def test_a_layer_given_the_whole_prompt_attends_as_the_model_does():
    # one layer: with the multiplier 1 / budget it keeps every prompt token, so the prefill logits are exact
    model = tiny_llama(seed=7, layers=1)
    ids = torch.randint(3, 97, (1, 48))
    small = kvpass.transform(model, "h2o", 0.25, chunk=16, window=2, allocation=[4.0])
    torch.testing.assert_close(small(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)
    evicting = kvpass.transform(model, "h2o", 0.25, chunk=16, window=2)
    assert not torch.allclose(evicting(ids).logits, model(ids).logits, atol=1e-3)


def test_the_exported_step_has_the_allocated_tables_and_keeps_what_the_cache_keeps():
    model = tiny_llama(seed=8, layers=3)
    small = kvpass.transform(model, "aha", 12, chunk=16, recent=8, k=4, allocation=[1.5, 0.5, 1.0])
    step = PureStep(small)
    assert [step.layout.layer_capacity(i) for i in range(3)] == [18, 6, 12]
    torch.manual_seed(12)
    ids = torch.randint(3, 97, (2, 40))
    ref = small.generate(ids, max_new_tokens=8, do_sample=False)
    got, tables = greedy_with_step(step, ids, 8)
    assert torch.equal(got, ref)
    groups = step.layout.split(tables)
    held = [int(groups[g].valid[i].sum()) for g, i in (step.layout.where[layer] for layer in range(3))]
    assert held == [2 * 2 * 18, 2 * 2 * 6, 2 * 2 * 12]


def test_an_onnx_engine_with_per_layer_tables_gives_the_torch_tokens(tmp_path):
    model = tiny_llama(seed=13)
    small = kvpass.transform(model, "tova", 16, chunk=16, allocation=[1.75, 0.25])
    engine = kvpass.OnnxEngine(kvpass.export_onnx(small, tmp_path / "alloc.onnx"))
    assert engine.layout.capacity == (28, 4) and engine.layout.groups == ((0,), (1,))
    torch.manual_seed(14)
    ids = torch.randint(3, 97, (2, 40))
    ref = small.generate(ids, max_new_tokens=8, do_sample=False)
    assert np.array_equal(engine.generate(ids.numpy(), 8), ref.numpy())


def test_allocation_rule():
    sens = [0.0, 0.5, 0.02, -0.1, 0.0, 0.3]
    a = allocation.allocate(sens, 0.5)
    assert math.isclose(sum(a) / len(a), 1.0, abs_tol=1e-3)
    assert max(a) <= 2.0 and min(a) >= 0.25
    # by hand: mean s = 0.82 / 6; the first layer is capped at 2 (the whole prompt), the rest share 4
    # slots' worth: c = 4 / (3 * 0.13667 + 0.15667 + 0.43667) = 3.9867
    assert a[1] == 2.0
    assert a[0] == a[3] == a[4] == pytest.approx(0.5449, abs=1e-3)  # a negative sensitivity counts as none
    assert a[2] == pytest.approx(0.6246, abs=1e-3) and a[5] == pytest.approx(1.7409, abs=1e-3)
    assert allocation.allocate([0.0, -0.2, 0.0], 0.25) == (1.0, 1.0, 1.0)
    tight = allocation.allocate([1.0, 0.0, 0.0, 0.0], 0.5, low=0.8)
    assert tight[1:] == (0.8, 0.8, 0.8) and math.isclose(tight[0], 1.6, abs_tol=1e-3)


def test_sensitivity_is_measured_one_layer_at_a_time(monkeypatch):
    model = tiny_llama(seed=9, layers=3, vocab=97)
    tok = WordTokenizer()
    seen = []
    real = sensitivity.answer_nll

    def spy(m, prompt, answer):
        policy = getattr(m, "kvpass_policy", None)
        seen.append(None if policy is None else policy.allocation)
        return real(m, prompt, answer)

    monkeypatch.setattr(sensitivity, "answer_nll", spy)
    out = sensitivity.calibrate(model, tok, "tova", 0.25, n_samples=2, tokens=120, chunk=32, progress=False)
    assert len(out["sensitivity"]) == 3 and len(out["allocation"]) == 3
    assert seen[:2] == [None, None]  # the unmodified model first
    assert seen[2:] == [(1.0, 4.0, 4.0)] * 2 + [(4.0, 1.0, 4.0)] * 2 + [(4.0, 4.0, 1.0)] * 2
    assert any(abs(s) > 1e-6 for s in out["sensitivity"])  # eviction in a random tiny model changes the answers
    with pytest.raises(ValueError, match="fraction"):
        sensitivity.sensitivity(model, tok, "tova", 8)


def test_cli_calibrates_and_evaluates_with_the_allocation(tmp_path, monkeypatch, capsys):
    from kvpass import default_model
    from kvpass.cli import main

    model, tok = tiny_llama(seed=10, layers=2), WordTokenizer()
    monkeypatch.setattr(default_model, "load_model", lambda name="default", **kw: (model, tok))
    out = tmp_path / "alloc.json"
    argv = ["calibrate", "--policy", "tova", "--budget", "0.25", "--samples", "1", "--tokens", "120", "--chunk", "32"]
    main([*argv, "--out", str(out)])
    result = allocation.load(out)
    assert len(result["sensitivity"]) == 2 and result["policy"] == "tova" and result["budget"] == 0.25
    assert f"wrote {out}" in capsys.readouterr().out
    argv = ["eval", "--tasks", "niah_single", "--lengths", "120", "--samples", "1", "--policies", "tova"]
    main([*argv, "--budgets", "0.5", "--new-tokens", "4", "--allocation", str(out), "--out", str(tmp_path / "ev")])
    policies_run = {
        r["policy"] for r in __import__("json").loads((tmp_path / "ev" / "results.json").read_text())["records"]
    }
    assert policies_run == {"full", "tova", "tova+alloc"}


def test_cli_calibrates_kvzip_with_its_probe(tmp_path, monkeypatch):
    from kvpass import default_model
    from kvpass.cli import main
    from kvpass.policies import KVzip

    model, tok = tiny_llama(seed=11, layers=2), WordTokenizer()
    monkeypatch.setattr(default_model, "load_model", lambda name="default", **kw: (model, tok))
    made, real = [], sensitivity.transform

    def spy(model, policy, budget, **kw):
        made.append((kw.get("repeat"), kw.get("share")))
        return real(model, policy, budget, **kw)

    monkeypatch.setattr(sensitivity, "transform", spy)
    argv = ["calibrate", "--policy", "kvzip", "--budget", "0.5", "--samples", "1", "--tokens", "120", "--chunk", "32"]
    main([*argv, "--out", str(tmp_path / "kvzip.json")])
    # the same probe as eval and demo use; each layer its own budget (kvzip's default shares the model's)
    assert made == [(KVzip.instruction(tok), "head")] and len(made[0][0]) > 0


def test_bad_calibrations_are_clear_errors(tmp_path):
    from kvpass.cli import main

    with pytest.raises(SystemExit, match="no calibration file"):
        main(["eval", "--allocation", str(tmp_path / "missing.json")])
    (tmp_path / "bad.json").write_bytes(b"\x00\xff not json")
    (tmp_path / "other.json").write_text('{"sensitivity": [0.1, "x"], "budget": 0.5}')
    for name in ("bad.json", "other.json"):
        with pytest.raises(SystemExit, match="not a kvpass calibration"):
            main(["eval", "--allocation", str(tmp_path / name)])
    for argv, message in ((["--budget", "1.0"], "fraction"), (["--policy", "nope"], "nope")):
        with pytest.raises(SystemExit, match=message):
            main(["calibrate", *argv])


def test_eval_allocates_from_the_calibration_nearest_each_budget(monkeypatch):
    from kvpass.eval import evaluate as ev

    made = []
    real = ev.transform

    def spy(model, policy, budget, **kw):
        made.append((policy, budget, kw.get("allocation")))
        return real(model, policy, budget, **kw)

    monkeypatch.setattr(ev, "transform", spy)
    cal = [{"budget": 0.5, "sensitivity": [0.0, 1.0]}, {"budget": 0.2, "sensitivity": [1.0, 0.0]}]
    records = ev.evaluate(
        tiny_llama(seed=11), WordTokenizer(), task_names=["vt"], lengths=[100], policies=["tova"],
        budgets=[0.6, 0.3], samples=1, max_new_tokens=2, calibrations=cal, progress=False,
    )  # fmt: skip
    assert made == [
        ("tova", 0.6, None),
        ("tova", 0.6, allocation.allocate([0.0, 1.0], 0.6)),
        ("tova", 0.3, None),
        ("tova", 0.3, allocation.allocate([1.0, 0.0], 0.3)),
    ]
    assert made[1][2][1] > 1.0 > made[1][2][0] and made[3][2][0] > 1.0 > made[3][2][1]
    assert {r.policy for r in records} == {"full", "tova", "tova+alloc"}


def test_transform_reads_a_calibration_file(tmp_path):
    model = tiny_llama(seed=12, layers=3)
    path = allocation.save({"policy": "tova", "budget": 0.25, "sensitivity": [0.0, 0.4, 0.1]}, tmp_path / "c.json")
    small = kvpass.transform(model, "tova", 0.5, allocation=path)
    assert small.kvpass_policy.allocation == allocation.allocate([0.0, 0.4, 0.1], 0.5)
    slots = kvpass.transform(model, "tova", 16, allocation=str(path))  # slots: capped as at the calibration's 0.25
    assert slots.kvpass_policy.allocation == allocation.allocate([0.0, 0.4, 0.1], 0.25)
    named = kvpass.transform(model, f"tova:allocation={path}", 16)  # in a policy's name, as the CLI takes it
    assert named.kvpass_policy.allocation == slots.kvpass_policy.allocation
    from kvpass.cli import _check_policy

    _check_policy(f"tova:allocation={path}", 16)  # the CLI's early check reads it too
    with pytest.raises(ValueError, match="neither multipliers nor a calibration file"):
        _check_policy(f"tova:allocation={tmp_path / 'none.json'}", 16)
    (tmp_path / "two.json").write_text('{"budget": 0.5, "sensitivity": [0.1, 0.2]}')
    with pytest.raises(ValueError, match="2 multipliers, this model has 3 attention layers"):
        kvpass.transform(model, "tova", 0.5, allocation=tmp_path / "two.json")
    with pytest.raises(ValueError, match="no calibration file"):
        kvpass.transform(model, "tova", 0.5, allocation=tmp_path / "none.json")


def test_engines_take_the_shares_of_one_budget_for_the_model(tmp_path, monkeypatch):
    """``kvpass calibrate --shares``: the per-layer sizes a budget shared by the whole model gives on
    the calibration prompts, as an allocation (averaging 1: the same memory) that a fixed-shape
    engine takes, with the torch model's tokens."""
    from kvpass import default_model
    from kvpass.cli import main
    from kvpass.eval import shares

    model, tok = tiny_llama(seed=15, layers=3), WordTokenizer()
    measured = []
    real = shares.transform

    def spy(model, policy, budget, **kw):
        measured.append(kw["share"])
        return real(model, policy, budget, **kw)

    monkeypatch.setattr(shares, "transform", spy)
    monkeypatch.setattr(default_model, "load_model", lambda name="default", **kw: (model, tok))
    out = tmp_path / "shares.json"
    argv = ["calibrate", "--policy", "tova", "--budget", "0.25", "--samples", "2", "--tokens", "120", "--chunk", "32"]
    main([*argv, "--shares", "--out", str(out)])
    assert measured == ["model"]
    result = allocation.load(out)
    got = result["shares"]
    assert len(got) == 3 and result["allocation"] == got and abs(sum(got) / 3 - 1) < 0.05
    assert max(got) - min(got) > 0.05  # the layers' scores moved slots between them
    small = kvpass.transform(model, "tova", 16, chunk=16, share="layer", allocation=out)
    assert small.kvpass_policy.allocation == tuple(got)
    engine = kvpass.OnnxEngine(kvpass.export_onnx(small, tmp_path / "shares.onnx"))
    assert [engine.layout.layer_capacity(i) for i in range(3)] == [math.ceil(16 * a) for a in got]
    torch.manual_seed(16)
    ids = torch.randint(3, 97, (2, 40))
    ref = small.generate(ids, max_new_tokens=8, do_sample=False, eos_token_id=None)  # the engine decodes on past it
    assert np.array_equal(engine.generate(ids.numpy(), 8), ref.numpy())
    with pytest.raises(ValueError, match="--shares"):  # the model-wide budget itself has no fixed shapes
        kvpass.export_onnx(kvpass.transform(model, "tova", 16, share="model"), tmp_path / "no.onnx")


def test_measured_shares_are_capped_at_the_prompt_and_checked(tmp_path):
    result = {"policy": "kvzip", "budget": 0.25, "shares": [0.5, 5.0, 0.7]}
    assert allocation.for_budget(result, 0.5) == (0.5, 2.0, 0.7)
    assert allocation.for_budget(result, 64) == (0.5, 4.0, 0.7)  # slots: capped as at the calibration's 0.25
    (tmp_path / "bad.json").write_text('{"budget": 0.25, "shares": [1.0, 0.0]}')
    with pytest.raises(ValueError, match="positive numbers"):
        allocation.load(tmp_path / "bad.json")
