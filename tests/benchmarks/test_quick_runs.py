"""Every speed benchmark runs on CPU with tiny sizes (`--device cpu --quick`) and writes JSON of the
documented shape. Shapes only: speed targets live in the benchmarks' GPU runs, not in tests."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

import nectar.moe.dispatch as dispatch_module
from tests.tolerance import approx

REPO = Path(__file__).resolve().parents[2]


def test_moe_layer_quick(tmp_path, monkeypatch):
    from benchmarks import moe_layer

    monkeypatch.setattr(dispatch_module, "GROUPED_MM_DEVICE_TYPES", dict(dispatch_module.GROUPED_MM_DEVICE_TYPES))
    out = tmp_path / "moe_layer.json"
    assert moe_layer.main(["--device", "cpu", "--quick", "--grouped-on-cpu", "--json-out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert isinstance(rows, list) and all({"kind", "tokens", "path", "ratio_vs_dense"} <= set(r) for r in rows)
    assert [r for r in rows if "error" in r] == []
    paths = {(r["kind"], r["path"]) for r in rows}
    for kind in ("swiglu", "gelu"):
        assert {(kind, "dense"), (kind, "grouped"), (kind, "loop"), (kind, "part:router"), (kind, "part:combine"),
                (kind, "part:experts"), (kind, "part:gemm1:grouped_mm")} <= paths
    dense = [r for r in rows if r["path"] == "dense"]
    assert all(r["ratio_vs_dense"] == 1.0 and r["ms"] > 0 for r in dense)
    assert all(r["ratio_vs_dense"] > 0 for r in rows if r["path"] in ("grouped", "loop"))


def test_forward_chunk_quick(tmp_path):
    from benchmarks import forward_chunk

    out = tmp_path / "forward_chunk.json"
    assert forward_chunk.main(["--device", "cpu", "--quick", "--json-out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["dispatch"], r["path"]) for r in rows] == [
        ("grouped", "plain"), ("grouped", "forward_chunk"), ("loop", "plain"), ("loop", "forward_chunk")]
    assert all(r["ratio_vs_plain"] > 0 and r["tokens_per_s"] > 0 for r in rows)
    assert rows[0]["dispatch_taken"] == "loop"  # no grouped kernel on CPU: the layers say what they ran


def test_policy_speed_quick(tmp_path):
    """Every row has the issue's keys; the identical-routing pairs are recognised as identical and
    the drop policies as different; host reads per forward are one number for every policy."""
    from benchmarks import policy_speed

    out = tmp_path / "policy_speed.json"
    assert policy_speed.main(["--device", "cpu", "--quick", "--json-out", str(out)]) == 0
    rows = {r["policy"]: r for r in json.loads(out.read_text())}
    keys = {"policy", "tokens_per_s", "speed_vs_top2", "energy_vs_top2", "syncs_per_chunk", "kernels_per_forward",
            "predicted_speed_vs_top2"}
    assert set(rows) == set(policy_speed.POLICIES) and all(keys <= set(r) for r in rows.values())
    assert all(rows[p]["same_routing_as_top2"] for p in ("static-top2", "fixed-bias:0", "fixed-price:1e9"))
    assert not rows["static-top1"]["same_routing_as_top2"] and not rows["fixed-price:0.5"]["same_routing_as_top2"]
    assert len({r["host_reads_per_forward"] for r in rows.values()}) == 1
    assert rows["static-top2"]["slots_per_token"] == 2.0 and rows["static-top1"]["slots_per_token"] == 1.0


def test_calibration_noise_quick(tmp_path):
    """One calibration per settle; each row's spread over the identical full experts is a number."""
    from benchmarks import calibration_noise

    out = tmp_path / "calibration_noise.json"
    assert calibration_noise.main(["--device", "cpu", "--quick", "--settle-fractions", "0,1", "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert [s["settle_fraction"] for s in report["settings"]] == [0.0, 1.0] and len(report["full_experts"]) == 3
    assert all(len(s["repeats"]) == 1 and s["median_full_J_cv"] >= 0 for s in report["settings"])


def test_fastweight_quick(tmp_path):
    from benchmarks import fastweight

    out = tmp_path / "fastweight.json"
    assert fastweight.main(["--device", "cpu", "--quick", "--dtype", "fp32", "--json-out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {(r["L"], r["what"]) for r in rows} == {(L, w) for L in (64, 128)
                                                  for w in ("kernel", "update", "update_unfused", "update_bmm")}
    assert all(r["share_of_matmul"] > 0 and r["tflops"] > 0 and "error" not in r for r in rows)


def test_telemetry_overhead_quick(tmp_path):
    from benchmarks import telemetry_overhead

    out = tmp_path / "telemetry_overhead.json"
    assert telemetry_overhead.main(["--device", "cpu", "--quick", "--json-out", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["ci_low"] <= report["overhead"] <= report["ci_high"]
    assert report["alternations"] == 3 and len(report["trials"]) == 6
    assert [t["sampler"] for t in report["trials"]] == ["off", "on", "on", "off", "off", "on"]
    assert report["nvml_query_us"]["tick_fast (power only)"] > 0


def test_paired_interval_closed_form():
    from benchmarks.telemetry_overhead import paired_overhead, t975

    ratios = [0.99, 1.0, 0.98, 1.01]
    trials = []
    for r in ratios:
        trials += [{"sampler": "off", "tokens_per_s": 100.0}, {"sampler": "on", "tokens_per_s": 100.0 * r}]
    summary = paired_overhead(trials)
    import math
    import statistics

    logs = [math.log(r) for r in ratios]
    half = 3.182 * statistics.stdev(logs) / 2
    # 4 logs, their mean and standard deviation (sums over 4, a √), an exp, then 1 − exp(·) ≈ 0
    # cancels terms of size 1: the scale is 100 · 1
    assert summary["overhead"] == approx(100 * (1 - math.exp(statistics.fmean(logs))), n=3 * 4 + 8, scale=100.0)
    assert summary["ci_low"] == approx(100 * (1 - math.exp(statistics.fmean(logs) + half)), n=3 * 4 + 8, scale=100.0)
    # not rounding: above 30 degrees of freedom t975 is the approximation 1.96 + 2.4/df, within
    # 0.002 of the exact quantile (1.9719 at df = 200)
    assert t975(9) == 2.262 and abs(t975(200) - 1.972) < 0.002


def test_gpu_suite_script_is_valid_bash_and_names_the_four_outputs():
    script = REPO / "benchmarks" / "run_gpu_suite.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    text = script.read_text()
    for name in ("moe_layer.json", "forward_chunk.json", "fastweight.json", "telemetry_overhead.json"):
        assert name in text


def test_hf_expert_share_quick(tmp_path):
    from benchmarks import hf_expert_share

    out = tmp_path / "expert_share.json"
    assert hf_expert_share.main(["--device", "cpu", "--shapes", "32x16", "--ks", "8", "1", "--vocab", "64",
                                 "--rows", "2", "--seq-len", "8", "--json-out", str(out)]) == 0
    (row,) = json.loads(out.read_text())["shapes"]
    assert row["tokens"] == 16 and row["plain_s"] > 0 and row["top8_s"] > 0 and row["top1_s"] > 0
    # the benchmark's own formula: a difference of two times (terms of size ≤ 8/7 after ÷ 7 · 8 / top8), ÷, ×, ÷
    assert row["expert_share"] == approx((row["top8_s"] - row["top1_s"]) / 7 * 8 / row["top8_s"], n=4, scale=16 / 7)


def test_policy_speed_kernel_difference_is_policy_minus_reference():
    from benchmarks.policy_speed import kernel_difference

    reference = {"count": 3, "gpu_us": 30.0, "by_name": {"gemm": [2, 20.0], "topk": [1, 10.0]}}
    policy = {"count": 5, "gpu_us": 52.0, "by_name": {"gemm": [2, 20.0], "topk": [3, 30.0], "scatter": [1, 2.0]}}
    rows = kernel_difference(policy, reference)
    assert rows == [{"kernel": "topk", "launches": 2, "gpu_us": 20.0}, {"kernel": "scatter", "launches": 1, "gpu_us": 2.0}]
    assert kernel_difference(None, reference) == []
    from benchmarks.policy_speed import top_kernels

    assert top_kernels(policy, top=2) == [{"kernel": "topk", "launches": 3, "gpu_us": 30.0},
                                          {"kernel": "gemm", "launches": 2, "gpu_us": 20.0}]
    assert top_kernels(None) == []


def test_policy_speed_drop_all_is_static_top1_through_the_drop_path(tmp_path):
    """`drop-all` routes exactly as static-top1 does (one slot a token), through NECTAR's router;
    `--chunk-forward` times the experiment's chunk forward."""
    from benchmarks import policy_speed

    out = tmp_path / "ps.json"
    assert policy_speed.main(["--device", "cpu", "--quick", "--chunk-forward", "--policies",
                              "static-top2,static-top1,drop-all", "--json-out", str(out)]) == 0
    rows = {r["policy"]: r for r in json.loads(out.read_text())}
    assert rows["drop-all"]["slots_per_token"] == rows["static-top1"]["slots_per_token"] == 1.0
    assert all(r["forward_wall_us"] > 0 for r in rows.values())
    from nectar.moe import fused_router

    assert rows["drop-all"]["chunk_forward"] is True
    assert rows["drop-all"]["fused_router"] == fused_router.runs_on("cpu")
    assert rows["drop-all"]["telemetry"] == "counter"


def test_policy_speed_times_chunks_in_the_backends_window(tmp_path):
    """`--telemetry backend` runs each timed chunk inside the telemetry backend's window (the simulator
    on the CPU: every round then has an energy), and needs the experiment's chunk forward."""
    from benchmarks import policy_speed

    out = tmp_path / "ps.json"
    assert policy_speed.main(["--device", "cpu", "--quick", "--chunk-forward", "--telemetry", "backend", "--policies",
                              "static-top2,drop-all", "--json-out", str(out)]) == 0
    rows = {r["policy"]: r for r in json.loads(out.read_text())}
    assert rows["drop-all"]["telemetry"] == "backend"
    assert all(j > 0 for r in rows.values() for j in r["round_J"]) and len(rows["drop-all"]["round_J"]) == 2
    with pytest.raises(SystemExit):
        policy_speed.parse_args(["--device", "cpu", "--quick", "--telemetry", "backend"])


def test_policy_speed_runs_a_saved_model_on_its_heldout_stream(tmp_path):
    from benchmarks import policy_speed

    out = tmp_path / "ps.json"
    assert policy_speed.main(["--device", "cpu", "--model", str(REPO / "data" / "models" / "cpu-demo"), "--rows", "2",
                              "--micro-batch", "1", "--seq-len", "64", "--rounds", "1", "--policies",
                              "static-top2,drop-all", "--json-out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == [str(REPO / "data" / "models" / "cpu-demo")] * 2
    with pytest.raises(SystemExit, match="policy_speed: .*does not exist"):
        policy_speed.main(["--device", "cpu", "--quick", "--model", str(tmp_path / "missing")])
