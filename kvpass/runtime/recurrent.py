"""Recurrent state: what a hybrid model's recurrent layers carry from one token to the next.

A hybrid (Qwen3.5, Qwen3-Next, Nemotron-H, Jamba, Bamba, Falcon-H1, LFM, OLMo-Hybrid, Kimi-Linear,
...) keeps KV only in its attention layers; its other layers mix tokens through a fixed-size
state: a causal convolution's last inputs and a linear-attention or state-space matrix. kvpass
captures each such *mixer* as one node (:mod:`kvpass.passes.mixers`) and runs the mixer's own code
there, handing it, each step, an object with the cache surface the mixer was written against
(:class:`States`) over fixed-size tensors that live in the step's tables beside the KV slots
(:class:`kvpass.runtime.step.Layout`). So the state goes wherever the KV goes: through chunked
prefill and decoding, ``select_rows`` (beams, batches), ``fork``, ``torch.compile`` and the
exported engines; and the mixer runs whichever implementation transformers picks for it (its torch
path on a CPU, a kernel where one is installed).

Which modules are mixers is read from their code, not from a list of families: a module whose
``forward`` (or a function it calls) reads or writes state through that surface. What each carries
(shapes and dtypes) is measured once, by running it on two tokens with a recording :class:`States`.

Relied on in transformers (5.21 and newer, where every recurrent mixer takes its state through
one ``Cache`` surface; older versions are refused by the token-mixing check, naming the mixer):
``get_conv_state`` / ``update_conv_state(states, layer_idx, state_idx, conv_kernel_size=)``
(returning the previous inputs followed by the new ones), ``get_recurrent_state`` /
``update_recurrent_state``, ``is_recording_past``, ``get_recurrent_states_to_keep``,
``increase_count``, ``has_previous_state``; a mixer's forward takes ``hidden_states``,
``attention_mask`` (2-D, 1 for real tokens) and its cache as ``cache`` (5.25) or
``cache_params``. Tests: ``tests/test_hybrids.py``.
"""

from __future__ import annotations

import inspect
import types
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

SURFACE = frozenset({"get_conv_state", "update_conv_state", "get_recurrent_state", "update_recurrent_state"})
SURFACE |= {"get_linear_cache", "set_linear_cache"}  # MiniMax's lightning attention: its state, by its own names
CACHE_NAMES = ("cache", "cache_params")


class StateSpec(NamedTuple):
    """One tensor a mixer carries: a ``"conv"`` or ``"recurrent"`` state, the mixer's ``index`` for
    it (``state_idx``), its shape per batch row, and its dtype (None: the model's)."""

    kind: str
    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype | None


