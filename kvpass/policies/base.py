"""What every eviction policy shares: the budget, the keep rule, and the scoring interface."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, NamedTuple

import torch
from torch import Tensor

SHARES = ("head", "layer", "model")  # who shares a budget's slots: a KV head, a layer's, the model's (Policy.share)


class Probe(NamedTuple):
    """Tokens a policy appended to a prefill chunk to score it (:meth:`Policy.probe`), as they
    reached one layer: queries ``q [B, H, P, D]``, keys ``k [B, Hkv, P, D]``, positions ``pos [B, P]``
    (-1 = padding), and the layer's softmax ``scale``. They attended over the slots, the chunk and
    themselves (causally) and are never admitted."""

    q: Tensor
    k: Tensor
    pos: Tensor
    scale: float


@dataclass
class Chunk:
    """What a policy may score with, for one layer and one step.

    ``old``: the slots' stored scores ``[B, Hkv, C]``; ``keys``, ``values``: the new tokens
    ``[B, Hkv, T, D]`` (after RoPE); ``pos``: their true positions ``[B, T]`` (-1 = padding);
    ``mass``: attention probability each key (slots, then the chunk) received from the chunk's
    last ``policy.obs`` queries, summed over the query heads of its KV head ``[B, Hkv, C + T]``;
    ``slot_pos``: the slots' positions ``[B, Hkv, C]``; ``gate``: the chunk's keep probabilities
    ``[B, Hkv, T]`` (gated policies only); ``slot_keys``: the slots' keys ``[B, Hkv, C, D]`` and
    ``probe``: the tokens the policy appended (:class:`Probe`), for policies that probe;
    ``slot_valid``: which slots hold an entry ``[B, Hkv, C]`` (a prefill chunk's).
    """

    old: Tensor
    keys: Tensor
    values: Tensor
    pos: Tensor
    mass: Tensor
    slot_pos: Tensor
    gate: Tensor | None = None
    slot_keys: Tensor | None = None
    probe: Probe | None = None
    slot_valid: Tensor | None = None

    def positions(self) -> Tensor:
        """The candidates' positions ``[B, Hkv, C + T]``: the slots', then the chunk's."""
        B, Hkv, T = self.keys.shape[:3]
        return torch.cat([self.slot_pos, self.pos[:, None, :].expand(B, Hkv, T)], dim=-1)


@dataclass
class Policy:
    """An eviction policy. Subclasses set ``name`` and implement :meth:`score`.

    ``budget``: slots per layer and KV head (int), or a fraction of the prompt length (float in
    (0, 1]). ``sink_tokens``: the first positions, never evicted. ``window``: the most recent
    positions, never evicted. ``allocation``: one multiplier of the budget per attention layer
    (layer i keeps ``ceil(budget * allocation[i])`` slots per KV head, never more than the prompt
    for a fractional budget); None: every layer keeps the budget. :func:`kvpass.calibrate`
    measures one whose mean is 1, which moves memory to the layers where eviction hurts most.
    ``share``: how a layer's slots are shared among its KV heads: ``"head"``, each KV head keeps
    the budget; ``"layer"``, the KV heads share one pool of budget x KV heads slots, and each
    entry's own head's score ranks it against the others' (as Ada-KV, Feng et al., arXiv
    2407.11550, does within a layer; here the memory follows the shares). The scores must then be
    comparable across the heads of a layer: attention a head's queries gave (each query's
    probabilities sum to one in every head), a learned probability, a position; a policy whose
    scores are not says so and refuses ``"layer"``. ``floor``: with ``"layer"``, each KV head keeps
    at least this fraction of its equal share -- its best entries -- whatever the others' scores
    (Ada-KV's safeguard; 0.2 there too): a head whose attention is sharp is not starved by one
    whose attention is spread. ``"model"``: every layer's pool shares one budget, budget x KV heads x
    layers slots: when the reading buffer is compressed, all layers' entries are ranked together
    (each head's floor first) and the best of them stay, so each layer's pool is sized by its scores
    (KVzip's non-uniform budgets, Kim et al., arXiv 2505.23416; kvpress's default); a layer holds at
    most its reading buffer. The scores must then be comparable across layers too: the policies
    that share heads rank by attention probabilities, keep probabilities or positions, alike in
    every layer. Decoding then admits within each layer's pool (:mod:`kvpass.runtime.shares`). An
    ``allocation`` then sets only each layer's equal share, hence its floor (a shipped gate carries
    the allocation it was trained with). The default is ``"head"``, except where a policy's scores
    were measured to share well (``kvzip``: ``"model"``; a gate: what it was trained for).
    """

    budget: int | float = 512
    sink_tokens: int = 0
    window: int = 0
    allocation: tuple[float, ...] | None = None
    share: str = "head"
    floor: float = 0.2

    name: ClassVar[str] = ""
    obs: ClassVar[int] = 1 << 30  # how many of a chunk's last queries feed ``mass``
    evicts: ClassVar[bool] = True
    mass_entropy_k: ClassVar[int] = 0  # > 0: ``mass`` at AhaKV's adaptive softmax scale (kvpass::attend)
    mass_by_value: ClassVar[bool] = False  # ``mass`` weighted by each key's squared value norm
    gated: ClassVar[bool] = False  # computes keep probabilities before attention (``keep_prob``)
    probes: ClassVar[bool] = False  # appends a probe to prefill chunks (``probe``)
    shares_heads: ClassVar[bool] = True  # its scores rank entries of different KV heads (``share="layer"``)

    def __post_init__(self) -> None:
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise ValueError(f"budget must be an int (slots) or a float in (0, 1] (fraction of the prompt), got {b!r}")
        if isinstance(b, float) and not 0.0 < b <= 1.0:
            raise ValueError(f"a float budget is a fraction of the prompt and must be in (0, 1], got {b}")
        if isinstance(b, int) and b <= 0:
            raise ValueError(f"budget must be a positive number of slots, got {b}")
        for knob in ("sink_tokens", "window"):
            value = getattr(self, knob)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{knob} must be a non-negative int, got {value!r}")
        if self.share not in SHARES:
            raise ValueError(f"share must be one of {SHARES}, got {self.share!r}")
        if isinstance(self.floor, bool) or not isinstance(self.floor, (int, float)) or not 0 <= self.floor <= 1:
            raise ValueError(f"floor is a fraction of a KV head's equal share, in [0, 1]; got {self.floor!r}")
        if self.share != "head" and not self.shares_heads:
            raise ValueError(f"policy {self.name!r}: its scores are not comparable across KV heads; use share='head'")
        if self.allocation is not None:
            a = self.allocation
            if not isinstance(a, (list, tuple)) or not a or not all(_positive(x) for x in a):
                raise ValueError(f"allocation must be a non-empty sequence of positive numbers (per layer), got {a!r}")
            if not self.evicts:
                raise ValueError(f"policy {self.name!r} keeps every token: an allocation of its budget means nothing")
            self.allocation = tuple(float(x) for x in a)
        if isinstance(b, int) and self.evicts:
            self.check_fits(b)

    def check_fits(self, slots: int) -> None:
        """The keep rule must leave room to choose: protected positions must be fewer than the slots."""
        if self.sink_tokens + self.window >= slots:
            raise ValueError(
                f"policy {self.name!r}: sink_tokens ({self.sink_tokens}) + window ({self.window}) must be smaller "
                f"than the budget ({slots} slots); lower them or raise the budget"
            )

    def capacity(self, prompt_len: int) -> int:
        """Slots per layer and KV head for a sequence whose first input has ``prompt_len`` tokens."""
        if isinstance(self.budget, float):
            return max(1, math.ceil(self.budget * prompt_len))
        return self.budget

    def layer_slots(self, slots: int, layer: int, most: int | None = None) -> int:
        """Slots of ``layer`` when every layer's budget is ``slots``: scaled by the layer's
        ``allocation``, capped at ``most`` (the prompt, for a fractional budget), never fewer than
        the keep rule needs."""
        if self.allocation is None:
            return slots
        n = math.ceil(slots * self.allocation[layer])
        if most is not None:
            n = min(n, max(most, slots))
        return max(n, self.sink_tokens + self.window + 1)

    def check_layers(self, layers: int) -> None:
        """Called by ``transform``: the allocation must have one multiplier per attention layer."""
        if self.allocation is not None and len(self.allocation) != layers:
            raise ValueError(
                f"allocation has {len(self.allocation)} multipliers, this model has {layers} attention layers "
                "(an allocation calibrated for another model?)"
            )

    @classmethod
    def text_knobs(cls, tokenizer) -> dict[str, object]:
        """Knobs this policy takes from the model's tokenizer, where the caller has one (none by default)."""
        return {}

    def bind(self, model, sites) -> None:
        """Called by ``transform`` with the model and its attention sites (a learned policy loads here)."""

    def keep_prob(self, layer: int | tuple[int, ...], q: Tensor, k: Tensor, v: Tensor, attend) -> Tensor:
        """A gated policy's keep probabilities ``[B, Hkv, T]`` for the chunk, before the layer attends:
        ``q [B, H, T, D]``, ``k, v [B, Hkv, T, D]``; ``attend(a)`` runs queries ``a [B, Hkv, T, D]`` over
        what the layer can see (kept slots, then the chunk causally) and returns their output. A tuple
        of layers: the rows are those layers' batches, one after the other (decode, all layers at once)."""
        raise NotImplementedError

    def probe(self, input_ids: Tensor, positions: Tensor, after: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
        """Tokens to append to a prefill chunk (``input_ids, positions [B, T]``) as ``(ids, positions)
        [B, P]``: they run through the model after the chunk, their attention reaches :meth:`score`
        (``Chunk.probe``), and they are never admitted nor change the chunk's logits. ``after [B]``:
        the probe's positions follow it instead of the chunk (a probe of a buffer already read,
        whose chunk is not run). None: no probe."""
        return None

    def drops(self, score: Tensor) -> Tensor | None:
        """Which new tokens leave at once, whatever room is left (in-context eviction); None: none."""
        return None

    def score(self, chunk: Chunk) -> Tensor:
        """Scores ``[B, Hkv, C + T]`` (slots, then the chunk); the lowest are evicted first."""
        raise NotImplementedError

    def across_heads(self, x: Tensor) -> Tensor:
        """``x [B, Hkv, N]`` summed over the layer's KV heads, ``[B, 1, N]``: the one way a score may mix
        KV heads (tensor parallelism splits them over workers and sums across them here too:
        :mod:`kvpass.serving.vllm`)."""
        return x.sum(dim=1, keepdim=True)

    def rank(self, score: Tensor, pos: Tensor, newest: Tensor) -> Tensor:
        """What candidates are ranked by, from their stored ``score`` and positions ``pos [B, Hkv, N]``
        (``newest [B]``: the newest position); the score itself unless a policy says otherwise."""
        return score

    def protected(self, pos: Tensor, newest: Tensor) -> Tensor:
        """Which positions the keep rule protects: sinks and the recent window. ``newest``: ``[B]``."""
        keep = pos < self.sink_tokens
        if self.window:
            keep = keep | (pos > newest.view(-1, *[1] * (pos.dim() - 1)) - self.window)
        return keep & (pos >= 0)


def _positive(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) and x > 0


def accumulated(chunk: Chunk) -> Tensor:
    """The slots' stored scores plus the attention mass they just received, then the chunk's own mass."""
    C = chunk.old.shape[-1]
    return torch.cat([chunk.old + chunk.mass[..., :C], chunk.mass[..., C:]], dim=-1)
