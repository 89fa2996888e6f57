"""The bench table's ratios, and one real case pair on the default model (slow)."""

import pytest

from kvpass.eval.bench import Case, run_all, table


def test_table_reports_ratios_against_the_full_cache_of_the_same_length():
    cases = [
        Case(1000, "full", None, 400, 1000, 2.0, 10.0, "cpu", 1, 0.05),
        Case(1000, "tova", 0.25, 100, 300, 1.0, 12.5, "cpu", 1, 0.05),
        Case(2000, "full", None, 800, 2000, 5.0, 8.0, "cpu", 1, 0.05),
        Case(2000, "tova", 0.25, 200, 500, 2.5, 16.0, "cpu", 1, 0.05),
        Case(2000, "tova+compiled", 0.25, 200, 500, 2.5, 20.0, "cpu", 1, 0.05),
    ]
    rows = table(cases).splitlines()[2:]
    assert rows[4].split(" | ")[1] == "tova @ 0.25, compiled" and rows[4].endswith("| 2.50 | 1.00 |")
    assert rows[1].split(" | ")[3:] == ["0.250", "0", "0.30", "1.00", "0.50", "12.5", "1.25", "1.60 |"]
    assert rows[3].split(" | ")[3] == "0.250" and rows[3].endswith("| 2.00 | 1.25 |")
    assert rows[0].split(" | ")[1] == "full (original)" and rows[2].split(" | ")[3] == "1.000"


def test_table_with_batches_compares_within_a_batch_size():
    cases = [
        Case(1000, "full", None, 400, 1000, 2.0, 10.0, "cpu", 1, 0.05),
        Case(1000, "full", None, 3200, 8000, 9.0, 4.0, "cpu", 8, 0.06),
        Case(1000, "full+static", None, 3200, 8000, 9.0, 5.0, "cpu", 8, 0.06),
        Case(1000, "tova", 512, 800, 900, 8.0, 10.0, "cpu", 8, 0.06),
    ]
    rows = [r.split(" | ") for r in table(cases).splitlines()[2:]]
    assert rows[2][1:3] == ["8", "original, static cache + torch.compile"] and rows[2][-2] == "1.25"
    # batch 8: 10 steps/s are 80 tokens/s, 2.5x the original's steps at batch 8; a step is 1/10 s, 1.67x its floor
    assert rows[3][2] == "tova @ 512" and rows[3][-3:] == ["80.0", "2.50", "1.67 |"]


@pytest.mark.slow
def test_one_length_on_the_default_model():
    full, small = run_all([600], ["tova"], 128, 4)
    assert (full.policy, small.policy) == ("full", "tova")
    # layers x KV heads x slots x head dim x (K, V) x fp32
    assert small.kv_bytes == 30 * 3 * 128 * 64 * 2 * 4
    assert full.kv_bytes > 4 * small.kv_bytes and small.decode_tok_s > 0 and full.prefill_s > 0
