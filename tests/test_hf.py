"""The transformers adapter: every generate() feature a user tries either matches the original model at
full budget or is refused with a clear error, on whichever transformers 5.x is installed; a forward that
lost its cache is an error; the Cache surface answers what generate() asks and refuses the rest."""

import inspect

import pytest
import torch
from transformers import Cache, DynamicCache, TextStreamer
from transformers.generation.streamers import BaseStreamer

import kvpass
from kvpass.runtime import hf
from tests.conftest import tiny_llama
from tests.test_transform import prompt

pytestmark = pytest.mark.hf


def seed() -> int:
    return int(torch.randint(0, 2**31, ()))


@pytest.fixture(scope="module")
def exact(llama):
    """The tiny Llama at a budget above every sequence here: it must behave as the original."""
    return kvpass.transform(llama, policy="tova", budget=256, chunk=16)


class Collect(BaseStreamer):
    def __init__(self):
        self.chunks = []

    def put(self, value):
        self.chunks.append(value.clone())

    def end(self):
        self.chunks.append(None)


GENERATE = {
    "greedy": {"max_new_tokens": 12, "do_sample": False},
    "sampled": {"max_new_tokens": 12, "do_sample": True, "top_k": 20, "temperature": 0.8},
    "max_length": {"max_length": 50, "do_sample": False},
    "scores": {"max_new_tokens": 8, "do_sample": False, "return_dict_in_generate": True, "output_scores": True},
    "beams": {"max_new_tokens": 10, "num_beams": 3, "do_sample": False},
    "beams_returned": {"max_new_tokens": 6, "num_beams": 2, "num_return_sequences": 2, "do_sample": False},
    "sequences": {"max_new_tokens": 6, "do_sample": True, "num_return_sequences": 3},
    "no_cache": {"max_new_tokens": 6, "do_sample": False, "use_cache": False},
}


@pytest.mark.parametrize("name", sorted(GENERATE))
def test_generate_matches_the_original(llama, exact, name):
    kwargs = GENERATE[name]
    ids = prompt(seed(), B=2, T=40)
    torch.manual_seed(s := seed())
    want = llama.generate(ids, **kwargs)
    torch.manual_seed(s)
    got = exact.generate(ids, **kwargs)
    if kwargs.get("return_dict_in_generate"):
        torch.testing.assert_close(got.sequences, want.sequences)
        torch.testing.assert_close(torch.stack(got.scores), torch.stack(want.scores), atol=1e-4, rtol=1e-4)
        assert isinstance(got[hf.OUTPUT_CACHE], hf.HFEvictingCache)
    else:
        torch.testing.assert_close(got, want)


def test_streamers_see_the_same_tokens(llama, exact, capsys):
    ids = prompt(seed(), B=1, T=30)
    want, got = Collect(), Collect()
    llama.generate(ids, max_new_tokens=8, do_sample=False, streamer=want)
    exact.generate(ids, max_new_tokens=8, do_sample=False, streamer=got)
    assert len(got.chunks) == len(want.chunks) == 10  # the prompt, 8 tokens, the end
    for a, b in zip(got.chunks[:-1], want.chunks[:-1], strict=True):
        torch.testing.assert_close(a, b)

    class Words:  # what TextStreamer asks of a tokenizer
        def decode(self, ids, **_):
            return "".join(f"<{int(i)}> " for i in ids)

    capsys.readouterr()
    llama.generate(ids, max_new_tokens=8, do_sample=False, streamer=TextStreamer(Words(), skip_prompt=True))
    printed = capsys.readouterr().out
    exact.generate(ids, max_new_tokens=8, do_sample=False, streamer=TextStreamer(Words(), skip_prompt=True))
    assert capsys.readouterr().out == printed and printed.count("<") == 8


def test_a_second_turn_continues_the_returned_cache(llama, exact):
    """Chat: the cache returned by the first turn is handed to the second, which feeds only the new turn."""
    first, reply = prompt(seed(), T=30), prompt(seed(), T=9)

    def two_turns(model, cache):
        out = model.generate(first, max_new_tokens=6, do_sample=False, return_dict_in_generate=True, **{
            hf.GENERATE_CACHE: cache
        })  # fmt: skip
        cache = out[hf.OUTPUT_CACHE]
        seen = cache.get_seq_length()
        ids = torch.cat([out.sequences, reply], dim=1)
        return model.generate(ids, max_new_tokens=6, do_sample=False, **{hf.GENERATE_CACHE: cache}), seen, cache

    want, _, _ = two_turns(llama, DynamicCache(config=llama.config))
    got, seen, cache = two_turns(exact, None)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(got, llama.generate(got[:, :-6], max_new_tokens=6, do_sample=False))
    assert seen == 30 + 5 and cache.seen == 30 + 6 + 9 + 5  # the last generated token is never fed
    # a cache the user made works the same way
    own = exact.kvpass_new_cache()
    exact.generate(first, max_new_tokens=6, do_sample=False, **{hf.GENERATE_CACHE: own})
    assert own.seen == 35


