"""Find the self-attention sites of a captured graph and describe each one.

A site is one ``aten.scaled_dot_product_attention`` call (or ``kvpass.eager_sdpa``, what
soft-capped eager attention is canonicalised to). Its keys and values are traced back through
grouped-query repetition (``repeat_kv``: unsqueeze + expand + reshape, or ``repeat_interleave``)
to the per-KV-head tensors that a cache would store.

What the graph's structure does not say plainly is measured: the graph is run once on a short
probe, and

- every site's effective mask is classified as causal, causal with a sliding window, causal
  within blocks (chunked attention, Llama 4's local layers), or something else (skipped) -- mask
  construction differs between models and versions; an additive
  mask's finite entries are a bias on the scores, taken only where it is ALiBi's (BLOOM, MPT):
  ``m_h * j`` plus anything constant along a query's row (``j`` the key's position, ``m_h`` a slope
  per query head), which kvpass adds from the positions it keeps per slot; any other bias is
  skipped (dropping it would be silently wrong);
- a single KV head that attention broadcasts to every query head (Falcon's multi-query) is
  taken as it is;
- where no repetition was found, heads whose keys *and* values are identical on the probe are
  recognised as one KV head repeated (Falcon repeats K/V before RoPE, by broadcasting a fused
  QKV projection), and the site reads every ``G``-th head only.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx

from kvpass.kernels import eager_sdpa  # noqa: F401  (registers torch.ops.kvpass.eager_sdpa)

SDPA = torch.ops.aten.scaled_dot_product_attention.default
EAGER_SDPA = torch.ops.kvpass.eager_sdpa.default
_PASS_THROUGH = {torch.ops.aten.clone.default, torch.ops.aten.contiguous.default, torch.ops.aten.alias.default}
_RESHAPE = {torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default}
PROBE_LEN = 16


@dataclass
class Site:
    """One attention call: what it computes and what kvpass will do with it."""

    layer: int
    module: str  # the module the call came from, e.g. ``model.layers.3.self_attn``
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    causal: bool
    sliding_window: int | None
    softcap: float = 0.0  # attention logits capped to (-c, c) by c * tanh(x / c); 0 = none
    value_dim: int = 0  # head dim of the values (0: head_dim; multi-head latent attention differs)
    alibi: tuple[float, ...] = ()  # ALiBi: per query head, the slope m_h of the bias m_h x key position; () none
    chunked: int = 0  # chunked attention: a query sees only keys of its block of this many positions (0: none)
    kv_stride: int = 1  # the site's k/v repeat each KV head this many times (read every kv_stride-th head)
    action: str = "rewrite"  # or "skip"
    reason: str = ""
    sinks: fx.Node | None = field(default=None, repr=False, compare=False)  # ``[H]`` sink logits (GPT-OSS)
    node: fx.Node | None = field(default=None, repr=False, compare=False)
    q: fx.Node | None = field(default=None, repr=False, compare=False)
    k: fx.Node | None = field(default=None, repr=False, compare=False)
    v: fx.Node | None = field(default=None, repr=False, compare=False)


def find_attention(gm: fx.GraphModule, probe: tuple | None = None) -> list[Site]:
    """Every attention call in ``gm``, in graph order; ``probe`` is an example input to measure masks with."""
    nodes = [n for n in gm.graph.nodes if n.op == "call_function" and n.target in (SDPA, EAGER_SDPA)]
    measured = _measure(gm, nodes, probe) if probe is not None else {}
    sites = []
    for layer, node in enumerate(nodes):
        a = _attn_args(node)
        q = node.args[0]
        _, H, _, D = _shape(q)
        k, kv_heads = (node.args[1], _shape(node.args[1])[1]) if a["gqa"] else _kv_source(node.args[1], H)
        v, v_heads = (node.args[2], kv_heads) if a["gqa"] else _kv_source(node.args[2], H)
        scale = a["scale"] or 1.0 / math.sqrt(D)
        site = Site(layer, _module_path(node), H, kv_heads, D, float(scale), False, None, float(a["softcap"]))
        site.node, site.q, site.k, site.v, site.sinks = node, q, k, v, a["sinks"]
        if v_heads != kv_heads:
            site.k, site.v, site.kv_heads = node.args[1], node.args[2], H  # keys and values grouped differently
        site.value_dim = int(_shape(v)[-1])
        if node in measured:
            kind, group, site.alibi = measured[node]
            site.causal = kind is not None
            site.sliding_window, site.chunked = (kind[0] or None, kind[1]) if kind else (None, 0)
            if kind is None and site.action == "rewrite":
                site.action = "skip"
                site.reason = (
                    "not causal self-attention (bidirectional, a bias on the scores other than ALiBi's, "
                    "or an unrecognised mask)"
                )
            if site.kv_heads == H and group > 1:
                site.kv_heads, site.kv_stride = H // group, group
        band = _buffer_window(gm, a["mask"])
        if site.causal and not site.sliding_window and not site.chunked and band:
            site.sliding_window = band
        sites.append(site)
    return sites


def _attn_args(node: fx.Node) -> dict:
    """Mask, causality, scale, GQA flag and soft-cap of an attention node, wherever they were passed."""
    if node.target == EAGER_SDPA:
        _, _, _, mask, scale, softcap, *sinks = node.args
        sinks = sinks[0] if sinks else node.kwargs.get("sinks")
        return {"mask": mask, "causal": False, "scale": scale, "gqa": False, "softcap": softcap, "sinks": sinks}
    names = ("q", "k", "v", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    got = {**dict(zip(names, node.args, strict=False)), **node.kwargs}
    return {
        "mask": got.get("attn_mask"),
        "causal": bool(got.get("is_causal", False)),
        "scale": got.get("scale"),
        "gqa": bool(got.get("enable_gqa", False)),
        "softcap": 0.0,
        "sinks": None,
    }


def _shape(node: fx.Node) -> tuple:
    return tuple(node.meta["val"].shape)


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    path = str(list(stack.values())[-1][0]) if stack else ""
    return path.removeprefix("model.")  # the capture wrapper's own attribute


def _skip(node: fx.Node) -> fx.Node:
    while (
        isinstance(node, fx.Node)
        and node.op == "call_function"
        and (
            node.target in _PASS_THROUGH
            or (node.target == torch.ops.aten.slice.Tensor and _same(_shape(node), _shape(node.args[0])))
        )
    ):
        node = node.args[0]
    return node


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(str(x) == str(y) for x, y in zip(a, b, strict=True))


def _kv_source(node: fx.Node, heads: int) -> tuple[fx.Node, int]:
    """The tensor before grouped-query repetition, and its number of heads."""
    if _shape(node)[1] == 1 and heads > 1:  # one KV head that attention broadcasts (multi-query)
        return node, 1
    n = _skip(node)
    if n.op == "call_function" and n.target == torch.ops.aten.repeat_interleave.self_int:
        src, reps, dim = n.args[0], n.args[1], n.args[2] if len(n.args) > 2 else n.kwargs.get("dim")
        if dim == 1 and _shape(src)[1] * reps == heads:
            return src, _shape(src)[1]
    if n.op == "call_function" and n.target in _RESHAPE:
        expanded = _skip(n.args[0])
        if expanded.op == "call_function" and expanded.target == torch.ops.aten.expand.default:
            unsq = _skip(expanded.args[0])
            if unsq.op == "call_function" and unsq.target == torch.ops.aten.unsqueeze.default and unsq.args[1] == 2:
                src = _skip(unsq.args[0])
                Hkv = _shape(src)[1]
                e = _shape(expanded)
                if len(e) == 5 and str(e[1]) == str(Hkv) and Hkv * int(e[2]) == heads:
                    return src, Hkv
    return node, heads


class _Probe(fx.Interpreter):
    def __init__(self, gm, nodes):
        super().__init__(gm)
        self.watch, self.found = set(nodes), {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.watch:
            a = _attn_args(n)
            q, k, v = (self.env[x] for x in n.args[:3])
            mask = self.env[a["mask"]] if isinstance(a["mask"], fx.Node) else None
            slopes = ()
            if mask is not None and mask.dtype != torch.bool:
                mask, slopes = _alibi(mask, q.shape[1])
            found = _classify(mask, a["causal"], q.shape[2], k.shape[2])
            self.found[n] = (found, _head_group(k, v), slopes if found is not None else ())
        return out


def _measure(gm: fx.GraphModule, nodes: list[fx.Node], probe: tuple) -> dict:
    """For every attention node: (mask kind, see :func:`_classify`; head group size, see
    :func:`_head_group`; ALiBi slopes, see :func:`_alibi`)."""
    interp = _Probe(gm, nodes)
    try:
        with torch.no_grad():
            interp.run(*probe)
    except Exception as e:  # re-raised with what was being done
        raise RuntimeError(
            "the graph torch.export captured fails when run on a 16-token probe (which kvpass does to measure "
            f"each attention site's mask): {type(e).__name__}: {e}"
        ) from e
    return interp.found


def _buffer_window(gm: fx.GraphModule, mask, depth: int = 8) -> int | None:
    """The window of a mask sliced from a constant boolean ``[..., P, P]`` buffer (GPT-Neo's local
    layers keep theirs in one), read from the whole buffer: the probe sees only its corner."""
    frontier, seen = [mask], set()
    for _ in range(depth):
        nxt = []
        for n in frontier:
            if not isinstance(n, fx.Node) or n in seen:
                continue
            seen.add(n)
            if n.op == "get_attr":
                try:
                    t = operator.attrgetter(n.target)(gm)
                except AttributeError:
                    continue
                if isinstance(t, torch.Tensor) and t.dtype == torch.bool and t.dim() >= 2:
                    P = t.shape[-1]
                    if t.shape[-2] == P > PROBE_LEN and t.numel() == P * P:
                        band = t.reshape(P, P).cpu()
                        w = int(band[-1].sum())
                        tril = torch.ones(P, P, dtype=torch.bool).tril()
                        if w < P and torch.equal(band, tril & ~tril.tril(-w)):
                            return w
            nxt += n.all_input_nodes
        frontier = nxt
    return None


def _head_group(k: torch.Tensor, v: torch.Tensor) -> int:
    """The largest ``G`` such that heads ``[jG, (j+1)G)`` have identical keys and values (1 if none)."""
    H = k.shape[1]
    for G in range(H, 1, -1):
        if H % G == 0 and all(bool((g == g[:, :, :1]).all()) for g in (t.unflatten(1, (H // G, G)) for t in (k, v))):
            return G
    return 1


def _alibi(mask: torch.Tensor, heads: int) -> tuple[torch.Tensor, tuple[float, ...]]:
    """An additive mask ``[..., T, S]`` measured on the probe (keys at positions ``0 .. S-1``) without
    its bias, and the bias's ALiBi slopes: where its finite entries are ``m_h * j + c`` (``c``
    constant along each query's row, which the softmax ignores), ``m_h`` per query head, the mask
    comes back as 0 / -inf and the slopes as a tuple; else the mask as it was and ``()``."""
    seen = mask > -1e4  # what masks is very negative; a bias is not
    finite = mask.double().masked_fill(~seen, 0.0)
    if not bool(finite.any()) or mask.dim() < 2:
        return mask, ()
    S = mask.shape[-1]
    if mask.dim() > 4:
        return mask, ()
    lead = (1,) * (4 - mask.dim())  # as attention broadcasts it: [B, H or 1, T, S]
    bias, see = finite.reshape(*lead, *mask.shape), seen.reshape(*lead, *mask.shape)
    if bias.shape[1] not in (1, heads):
        return mask, ()
    last = see[:, :, -1]  # the last query sees the most keys (causal)
    j = torch.arange(S, dtype=torch.float64)
    first = torch.where(last, j, float(S)).amin(dim=-1).long()
    end = torch.where(last, j, -1.0).amax(dim=-1).long()
    if bool((end <= first).any()):
        return mask, ()
    rows = bias[:, :, -1]
    slope = (rows.gather(-1, end[..., None]) - rows.gather(-1, first[..., None]))[..., 0] / (end - first)  # [B, H']
    rest = torch.where(see, bias - slope[..., None, None] * j, torch.nan)
    row = rest.nanmean(dim=-1, keepdim=True)
    tol = 1e-4 * (1.0 + float(bias.abs().max()))
    if not bool(((rest - row).abs() <= tol).logical_or_(~see).all()) or float((slope - slope[:1]).abs().max()) > tol:
        return mask, ()
    plain = torch.zeros_like(mask).masked_fill(~seen, -torch.inf)
    return plain, tuple(float(m) for m in slope[0].expand(heads))


def _classify(mask, is_causal: bool, Tq: int, Tk: int) -> tuple[int, int] | None:
    """``(window, chunk)``: ``(0, 0)`` for causal, ``(w, 0)`` for causal with a window of ``w``
    positions, ``(0, c)`` for causal within blocks of ``c`` positions (chunked attention); None
    for anything else."""
    if Tq != Tk:
        return None
    tril = torch.ones(Tq, Tk, dtype=torch.bool).tril()
    if mask is None:
        return (0, 0) if is_causal else None
    if mask.dtype != torch.bool:  # additive: 0 where seen, very negative where not; anything else is a bias
        seen = mask > -1e4
        if bool((mask[seen.expand_as(mask)] != 0).any()):
            return None  # a bias on the scores (relative positions) that is not ALiBi's: not plain causal attention
    else:
        seen = mask
    seen = seen.expand(*seen.shape[:-2], Tq, Tk).reshape(-1, Tq, Tk).cpu()
    if not bool((seen == seen[0]).all()):
        return None
    seen = seen[0] & tril if is_causal else seen[0]
    if torch.equal(seen, tril):
        return (0, 0)
    i = torch.arange(Tq)
    for w in range(1, Tq):
        if torch.equal(seen, tril & ~torch.ones(Tq, Tk, dtype=torch.bool).tril(-w)):
            return (w, 0)
        if torch.equal(seen, tril & (i[:, None] // w == i[None, :] // w)):
            return (0, w)
    return None
