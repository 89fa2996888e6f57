"""Eviction policies, one file each, looked up by name.

``kvpass.policies()`` lists the names (this package is callable); ``get(name, **knobs)`` builds one.
Where a policy is named by a string (the CLI, ``transform``), knobs may ride along with it:
``"gate:threshold=0.05"``, ``"aha:k=64,value_norms=False"`` (values are Python literals, else strings).
"""

from __future__ import annotations

import ast
import sys
import types

from .aha import AhaKV
from .base import Chunk, Policy, Probe
from .full import Full
from .gate import AttentionGate
from .h2o import H2O
from .knorm import KNorm
from .kvzip import KVzip
from .observed import Observed
from .random import Random
from .snapkv import SnapKV
from .streaming import Streaming
from .tova import TOVA

_ALL = (Full, Streaming, H2O, Observed, TOVA, SnapKV, KNorm, KVzip, AhaKV, AttentionGate, Random)
REGISTRY: dict[str, type[Policy]] = {p.name: p for p in _ALL}


def names() -> list[str]:
    """The policy names ``transform`` accepts."""
    return sorted(REGISTRY)


def parse(spec: str) -> tuple[str, dict[str, object]]:
    """``"NAME:KNOB=VALUE,KNOB=VALUE"`` -> ``(NAME, {KNOB: VALUE})``; a bare name has no knobs."""
    name, _, rest = spec.partition(":")
    knobs: dict[str, object] = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or not key.isidentifier():
            raise ValueError(f"policy {spec!r}: knobs are written NAME:KNOB=VALUE,KNOB=VALUE, not {item!r}")
        if key in knobs:
            raise ValueError(f"policy {spec!r}: knob {key!r} given twice")
        try:
            knobs[key] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):  # not a literal: a string (a checkpoint path, say)
            knobs[key] = value.strip()
    return name.strip(), knobs


def merge(spec: str, knobs: dict[str, object]) -> tuple[str, dict[str, object]]:
    """The name in ``spec`` and its knobs joined with ``knobs`` (a knob in both is an error)."""
    name, named = parse(spec)
    if both := sorted(set(named) & set(knobs)):
        raise ValueError(f"policy {spec!r}: {', '.join(both)} given both in the name and as arguments")
    return name, {**knobs, **named}


def get(policy: str | Policy, **knobs) -> Policy:
    """A policy instance from a name (or ``NAME:KNOB=VALUE,...``) and knobs, or ``policy`` itself
    if it already is one."""
    if isinstance(policy, Policy):
        if knobs:
            raise ValueError("pass knobs either to the Policy instance or to transform(), not both")
        return policy
    policy, knobs = merge(policy, knobs)
    if policy not in REGISTRY:
        raise ValueError(f"unknown policy {policy!r}; valid policies: {', '.join(names())}")
    try:
        return REGISTRY[policy](**knobs)
    except TypeError as e:  # an unknown knob
        raise ValueError(f"policy {policy!r}: {e}") from None


def text_knobs(policy: str, tokenizer) -> dict[str, object]:
    """The knobs the policy named ``policy`` takes from ``tokenizer`` (KVzip's probe, say), less
    those the name already sets: what a caller holding a tokenizer passes on to ``transform``."""
    name, named = parse(policy)
    if name not in REGISTRY:
        return {}
    return {k: v for k, v in REGISTRY[name].text_knobs(tokenizer).items() if k not in named}


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
    "KVzip",
    "Observed",
    "Policy",
    "Probe",
    "Random",
    "SnapKV",
    "Streaming",
    "get",
    "merge",
    "names",
    "parse",
    "text_knobs",
]