def test_beam_search_with_a_small_budget_stays_bounded(llama):
    small = kvpass.transform(llama, policy="tova", budget=16, chunk=16)
    ids = prompt(seed(), B=2, T=60)
    out = small.generate(ids, max_new_tokens=10, num_beams=3, do_sample=False)
    assert out.shape == (2, 70)
    stats = kvpass.cache_stats(small)
    assert all(layer.capacity == 16 and layer.held <= 2 * 3 * 2 * 16 for layer in stats.layers)


def test_cache_rows_follow_the_selected_beams(llama):
    """reorder_cache / batch_select_indices / batch_repeat_interleave move whole rows of every table."""
    small = kvpass.transform(llama, policy="tova", budget=16, chunk=16)
    cache = small.kvpass_new_cache()
    ids = prompt(seed(), B=3, T=40)
    small(ids, cache=cache)
    before = {i: (s.keys.clone(), s.pos.clone(), s.valid.clone()) for i, s in cache.slots.items()}
    lengths = cache.lengths.clone()
    cache.reorder_cache(torch.tensor([2, 0, 0]))
    for i, s in cache.slots.items():
        keys, pos, valid = before[i]
        torch.testing.assert_close(s.keys, keys[[2, 0, 0]])
        torch.testing.assert_close(s.pos, pos[[2, 0, 0]])
        torch.testing.assert_close(s.valid, valid[[2, 0, 0]])
    cache.batch_repeat_interleave(2)
    assert cache.lengths.tolist() == [lengths[2]] * 2 + [lengths[0]] * 4
    cache.batch_select_indices(torch.tensor([1, 4]))
    torch.testing.assert_close(cache.slots[0].keys, before[0][0][[2, 0]])
    out = small(torch.cat([ids[2:], ids[:1]])[:, -1:], cache=cache, logits_to_keep=1)  # decoding goes on
    assert out.logits.shape == (2, 1, 97) and cache.seen == 41


def test_decode_reserve_follows_max_length(llama):
    ids = prompt(seed(), T=100)
    small = kvpass.transform(llama, policy="tova", budget=0.25, evict_during_decode=False)
    small.generate(ids, max_length=112, do_sample=False)
    assert small.kvpass_cache.budget == 25 and small.kvpass_cache.capacity == 25 + 12
    small.generate(ids, max_new_tokens=7, do_sample=False)
    assert small.kvpass_cache.capacity == 25 + 7


def test_assisted_decoding_is_refused(llama, exact):
    ids = prompt(seed(), T=20)
    with pytest.raises(NotImplementedError, match="assisted"):
        exact.generate(ids, max_new_tokens=4, assistant_model=llama)
    with pytest.raises(NotImplementedError, match="assisted"):
        exact.generate(ids, max_new_tokens=4, prompt_lookup_num_tokens=3)
    with pytest.raises(NotImplementedError, match="cropped"):
        exact.kvpass_new_cache().crop(3)


def test_transformers_cache_options_are_refused_or_set_aside(llama):
    ids = prompt(seed(), T=20)
    model = tiny_llama()
    model.generation_config.cache_implementation = "dynamic"  # as some checkpoints' configs name one
    small = kvpass.transform(model, policy="tova", budget=64)
    assert model.generation_config.cache_implementation == "dynamic"  # the original keeps its own
    with pytest.raises(ValueError, match="cache_implementation"):
        small.generate(ids, max_new_tokens=4, cache_implementation="static")
    with pytest.raises(TypeError, match="DynamicCache"):
        small.generate(ids, max_new_tokens=4, **{hf.GENERATE_CACHE: DynamicCache(config=llama.config)})
    with pytest.raises(ValueError, match="chunk="):
        small.generate(ids, max_new_tokens=4, prefill_chunk_size=8)
    want = llama.generate(ids, max_new_tokens=6, do_sample=False)
    torch.testing.assert_close(small.generate(ids, max_new_tokens=6, do_sample=False), want)
    assert small.kvpass_cache.seen == 25


