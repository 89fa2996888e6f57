"""A batch's tables over vLLM's per-request state rows (kvpass/serving/rows.py), without vLLM:
written back after a step exactly as a whole copy would write them, whatever the batch."""

import pytest
import torch

from kvpass.runtime.step import Layout, Slots
from kvpass.serving.rows import Plan, Rows

N = len(Slots._fields)
POS, OWNER, KEYS, VALUES, VALID, SCORE = (
    Slots._fields.index(f) for f in ("pos", "owner", "keys", "values", "valid", "score")
)


def layout():
    """Two groups: 2 layers of 2 KV heads x 6 slots, and 1 layer whose 2 KV heads pool 8 slots."""
    return Layout(((0, 2), (1,)), (6, 4), (2, 2), (8, 8), (8, 8), (False, True))


def filled(plan: Plan, rows: int, gen) -> list[torch.Tensor]:
    """vLLM's state tensors, ``rows`` requests, each row's bytes random (earlier requests' leftovers)."""
    return [torch.randint(-50, 50, (rows, *shape), generator=gen).to(dtype) for shape, dtype in plan.states]


def step(flat: list[torch.Tensor], gen, bulk_only_where_moved: bool = True) -> None:
    """What a decode step does to its tables, in place: per layer, row and table, one slot takes a
    new token (a new position, its owner, key and value); scores and valid flags change anywhere."""
    for g in range(0, len(flat), N):
        pos = flat[g + POS]
        L, B, G, S = pos.shape
        slot = torch.randint(0, S, (L, B, G), generator=gen)
        at = (*torch.meshgrid(torch.arange(L), torch.arange(B), torch.arange(G), indexing="ij"), slot)
        pos[at] = 10_000 + torch.randint(0, 100, (L, B, G), generator=gen)
        flat[g + OWNER][at] = torch.randint(0, 2, (L, B, G), generator=gen).to(torch.uint8)
        for t in (KEYS, VALUES):
            flat[g + t][at] = torch.randn(L, B, G, flat[g + t].shape[-1], generator=gen).to(flat[g + t].dtype)
        flat[g + SCORE].copy_(torch.rand(pos.shape, generator=gen))
        flat[g + VALID].copy_(torch.rand(pos.shape, generator=gen) < 0.5)


def whole(rows: Rows, states, index, flat) -> list[torch.Tensor]:
    """The reference: every table copied back whole into a copy of the state."""
    states = [s.clone() for s in states]
    for t, table in enumerate(flat):
        rows.view(states, t).transpose(0, 1)[:, torch.tensor(index)] = table.to(states[rows.spans[t][0]].dtype)
    return states


@pytest.mark.parametrize(
    "index,new,dtype",
    [
        ([3, 1, 4], [False, False, False], torch.float32),  # a decode batch
        ([2, 0], [True, False], torch.float32),  # one of them new: its row's leftovers go
        ([3, 1], [False, True], torch.bfloat16),
        ([1], [False], torch.bfloat16),  # one request, the state in another dtype than the step's
    ],
)
def test_what_a_step_changed_is_written_back_as_a_whole_copy_would(index, new, dtype):
    seed = torch.seed() % 2**31
    gen = torch.Generator().manual_seed(seed)
    plan = Plan.of(layout(), dtype)
    rows = Rows(plan.spans, layout().empty(1, torch.float32), layout().slot_tables, {})  # the step in fp32
    states = filled(plan, 5, gen)
    flat, before = rows.gather(states, index, new)
    assert before is not None  # copies: a batch, or the state in another dtype
    for table, empty, span in zip(flat, rows.empty, plan.spans, strict=True):
        assert table.shape == (span[3][0], len(index), *span[3][1:]) and table.dtype == empty.dtype
        for b, i in enumerate(index):
            want = empty[:, 0] if new[b] else rows.view(states, plan.spans.index(span))[i].to(empty.dtype)
            torch.testing.assert_close(table[:, b], want, rtol=0, atol=0, msg=f"seed {seed}")
    step(flat, gen)
    want = whole(rows, states, index, flat)
    rows.scatter(states, index, new, flat, before)
    for got, ref in zip(states, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=0, equal_nan=True, msg=f"seed {seed}")


def test_one_request_in_the_steps_dtypes_gets_views_of_its_row():
    gen = torch.Generator().manual_seed(0)
    plan = Plan.of(layout(), torch.float32)
    rows = Rows(plan.spans, layout().empty(1, torch.float32), layout().slot_tables, {})
    states = filled(plan, 4, gen)
    flat, before = rows.gather(states, [2], [True])
    assert before is None
    for t, empty in enumerate(rows.empty):
        torch.testing.assert_close(rows.view(states, t)[2], empty[:, 0], rtol=0, atol=0)  # emptied in place
    step(flat, gen)
    for t, table in enumerate(flat):
        torch.testing.assert_close(rows.view(states, t)[2], table[:, 0], rtol=0, atol=0)  # the step wrote the state


def test_a_key_changed_without_its_slot_changing_hands_is_not_written_back():
    """What the write-back relies on (a token's key and value are fixed while it holds a slot),
    shown by breaking it: the test above would miss no change only because a step keeps it."""
    gen = torch.Generator().manual_seed(1)
    plan = Plan.of(layout(), torch.float32)
    rows = Rows(plan.spans, layout().empty(1, torch.float32), layout().slot_tables, {})
    states = filled(plan, 3, gen)
    flat, before = rows.gather(states, [0, 1], [False, False])
    flat[KEYS][0, 1, 0, 0] += 1.0
    rows.scatter(states, [0, 1], [False, False], flat, before)
    assert rows.view(states, KEYS)[1, 0, 0, 0, 0] != flat[KEYS][0, 1, 0, 0, 0]


def test_steps_one_after_another_reuse_the_copies_memory_and_read_their_own_rows():
    seed = torch.seed() % 2**31
    gen = torch.Generator().manual_seed(seed)
    plan = Plan.of(layout(), torch.float32)
    rows = Rows(plan.spans, layout().empty(1, torch.float32), layout().slot_tables, {})
    states = filled(plan, 6, gen)
    for index in ([4, 0, 2], [1, 5], [3, 2, 0]):  # fewer rows, then as many again: the same memory
        with rows.tables(states, index, [False] * len(index)) as flat:  # gather, then scatter on leaving
            for t, table in enumerate(flat):
                for b, i in enumerate(index):
                    torch.testing.assert_close(table[:, b], rows.view(states, t)[i], rtol=0, atol=0, msg=f"seed {seed}")
            step(flat, gen)
            want = whole(rows, states, index, flat)
        for got, ref in zip(states, want, strict=True):
            torch.testing.assert_close(got, ref, rtol=0, atol=0, msg=f"seed {seed}")
    assert len(rows.work) == len(plan.spans)
