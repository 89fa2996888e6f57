"""Cut the LM head off the end of the graph, so logits are computed only for the rows wanted.

Prefilling a 512-token chunk of a 49k-vocabulary model would otherwise compute (and hold) a
512 x 49k logits matrix per chunk, of which generation reads one row.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import fx, nn

from .find_attention import _skip


class Head(nn.Module):
    """The linear layer that maps final hidden states to logits (its weights are the model's own)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.weight, self.bias = weight, bias

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return F.linear(hidden, self.weight, self.bias)


def split_head(gm: fx.GraphModule) -> Head | None:
    """If the graph's single output is a ``linear`` of a parameter, make the graph return that
    linear's input instead and return the linear as a :class:`Head`; otherwise change nothing and
    return ``None`` (e.g. when logits are soft-capped after the head)."""
    output = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    results = output.args[0]
    if not isinstance(results, (tuple, list)) or len(results) != 1:
        return None
    linear = results[0]
    if not (
        isinstance(linear, fx.Node) and linear.op == "call_function" and linear.target == torch.ops.aten.linear.default
    ):
        return None
    x, weight, bias = [*linear.args, None][:3]
    if weight.op != "get_attr" or (bias is not None and bias.op != "get_attr"):
        return None
    head = Head(gm.get_parameter(weight.target), gm.get_parameter(bias.target) if bias is not None else None)
    output.args = ((_skip(x),),)
    gm.graph.eliminate_dead_code()
    gm.graph.lint()
    gm.recompile()
    return head
