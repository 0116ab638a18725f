"""The on-device runner's orchestration, run on the simulator with a tiny model (no GPU needed)."""

import json

from nectar.cli.hw_run import main as hw_main
from nectar.telemetry.trace import read_trace


def test_runner_segments_calibration_and_outputs(tiny_model_dir, tmp_path):
    out = tmp_path / "hw"
    code = hw_main(["--backend", "sim", "--device", "cpu", "--model", str(tiny_model_dir), "--out", str(out),
                    "--segments", "main,thermal,power", "--policy-seconds", "0.5", "--thermal-seconds", "0.5",
                    "--power-seconds", "0.5", "--warmup-s", "0.2", "--calibration-s", "0.2", "--chunk-tokens", "256",
                    "--seq-len", "64", "--guard-tokens", "128", "--guard-check-tokens", "64", "--max-chunks", "2", "--no-progress"])
    assert code == 0
    main = json.loads((out / "main" / "summary.json").read_text())
    assert set(main["policies"]) == {"static-top2", "static-top1", "static-cheap", "nectar"}
    kinds = {row.kind for row in read_trace(out / "main" / "trace.csv.gz")}
    assert {"warmup", "idle", "calibration", "chunk"} <= kinds
    thermal = json.loads((out / "thermal" / "summary.json").read_text())
    assert thermal["temp_cap_C"] == main["policies"]["static-top2"]["max_temp_C"] - 4.0
    power = json.loads((out / "power" / "summary.json").read_text())
    assert abs(power["power_budget_W"] - 0.9 * main["policies"]["static-top2"]["mean_power_W"]) < 1e-9


def test_runner_rejects_unknown_segments(tiny_model_dir, tmp_path, capsys):
    assert hw_main(["--backend", "sim", "--device", "cpu", "--model", str(tiny_model_dir),
                    "--segments", "main,party", "--out", str(tmp_path)]) == 2
    assert "unknown segments" in capsys.readouterr().err
