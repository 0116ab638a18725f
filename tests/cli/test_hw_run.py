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
