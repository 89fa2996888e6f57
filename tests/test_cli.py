import argparse
import subprocess
import sys

import pytest

from kvpass.cli import _parser, main


def test_policies_command_prints_one_line_per_policy(capsys):
    import kvpass

    main(["policies"])
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == kvpass.policies()
    assert all(line.endswith(".") and len(line.split()) > 3 for line in lines), lines


@pytest.mark.parametrize(
    "command", ["demo", "inspect", "eval", "bench", "train-gates", "calibrate", "export", "sweep", "policies"]
)
def test_every_option_has_a_help_text_and_shows_its_default(command, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # no line breaks inside a default (argparse breaks at hyphens)
    with pytest.raises(SystemExit):
        main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    parser = next(a for a in _parser()._actions if a.dest == "command").choices[command]
    assert parser.description and parser.description in text
    for action in parser._actions:
        assert action.help, f"{command} {action.option_strings}: no help text"
        if action.option_strings and not any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            shown = " ".join(map(str, action.default)) if isinstance(action.default, list) else str(action.default)
            assert f"(default {shown})" in text or f"'{shown}'" in text, (command, action.dest)


def test_demo_rejects_a_bad_policy_before_loading_anything():
    with pytest.raises(SystemExit, match="valid policies"):
        main(["demo", "--policy", "nope"])


@pytest.mark.slow
def test_demo_runs():
    out = subprocess.run(
        [sys.executable, "-m", "kvpass.cli", "demo", "--tokens", "700", "--budgets", "0.25", "--new-tokens", "8"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "full cache" in out and "tova @ 0.25" in out and "decode tok/s" in out


def test_inspect_lists_the_sites_of_a_saved_model(tmp_path, llama, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # a wide table, one row per site
    llama.save_pretrained(tmp_path)
    main(["inspect", str(tmp_path)])
    out = capsys.readouterr().out
    assert "2 attention sites" in out
    assert out.count("model.layers.") == 2 and out.count("rewrite") == 2 and "causal" in out
    assert "ready to transform" in out


def test_inspect_a_missing_model_is_a_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="nothing-here"):
        main(["inspect", str(tmp_path / "nothing-here")])


@pytest.mark.slow
def test_inspect_default_model_prints_30_sites():
    out = subprocess.run(
        [sys.executable, "-m", "kvpass.cli", "inspect", "default"],
        capture_output=True,
        text=True,
        check=True,
        env={**__import__("os").environ, "COLUMNS": "200"},
    ).stdout
    assert "30 attention sites" in out and out.count("rewrite") == 30


@pytest.mark.parametrize(
    "argv,message",
    [
        (["eval", "--tasks", "sudoku"], "unknown task 'sudoku'"),
        (["eval", "--policies", "nope"], "nope"),
        (["eval", "--mode", "sideways"], "unknown mode"),
        (["bench", "--policies", "nope"], "nope"),
    ],
)
def test_eval_and_bench_refuse_bad_arguments_before_loading_anything(argv, message):
    with pytest.raises(SystemExit, match=message):
        main(argv)


def test_train_gates_refuses_an_unknown_retrieval_kind_before_loading_anything(capsys):
    with pytest.raises(SystemExit):
        main(["train-gates", "--retrieval", "lockers", "ledgers"])
    assert "invalid choice: 'ledgers'" in capsys.readouterr().err


def test_export_vllm_writes_a_directory_for_the_plugin(tmp_path, llama, capsys, monkeypatch):
    import json

    llama.save_pretrained(tmp_path / "hf")
    monkeypatch.chdir(tmp_path)
    out = "kvpass-vllm"  # the default --out for --format vllm
    main(["export", "--format", "vllm", "--model", str(tmp_path / "hf"), "--policy", "h2o", "--budget", "48",
          "--chunk", "8"])  # fmt: skip
    config = json.loads((tmp_path / out / "config.json").read_text())
    assert config["architectures"] == ["KvpassForCausalLM"]
    assert config["kvpass"]["policy"] == "h2o" and config["kvpass"]["budget"] == 48
    assert f"vllm serve {out}" in " ".join(capsys.readouterr().out.split())  # rich wraps lines
