"""``kvpass.cache_stats``: what a transformed model's cache physically holds."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass
class LayerStats:
    layer: int
    capacity: int  # slots per batch row and KV head (on average, where the KV heads share a pool)
    kv_bytes: int  # keys + values, as allocated
    meta_bytes: int  # positions, scores, valid flags, owners
    held: int  # valid entries (token x KV head x batch row)
    evicted: int  # entries evicted so far


@dataclass
class CacheStats:
    policy: str
    tokens_seen: int  # columns fed per sequence (padding included)
    layers: list[LayerStats]
    state_bytes: int = 0  # a hybrid's recurrent state (its convolutions' and scans'), fixed-size

    @property
    def kv_bytes(self) -> int:
        return sum(s.kv_bytes for s in self.layers)

    @property
    def meta_bytes(self) -> int:
        return sum(s.meta_bytes for s in self.layers)

    @property
    def held(self) -> int:
        return sum(s.held for s in self.layers)

    @property
    def evicted(self) -> int:
        return sum(s.evicted for s in self.layers)

    def __str__(self) -> str:
        head = f"{'layer':>5} {'capacity':>8} {'KV bytes':>12} {'held':>9} {'evicted':>9}"
        rows = [f"{s.layer:>5} {s.capacity:>8} {s.kv_bytes:>12,} {s.held:>9,} {s.evicted:>9,}" for s in self.layers]
        total = f"{'all':>5} {'':>8} {self.kv_bytes:>12,} {self.held:>9,} {self.evicted:>9,}"
        state = [f"recurrent state: {self.state_bytes:,} bytes"] if self.state_bytes else []
        return "\n".join([f"policy {self.policy}, {self.tokens_seen} tokens seen", head, *rows, total, *state])


def cache_stats(model: nn.Module) -> CacheStats:
    """Physical KV bytes, capacity, tokens seen and evicted, per layer and in total, for the cache
    of the model's last forward (or ``generate``); a hybrid's recurrent-state bytes apart."""
    cache = getattr(model, "kvpass_cache", None)
    if getattr(model, "kvpass_policy", None) is None:
        raise ValueError("cache_stats needs a model returned by kvpass.transform")
    if cache is None:
        return CacheStats(model.kvpass_policy.name, 0, [])
    layers = [
        LayerStats(i, cache.layout.layer_capacity(i), s.kv_bytes, s.meta_bytes, int(s.valid.sum()), cache.evicted(i))
        for i, s in sorted(cache.slots.items())
    ]
    state = sum(t.nbytes for t in cache.tables[cache.layout.slot_tables :])
    return CacheStats(model.kvpass_policy.name, cache.seen, layers, state)
