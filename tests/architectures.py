"""Tiny random configurations of the transformers architectures kvpass is tested on (no downloads)."""

import torch
import transformers as T

_GQA = {"num_attention_heads": 4, "num_key_value_heads": 2}
_LLAMA_LIKE = {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, **_GQA}

# name -> (config class, model class, config kwargs, attention implementation)
ARCHITECTURES = {
    "llama": (T.LlamaConfig, T.LlamaForCausalLM, _LLAMA_LIKE, "sdpa"),
    "mistral": (T.MistralConfig, T.MistralForCausalLM, {**_LLAMA_LIKE, "sliding_window": 8}, "sdpa"),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, _LLAMA_LIKE, "sdpa"),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, {**_LLAMA_LIKE, "head_dim": 16}, "sdpa"),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, _LLAMA_LIKE, "sdpa"),
    # Gemma 2 soft-caps attention logits, which only its eager attention does.
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM, {**_LLAMA_LIKE, "head_dim": 16, "sliding_window": 8}, "eager"),
    "gemma3": (
        T.Gemma3TextConfig,
        T.Gemma3ForCausalLM,
        {**_LLAMA_LIKE, "head_dim": 16, "sliding_window": 8, "layer_types": ["sliding_attention", "full_attention"]},
        "sdpa",
    ),
    "gpt2": (T.GPT2Config, T.GPT2LMHeadModel, {"n_embd": 64, "n_layer": 2, "n_head": 4, "n_positions": 256}, "sdpa"),
    "gpt_neox": (
        T.GPTNeoXConfig,
        T.GPTNeoXForCausalLM,
        {"hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4},
        "sdpa",
    ),
    "opt": (
        T.OPTConfig,
        T.OPTForCausalLM,
        {
            "hidden_size": 64,
            "ffn_dim": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "word_embed_proj_dim": 64,
            "max_position_embeddings": 256,
        },
        "sdpa",
    ),
    "falcon": (
        T.FalconConfig,
        T.FalconForCausalLM,
        {
            "hidden_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_kv_heads": 2,
            "new_decoder_architecture": True,
        },
        "eager",
    ),
    # chunked attention: layer 0 sees blocks of 8 positions (RoPE), layer 1 everything (no RoPE)
    "llama4": (
        T.Llama4TextConfig,
        T.Llama4ForCausalLM,
        {
            **_LLAMA_LIKE,
            "intermediate_size_mlp": 96,
            "head_dim": 16,
            "num_local_experts": 2,
            "attention_chunk_size": 8,
            "no_rope_layer_interval": 2,
        },
        "sdpa",
    ),
    # ALiBi: a slope per head times the key's position, added to the scores (BLOOM: baddbmm's bias)
    "bloom": (T.BloomConfig, T.BloomForCausalLM, {"hidden_size": 64, "n_layer": 2, "n_head": 4}, "eager"),
    "mpt": (
        T.MptConfig,
        T.MptForCausalLM,
        {"d_model": 64, "n_heads": 4, "n_layers": 2, "expansion_ratio": 2, "max_seq_len": 256},
        "eager",
    ),
}


def build(name: str, seed: int = 0, attn_implementation: str | None = None):
    config_cls, model_cls, kwargs, impl = ARCHITECTURES[name]
    torch.manual_seed(seed)
    config = config_cls(
        vocab_size=97,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        **kwargs,
        attn_implementation=attn_implementation or impl,
    )
    return model_cls(config).eval()
