"""kvpass kernels: attention and scoring over the evicting cache (torch references; Triton on CUDA).

This directory installs as ``kvpass.kernels``. Where the repository root is on ``sys.path`` it is
also visible as a top-level ``kernels``, the name of a Hugging Face package that transformers
imports to probe for; imported under that name it stays empty, so the probe finds nothing and
our ops are not registered a second time (which would tear down the first registration).
"""

if __name__ == "kvpass.kernels":
    from .attend import attend, attend_attention, attend_reference, visible
    from .decode import decode, decode_attention, decode_reference
    from .eager_sdpa import eager_sdpa

    __all__ = [
        "attend",
        "attend_attention",
        "attend_reference",
        "decode",
        "decode_attention",
        "decode_reference",
        "eager_sdpa",
        "visible",
    ]
