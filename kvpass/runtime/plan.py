"""The planner: how one call's tokens are cut into steps, decided once for every front door.

Eager ``forward``/``generate()``, the compiled step, the ONNX engine and the vLLM plugin all feed a
transformed model through :func:`plan`, so they cut the same input the same way and run each piece
in the same mode:

- an input is cut into spans of at most ``chunk`` tokens **from its end**, so the last span is a
  whole one and the first takes the remainder (the end of a prompt, where the question usually is,
  scores the most candidates before anything is lost); a remainder of one token joins the next
  span instead, so a span of one token is always a whole input;
- a span of one token is a **decoded** token (attend over the slots, then admit it), every other
  span a **prefill** chunk (attend causally, score, keep the best). The rule is the span's length
  alone, so an engine whose graphs branch on the input's length follows it too;
- while a prompt is read, its spans go into a **reading buffer**: ``room`` entries of tables per
  layer and KV head (the buffer less the chunk in flight). A span keeps everything read so far while
  that fits, and **compresses** the buffer to the budget when it would not, and after the prompt's
  last span: a policy then ranks the whole buffer at once. ``room`` equal to the budget is eviction
  after every chunk.
"""

from __future__ import annotations

from typing import NamedTuple

PREFILL, DECODE = "prefill", "decode"


class Span(NamedTuple):
    """Columns ``[start, end)`` of a call's input, run as one step in ``mode``; ``compress``: after
    this prefill span the tables keep only the budget (else everything, up to their capacity)."""

    start: int
    end: int
    mode: str
    compress: bool = False


def mode_of(tokens: int) -> str:
    """The mode of a step over ``tokens`` columns: :data:`DECODE` for one, else :data:`PREFILL`."""
    return DECODE if tokens == 1 else PREFILL


def cuts(length: int, chunk: int) -> list[tuple[int, int]]:
    """Where ``length`` tokens are cut into spans of at most ``chunk`` (``chunk + 1`` where a
    remainder of one joins the first whole span): from the end."""
    if length <= 0 or chunk <= 0:
        raise ValueError(f"cannot cut {length} tokens into chunks of {chunk}")
    ends = list(reversed(range(length, 0, -chunk)))
    starts = [max(0, end - chunk) for end in ends]
    if len(ends) > 1 and ends[0] == 1 and chunk > 1:  # no lone first token: it joins the next span
        ends, starts = ends[1:], [0, *starts[2:]]
    return list(zip(starts, ends, strict=True))


def plan(length: int, chunk: int, *, room: int | None = None, budget: int = 0) -> list[Span]:
    """The spans of an input of ``length`` tokens.

    ``room``: for a prompt, the entries its tables hold while it is read (per layer and KV head);
    a span compresses the buffer to ``budget`` (the largest layer's) when what it read would not
    fit, and the prompt's last span always does. None: nothing is compressed (every span keeps
    what its tables hold: an input after the prompt, or an engine whose tables are the budget)."""
    spans, held = [], 0
    pieces = cuts(length, chunk)
    for i, (start, end) in enumerate(pieces):
        mode = mode_of(end - start)
        compress = mode == PREFILL and room is not None and (i == len(pieces) - 1 or held + end - start > room)
        spans.append(Span(start, end, mode, compress))
        held = min(budget, held + end - start) if compress else held + end - start
    return spans
