"""``kvpass eval``: score policies x budgets x context lengths on the long-context tasks of
:mod:`kvpass.data.tasks`, the unmodified model beside them.

Two modes, as in kvpress's benchmarks:

- ``aware``: the question is part of the prompt that is compressed (prefilled, evicting);
- ``agnostic``: the context alone is prefilled and compressed; the question then comes as new
  tokens and is kept, with the answer, in slots reserved for them.

In both, eviction happens while the prompt (or context) is processed and not while answering,
like kvpress. The score of an answer is RULER's ``string_match_all``: the fraction of expected
answers that appear in it, case-insensitively.
"""

from __future__ import annotations

import contextlib
import copy
import time
from dataclasses import asdict, dataclass
from itertools import product
from typing import NamedTuple

import torch
from torch import Tensor, nn
from tqdm import tqdm

from kvpass import policies as kvpass_policies
from kvpass.data import tasks
from kvpass.eval import peers
from kvpass.runtime import allocation, hf
from kvpass.runtime.cache import READING, EvictingCache
from kvpass.transform import transform

ALLOC = "+alloc"  # suffix of a policy run with per-layer budgets
PEER = "kvpress:"  # prefix of a kvpress press, as a policy name

MODES = ("aware", "agnostic")


@dataclass
class Record:
    task: str
    tokens: int  # requested context length
    seed: int
    mode: str
    policy: str  # "full" (the unmodified model) or a kvpass policy
    budget: float | None  # fraction of the prompt (or context) kept; None for the full cache
    score: float  # 0..1
    output: str
    answers: list[str]
    seconds: float

    def to_dict(self) -> dict:
        return asdict(self)


def kvpass_names() -> list[str]:
    from kvpass import policies

    return policies()


def score(output: str, answers: list[str]) -> float:
    """RULER's ``string_match_all``: the fraction of ``answers`` found in ``output`` (case-insensitive)."""
    if not answers:
        raise ValueError("a sample needs at least one expected answer")
    out = output.lower()
    return sum(a.lower() in out for a in answers) / len(answers)


def render(tokenizer, sample: tasks.Sample, mode: str) -> list[Tensor]:
    """The sample as chat-formatted token ids: one piece (``aware``) or context, then question (``agnostic``)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    text = f"{sample.context}\n\n{sample.question}"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    cut = prompt.rindex(sample.question)
    pieces = [prompt] if mode == "aware" else [prompt[:cut], prompt[cut:]]
    return [tokenizer(p, return_tensors="pt", add_special_tokens=False).input_ids for p in pieces]


class Context(NamedTuple):
    """A context read into a cache: the logits of its last token, the cache, the tokens seen."""

    logits: Tensor
    cache: object
    seen: int


@torch.no_grad()
def read(model: nn.Module, context: Tensor, reserve: int, press=None) -> Context:
    """Prefill ``context [1, n]`` into a fresh cache, compressed as it is read (``press``: a kvpress
    press, applied to this prefill, which is how kvpress compresses); ``reserve``: the tokens that
    will follow it (a kvpass cache keeps slots for them)."""
    if hasattr(model, "kvpass_new_cache"):
        cache = model.kvpass_new_cache(decode_reserve=reserve)
    else:
        cache = hf.full_cache(model)
    with peers.applied(press, model) if press is not None else contextlib.nullcontext():
        return _feed(model, Context(None, cache, 0), context)


def _feed(model: nn.Module, at: Context, ids: Tensor) -> Context:
    # Positions are passed explicitly: a kvpress cache holds fewer entries than tokens seen, and
    # transformers would otherwise number the next tokens by the entries held (as kvpress's own
    # pipeline does, the true positions continue from the prompt's length).
    pos = torch.arange(at.seen, at.seen + ids.shape[1], device=ids.device)[None]
    logits, cache = hf.call(model, ids, at.cache, position_ids=pos, logits_to_keep=1)
    return Context(logits, cache, at.seen + ids.shape[1])


def fork(cache):
    """An independent copy of ``cache``: what one question does to it leaves the other questions' alone."""
    return cache.fork() if isinstance(cache, EvictingCache) else copy.deepcopy(cache)


@torch.no_grad()
def ask(model: nn.Module, at: Context, pieces: list[Tensor], max_new_tokens: int, eos: int | None = None) -> Tensor:
    """Feed ``pieces`` after the context ``at`` (whose cache this consumes), then decode greedily;
    the new token ids."""
    for piece in pieces:
        at = _feed(model, at, piece)
    nxt = at.logits[:, -1:].argmax(-1)
    tokens = [nxt]
    for _ in range(max_new_tokens - 1):
        if eos is not None and int(nxt) == eos:
            break
        at = _feed(model, at, nxt)
        nxt = at.logits[:, -1:].argmax(-1)
        tokens.append(nxt)
    return torch.cat(tokens, dim=1)[0]


