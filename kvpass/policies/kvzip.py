from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from .base import Chunk, Policy

INSTRUCTION = "\n\nRepeat the previous context exactly."


@dataclass
class KVzip(Policy):
    """KVzip: keep what the model needs to reconstruct the context, whatever is asked later.

    After each prefill chunk the model is made to repeat it: the probe ``repeat`` (the instruction,
    and the chat turn that starts the model's answer) followed by the chunk's own tokens, teacher-
    forced, runs after the chunk through every layer (it attends over the kept slots, the chunk and
    itself, causally) and is never admitted. A candidate j of the chunk scores

        score_j = max over the probe's queries i and the query heads h of j's KV head of
                  softmax_j(q_{i,h} k^T * scale)

    with the softmax over the sinks (slots at positions < ``sink_tokens``), the chunk and the
    probe, as in the paper. A token keeps the score its own chunk's reconstruction gave it, so
    evicting chunk by chunk keeps, per layer and KV head, the top entries by those scores. A chunk's
    probe repeats that chunk alone, so reading the context in one chunk scores it better (the
    paper's method with a uniform budget per head; docs/query-agnostic.md measures the difference).

    With a reading buffer (``transform(..., reading=...)`` larger than budget + chunk) the chunks
    are read without their probe (entering at score 0), and when the buffer is compressed the probe
    repeats everything read since the last compression, a chunk at a time, placed after it: each
    piece attends over the whole buffer and itself, and every entry of the buffer scores the most
    attention a probe query gives it, the softmax over the whole buffer and the probe -- the paper's
    scoring of the whole context, with chunk-sized activations.
    By default one budget serves the whole model (``share="model"``, as in the paper's non-uniform
    head budgets and kvpress's default): the entries of all layers and KV heads are ranked together
    by these probabilities, so the budget goes where reconstruction reads most; the reading buffer
    (budget + chunk per layer and KV head) is held while the prompt is read. ``share="head"``: each
    KV head keeps the budget (what a fixed-shape engine needs: ``"layer"`` or ``"head"``).
    The probe costs a second pass over the context while it is prefilled; scoring holds one
    ``[B, H, P, C + T + P]`` probability matrix per layer at a time (P the probe's length).
    A decoded token is not scored (the paper compresses the context only): it enters with the
    highest score, so the context gives way to what is generated.

    ``repeat``: the probe's token ids before the chunk's copy (:meth:`instruction` makes them
    from a tokenizer); empty: the chunk's copy alone.
    Kim et al., "KVzip: Query-Agnostic KV Cache Compression with Context Reconstruction",
    NeurIPS 2025, arXiv 2505.23416.
    """

    sink_tokens: int = 4
    repeat: tuple[int, ...] = ()
    share: str = "model"
    name = "kvzip"
    obs = 1  # the attention mass is not used
    probes = True

    def __post_init__(self) -> None:
        super().__post_init__()
        r = self.repeat
        if not isinstance(r, (list, tuple)) or not all(isinstance(i, int) and i >= 0 for i in r):
            raise ValueError(f"kvzip: repeat must be a sequence of token ids, got {r!r}")
        self.repeat = tuple(r)

    @classmethod
    def text_knobs(cls, tokenizer) -> dict[str, object]:
        return {"repeat": cls.instruction(tokenizer)}

    @staticmethod
    def instruction(tokenizer) -> tuple[int, ...]:
        """The paper's probe prefix in ``tokenizer``'s chat format: the instruction to repeat the
        context, then what closes the user's turn and opens the model's."""
        suffix = ""
        if getattr(tokenizer, "chat_template", None):
            mark = "\x00"
            chat = tokenizer.apply_chat_template(
                [{"role": "user", "content": mark}], tokenize=False, add_generation_prompt=True
            )
            suffix = chat[chat.rindex(mark) + 1 :]
        return tuple(tokenizer(INSTRUCTION + suffix, add_special_tokens=False).input_ids)

    def probe(self, input_ids: Tensor, positions: Tensor, after: Tensor | None = None) -> tuple[Tensor, Tensor]:
        B, R = input_ids.shape[0], len(self.repeat)
        prefix = torch.tensor(self.repeat, dtype=input_ids.dtype, device=input_ids.device).expand(B, R)
        real = positions >= 0
        last = positions.amax(dim=1) if after is None else after
        start = last[:, None] + 1  # after the chunk's last token (or the buffer's)
        copy = torch.where(real, start + R + real.long().cumsum(dim=1) - 1, -1)
        ahead = start + torch.arange(R, device=positions.device)
        return torch.cat([prefix, input_ids], dim=1), torch.cat([ahead, copy], dim=1)

    def score(self, chunk: Chunk) -> Tensor:
        B, Hkv, T, _ = chunk.keys.shape
        if chunk.probe is None:  # a decoded token enters first; a chunk read into a buffer waits for its probe
            fill = torch.ones_like if T == 1 else torch.zeros_like
            return torch.cat([chunk.old, fill(chunk.old[..., :T])], dim=-1)
        q, k, pos, scale = chunk.probe
        C, P = chunk.old.shape[-1], q.shape[2]
        if T == 0:  # the probe repeats the buffer: its softmax runs over all of it, as the paper's over the context
            sinks = chunk.slot_valid & (chunk.slot_pos >= 0)
        else:
            sinks = (chunk.slot_pos >= 0) & (chunk.slot_pos < self.sink_tokens)  # [B, Hkv, C]
        causal = torch.ones(P, P, dtype=torch.bool, device=q.device).tril() & (pos >= 0)[:, None, None, :]
        seen = torch.cat(
            [
                sinks[:, :, None, :].expand(B, Hkv, P, C),
                (chunk.pos >= 0)[:, None, None, :].expand(B, Hkv, P, T),
                (causal | torch.eye(P, dtype=torch.bool, device=q.device)).expand(B, Hkv, P, P),
            ],
            dim=-1,
        )
        keys = torch.cat([chunk.slot_keys, chunk.keys, k], dim=2).float()  # [B, Hkv, C + T + P, D]
        qg = q.float().unflatten(1, (Hkv, -1))  # [B, Hkv, G, P, D]
        logits = (qg @ keys[:, :, None].transpose(-1, -2)) * scale
        probs = logits.masked_fill(~seen[:, :, None], -torch.inf).softmax(dim=-1)
        if T == 0:  # every slot of the buffer: the most any piece's probe gave it
            return torch.maximum(chunk.old, probs[..., :C].amax(dim=(2, 3)))
        best = probs[..., C : C + T].amax(dim=(2, 3))  # [B, Hkv, T]
        return torch.cat([chunk.old, best], dim=-1)
