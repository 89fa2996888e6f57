"""Capture one forward step of a causal LM as an FX graph with ``torch.export``."""

from __future__ import annotations

import inspect

import torch
from torch import nn

from .arange_positions import arange_positions
from .mixers import opaque, opaque_rows

POSITION_NAMES = ("position_ids", "input_pos", "pos", "positions")


class LogitsStep(nn.Module):
    """``(input_ids, position_ids) -> logits`` for a causal LM, with no cache of its own.

    The model is called with the token ids as its first argument and the ``[batch, sequence]``
    positions under the first of :data:`POSITION_NAMES` its forward takes, if any (plus
    ``use_cache=False`` where it takes that, as Hugging Face models do); it may return logits or
    an output with a ``logits`` field. A model that takes no positions must make them by
    ``arange`` over its input (:mod:`.arange_positions`).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        params = inspect.signature(model.forward).parameters
        self.pos_name = next((n for n in POSITION_NAMES if n in params), None)
        self.extra = {"use_cache": False} if "use_cache" in params else {}

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        pos = {self.pos_name: position_ids} if self.pos_name else {}
        out = self.model(input_ids, **pos, **self.extra)
        return getattr(out, "logits", out)


def capture(
    model: nn.Module, vocab_size: int = 2, mixers: list[nn.Module] = (), rows: list[nn.Module] = ()
) -> torch.fx.GraphModule:
    """Export ``model``'s forward with dynamic batch and sequence length; each of ``mixers`` (a
    hybrid's recurrent layers) and of ``rows`` (modules row-wise by contract) as one placeholder
    node (:mod:`.mixers`).

    The parameters of the returned module are the model's own (shared, not copied).
    """
    ids = torch.randint(0, vocab_size, (2, 17), device=_device(model))
    pos = torch.arange(17, device=ids.device).expand(2, 17)
    # Dim.DYNAMIC, not named Dims: it refuses to specialise but lets export keep guards it cannot
    # prove for every length (torch 2.11 cannot prove min(8s, 16s) == 8s for s >= 1).
    dyn = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
    dims = {"input_ids": dyn, "position_ids": dyn}
    step = LogitsStep(model)
    try:
        probe = lambda: step(ids[:1, :2], pos[:1, :2])
        with torch.no_grad(), opaque(list(mixers), probe), opaque_rows(list(rows)):
            program = torch.export.export(step, (ids, pos), dynamic_shapes=dims, strict=False)
    except Exception as e:  # re-raised with what was attempted
        args = ["input_ids", *([f"{step.pos_name}=..."] if step.pos_name else []), *(f"{k}=False" for k in step.extra)]
        call = ", ".join(args)
        raise RuntimeError(
            f"kvpass could not capture {type(model).__name__} with torch.export (forward({call}) with dynamic "
            f"batch and sequence length): {e}"
        ) from e
    gm = program.module()
    gm.meta["kvpass_shortest"] = _shortest(program)  # checked once the graph's other refusals had their say
    if not arange_positions(gm) and step.pos_name is None:
        raise ValueError(
            f"{type(model).__name__}.forward takes no token positions (an argument named one of "
            f"{', '.join(POSITION_NAMES)}) and makes none by arange over its input: kvpass runs a model a chunk "
            "or a token at a time, and each call must be told where its tokens are. Add such an argument (used "
            "where the model makes positions, e.g. torch.arange(T))."
        )
    return gm


def _shortest(program: torch.export.ExportedProgram) -> int:
    """The fewest tokens the exported graph holds for: ``torch.export`` keeps a condition on the
    length it could not prove for all (MoE routing written for a minimum number of tokens, say) as a
    range of the length's symbol, checked when the graph runs. (Every dynamic size is assumed to be
    at least 2; that one is no check, and a graph runs on one token.)"""
    ids = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == "input_ids")
    length = ids.meta["val"].shape[1]
    lengths = program.range_constraints.get(length.node.expr) if isinstance(length, torch.SymInt) else None
    return 1 if lengths is None or int(lengths.lower) <= 2 else int(lengths.lower)


def check_lengths(gm: torch.fx.GraphModule, name: str) -> None:
    """Refuse a captured graph that does not hold for one token: kvpass decodes a token at a time."""
    shortest = gm.meta.get("kvpass_shortest", 1)
    if shortest > 1:
        raise RuntimeError(
            f"kvpass could not capture {name} with torch.export for every sequence length: its graph holds only for "
            f"{shortest} tokens or more (a condition on the length in the model's code), and kvpass runs it a token "
            "at a time while decoding"
        )


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