def mixers_of(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The recurrent mixers of ``model``, by path: modules whose forward, or a function it calls (two
    calls deep), reads or writes state through :data:`SURFACE`; the outermost where they nest."""
    found: list[tuple[str, nn.Module]] = []
    for name, m in model.named_modules():
        if any(name.startswith(f"{n}.") for n, _ in found):
            continue
        forward = inspect.unwrap(type(m).forward)
        methods = [inspect.unwrap(f) for n, f in vars(type(m)).items() if isinstance(f, types.FunctionType)]
        called = getattr(forward, "__code__", None)
        if _touches(forward) or any(
            called is not None and f.__name__ in called.co_names and _touches(f) for f in methods if f is not forward
        ):
            found.append((name, m))
    return found


def _touches(fn, depth: int = 2, seen: set | None = None) -> bool:
    code = getattr(fn, "__code__", None)
    seen = set() if seen is None else seen
    if code is None or fn in seen:  # (by function: wrappers share their code and close over different functions)
        return False
    seen.add(fn)
    names = set(code.co_names)
    if names & SURFACE:
        return True
    cells = [c.cell_contents for c in fn.__closure__ or () if c.cell_contents is not None]  # (a wrapper's function)
    called = [_function(x) for x in [*(fn.__globals__.get(n) for n in names), *cells]] if depth else []
    return any(f is not None and _touches(f, depth - 1, seen) for f in called)


def _function(obj) -> types.FunctionType | None:
    """The code behind a global a forward calls (or a function a wrapper closes over): a function, or a
    function wrapped as a module (how transformers lets a hub kernel replace one)."""
    if isinstance(obj, nn.Module):
        obj = getattr(type(obj), "forward", None)
    obj = inspect.unwrap(obj) if callable(obj) else None
    return obj if isinstance(obj, types.FunctionType) else None


def explain(error: Exception, model: nn.Module, mixers: list[str] = ()) -> Exception:
    """``error`` (a refusal: a node that mixes tokens, in ``error.where``, or a capture that failed),
    saying what is missing where it comes from a recurrent layer kvpass did not find as a mixer: one
    whose code keeps its state elsewhere than through :data:`SURFACE` (transformers before 5.21, or
    a family's own state attributes). ``mixers``: the paths of those found."""
    where = getattr(error, "where", "")
    try:
        module = model.get_submodule(where) if where else None
    except AttributeError:
        module = None
    while module is not None and not _recurrent(module):
        where = where.rpartition(".")[0]
        module = model.get_submodule(where) if where else None
    if module is None and not hasattr(error, "where"):  # a capture: the first recurrent layer not found
        where, module = next(
            ((n, m) for n, m in model.named_modules() if _recurrent(m) and n not in mixers and n), ("", None)
        )
    if module is None:
        return error
    explained = type(error)(
        f"{where} ({type(module).__name__}) is a recurrent layer whose state kvpass cannot carry: kvpass carries "
        "the state of a layer that reads and writes it through transformers' cache surface "
        f"({', '.join(sorted(SURFACE))}; transformers 5.21 or newer), and this one keeps it another way. {error}"
    )
    explained.where = where
    return explained


def _recurrent(module: nn.Module) -> bool:
    """A layer (not a whole model) that takes a recurrent cache (``cache_params``) or names itself
    recurrent or a mixer."""
    if hasattr(type(module), "config_class"):
        return False
    params = inspect.signature(module.forward).parameters
    name = type(module).__name__.lower()
    return "cache_params" in params or any(w in name for w in ("mamba", "recurrent", "deltanet", "shortconv", "rglru"))


class States:
    """The cache surface one mixer reads and writes its state through, for one call: over
    ``tensors`` (``(kind, index) -> [B, ...]``, written in place), or, with None, recording what
    the mixer would store (:func:`measure`). It never records the past: kvpass does not roll back."""

    def __init__(self, tensors: dict[tuple[str, int], Tensor] | None) -> None:
        self.tensors = tensors
        self.specs: dict[tuple[str, int], tuple[tuple[int, ...], torch.dtype]] = {}

    def _get(self, kind: str, index: int) -> Tensor | None:
        if self.tensors is None:
            return None
        state = self.tensors.get((kind, index))
        if state is None:
            raise RuntimeError(
                f"a recurrent mixer read a {kind} state #{index} it did not write when kvpass measured it"
            )
        return state

    def get_conv_state(self, layer_idx: int, state_idx: int = 0) -> Tensor | None:
        return self._get("conv", state_idx)

    def get_recurrent_state(self, layer_idx: int, state_idx: int = 0) -> Tensor | None:
        return self._get("recurrent", state_idx)

    def update_conv_state(
        self, conv_states: Tensor, layer_idx: int, state_idx: int = 0, conv_kernel_size: int | None = None, **kwargs
    ) -> Tensor:
        """Keep the last inputs of ``conv_states [B, C, T]``; return the kept ones followed by it."""
        state = self._get("conv", state_idx)
        if state is None:
            width = conv_kernel_size or conv_states.shape[-1]
            self.specs[("conv", state_idx)] = ((*conv_states.shape[1:-1], width), conv_states.dtype)
            return F.pad(conv_states, (max(0, width - conv_states.shape[-1]), 0))
        full = torch.cat([state.to(conv_states.dtype), conv_states], dim=-1)
        state.copy_(full[..., -state.shape[-1] :])
        return full

    def update_recurrent_state(self, recurrent_states: Tensor, layer_idx: int, state_idx: int = 0, **kwargs) -> Tensor:
        if not isinstance(recurrent_states, Tensor):
            raise TypeError("a recurrent mixer gave kvpass a history of states; kvpass keeps only the last")
        state = self._get("recurrent", state_idx)
        if state is None:
            self.specs[("recurrent", state_idx)] = (tuple(recurrent_states.shape[1:]), recurrent_states.dtype)
            return recurrent_states
        state.copy_(recurrent_states)
        return state

    def get_linear_cache(self, layer_idx: int) -> Tensor | None:
        return self._get("recurrent", 0)

    def set_linear_cache(self, layer_idx: int, linear_cache: Tensor) -> None:
        self.update_recurrent_state(linear_cache, layer_idx)

    def has_previous_state(self, layer_idx: int | None = None, state_idx: int | None = None) -> bool:
        return self.tensors is not None

    def is_recording_past(self, layer_idx: int | None = None) -> bool:
        return False

    def get_recurrent_states_to_keep(self, layer_idx: int | None = None) -> int:
        return 0

    def increase_count(self, layer_idx: int, state_idx: int = 0) -> None:
        """(transformers counts tokens here; kvpass counts them in its cache.)"""


class KVMixer(nn.Module):
    """One recurrent mixer in a rewritten graph, ``forward(x [B, T, D], positions [B, T]) -> [B, T, D]``.

    In a step (its ``io`` bound to one, :class:`kvpass.runtime.step.Exchange`) it carries its state
    in the step's tables; outside one (measuring attention masks on a probe) it runs as the original
    does, over the whole input from an empty state. Padding (position -1) is masked as transformers
    masks it."""

    def __init__(self, index: int, mixer: nn.Module, example: Tensor, where: str = "") -> None:
        super().__init__()
        self.index, self.mixer, self.where = index, mixer, where
        params = inspect.signature(mixer.forward).parameters
        self.cache_name = next((n for n in CACHE_NAMES if n in params), None)
        # what else it requires, unused by its recurrence (MiniMax's lightning attention: position_embeddings)
        self.unused = {
            n: None
            for n, p in params.items()
            if p.default is p.empty
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and n not in ("hidden_states", "attention_mask", *CACHE_NAMES)
        }
        if self.cache_name is None:
            raise ValueError(
                f"the recurrent mixer {where or type(mixer).__name__} takes its cache under none of the names kvpass "
                f"knows ({', '.join(CACHE_NAMES)})"
            )
        self.io = None  # the step's Exchange, bound by kvpass.transform
        self.stepwise = False  # fed a token at a time (its chunked path does not continue a state)
        self.specs = measure(self, example)

    def forward(self, x: Tensor, pos: Tensor) -> Tensor:
        call = None if self.io is None else self.io.call
        if call is None:
            return self.run(x, pos, None)
        return self.io.mix(self, x, pos)

    def run(self, x: Tensor, pos: Tensor, states: States | None) -> Tensor:
        """The mixer over ``x`` from ``states`` (written in place; None: none, as a forward without a
        cache). A ``stepwise`` mixer reads a chunk a token at a time, its padding zeroed here (the
        mixer masks only inputs of more than one token)."""
        if self.stepwise and states is not None and x.shape[1] > 1:
            if torch.compiler.is_exporting():
                raise ValueError(
                    f"the recurrent mixer {self.where} reads a chunk a token at a time (its chunked path does not "
                    "continue a state), a loop over the chunk's length that an engine's graph cannot hold"
                )
            x = x * (pos >= 0)[..., None].to(x.dtype)
            return torch.cat([self.run(x[:, t : t + 1], pos[:, t : t + 1], states) for t in range(x.shape[1])], 1)
        cache = {} if states is None else {self.cache_name: states}
        out = self.mixer(hidden_states=x, attention_mask=(pos >= 0).long(), **self.unused, **cache)
        out = out[0] if isinstance(out, tuple) and out else out  # (the output, then what the model ignores)
        if not isinstance(out, Tensor) or out.shape != x.shape:
            raise TypeError(
                f"the recurrent mixer {self.where or type(self.mixer).__name__} returned "
                f"{type(out).__name__ if not isinstance(out, Tensor) else tuple(out.shape)}; kvpass takes a mixer "
                "that returns a tensor of its input's shape"
            )
        return out

    def extra_repr(self) -> str:
        states = ", ".join(f"{s.kind}{s.index}={list(s.shape)}" for s in self.specs)
        step = ", a token at a time" if self.stepwise else ""
        return f"index={self.index}, {self.where or type(self.mixer).__name__}, {states}{step}"


@torch.no_grad()
def measure(mixer: KVMixer, example: Tensor) -> tuple[StateSpec, ...]:
    """What ``mixer`` stores (shapes per batch row, and dtypes), run on four tokens shaped like
    ``example``'s last dimension; a dtype the same as the input's is the model's (None).

    Then the state is checked to carry: the four tokens read at once, and read as 1, 2 and 1 (from
    an empty state, a chunk continuing a state, a decoded token), must give the same outputs. A mixer
    whose chunked path starts from zero whatever its state (transformers' Mamba-1 scan) is made
    ``stepwise`` if a token at a time then agrees, and refused if nothing does."""
    name = mixer.where or type(mixer.mixer).__name__
    device = next(mixer.mixer.parameters()).device
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(1, 4, example.shape[-1], generator=gen, device=device).to(example.dtype)
    pos = torch.arange(4, device=device)[None]
    recorder = States(None)
    whole = mixer.run(x, pos, recorder)
    if not recorder.specs:
        raise ValueError(f"the recurrent mixer {name} stored no state")
    specs = tuple(
        StateSpec(kind, index, shape, None if dtype == example.dtype else dtype)
        for (kind, index), (shape, dtype) in sorted(recorder.specs.items())
    )
    scale = float(whole.abs().amax().clamp_min(1e-6))
    err = _apart(mixer, x, pos, specs, whole, scale)
    if err is not None:
        mixer.stepwise = True
        if _apart(mixer, x, pos, specs, whole, scale) is not None:
            raise ValueError(
                f"the recurrent mixer {name} ({type(mixer.mixer).__name__}) does not carry its state from one chunk to "
                f"the next: read in pieces, its output differs from reading at once by {err:.2g} of its scale, and "
                "a token at a time as well; kvpass reads prompts in chunks and decodes a token at a time"
            )
    return specs


def _apart(mixer: KVMixer, x: Tensor, pos: Tensor, specs, whole: Tensor, scale: float) -> float | None:
    """How far (relative to ``scale``) ``x`` read as 1, 2 and 1 tokens is from ``whole``, where it is."""
    state = {(s.kind, s.index): torch.zeros(1, *s.shape, dtype=s.dtype or x.dtype, device=x.device) for s in specs}
    pieces = [mixer.run(x[:, a:b], pos[:, a:b], States(state)) for a, b in ((0, 1), (1, 3), (3, 4))]
    apart = torch.cat(pieces, dim=1)
    if torch.allclose(apart.float(), whole.float(), rtol=1e-3, atol=1e-4 * scale):
        return None
    return float((apart - whole).abs().amax()) / scale
