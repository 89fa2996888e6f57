"""Rewrite each attention site into one call of a module bound to that layer's KV cache."""

from __future__ import annotations

from collections.abc import Callable

from torch import fx, nn

from .find_attention import Site


def rewrite(
    gm: fx.GraphModule, sites: list[Site], make_module: Callable[[Site], nn.Module], positions: str = "position_ids"
) -> fx.GraphModule:
    """Replace every site marked ``rewrite`` by ``make_module(site)(q, k, v, positions)``.

    ``k`` and ``v`` are the per-KV-head tensors (before grouped-query repetition); ``positions``
    names the graph input carrying true token positions. The model's own mask construction is left
    without users and removed.
    """
    pos = next((n for n in gm.graph.nodes if n.op == "placeholder" and n.name == positions), None)
    if pos is None:
        raise ValueError(f"the captured graph has no input named {positions!r} to feed token positions from")
    for site in sites:
        if site.action != "rewrite":
            continue
        name = f"kvpass_attn_{site.layer}"
        gm.add_submodule(name, make_module(site))
        with gm.graph.inserting_before(site.node):
            call = gm.graph.call_module(name, (site.q, site.k, site.v, pos))
        call.meta = dict(site.node.meta)
        site.node.replace_all_uses_with(call)
        gm.graph.erase_node(site.node)
        site.node = call
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return gm