def answer(model: nn.Module, pieces: list[Tensor], max_new_tokens: int, eos: int | None = None, press=None) -> Tensor:
    """Read the first piece (compressing it), feed the others, then decode greedily; the new token ids."""
    reserve = sum(p.shape[1] for p in pieces[1:]) + max_new_tokens
    return ask(model, read(model, pieces[0], reserve, press), pieces[1:], max_new_tokens, eos)


def answers(
    model: nn.Module, context: Tensor, questions: list[Tensor], max_new_tokens: int, eos: int | None = None, press=None
) -> list[Tensor]:
    """Compress once, ask anything: ``context`` is read (and compressed) once, then each question
    is answered from its own copy of that cache, as if it were the only one."""
    at = read(model, context, max(q.shape[1] for q in questions) + max_new_tokens, press)
    return [ask(model, Context(at.logits, fork(at.cache), at.seen), [q], max_new_tokens, eos) for q in questions]


@torch.no_grad()
def perplexity(model: nn.Module, ids: Tensor) -> float:
    """exp(mean next-token NLL) over ``ids [1, n]``, prefilled in one call (a kvpass model evicts as it goes)."""
    logits = hf.call(model, ids)[0][0, :-1].float()
    return float(torch.nn.functional.cross_entropy(logits, ids[0, 1:]).exp())


def evaluate(
    model: nn.Module,
    tokenizer,
    *,
    task_names: list[str],
    lengths: list[int],
    policies: list[str],
    budgets: list[float],
    samples: int = 3,
    mode: str = "aware",
    max_new_tokens: int = 48,
    chunk: int = 512,
    reading: int | None = READING,
    seed: int = 0,
    peer: str | None = None,
    ppl: bool = False,
    calibrations: list[dict] | None = None,
    progress: bool = True,
) -> list[Record]:
    """Every (task, length, sample) under the unmodified model and every (policy, budget); with
    ``peer="kvpress"``, also under kvpress's counterpart of every policy it has (policy ``kvpress:NAME``;
    such a name in ``policies`` runs that press alone).
    ``ppl=True`` adds, per length, the perplexity of documentation text (task ``perplexity``, its
    ``score`` the perplexity) for the unmodified model and every kvpass policy; kvpress compresses
    only after the prompt's logits are computed, so it has no such number. ``calibrations``:
    results of :func:`kvpass.calibrate`; every (policy, budget) also runs with per-layer budgets
    allocated from the sensitivities of the calibration nearest that budget (policy ``NAME+alloc``)."""
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose from {', '.join(MODES)}")
    for b in budgets:
        if not 0 < b <= 1:
            raise ValueError(f"eval budgets are fractions of the prompt in (0, 1], got {b}")
    if peer not in (None, "kvpress"):
        raise ValueError(f"unknown peer {peer!r}; the one known is kvpress")
    presses = [p.removeprefix(PEER) for p in policies if p.startswith(PEER)]  # the peer's rows alone
    policies = [p for p in policies if not p.startswith(PEER)]
    if presses:
        peers.press(presses[0], budgets[0])  # kvpress missing or an unknown name: fail before any run
    runs: list[tuple[str, float | None, nn.Module, object]] = [("full", None, model, None)]
    for policy, budget in product(policies, budgets):
        knobs = {"chunk": chunk, "reading": reading, "evict_during_decode": False}
        knobs |= kvpass_policies.text_knobs(policy, tokenizer)
        runs.append((policy, budget, transform(model, policy, budget, **knobs), None))
        if calibrations:
            alloc = allocation.nearest(calibrations, budget)
            small = transform(model, policy, budget, allocation=alloc, **knobs)
            runs.append((policy + ALLOC, budget, small, None))
    if peer == "kvpress":  # every counterpart, and the presses kvpass has none of
        presses += [p for p in peers.PRESSES if (p in policies or p not in kvpass_names()) and p not in presses]
    for policy, budget in product(presses, budgets):  # after the transforms: kvpress patches attention on import
        runs.append((PEER + policy, budget, model, peers.press(policy, budget)))
    cases = [
        (n, tasks.make(t, tokenizer, n, seed + i)) for t, n in product(task_names, lengths) for i in range(samples)
    ]
    eos = tokenizer.eos_token_id
    records = []
    bar = tqdm(total=len(cases) * len(runs), desc="eval", disable=not progress)
    for n, case in cases:
        pieces = render(tokenizer, case, mode)
        for policy, budget, m, press in runs:
            t = time.perf_counter()
            out = tokenizer.decode(answer(m, pieces, max_new_tokens, eos, press), skip_special_tokens=True)
            seconds, s = time.perf_counter() - t, score(out, case.answers)
            records.append(Record(case.task, n, case.seed, mode, policy, budget, s, out, case.answers, seconds))
            bar.update()
    bar.close()
    if ppl:
        for n in lengths:
            ids = tokenizer(tasks.documentation(tokenizer, n, seed), return_tensors="pt").input_ids[:, :n]
            for policy, budget, m, press in runs:
                if press is None:
                    t = time.perf_counter()
                    p = perplexity(m, ids)
                    seconds = time.perf_counter() - t
                    records.append(Record("perplexity", n, seed, mode, policy, budget, p, "", [], seconds))
    return records
