"""The core install runs transform + generate; each extra's absence is a clear error naming the
install that fixes it (modules hidden, as where the extra is not installed)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

import kvpass
from kvpass import extras
from tests.conftest import tiny_llama

ROOT = Path(__file__).resolve().parents[1]


def test_the_core_runs_without_any_extra():
    hidden = "; ".join(f"sys.modules[{m!r}] = None" for m in extras.EXTRA)
    code = f"""import sys; {hidden}
import torch, kvpass, kvpass.cli
from tests.conftest import tiny_llama
small = kvpass.transform(tiny_llama(seed=1), "tova", 8, chunk=4)
out = small.generate(torch.randint(3, 97, (1, 20)), max_new_tokens=5, do_sample=False)
assert out.shape == (1, 25) and kvpass.cache_stats(small)
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_each_hidden_module_is_in_the_extra_the_error_names():
    text = (ROOT / "pyproject.toml").read_text()
    for module, extra in extras.EXTRA.items():
        line = re.search(rf"^{re.escape(extra)} = \[(.*)\]", text, re.M)
        assert line and f'"{module}>=' in line.group(1), (module, extra)


def _export(tmp_path):
    kvpass.export_onnx(kvpass.transform(tiny_llama(seed=2), "tova", 8, chunk=4), tmp_path / "m.onnx")


def _engine(tmp_path):
    kvpass.OnnxEngine(tmp_path / "m.onnx")


def _plot(tmp_path):
    from kvpass.eval import report

    report.plot([], tmp_path / "p.png")


def _default_model(tmp_path, monkeypatch):
    monkeypatch.setenv("KVPASS_CACHE", str(tmp_path))  # not converted yet: the GGUF must be read
    kvpass.load_default_model()


@pytest.mark.parametrize(
    "module, extra, call",
    [
        ("onnx", "export", _export),
        ("onnxscript", "export", _export),
        ("onnxruntime", "export", _engine),
        ("matplotlib", "eval", _plot),
        ("gguf", "default-model", _default_model),
    ],
)
def test_a_missing_extra_names_its_install(tmp_path, monkeypatch, module, extra, call):
    monkeypatch.setitem(sys.modules, module, None)
    args = (tmp_path, monkeypatch) if call is _default_model else (tmp_path,)
    with pytest.raises(ImportError, match=re.escape(f'pip install "kvpass[{extra}]"')):
        call(*args)
    assert not any(tmp_path.iterdir())  # failed before writing anything
