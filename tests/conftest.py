import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run in its interpreter on CPU tensors; it must be set before
    os.environ.setdefault("TRITON_INTERPRET", "1")  # anything imports triton (torch._dynamo does, via kvpass)

from kvpass.passes import capture  # noqa: F401  (imported early so a broken install fails fast)


def tiny_llama(seed: int = 0, layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 97):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=16 * heads,
        intermediate_size=96,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=8192,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        attn_implementation="sdpa",
    )
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="session")
def llama():
    """A tiny random Llama with grouped-query attention (4 heads, 2 KV heads)."""
    return tiny_llama()


@pytest.fixture(scope="session")
def default_model():
    import kvpass

    return kvpass.load_default_model()


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield
