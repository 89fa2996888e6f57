"""kvpass graph passes: capture a model as an FX graph, find its attention, rewrite it onto the evicting cache."""

from .capture import capture
from .find_attention import PROBE_LEN, Site, find_attention
from .rewrite import rewrite

__all__ = ["PROBE_LEN", "Site", "capture", "find_attention", "rewrite"]
