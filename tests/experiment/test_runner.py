"""`nectar run` end to end on the simulator with a tiny model the test builds and saves itself."""

import json
import math

import pytest

from nectar.cli.run import main as run_main
from tests.tolerance import approx, assert_close

def _run(tiny_model_dir, out, *extra):
    args = ["--model", str(tiny_model_dir), "--out", str(out), "--tokens", "2048", "--chunk-tokens", "512",
            "--seq-len", "64", "--price-batch", "64", "--json", "--no-progress", *extra]
    assert run_main(args) == 0
    return json.loads((out / "summary.json").read_text())


def test_run_writes_summary_outputs_and_is_deterministic(tiny_model_dir, tmp_path, capsys):
    a = _run(tiny_model_dir, tmp_path / "a")
    printed = json.loads(capsys.readouterr().out)
    assert printed == a
    b = _run(tiny_model_dir, tmp_path / "b")
    assert a == b
    assert a["backend"] == "sim" and "H100" in a["gpu"]
    assert a["fused_router"]["failed"] == []     # the run says whether its routers stayed on one path
    assert set(a["policies"]) == {"static-top2", "static-top1", "static-cheap", "nectar"}
    keys = {"tokens", "energy_J", "duration_s", "J_per_token", "mean_power_W", "max_temp_C", "perplexity",
            "routing_agreement", "fallback_chunks"}
    for p in a["policies"].values():
        assert keys <= set(p)
        assert math.isfinite(p["perplexity"]) and p["energy_J"] > 0
    pol = a["policies"]
    assert pol["static-top1"]["J_per_token"] < pol["static-top2"]["J_per_token"]
    assert pol["static-top2"]["routing_agreement"] == approx(1.0, n=16)  # ratios of counts, averaged
    assert pol["static-top1"]["routing_agreement"] == approx(0.5, n=16)
    assert pol["nectar"]["routing_agreement"] >= 0.5
    for name in ("chunks.csv", "trace.csv.gz", "meta.json", "energy_per_token.png", "energy_vs_perplexity.png",
                 "temperature.png", "expert_loads_nectar.png", "convexity_instance.npz"):
        assert (tmp_path / "a" / name).exists(), name


def test_fast_weight_router_option_runs(tiny_model_dir, tmp_path):
    s = _run(tiny_model_dir, tmp_path / "fw", "--policies", "static-top2,nectar:fast")
    assert math.isfinite(s["policies"]["nectar:fast"]["perplexity"])


def test_faults_do_not_crash_and_the_guard_bounds_quality(tiny_model_dir, tmp_path):
    s = _run(tiny_model_dir, tmp_path / "f", "--faults", "nan:0.2,stale:0.2,spike:0.1", "--policies", "static-top2,nectar",
             "--price", "0.05", "--shadow-share", "0.25")
    rows = (tmp_path / "f" / "chunks.csv").read_text().splitlines()
    assert len(rows) > 1 and math.isfinite(s["policies"]["nectar"]["J_per_token"])


@pytest.mark.parametrize("bad", [["--price", "0"], ["--tokens", "5000"], ["--temp-cap", "500"], ["--power-budget", "-3"],
                                 ["--policies", "static-top9"], ["--chunk-tokens", "100"], ["--faults", "gremlins:1"]])
def test_bad_options_give_a_clear_error(tiny_model_dir, tmp_path, bad, capsys):
    args = ["--model", str(tiny_model_dir), "--out", str(tmp_path / "x"), "--seq-len", "64", "--no-progress", *bad]
    try:
        code = run_main(args)
    except SystemExit as exc:  # argparse rejects malformed values itself
        code = exc.code
    assert code == 2
    assert "error" in capsys.readouterr().err.lower()


def test_micro_batched_chunk_equals_one_forward(tiny_model_dir):
    import torch

    from nectar.train.recipes import load_demo_model
    from nectar.experiment.forward import forward_chunk, install
    from nectar.experiment.policies import policy_router

    demo = load_demo_model(tiny_model_dir)
    model = demo.model
    install(model, [policy_router("static-top2", layer) for _, layer in model.moe_layers()])
    batch = demo.heldout_ids[: 8 * 32].view(8, 32)
    whole = forward_chunk(model, batch)
    parts = forward_chunk(model, batch, micro_rows=3)
    # float32, micro-batches of 3 rows vs 8: the model's path (tests/experiment/test_data_parallel.py's
    # MODEL_N: layers of width 32, hidden 64, 32 keys, a 300-token vocabulary) and the sum over 256 tokens
    model_n = 2 * (9 * 32 + 2 * 64 + 2 * 32) + 2 * 32 + 2 * 300
    assert parts.nll_sum == approx(whole.nll_sum, dtype=torch.float32, n=model_n + 256)
    assert parts.agreement == approx(whole.agreement, n=256)  # a mean of counts
    assert parts.workload.expert_counts() == whole.workload.expert_counts()
    assert parts.workload.tokens == whole.workload.tokens == 256
    for a, b in zip(parts.layers, whole.layers):
        assert_close(a.logits, b.logits, n=model_n, what="router logits")
        assert_close(a.inputs, b.inputs, n=model_n, what="router inputs")
    # a strided sample: every 4th token of the chunk, across micro-batch boundaries
    sampled = forward_chunk(model, batch, micro_rows=3, max_sample_tokens=64)
    assert all(layer.logits.shape[0] == 64 for layer in sampled.layers)
    assert_close(sampled.layers[0].logits, whole.layers[0].logits[::4], n=model_n)


def test_the_quality_check_rides_along_in_its_chunks_window(tiny_model_dir, tmp_path):
    """A chunk with a check is one trace window holding both forwards (its workload counts the re-run
    rows too); the record splits the window's energy and time by the rows' shares."""
    import csv

    from nectar.telemetry.energy import window_energy_J
    from nectar.telemetry.trace import read_trace

    _run(tiny_model_dir, tmp_path / "r", "--policies", "static-top2,nectar", "--shadow-share", "0.25")
    trace = [r for r in read_trace(tmp_path / "r" / "trace.csv.gz") if r.kind == "chunk"]
    with open(tmp_path / "r" / "chunks.csv") as f:
        records = {int(r["chunk"]): r for r in csv.DictReader(f) if r["policy"] == "nectar"}
    assert {r.policy for r in trace} == {"static-top2", "nectar"}                 # no window of its own
    windows = {r.chunk_index: r.window for r in trace if r.policy == "nectar"}
    workloads = {r.chunk_index: r.workload for r in trace if r.policy == "nectar"}
    rows = 512 // 64                                                              # rows per chunk
    checked = 0
    for i, record in records.items():
        window = windows[i]
        whole_J = window_energy_J(window)
        assert float(record["energy_J"]) + float(record["guard_energy_J"]) == approx(whole_J, n=2)
        seconds = float(record["t_end_s"]) - float(record["t_start_s"]) + float(record["guard_s"])
        assert seconds == approx(window.duration_s, n=4, scale=window.t_end_s)    # differences of clock readings
        share = float(record["guard_energy_J"]) / whole_J
        if share > 0:
            checked += 1
            assert round(share * rows / (1 - share)) == 2                         # share = r / (rows + r), r = 0.25·8
            assert workloads[i].tokens == round(int(record["tokens"]) * (rows + 2) / rows)
        else:
            assert workloads[i].tokens == int(record["tokens"])
    assert checked > 0, "no chunk was checked"
