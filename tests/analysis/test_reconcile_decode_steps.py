"""`nectar reconcile --decode-steps FILE.json`: captured decode steps measured on a GPU against the
simulator, and the captured-decode constants fitted to them.

The rebuild is checked on the committed H100 measurement (every row's distinct experts, slots and
bytes come back); the fit on synthetic measurements whose times are the simulator's own under
known constants (the fit must find them, and the held-out model must then match exactly)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from analysis.reconcile.cli import main as reconcile_main
from analysis.reconcile.decode_steps import (FITTED, load_measurement, positions, rebuild_row, reconcile_decode_steps,
                                             routing_means, swiglu_cost, synthetic_measurement, uncaptured,
                                             with_constants)
from benchmarks.decode_step import WARMUP_STEPS, step_inputs
from nectar.hf.describe import swiglu_cost as hf_swiglu_cost
from nectar.serving.frontier import step_bytes
from sim.presets import load_preset
from tests.tolerance import approx

H100_DECODE = Path(__file__).resolve().parents[2] / "docs/results/h100/2026-12-07/decode-step/decode_step.json"
KNOWN = (0.62, 2.5e-4, 3.0e-6)               # the synthetic GPU's decode_* constants
MODELS = [  # two small OLMoE-like shapes (one fitted, one held out); weight_bytes / parameters gives bf16
    {"name": "wide", "layers": 2, "hidden": 1024, "experts": 16, "expert_hidden": 1024, "top_k": 4, "vocab": 4096,
     "parameters": 1, "weight_bytes": 2},
    {"name": "narrow", "layers": 3, "hidden": 256, "experts": 16, "expert_hidden": 128, "top_k": 4, "vocab": 2048,
     "parameters": 1, "weight_bytes": 2},
]


def _synthetic(tmp_path: Path, preset) -> Path:
    path = tmp_path / "decode_step.json"
    path.write_text(json.dumps(synthetic_measurement(preset, MODELS)))
    return path


# ---------------------------------------------------------------------------- the rebuild
def test_the_rebuilt_steps_follow_the_benchmarks_schedule_and_expert_cost():
    for batch in (1, 5, 16):
        for s in range(4):
            _, pos, _ = step_inputs(batch, 192, 100, WARMUP_STEPS + 4)[WARMUP_STEPS + s]
            assert positions(batch, 192, s) == pos
    assert swiglu_cost(2048, 1024, 2) == hf_swiglu_cost(2048, 1024, 2)


def test_every_measured_row_is_rebuilt_with_its_slots_distinct_experts_and_bytes():
    measurement = load_measurement(H100_DECODE)
    assert [m.name for m in measurement.models] == ["small", "olmoe-1b-7b"]
    for model in measurement.models:
        assert len(model.rows) == 11
        for row in model.rows:
            workloads = rebuild_row(model, row, measurement.context, measurement.steps)
            assert len(workloads) == measurement.steps
            assert all(w.phase == "decode" and w.tokens == w.batch == w.logit_tokens == row["batch"] for w in workloads)
            distinct, slots = routing_means(workloads)
            n = 2 * measurement.steps * model.layers      # a mean of that many per-layer counts, on both sides
            assert distinct == approx(row["distinct_experts"], n=n)
            assert slots == approx(row["slots"], n=n)
            assert float(np.mean([step_bytes(w) for w in workloads])) == approx(row["bytes_per_step"], n=n)


def test_a_row_that_cannot_be_rebuilt_is_refused():
    model = load_measurement(H100_DECODE).models[0]
    with pytest.raises(ValueError, match="cannot be rebuilt"):
        rebuild_row(model, {"batch": 2, "policy": "x", "distinct_experts": 8.0, "slots": 4.0}, 192, 2)


# ---------------------------------------------------------------------------- the fit
def test_the_fit_recovers_known_constants_and_the_held_out_model_then_matches(tmp_path):
    base = load_preset("h100_sxm")
    gpu = with_constants(base, KNOWN)
    report = reconcile_decode_steps(_synthetic(tmp_path, gpu), base, calibrate_on="wide")
    fitted = [report["constants"][name] for name in FITTED]
    # not rounding: where scipy's least_squares stops (the residuals are exact at KNOWN)
    assert np.allclose(fitted, KNOWN, rtol=1e-6, atol=0), fitted
    models = {m["name"]: m for m in report["models"]}
    assert models["wide"]["role"] == "fit" and models["narrow"]["role"] == "held out"
    assert models["narrow"]["mape_after"] < 1e-6 and models["wide"]["mape_after"] < 1e-6
    assert models["narrow"]["mape_before"] > 0.5          # priced like a chunk: every kernel launched from the host
    assert report["improves_held_out"] and report["held_out"] == ["narrow"]
    # without the row latency the fit cannot match (the synthetic GPU has one)
    assert models["narrow"]["mape_after_without_row_latency"] > 1e-3


def test_the_default_model_to_fit_is_the_one_with_the_most_weights(tmp_path):
    report = reconcile_decode_steps(_synthetic(tmp_path, with_constants(load_preset("h100_sxm"), KNOWN)), "h100_sxm")
    assert report["calibrate_on"] == "wide"


# ---------------------------------------------------------------------------- the command
def test_the_command_writes_the_report_the_plot_and_the_fitted_preset(tmp_path, capsys):
    gpu = with_constants(load_preset("h100_sxm"), KNOWN)
    path = _synthetic(tmp_path, gpu)
    out, saved = tmp_path / "report.json", tmp_path / "fitted.json"
    args = ["--decode-steps", str(path), "--calibrate-on", "wide", "--out", str(out), "--save", str(saved)]
    assert reconcile_main(args) == 0
    assert "narrow (held out): MAPE" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert report["command"].startswith("nectar reconcile --decode-steps") and out.with_suffix(".png").is_file()
    assert len(report["models"][0]["rows"]) == 9 and report["measured"] == "graph_ms"
    preset = load_preset(saved)
    assert preset.name == "fitted" and "analysis/reconcile/decode_steps.py" in preset.source
    assert [getattr(preset, name) for name in FITTED] == [report["constants"][name] for name in FITTED]
    assert reconcile_main(args) == 2                      # --out exists: nothing replaced without --overwrite
    assert reconcile_main([*args, "--overwrite", "--decode-time", "replay_ms", "--json"]) == 0
    assert json.loads(out.read_text())["measured"] == "replay_ms"


def test_a_fit_that_does_not_lower_the_held_out_error_is_not_saved(tmp_path):
    """Times from the uncaptured pricing (every kernel launched from the host): 'before' is exact."""
    path = _synthetic(tmp_path, uncaptured(load_preset("h100_sxm")))
    saved = tmp_path / "fitted.json"
    code = reconcile_main(["--decode-steps", str(path), "--out", str(tmp_path / "r.json"), "--save", str(saved)])
    assert code == 1 and not saved.exists()


def test_bad_input_is_refused_in_one_line(tmp_path, capsys):
    empty = tmp_path / "empty.json"
    empty.write_text(json.dumps({"context": 24, "steps": 2, "models": []}))
    assert reconcile_main(["--decode-steps", str(empty), "--out", str(tmp_path / "r.json")]) == 2
    assert "no 'models'" in capsys.readouterr().err
    assert reconcile_main(["--decode-steps", str(H100_DECODE), "--calibrate-on", "huge",
                           "--out", str(tmp_path / "r.json")]) == 2
    assert "is not a model" in capsys.readouterr().err
    assert reconcile_main(["--decode-steps", str(H100_DECODE), "data/traces/h100"]) == 2
