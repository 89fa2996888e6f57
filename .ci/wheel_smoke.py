"""Smoke test of an installed wheel, run from outside the source tree (.ci/wheel-smoke)."""

import importlib
import pkgutil
import subprocess
import sys
import tarfile
from importlib import resources
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import kvpass
from kvpass.policies import gate_network

dist = Path(sys.argv[1])
here = Path(kvpass.__file__).resolve()
assert "site-packages" in here.parts, f"kvpass imported from {here}, not from the installed wheel"
subprocess.run([Path(sys.executable).parent / "kvpass", "--help"], check=True, stdout=subprocess.DEVNULL)
gates = [p.name for p in resources.files("kvpass").joinpath("weights").iterdir() if p.name.endswith(".safetensors")]
assert len(gates) >= 2, f"the shipped gate checkpoints are missing from the wheel: {gates}"
assert gate_network.shipped(0.5).name in gates, "the gate policy does not look where the wheel has its gates"
for module in pkgutil.walk_packages(kvpass.__path__, "kvpass."):  # every module the wheel ships imports without extras
    try:
        importlib.import_module(module.name)
    except ModuleNotFoundError as e:  # but the vLLM plugin and the Triton kernels (used where CUDA brings Triton)
        assert e.name in ("vllm", "triton"), f"{module.name} needs {e.name}, which a plain install lacks"
(sdist,) = dist.glob("kvpass-*.tar.gz")
names = tarfile.open(sdist).getnames()
for part in ("passes/find_attention.py", "kernels/decode_triton.py", "kvpass/kernels/__init__.py",
             "kvpass/serving/vllm.py", "pyproject.toml"):  # fmt: skip
    assert any(n.endswith(part) for n in names), f"{part} is missing from the sdist"

torch.manual_seed(0)
config = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2)  # fmt: skip
small = kvpass.transform(LlamaForCausalLM(config).eval(), "tova", 8, chunk=4)
out = small.generate(torch.randint(3, 97, (1, 20)), max_new_tokens=5, do_sample=False)
assert out.shape == (1, 25)
try:  # no extras installed: the ONNX export says which one it needs
    kvpass.export_onnx(small, "m.onnx")
    raise AssertionError("the ONNX export ran without the [export] extra")
except ImportError as e:
    assert 'pip install "kvpass[export]"' in str(e), e
print(f"wheel smoke test passed ({here.parent})")
