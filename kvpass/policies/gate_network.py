"""The Attention-Gate network: per layer and KV head, a keep probability for every token.

For layer ``l`` and KV head ``g`` (with query heads ``q_{t,h}``, ``h`` in ``g``) and token ``t``:

    a_t = W_{l,g} [q_{t,h} for h in g]                 (gate query, one per KV head)
    o_t = softmax(a_t K^T * scale) V                   (causal, over the layer's own keys and values)
    f_t = [o_t ; v_t ; log |o_t - v_t|^2 ; log |v_t|^2 ; log |k_t|^2]
    p_t = sigmoid(w_{l,g} . f_t + b_{l,g})              (keep probability)

The gate reads what the rewritten attention site already has (the layer's ``q, k, v`` after
RoPE), so it needs no graph surgery and no second cache: its attention runs over the keys the
layer holds. ``W`` starts as the mean of the group's query heads, so the gate's attention starts
as the average attention of its heads; ``w`` starts random on ``o`` and ``v`` and at zero on the
norms (``|o_t - v_t|`` is 0 for a token that sees only itself: the first one), and ``b`` at 1,
so training starts from keeping nearly everything and the rate term lowers it.

Checkpoints are safetensors with metadata naming the base model (architecture, layer count,
heads, KV heads, head dim, hidden size, a fingerprint of its embedding weights); loading into
another model, or a damaged file, is a clear error.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

SHIPPED = Path(__file__).parents[1] / "weights"  # kvpass/weights: trained gates for the default model


@dataclass(frozen=True)
class BaseModel:
    """What a gate checkpoint must match: the shapes it was trained for and whose weights."""

    architecture: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    hidden_size: int
    fingerprint: tuple[float, ...]  # norms of the first embedding rows: tells fine-tunes and random inits apart

    @classmethod
    def of(cls, model: nn.Module, sites) -> BaseModel:
        """Describe ``model`` from its rewritten attention ``sites`` (one per layer) and its weights."""
        rewritten = [s for s in sites if s.action == "rewrite"]
        shapes = {(s.heads, s.kv_heads, s.head_dim) for s in rewritten}
        if len(shapes) != 1:
            raise ValueError(f"a gate needs the same head shapes in every layer, this model has {sorted(shapes)}")
        ((heads, kv_heads, head_dim),) = shapes
        emb = model.get_input_embeddings().weight.detach()
        return cls(
            architecture=type(model).__name__.removeprefix("KVPass"),
            layers=len(rewritten),
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            hidden_size=emb.shape[1],
            fingerprint=tuple(round(float(x), 4) for x in emb[:8].double().norm(dim=1)),
        )

    def differences(self, other: BaseModel) -> list[str]:
        """How ``other`` differs from this model, in words (empty: a match)."""
        out = [
            f"{field} {getattr(self, field)} vs {getattr(other, field)}"
            for field in ("architecture", "layers", "heads", "kv_heads", "head_dim", "hidden_size")
            if getattr(self, field) != getattr(other, field)
        ]
        if not out and not all(
            math.isclose(a, b, rel_tol=1e-2) for a, b in zip(self.fingerprint, other.fingerprint, strict=True)
        ):
            out.append("same shapes but different weights (embedding fingerprint)")
        return out


class Gates(nn.Module):
    """One gate per layer and KV head (see the module docstring); parameters stacked over layers."""

    def __init__(self, layers: int, heads: int, kv_heads: int, head_dim: int, seed: int | None = None) -> None:
        super().__init__()
        G, D = heads // kv_heads, head_dim
        eye = torch.eye(D).repeat(G, 1) / G  # [G*D, D]: the mean of the group's query heads
        self.query = nn.Parameter(eye.expand(layers, kv_heads, G * D, D).clone())
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        readout = torch.randn(layers, kv_heads, 2 * D + 3, generator=gen) / math.sqrt(2 * D)
        readout[..., 2 * D :] = 0
        self.readout = nn.Parameter(readout)
        self.bias = nn.Parameter(torch.ones(layers, kv_heads))
        self.kv_heads = kv_heads

    def queries(self, layer: int | tuple[int, ...], q: Tensor) -> Tensor:
        """Gate queries ``[B, Hkv, T, D]`` from the layer's queries ``q [B, H, T, D]``. With a tuple
        of ``L`` layers, ``q``'s rows are those layers' batches, one after the other."""
        B, H, T, D = q.shape
        W = self._of(self.query, layer)  # [L, Hkv, G*D, D]
        L = W.shape[0]
        qg = q.view(L, B // L, self.kv_heads, H // self.kv_heads, T, D).transpose(3, 4).flatten(-2)
        return (qg.to(W.dtype) @ W[:, None]).flatten(0, 1).to(q.dtype)

    def keep_prob(self, layer: int | tuple[int, ...], o: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Keep probabilities ``[B, Hkv, T]`` (fp32) from the gate's attention output ``o`` and the
        tokens' keys and values (all ``[B, Hkv, T, D]``; rows as in :meth:`queries`)."""
        w, b = self._of(self.readout, layer), self._of(self.bias, layer)
        o, k, v = (t.to(w.dtype) for t in (o, k, v))
        norms = [(t.square().sum(-1, keepdim=True) + 1e-4).log() for t in (o - v, v, k)]
        feats = torch.cat([o, v, *norms], dim=-1)
        feats = feats.view(w.shape[0], -1, *feats.shape[1:])  # [L, B, Hkv, T, F]
        logit = (feats * w[:, None, :, None]).sum(-1) + b[:, None, :, None]
        return torch.sigmoid(logit.flatten(0, 1).float())

    @staticmethod
    def _of(param: Tensor, layer: int | tuple[int, ...]) -> Tensor:
        """``param``'s rows for ``layer`` (a leading axis of 1) or for a tuple of layers."""
        if isinstance(layer, int):
            return param[layer : layer + 1]
        if layer == tuple(range(param.shape[0])):
            return param  # every layer in order: no copy
        return param[list(layer)]

    def forward(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """Keep probabilities for a whole sequence (training): the gate attends causally over ``k, v``."""
        o = F.scaled_dot_product_attention(self.queries(layer, q), k, v, is_causal=True, scale=scale)
        return self.keep_prob(layer, o, k, v)


def save(gates: Gates, path: str | Path, base: BaseModel, info: dict, dtype: torch.dtype = torch.float32) -> None:
    """Write ``gates`` (as ``dtype``) with metadata naming ``base``."""
    tensors = {name: p.detach().to(dtype).contiguous() for name, p in gates.state_dict().items()}
    meta = {"format": "kvpass-gate/1", "base_model": json.dumps(asdict(base)), "info": json.dumps(info)}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def load(path: str | Path, base: BaseModel | None = None) -> tuple[Gates, dict, BaseModel]:
    """``(gates, info, trained-for model)`` from a checkpoint (fp32); with ``base``, it must be for it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no gate checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    if meta.get("format") != "kvpass-gate/1":
        raise ValueError(f"{path} is not a kvpass gate checkpoint (metadata format {meta.get('format')!r})")
    try:
        saved = json.loads(meta["base_model"])
        trained_for = BaseModel(**{**saved, "fingerprint": tuple(saved["fingerprint"])})
        info = json.loads(meta["info"])
    except (KeyError, TypeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: damaged gate metadata ({e})") from None
    if base is not None and (diff := trained_for.differences(base)):
        raise ValueError(
            f"{path} is a gate for another model ({'; '.join(diff)}, trained-for vs this one); "
            "train a gate for this model with `kvpass train-gates`"
        )
    gates = Gates(trained_for.layers, trained_for.heads, trained_for.kv_heads, trained_for.head_dim)
    try:
        gates.load_state_dict({n: t.float() for n, t in tensors.items()})
    except RuntimeError as e:
        raise ValueError(f"{path}: gate tensors missing, extra or misshapen ({e})") from None
    return gates.requires_grad_(False), info, trained_for


def publish(src: str | Path, dst: str | Path) -> None:
    """Copy a trained gate as fp16 (how the shipped gates are stored: half the bytes)."""
    g, info, base = load(src)
    save(g, dst, base, info, dtype=torch.float16)


def shipped(target: float) -> Path:
    """The committed gate for the default model whose keep target is nearest ``target``."""
    files = sorted(SHIPPED.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no shipped gate under {SHIPPED}")
    return min(files, key=lambda p: abs(_target_of(p) - target))


def _target_of(path: Path) -> float:
    return int(path.stem.rsplit("keep", 1)[1]) / 100  # e.g. SmolLM2-135M-Instruct-keep25
