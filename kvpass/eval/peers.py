"""The peer, NVIDIA's kvpress, run on the same model, prompts and compression as kvpass.

kvpress compresses the cache once, at the end of prefill, through forward hooks on a Hugging Face
model (``with press(model): model(prompt, past_key_values=cache)``); its cache then keeps growing
with the question and the answer. A budget here is the fraction of the prompt kept, so a kvpress
``compression_ratio`` is ``1 - budget``. Install with ``pip install "kvpass[compare]"`` (kvpress
pins transformers < 5.3; kvpass supports 5.2).
"""

from __future__ import annotations

import contextlib

# kvpass policy name -> the kvpress class with the same score (KVzipPress, as kvpress sets it
# by default, shares the budget across layers and heads, as kvpass's kvzip does by default); the last two have no
# kvpass counterpart yet. (kvpress has no H2O as in its paper -- raw sum plus a protected recent window.)
PRESSES = {
    "streaming": "StreamingLLMPress",
    "observed": "ObservedAttentionPress",
    "tova": "TOVAPress",
    "snapkv": "SnapKVPress",
    "knorm": "KnormPress",
    "kvzip": "KVzipPress",
    "expected_attention": "ExpectedAttentionPress",
    "pyramidkv": "PyramidKVPress",
}


def press(name: str, budget: float):
    """The kvpress press standing for ``name`` at ``budget`` (fraction of the prompt kept)."""
    if name not in PRESSES:
        raise ValueError(f"no kvpress counterpart for {name!r}; known: {', '.join(PRESSES)}")
    if not 0 < budget <= 1:
        raise ValueError(f"kvpress budgets are fractions of the prompt in (0, 1], got {budget}")
    try:
        import kvpress
    except ImportError as e:
        raise ValueError('kvpress is not installed: pip install "kvpass[compare]" (it needs transformers < 5.3)') from e
    return getattr(kvpress, PRESSES[name])(compression_ratio=1 - budget)


@contextlib.contextmanager
def applied(p, model):
    """``p`` hooked into ``model`` for the duration; eager attention where the press reads attention weights."""
    eager = type(p).__name__ == "ObservedAttentionPress"
    before = model.config._attn_implementation
    if eager:
        model.set_attn_implementation("eager")
    try:
        with p(model):
            yield
    finally:
        if eager:
            model.set_attn_implementation(before)
