"""kvpass graph passes: capture a model as an FX graph, find its attention, rewrite it onto the evicting cache."""

from .arange_positions import arange_positions
from .capture import capture, check_lengths
from .drop_noops import drop_noops
from .eager_to_sdpa import eager_to_sdpa
from .find_attention import PROBE_LEN, Site, find_attention
from .flatten_attrs import flatten_attrs
from .mixers import RowWise, rewrite_mixers, rewrite_rows
from .rewrite import rewrite
from .split_head import Head, split_head
from .token_mixing import TokenMixingError, check_token_local

__all__ = [
    "PROBE_LEN",
    "Head",
    "RowWise",
    "Site",
    "TokenMixingError",
    "arange_positions",
    "capture",
    "check_lengths",
    "check_token_local",
    "drop_noops",
    "eager_to_sdpa",
    "find_attention",
    "flatten_attrs",
    "rewrite",
    "rewrite_mixers",
    "rewrite_rows",
    "split_head",
]
