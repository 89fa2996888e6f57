"""Eviction policies, one file each, looked up by name.

``kvpass.policies()`` lists the names (this package is callable); ``get(name, **knobs)`` builds one.
"""

from __future__ import annotations

import sys
import types

from .aha import AhaKV
from .base import Chunk, Policy
from .full import Full
from .gate import AttentionGate
from .h2o import H2O
from .knorm import KNorm
from .observed import Observed
from .random import Random
from .snapkv import SnapKV
from .streaming import Streaming
from .tova import TOVA

_ALL = (Full, Streaming, H2O, Observed, TOVA, SnapKV, KNorm, AhaKV, AttentionGate, Random)
REGISTRY: dict[str, type[Policy]] = {p.name: p for p in _ALL}


def names() -> list[str]:
    """The policy names ``transform`` accepts."""
    return sorted(REGISTRY)


def get(policy: str | Policy, **knobs) -> Policy:
    """A policy instance from a name and knobs, or ``policy`` itself if it already is one."""
    if isinstance(policy, Policy):
        if knobs:
            raise ValueError("pass knobs either to the Policy instance or to transform(), not both")
        return policy
    if policy not in REGISTRY:
        raise ValueError(f"unknown policy {policy!r}; valid policies: {', '.join(names())}")
    try:
        return REGISTRY[policy](**knobs)
    except TypeError as e:  # an unknown knob
        raise ValueError(f"policy {policy!r}: {e}") from None


class _CallableModule(types.ModuleType):
    # `kvpass.policies` is both this package and, by the public API, a function listing the names.
    def __call__(self) -> list[str]:
        return names()


sys.modules[__name__].__class__ = _CallableModule

__all__ = [
    "H2O",
    "REGISTRY",
    "TOVA",
    "AhaKV",
    "AttentionGate",
    "Chunk",
    "Full",
    "KNorm",
    "Observed",
    "Policy",
    "Random",
    "SnapKV",
    "Streaming",
    "get",
    "names",
]
