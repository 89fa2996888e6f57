"""The Triton kernels compile for NVIDIA GPUs (sm_80, sm_90) with the wrappers' launch settings and
every option on, without register spills: Triton's compiler and ptxas run here, no GPU needed."""

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")


def test_kernels_build_for_gpus_without_spills():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the interpreter replaces the compiler
    run = subprocess.run(
        [sys.executable, "-m", "kvpass.kernels.build", "--quick", "--json"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    builds = [json.loads(line) for line in run.stdout.splitlines()]
    kernels = {(b["kernel"], b["arch"]) for b in builds}
    assert kernels == {(k, a) for k in ("_partial", "_merge", "_rows", "_columns") for a in (80, 90)}
    for b in builds:
        assert 0 < b["registers"] <= 255, b
        assert b["spill_stores"] == 0 and b["spill_loads"] == 0, b


def test_build_refuses_the_interpreter():
    env = dict(os.environ, TRITON_INTERPRET="1")
    run = subprocess.run([sys.executable, "-m", "kvpass.kernels.build"], capture_output=True, text=True, env=env)
    assert run.returncode != 0 and "without TRITON_INTERPRET" in run.stderr