def test_a_lost_cache_is_an_error(exact, monkeypatch):
    """The failure transformers 5.24 caused: generate() hands the cache over under a name the forward
    does not take, so each step would start an empty cache. Simulated by dropping it on the way."""
    ids = prompt(seed(), T=20)
    original = type(exact).prepare_inputs_for_generation

    def dropped(self, *args, **kwargs):
        inputs = original(self, *args, **kwargs)
        for name in hf.CACHE_NAMES:
            inputs.pop(name, None)
        return inputs

    monkeypatch.setattr(type(exact), "prepare_inputs_for_generation", dropped)
    with pytest.raises(RuntimeError, match=r"lost its cache.*under a name kvpass does not know"):
        exact.generate(ids, max_new_tokens=4, do_sample=False)

    def renamed(self, *args, **kwargs):
        inputs = dropped(self, *args, **kwargs)
        inputs["kv_cache"] = kwargs.get(hf.GENERATE_CACHE)
        return inputs

    monkeypatch.setattr(type(exact), "prepare_inputs_for_generation", renamed)
    with pytest.raises(TypeError, match="kv_cache"):
        exact.generate(ids, max_new_tokens=4, do_sample=False)
    monkeypatch.undo()
    # the same without generate(): a decode step whose mask or cache_position says earlier tokens exist
    with pytest.raises(RuntimeError, match=r"lost its cache.*mask covers 21"):
        exact(ids[:, -1:], attention_mask=torch.ones(1, 21, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"lost its cache.*cache_position starts at 20"):
        exact(ids[:, -1:], cache_position=torch.tensor([20]))
    assert exact.generate(ids, max_new_tokens=4, do_sample=False).shape == (1, 24)  # undone: works again


def test_forward_keywords(llama, exact):
    ids = prompt(seed(), T=20)
    want = llama(ids).logits
    for name in hf.CACHE_NAMES:  # either name, whatever the installed version
        cache = exact.kvpass_new_cache()
        out = exact(ids[:, :12], **{name: cache})
        nxt = exact(ids[:, 12:], **{name: out[hf.OUTPUT_CACHE]})
        torch.testing.assert_close(torch.cat([out.logits, nxt.logits], 1), want, atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="given twice"):
        exact(ids, cache=exact.kvpass_new_cache(), past_key_values=exact.kvpass_new_cache())
    logits, cache = exact(ids, return_dict=False)
    torch.testing.assert_close(logits, want, atol=1e-4, rtol=1e-4)
    assert getattr(exact(ids, use_cache=False), hf.OUTPUT_CACHE) is None


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"output_attentions": True}, ValueError, "logits only"),
        ({"output_hidden_states": True}, ValueError, "logits only"),
        ({"labels": torch.zeros(1, 20, dtype=torch.long)}, ValueError, "inference"),
        ({"token_type_ids": torch.zeros(1, 20, dtype=torch.long)}, TypeError, "token_type_ids"),
        ({"num_items_in_batch": 4}, TypeError, "num_items_in_batch"),
    ],
)
def test_unknown_keywords_are_refused(exact, kwargs, error, match):
    with pytest.raises(error, match=match):
        exact(prompt(1, T=20), **kwargs)


def test_absent_inputs_are_not_refused(exact):
    """A multimodal model's generate() passes its image and audio inputs as None: text only."""
    ids = prompt(1, T=20)
    torch.testing.assert_close(exact(ids, pixel_values=None, audio_input_features=None).logits, exact(ids).logits)


def test_cache_surface():
    """Every public member of the installed transformers Cache is either answered by kvpass or refuses,
    naming itself: none walks the (absent) transformers layers and silently finds nothing."""
    cache = kvpass.transform(tiny_llama(), policy="tova", budget=8).kvpass_new_cache()
    assert isinstance(cache, Cache)
    answered = {
        "get_seq_length": lambda: cache.get_seq_length() == 0,
        "is_compileable": lambda: cache.is_compileable is False,
        "is_initialized": lambda: cache.is_initialized is False,
        "is_linear": lambda: not any(cache.is_linear),
        "is_croppable": lambda: cache.is_croppable is False,
        "reset": lambda: cache.reset() is None,
    }
    moves = {"reorder_cache", "batch_repeat_interleave", "batch_select_indices", "crop"}  # tested above
    members = {n for n, _ in inspect.getmembers(Cache) if not n.startswith("_")} | {"layers"}
    assert {"get_seq_length", "reorder_cache", "crop"} <= members
    for name in sorted(members):
        if name in answered:
            assert answered[name](), name
        elif name not in moves:
            with pytest.raises(NotImplementedError, match=f"Cache.{name}"):
                member = getattr(cache, name)
                member(*[None] * (len(inspect.signature(getattr(Cache, name)).parameters) - 1))
    assert len(cache) == 0 and "policy=tova" in repr(cache)


@pytest.mark.parametrize("kwargs", [{"foo": 1}, {"output_attentions": True}, {"output_hidden_states": True}])
def test_generate_refuses_what_it_would_drop(exact, kwargs):
    with pytest.raises(ValueError, match=r"foo|logits only"):
        exact.generate(prompt(2, T=10), max_new_tokens=2, return_dict_in_generate=True, **kwargs)
