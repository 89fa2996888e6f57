from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .base import Chunk, Policy
from .snapkv import pool_by_position


@dataclass
class AttentionGate(Policy):
    """Attention-Gate: a learned gate flags, per token and KV head, what to evict -- in context.

    A small gate per layer (:mod:`kvpass.policies.gate_network`) gives every token t a keep probability p_t per KV
    head from the layer's queries, keys and values: a gate query attends over the layer's keys,
    and a linear readout of its output, v_t and three norms gives the logit. The flag is
    p_t >= ``threshold``. A flagged-out token is seen by itself and by the ``window`` queries after
    it (default: the window the gate was trained with; 0 = only itself), then by no later query of
    that head -- also within its own prefill chunk -- and leaves the cache. If more tokens want to
    stay than the budget holds, the lowest p go. ``sink_tokens`` is off by default: the gate learns
    which tokens to keep.

    ``attention`` (beta): at the end of each prefill chunk, the ranking also counts what the chunk's
    newest query reads, as TOVA does: candidate j's score in KV head h is ``p_j + beta * min(1, N a_j)``,
    with a_j the attention the chunk's last query gives j averaged over h's query heads and N the
    number of candidates h sees -- a token read at least as much as the average gets the whole beta.
    Per KV head, because each head keeps its own tokens: its slot i holds another token than slot i
    of the next head, so their attention cannot be summed by slot. A slot keeps the score it was
    ranked with; a decoded token enters with p alone. 0: the gate alone.

    ``pool`` (odd k): the term's ``min(1, N a_j)`` is max-pooled over each candidate's k nearest
    candidates in position order (SnapKV's clustering, with the maximum: a token next to one the
    query reads is kept with it), so a read phrase stays whole in every head and repeated words
    keep their share. Only candidates the query sees are pooled. 0 or 1: no pooling.

    ``checkpoint``: a gate file from ``kvpass train-gates``; default: the gate shipped for the
    default model whose keep target (``target``; default the budget if it is a fraction, else 0.5)
    is nearest. ``gates``: a :class:`kvpass.policies.gate_network.Gates` object instead of a file.
    ``share`` defaults to the one the gate was trained for (``--share``: ``"model"`` when it
    learned one budget for the whole model, else ``"head"``).

    From the paper: a learned per-layer gate before attention, per-token per-head flags, in-context
    eviction, training on a frozen model with a keep-rate penalty. Ours: the gate reads the
    layer's q, k, v instead of its hidden states (no graph surgery, no second cache; see
    :mod:`kvpass.policies.gate_network`), self-distillation as the main loss with a hindsight term (the keep
    probability of the tokens a retrieval answer reads is pulled up; :mod:`kvpass.train.distill`), the
    grace ``window``, and the ``attention`` term (from TOVA, :mod:`kvpass.policies.tova`). Zeng et al.,
    "In-context KV-Cache Eviction for LLMs via Attention-Gate", arXiv 2410.12876.
    """

    window: int | None = None  # type: ignore[assignment]
    share: str | None = None  # type: ignore[assignment]
    threshold: float = 0.5
    checkpoint: str | None = None
    target: float | None = None
    attention: float = 0.0
    pool: int = 0
    gates: object = field(default=None, repr=False)  # kvpass.policies.gate_network.Gates; loaded by bind() if None
    name = "gate"
    gated = True
    obs = 1  # the ``attention`` term reads the newest query's attention only

    def __post_init__(self) -> None:
        self._window_given = self.window is not None
        self.window = self.window or 0
        self._share_given = self.share is not None
        self.share = self.share or "head"
        super().__post_init__()
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"gate: threshold must be in (0, 1), got {self.threshold!r}")
        if self.target is not None and not 0.0 < self.target < 1.0:
            raise ValueError(f"gate: target must be in (0, 1), got {self.target!r}")
        a = self.attention
        if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a < float("inf"):
            raise ValueError(f"gate: attention must be a non-negative number, got {a!r}")
        k = self.pool
        if isinstance(k, bool) or not isinstance(k, int) or k < 0 or (k > 1 and k % 2 == 0):
            raise ValueError(f"gate: pool must be 0 or a positive odd number of positions, got {k!r}")

    def bind(self, model, sites) -> None:
        from kvpass.policies import gate_network as gates

        base = gates.BaseModel.of(model, sites)
        if self.gates is not None:  # given as an object (e.g. just trained): its shapes must fit
            q = self.gates.query
            want = (base.layers, base.kv_heads, base.head_dim * base.heads // base.kv_heads, base.head_dim)
            if tuple(q.shape) != want:
                raise ValueError(f"gate: these gates have shape {tuple(q.shape)}, this model needs {want}")
            return
        if self.checkpoint is None:
            target = self.target or (self.budget if isinstance(self.budget, float) else 0.5)
            path = gates.shipped(target)
            try:
                net, info, _ = gates.load(path, base)
            except ValueError as e:
                raise ValueError(
                    f"policy 'gate' has a trained gate only for the default model; for this one pass "
                    f"checkpoint= a gate trained with `kvpass train-gates` ({e})"
                ) from None
        else:
            net, info, _ = gates.load(self.checkpoint, base)
        if self.allocation is None and info.get("allocation"):  # the per-layer budgets it was trained for
            self.allocation = tuple(info["allocation"])
        if not self._share_given:  # the budget it was trained for: each KV head's, or the model's
            self.share = info.get("share", "head")
        if not self._window_given:  # the window the gate was trained with
            self.window = info.get("window", 0)
            if isinstance(self.budget, int):
                self.check_fits(self.budget)
        device = next(model.parameters()).device
        self.gates = net.to(device)

    def keep_prob(self, layer: int | tuple[int, ...], q: Tensor, k: Tensor, v: Tensor, attend) -> Tensor:
        if self.gates is None:
            raise RuntimeError("the gate policy is not bound to a model; use it through kvpass.transform")
        return self.gates.keep_prob(layer, attend(self.gates.queries(layer, q)), k, v)

    def drops(self, score: Tensor) -> Tensor:
        return score < self.threshold

    def score(self, chunk: Chunk) -> Tensor:
        p = torch.cat([chunk.old, chunk.gate], dim=-1)
        if not self.attention:
            return p
        a = chunk.mass.float()  # [B, Hkv, N]: summed over each KV head's query heads
        n = (a > 0).sum(dim=-1, keepdim=True)  # the candidates the head could see
        read = (a * n / a.sum(dim=-1, keepdim=True).clamp_min(1e-30)).clamp(max=1.0)
        T = chunk.keys.shape[2]
        if self.pool > 1 and T > 1:
            read = pool_by_position(read, torch.where(a > 0, chunk.positions(), -1), self.pool, how="max")
        prefill = torch.sym_min(T - 1, 1)  # 0 for a decoded token, 1 for a chunk
        return p + (self.attention * prefill) * read.to(p.dtype)
