"""The wheel installs kvpass, kvpass.passes and kvpass.kernels, and no top-level `passes` or `kernels`
(a top-level `kernels` would shadow the Hugging Face package transformers imports); from a clone, the
top-level `kernels/` folder is a namespace portion, which never shadows an installed package."""

import importlib.metadata
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

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
    for module in ("kvpass/passes/find_attention.py", "kvpass/kernels/__init__.py", "kvpass/kernels/attend.py",
                   "kvpass/policies/h2o.py", "kvpass/serving/vllm.py"):  # fmt: skip
        assert module in names
    shipped = [n for n in names if n.startswith("kvpass/weights/") and n.endswith(".safetensors")]
    assert len(shipped) >= 2, "the trained gates of the default model are package data"


def from_the_root(code: str) -> None:
    """Run ``code`` in a fresh interpreter as pytest and ``python -m`` run it from a clone: in the repository
    root, with the root first on ``sys.path`` (ahead of site-packages)."""
    subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {str(ROOT)!r})\n{code}"], check=True, cwd=ROOT
    )


@pytest.mark.parametrize("name", ["kernels", "passes"])
def test_top_level_folders_never_shadow_an_installed_package(name):
    """transformers >= 5.25 imports Hugging Face's `kernels` (its dependency); from the repository root our
    top-level `kernels/` must not stand in for it (`ImportError: cannot import name 'CUDAProperties'`).
    `passes/` (a regular package) is checked the same way in case a dependency ever ships a `passes`."""
    owners = importlib.metadata.packages_distributions().get(name, [])
    if not owners:
        pytest.skip(f"no installed distribution provides a top-level `{name}` (transformers >= 5.25 brings "
                    "Hugging Face's `kernels`)")  # fmt: skip
    files = importlib.metadata.distribution(owners[0]).files or []
    (init,) = [f.locate() for f in files if str(f) == f"{name}/__init__.py"]
    from_the_root(
        f"import {name}, pathlib\n"
        f"assert pathlib.Path({name}.__file__).resolve() == pathlib.Path({str(init)!r}).resolve(), {name}\n"
        "import transformers, kvpass\n"
        "transformers.PreTrainedModel  # imports transformers' `kernels` integration\n"
        "from kvpass.kernels import attend, decode_attention\n"
        "from kvpass.kernels.decode import decode_reference\n"
        "import kvpass.kernels.backend, kvpass.passes.find_attention\n"
    )


def test_top_level_kernels_from_the_source_tree_is_inert():
    """From the repository root a top-level `kernels` is Hugging Face's package or, without it, our folder as an
    empty namespace (transformers' probe then finds no version and no `__file__`): never our modules, which must
    not be defined or registered a second time."""
    from_the_root(
        "import importlib, pathlib, torch, kvpass\n"
        "k = importlib.import_module('kernels')\n"
        "f = getattr(k, '__file__', None)  # None: a namespace\n"
        "assert f is None or pathlib.Path(f).resolve().parent != pathlib.Path(sys.path[0], 'kernels').resolve(), f\n"
        "assert not hasattr(k, 'attend'), dir(k)\n"
        "import gc; gc.collect()\n"
        "z = torch.zeros(1, 1, 2, 1)\n"
        "out, mass = kvpass.kernels.attend(torch.ones(1, 1, 1, 1), z[:, :, :1], z[:, :, :1], z, z,\n"
        "    torch.zeros(1, 1, 2, dtype=torch.bool), torch.full((1, 1, 2), -1), torch.tensor([[0]]), 1.0, 0, 0.0, 1)\n"
        "assert mass.shape == (1, 1, 3)\n"
    )
