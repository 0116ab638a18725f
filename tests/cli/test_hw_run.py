"""The GPU campaign's orchestration, run on the simulator with a tiny model (no GPU needed)."""

import json

from nectar.cli.hw_run import main as hw_main
from nectar.telemetry.trace import read_trace


def test_campaign_calibrates_and_writes_a_frontier_per_workload(tiny_model_dir, tmp_path):
    out = tmp_path / "hw"
    code = hw_main(["--backend", "sim", "--device", "cpu", "--model", str(tiny_model_dir), "--out", str(out),
                    "--workloads", "stationary", "--policies", "static-top2,static-cheap,fixed-bias:1,nectar",
                    "--repeats", "2", "--workload-seconds", "0.01", "--warmup-s", "0.2", "--calibration-s", "0.2",
                    "--chunk-tokens", "256", "--seq-len", "64", "--micro-batch", "4", "--no-progress"])
    assert code == 0
    report = json.loads((out / "stationary" / "frontier.json").read_text())
    assert {p["name"] for p in report["policies"]} == {"static-top2", "static-cheap", "fixed-bias:1", "nectar"}
    assert report["repeats"] == 2 and len(report["nectar_margin_per_repeat"]) == 2
    kinds = {row.kind for row in read_trace(out / "calibration.csv.gz")}
    assert {"warmup", "idle", "calibration"} <= kinds
    campaign = json.loads((out / "campaign.json").read_text())
    assert campaign["static_top2_tokens_per_s"] > 0 and campaign["speed"]["ratio"] > 0


def test_campaign_rejects_unknown_workloads(tiny_model_dir, tmp_path, capsys):
    assert hw_main(["--backend", "sim", "--device", "cpu", "--model", str(tiny_model_dir),
                    "--workloads", "stationary,party", "--out", str(tmp_path)]) == 2
    assert "workloads" in capsys.readouterr().err


def test_campaign_runs_the_limit_workloads(tiny_model_dir, tmp_path):
    """power-schedule (interleaved, default budget from the calibration) and thermal (policies one
    after another, each after the same warm-up, beside the backend's co-tenant) on the simulator."""
    out = tmp_path / "hw"
    code = hw_main(["--backend", "sim", "--device", "cpu", "--model", str(tiny_model_dir), "--out", str(out),
                    "--workloads", "power-schedule,thermal", "--temp-cap", "40",
                    "--policies", "static-top2,static-cheap,nectar", "--repeats", "1", "--workload-seconds", "0.01",
                    "--warmup-s", "0.2", "--calibration-s", "0.2", "--policy-warmup-s", "0.2",
                    "--chunk-tokens", "256", "--seq-len", "64", "--micro-batch", "4", "--no-progress"])
    assert code == 0
    campaign = json.loads((out / "campaign.json").read_text())
    power = json.loads((out / "power-schedule" / "frontier.json").read_text())
    levels = [float(item.split(":")[1]) for item in power["power_budget_W"].split(",")]
    assert levels == [round(f * campaign["static_top2_power_W"]) for f in (0.85, 0.75, 0.85)]
    thermal = json.loads((out / "thermal" / "frontier.json").read_text())
    assert thermal["temp_cap_C"] == 40 and thermal["workload_detail"]["heat"] == "0:0.3"
    rows = [r for r in read_trace(out / "thermal" / "trace.csv.gz") if r.kind == "chunk"]
    order = [r.policy.split(":guard")[0] for r in rows]
    assert order == sorted(order, key=["static-top2", "static-cheap", "nectar"].index)   # one after another


def test_thermal_cap_defaults_below_a_warm_up(tiny_model_dir, tmp_path):
    out = tmp_path / "hw"
    code = hw_main(["--backend", "sim", "--device", "cpu", "--model", str(tiny_model_dir), "--out", str(out),
                    "--workloads", "thermal", "--thermal-headroom-c", "3", "--policies", "static-top2,nectar",
                    "--repeats", "1", "--workload-seconds", "0.01", "--warmup-s", "0.2", "--calibration-s", "0.2",
                    "--policy-warmup-s", "0.2", "--chunk-tokens", "256", "--seq-len", "64", "--micro-batch", "4",
                    "--no-progress"])
    assert code == 0
    cap = json.loads((out / "thermal" / "frontier.json").read_text())["temp_cap_C"]
    first = next(r for r in read_trace(out / "thermal" / "trace.csv.gz") if r.kind == "chunk")
    # the cap's warm-up ended at floor(T) = cap + 3; 0.2 s later the first chunk reads about the same
    assert cap == int(cap) and abs(first.window.gpu_temp_C - (cap + 3)) <= 2  # whole-degree readings, 0.2 s of drift
