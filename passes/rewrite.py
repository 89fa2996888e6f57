"""Rewrite each attention site into one call of a module bound to that layer's KV cache."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx, nn

from .find_attention import Site


def rewrite(
    gm: fx.GraphModule, sites: list[Site], make_module: Callable[[Site], nn.Module], positions: str = "position_ids"
) -> fx.GraphModule:
    """Replace every site marked ``rewrite`` by ``make_module(site)(q, k, v, positions)`` (and the
    site's ``[H]`` sink logits, where it has them).

    ``k`` and ``v`` are the per-KV-head tensors (before grouped-query repetition); ``positions``
    names the graph input carrying true token positions, ``-1`` for padding: the attention modules
    (and recurrent mixers, :mod:`.mixers`) read it as it is; every other use (RoPE, position
    embeddings) reads it clamped at 0, so a padding token never indexes a table at -1. The model's own mask
    construction is left without
    users and removed.
    """
    g = gm.graph
    pos = next((n for n in g.nodes if n.op == "placeholder" and n.name == positions), None)
    if pos is None:
        raise ValueError(f"the captured graph has no input named {positions!r} to feed token positions from")
    if pos.users:
        with g.inserting_after(pos):
            clamped = g.call_function(torch.ops.aten.clamp_min.default, (pos, 0))
        clamped.meta = dict(pos.meta)
        raw = {clamped} | {n for n in pos.users if n.meta.get("kvpass_positions")}  # (a recurrent mixer's)
        pos.replace_all_uses_with(clamped, delete_user_cb=lambda user: user not in raw)
    for site in sites:
        if site.action != "rewrite":
            continue
        name = f"kvpass_attn_{site.layer}"
        gm.add_submodule(name, make_module(site))
        with g.inserting_before(site.node):
            k, v = site.k, site.v
            if site.kv_stride > 1:  # every head repeated kv_stride times: keep one of each
                H = site.kv_heads * site.kv_stride
                k, v = (g.call_function(torch.ops.aten.slice.Tensor, (t, 1, 0, H, site.kv_stride)) for t in (k, v))
                for t in (k, v):
                    t.meta["val"] = t.args[0].meta["val"][:, :: site.kv_stride]
            sinks = () if site.sinks is None else (site.sinks,)
            call = g.call_module(name, (site.q, k, v, pos, *sinks))
        call.meta = dict(site.node.meta)
        site.node.replace_all_uses_with(call)
        gm.graph.erase_node(site.node)
        site.node = call
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
