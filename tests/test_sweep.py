"""The support table stays true: every architecture ``docs/supported-models.md`` calls exact is
still exact at full budget (logits over a chunked prefill and decode steps; the full sweep, with
``generate()`` and a small budget, is ``kvpass sweep``), and the sweep's own parts work."""

import re
from pathlib import Path

import pytest
import torch
import transformers
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

import kvpass
from kvpass.eval import sweep

TABLE = Path(__file__).parent.parent / "docs" / "supported-models.md"


def _rows(outcome: str) -> list[str]:
    rows = re.findall(r"^\| ([\w.-]+) \| \w+ \| ([a-z ]+) \|", TABLE.read_text(), re.M)
    return [t for t, o in rows if o == outcome]


EXACT = _rows("exact")


def test_the_table_is_the_sweep_of_every_causal_lm():
    text = TABLE.read_text()
    assert len(EXACT) >= 100 and not _rows("wrong") and not _rows("crashed")
    if f"transformers {transformers.__version__} " in text:  # the version it was made with lists them all
        listed = set(re.findall(r"^\| ([\w.-]+) \| \w+ \|", text, re.M))
        assert listed == set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES)


@pytest.mark.parametrize("model_type", EXACT)
def test_exact_architectures_stay_exact(model_type):
    if model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        pytest.skip(f"this transformers has no {model_type}")
    model, _ = sweep.build(model_type, seed=int(torch.randint(0, 2**31, ())))
    vocab = model.config.get_text_config().vocab_size
    ids = torch.randint(3, vocab, (2, 28))
    exact = kvpass.transform(model, policy="full", chunk=8)
    diff = (sweep.kvpass_logits(exact, ids, 24) - sweep.reference_logits(model, ids)).abs().max()
    assert diff <= sweep.TOLERANCE, f"{model_type}: {diff:.2e}"


def test_out_of_scope_and_failures_are_rows_not_silence():
    (row,) = sweep.sweep(["mamba"], workers=1)
    assert row.outcome == "out of scope" and "state-space" in row.reason
    md = sweep.render([row, sweep.Row("x", "X", "refused", "a | b")], "kvpass sweep", "here")
    assert "| x | X | refused |" in md and "a \\| b" in md and "0 of 1 architectures in scope are exact" in md


def test_tiny_configs_are_tiny():
    config = sweep.tiny_config("qwen3_moe")
    assert (config.hidden_size, config.num_hidden_layers, config.num_key_value_heads, config.num_experts) == (
        64,
        2,
        2,
        4,
    )


# one architecture of each kind, its paths beyond eager: the whole run is `kvpass sweep --compile --onnx`
# (chunked attention, compiled and refused by the ONNX export: tests/test_architectures.py's llama4)
PATH_SAMPLE = {
    "llama": "compile, onnx",  # dense
    "mistral": "compile, onnx",  # sliding window
    "deepseek_v3": "compile, onnx",  # multi-head latent attention, MoE
    "bloom": "compile, onnx",  # ALiBi
    "lfm3": "compile, onnx",  # hybrid: short convolutions carrying their state beside attention
}


@pytest.mark.parametrize("model_type", sorted(PATH_SAMPLE))
def test_compiled_and_exported_paths_give_the_eager_tokens(model_type):
    row = sweep.check(model_type, sweep.PATHS)
    assert row.outcome == "exact", row.reason
    assert row.paths.startswith(PATH_SAMPLE[model_type]), row.paths
