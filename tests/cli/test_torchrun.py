"""`torchrun --nproc-per-node N -m nectar run …`: the launch is detected, the replicas join one gloo
group, rank 0 alone prints and writes, and the run's records are the node's (energy summed over the
replicas' GPUs, the hottest GPU's temperature). Plus the launch's environment checks (which GPU a
replica measures), which need no processes."""

from __future__ import annotations

import argparse
import csv
import gzip
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nectar.cli.hw_run import check_replica_args
from nectar.cli.replicas import Launch, device_options, launch, nvml_index
from tests.tolerance import approx

REPO = Path(__file__).resolve().parents[2]


def test_two_replicas_run_and_only_rank_zero_writes(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "nectar", "run", "--model", str(tiny_model_dir), "--out", str(out), "--tokens", "1024",
           "--chunk-tokens", "256", "--seq-len", "32", "--price-batch", "16", "--policies", "static-top2,nectar",
           "--shadow-share", "0.25", "--json", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)                        # one JSON document: only rank 0 printed
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["replicas"] == 2 and len(summary["replica_gpus"]) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]      # nothing else written
    with gzip.open(out / "trace.csv.gz", "rt") as f:
        rows = [r for r in csv.DictReader(f) if r["kind"] == "chunk"]
    assert {r["policy"] for r in rows} == {"static-top2", "nectar"}      # the checks ride along in chunk windows
    for row in rows:
        each = json.loads(row["extra_json"])
        assert float(row["energy_J"]) == approx(sum(each["replica_energy_J"]), n=3)  # a sum of ≤ 3 (text keeps repr)
        assert float(row["temp_C"]) == max(each["replica_temp_C"])
        assert len(each["replica_temp_C"]) == 2
    with open(out / "chunks.csv") as f:
        records = list(csv.DictReader(f))
    assert len(records) == 2 * 4                              # 2 policies × 4 chunks, the node's records
    assert any(float(r["guard_energy_J"]) > 0 for r in records if r["policy"] == "nectar")   # checks were charged


def test_launch_is_read_from_torchruns_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "CUDA_DEVICE_ORDER", "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    assert launch() is None
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launch() == Launch(3, 4, 1) and os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    with pytest.raises(ValueError, match="PCI_BUS_ID"):
        launch()
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(ValueError, match="bad torchrun environment"):
        launch()


def test_a_replica_measures_the_gpu_its_model_runs_on(monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert nvml_index(2) == 2
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "5, 3,7")
    assert [nvml_index(i) for i in range(3)] == [5, 3, 7]
    assert device_options("cuda", Launch(1, 3, 1)) == {"device_index": 3} and device_options("cpu", Launch(1, 3, 1)) == {}
    with pytest.raises(ValueError, match="lists 3 GPU"):
        nvml_index(3)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-8f1a,GPU-77c2")
    with pytest.raises(ValueError, match="integer index"):
        nvml_index(0)


def test_hw_run_replicas_load_one_saved_model():
    args = argparse.Namespace(model=None, device="cuda")
    with pytest.raises(ValueError, match="needs --model"):
        check_replica_args(args)
    with pytest.raises(ValueError, match="LOCAL_RANK"):
        check_replica_args(argparse.Namespace(model=Path("m"), device="cuda:1"))
    check_replica_args(argparse.Namespace(model=Path("m"), device="cuda"))


def _calibration_child(rank: int, world: int):
    from nectar.cli.hw_run import replica_calibration
    from nectar.control.replicas import ReplicaGroup
    from nectar.experiment.campaign import Calibration
    from nectar.telemetry.trace import TraceRow
    from nectar.telemetry.window import TelemetryWindow
    from nectar.telemetry.workload import ChunkWorkload

    def row(kind, energy, tokens):
        workload = None if tokens is None else ChunkWorkload(tokens, 1, tokens, 8, 1, 1, 10)
        return TraceRow(TelemetryWindow(0.0, 5.0, energy, energy / 5, energy / 5, 50.0), workload, kind=kind)

    tokens = 1000 * (rank + 1)
    rows = [row("warmup", 1.0, 10), row("idle", 2.0, None), row("calibration", 100.0 * (rank + 1), tokens),
            row("calibration", 3.0, 10)]
    node = replica_calibration(ReplicaGroup(), Calibration(rows, tokens / 5.0, 20.0 * (rank + 1), 0.1))
    return node.tokens_per_s, node.power_W, node.joules_per_token, [(r.kind, r.extra) for r in node.rows]


def test_hw_run_calibration_is_the_nodes():
    from nectar.lact.launch import run_group

    results = run_group(_calibration_child, 2, start_method="fork", threads=1, timeout_s=120.0)
    assert results[0] == results[1]
    tokens_per_s, power_W, joules_per_token, rows = results[0]
    assert tokens_per_s == 200.0 + 400.0 and power_W == 60.0       # the GPUs run side by side
    assert joules_per_token == approx(300.0 / 3000.0, n=4 + 1)       # Σ energy / Σ tokens of the top-2 windows
    assert [extra["replica"] for _, extra in rows] == [0] * 4 + [1] * 4
