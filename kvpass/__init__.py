"""kvpass: make any PyTorch causal LM keep only the KV entries worth keeping.

model, tok = kvpass.load_default_model()
small = kvpass.transform(model, policy="snapkv", budget=512)
small.generate(**tok(prompt, return_tensors="pt"), max_new_tokens=32)
"""

from kvpass import policies
from kvpass.default_model import load_default_model
from kvpass.eval.sensitivity import calibrate
from kvpass.export.onnx import export_onnx
from kvpass.export.onnx_engine import OnnxEngine
from kvpass.export.tensorrt import export_tensorrt
from kvpass.runtime import compile
from kvpass.runtime.cache import EvictingCache
from kvpass.runtime.stats import CacheStats, cache_stats
from kvpass.train.distill import train_gates
from kvpass.transform import transform


def find_attention(model):
    """The attention sites kvpass finds in ``model``: layer, heads, KV heads, head dim, scale,
    causal, sliding window, and whether it will be rewritten (of its text model, for a multimodal
    transformers model, as :func:`transform` does)."""
    from kvpass.runtime import hf
    from kvpass.transform import sites_of

    if hf.is_hf_model(type(model)):
        model = hf.text_model(model) or model
    return sites_of(model)[1]


compile.register()  # torch.compile(model, backend="kvpass")

__all__ = [
    "CacheStats",
    "EvictingCache",
    "OnnxEngine",
    "cache_stats",
    "calibrate",
    "export_onnx",
    "export_tensorrt",
    "find_attention",
    "load_default_model",
    "policies",
    "train_gates",
    "transform",
]
__version__ = "0.1.0"
