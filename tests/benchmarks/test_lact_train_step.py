"""Smoke test of benchmarks/lact_train_step.py: a tiny CPU run writes one row per recipe and variant."""

from __future__ import annotations

import json

from benchmarks import lact_train_step


def test_small_cpu_run_writes_rows(tmp_path):
    out = tmp_path / "rows.json"
    rows = lact_train_step.main(["--device", "cpu", "--small", "--seq-len", "64", "--warmup", "1", "--repeats", "1",
                                 "--recipes", "distilgpt2", "distilgpt2-lact-attn",
                                 "--variants", "reference", "lean", "--json-out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(rows))
    assert [(r["recipe"], r["variant"]) for r in rows] == [
        ("distilgpt2", "reference"), ("distilgpt2-lact-attn", "reference"), ("distilgpt2-lact-attn", "lean")]
    for row in rows:
        assert row["train_tokens_per_s"] > 0 and row["forward_tokens_per_s"] > 0 and row["ms_per_step"] > 0
        assert row["n_layer"] == 2 and row["batch"] == 1 and row["stage"] == "moe"
    assert abs(rows[2]["loss_diff_vs_reference"]) < 1e-3  # a smoke bound far above fp32 rounding (the exact check: tests/lact/test_speed_options.py)
