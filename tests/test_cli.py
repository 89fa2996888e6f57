import subprocess
import sys

import pytest

from kvpass.cli import main


def test_policies_command(capsys):
    main(["policies"])
    assert "snapkv" in capsys.readouterr().out.split()


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
