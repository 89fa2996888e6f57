"""The wheel installs kvpass, kvpass.passes and kvpass.kernels, and no top-level `passes` or `kernels`
(a top-level `kernels` would shadow the Hugging Face package transformers probes for)."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_layout(tmp_path):
    src = tmp_path / "src"  # a copy: setuptools writes build/ and *.egg-info beside the sources
    skip = shutil.ignore_patterns(".venv*", ".git", "build", "*.egg-info", "__pycache__", ".*_cache", "gpu-results")
    shutil.copytree(ROOT, src, ignore=skip)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(src),
        ],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("kvpass-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"kvpass"}
    for module in ("kvpass/passes/find_attention.py", "kvpass/kernels/attend.py", "kvpass/policies/h2o.py",
                   "kvpass/serving/vllm.py"):  # fmt: skip
        assert module in names
    shipped = [n for n in names if n.startswith("kvpass/weights/") and n.endswith(".safetensors")]
    assert len(shipped) >= 2, "the trained gates of the default model are package data"


def test_top_level_kernels_from_the_source_tree_is_inert():
    """transformers imports a top-level `kernels` when it probes for the Hugging Face package; from the
    repository root that finds our source directory, which must then neither define nor re-register anything."""
    code = (
        "import importlib, torch, kvpass\n"
        "k = importlib.import_module('kernels')\n"
        "assert k.__file__.endswith('kernels/__init__.py') and not hasattr(k, 'attend'), dir(k)\n"
        "import gc; gc.collect()\n"
        "z = torch.zeros(1, 1, 2, 1)\n"
        "out, mass = kvpass.kernels.attend(torch.ones(1, 1, 1, 1), z[:, :, :1], z[:, :, :1], z, z,\n"
        "    torch.zeros(1, 1, 2, dtype=torch.bool), torch.full((1, 1, 2), -1), torch.tensor([[0]]), 1.0, 0, 0.0, 1)\n"
        "assert mass.shape == (1, 1, 3)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
