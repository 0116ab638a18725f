"""The model summary and the training-curves plot from a model's info (a hand-made info record)."""

from __future__ import annotations

import json

from nectar.train.curves import main, model_summary, write_model_summary

INFO = {
    "recipe": {"preset": "distilgpt2"}, "seed": 0, "corpus_tokens": 34556680, "corpus_sha256": "ab" * 32,
    "corpus": {"train_tokens": 1000, "heldout_tokens": {"prose": 10}, "vocab_size": 16384, "source": "built"},
    "dense_heldout_ppl": 40.0, "moe_heldout_ppl": 38.5, "train_seconds": 330.0, "dense_seconds": 198.0,
    "moe_seconds": 132.0, "eval_seconds": 9.0, "data_seconds": 6.0, "dense_steps": 4, "moe_steps": 2,
    "dense": {"tokens": 400, "steps": 4, "heldout_ppl": {"all": 40.0, "prose": 50.0, "code": 20.0},
              "curve": {"step": [0, 1, 2, 3], "lm_loss": [9.0, 7.0, 6.0, 5.5], "lr": [1e-4, 1e-3, 5e-4, 1e-4]}},
    "moe": {"tokens": 200, "steps": 2, "heldout_ppl": {"all": 38.5, "prose": 48.0, "code": 19.0},
            "heldout_ppl_at_upcycle": 45.0, "curve": {"step": [0, 1], "lm_loss": [5.6, float("nan")], "lr": [3e-4, 3e-5]},
            "routing": {"static-top1": {"dppl": 0.004}}},
}


def test_summary_has_the_figures_docs_results_records():
    summary = model_summary(INFO, device="NVIDIA H200")
    assert summary["corpus_tokens"] == 34556680 and summary["train_seconds"] == 330.0
    assert summary["dense_heldout_ppl"] == 40.0 and summary["moe_heldout_ppl"] == 38.5
    assert summary["dense_heldout_ppl_by_domain"] == {"prose": 50.0, "code": 20.0}
    assert summary["moe_heldout_ppl_by_domain"]["code"] == 19.0 and summary["device"] == "NVIDIA H200"
    assert summary["dense_tokens"] == 400 and summary["flop_frontier"] == {"static-top1": {"dppl": 0.004}}


def test_write_model_summary_writes_strict_json_and_a_png(tmp_path):
    write_model_summary(INFO, tmp_path / "model")
    json.loads((tmp_path / "model" / "summary.json").read_text(), parse_constant=lambda c: 1 / 0)
    png = (tmp_path / "model" / "training_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_module_command_reads_a_saved_model(tmp_path, capsys):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "nectar_model.json").write_text(json.dumps({**INFO, "moe": {**INFO["moe"], "curve": None}}))
    assert main([str(tmp_path / "m"), str(tmp_path / "out"), "--device", "cpu"]) == 0
    assert json.loads(capsys.readouterr().out)["moe_heldout_ppl"] == 38.5
    assert json.loads((tmp_path / "out" / "summary.json").read_text())["device"] == "cpu"
    assert main([str(tmp_path / "nowhere"), str(tmp_path / "o2")]) == 2
