"""Capture one forward step of a causal LM as an FX graph with ``torch.export``."""

from __future__ import annotations

import inspect

import torch
from torch import nn


class LogitsStep(nn.Module):
    """``(input_ids, position_ids) -> logits`` for a causal LM, with no cache of its own.

    The model is called as ``model(input_ids=..., position_ids=...)`` (plus ``use_cache=False``
    where its forward takes it, as Hugging Face models do) and may return logits or an output
    with a ``logits`` field.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.extra = {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        out = self.model(input_ids=input_ids, position_ids=position_ids, **self.extra)
        return getattr(out, "logits", out)


def capture(model: nn.Module, vocab_size: int = 2) -> torch.fx.GraphModule:
    """Export ``model``'s forward with dynamic batch and sequence length.

    The parameters of the returned module are the model's own (shared, not copied).
    """
    ids = torch.randint(0, vocab_size, (2, 17), device=_device(model))
    pos = torch.arange(17, device=ids.device).expand(2, 17)
    # Dim.DYNAMIC, not named Dims: it refuses to specialise but lets export keep guards it cannot
    # prove for every length (torch 2.11 cannot prove min(8s, 16s) == 8s for s >= 1).
    dyn = {0: torch.export.Dim.DYNAMIC, 1: torch.export.Dim.DYNAMIC}
    dims = {"input_ids": dyn, "position_ids": dyn}
    try:
        with torch.no_grad():
            program = torch.export.export(LogitsStep(model), (ids, pos), dynamic_shapes=dims, strict=False)
    except Exception as e:  # re-raised with what was attempted
        raise RuntimeError(
            f"kvpass could not capture {type(model).__name__} with torch.export "
            f"(forward(input_ids, position_ids, use_cache=False) with dynamic batch and sequence): {e}"
        ) from e
    return program.module()


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")
