"""nectar.telemetry.trace (backend-neutral trace CSV + meta.json) and hw.meta's hardware meta."""

from __future__ import annotations

import csv
import gzip
import json
import math
from datetime import datetime
from importlib import metadata

import pytest

from tests.hw.fake_nvml import FakeClock, FakeNvml
from hw.backend import NvmlBackend
from hw.meta import write_hardware_meta
from nectar.telemetry.window import TelemetryWindow
from nectar.telemetry.trace import COLUMNS, TraceRow, TraceWriter, read_meta, read_trace, write_meta, write_trace
from nectar.telemetry.workload import ChunkWorkload, ExpertCost, LayerWorkload
from tests.tolerance import approx

REQUIRED = {"t_start_s", "t_end_s", "energy_mJ_start", "energy_mJ_end", "energy_J", "mean_power_W",
            "peak_power_W", "temp_C", "mem_temp_C", "sm_clock_MHz", "throttle_reasons", "samples", "policy",
            "chunk_index", "kind", "tokens", "batch", "seq_len", "expert_counts", "workload_json"}


def workload(policy="energy") -> ChunkWorkload:
    ffn = ExpertCost(flops=1.0 / 3.0, bytes=2.5e9, weight_bytes=9.4e6, kind="ffn")
    zero = ExpertCost(flops=0.0, bytes=0.0, kind="zero")
    layers = [
        LayerWorkload(tokens_per_expert=[7, 0, 1], expert_costs=[ffn, zero, ffn], router_flops_per_token=12.5,
                      dropped_tokens=2),
        LayerWorkload(tokens_per_expert=[3, 3, 2], expert_costs=[ffn, ffn, zero]),
    ]
    return ChunkWorkload(tokens=8, batch=2, seq_len=4, d_model=768, n_layers=2, n_heads=12, vocab_size=50257,
                         layers=layers, dtype_bytes=2, policy=policy)


def window(i=0) -> TelemetryWindow:
    return TelemetryWindow(
        t_start_s=10.0 + i / 7, t_end_s=11.0 + i / 3, energy_J=0.1 + 1e-17 * i, mean_power_W=512.25,
        peak_power_W=600.125, gpu_temp_C=48.0, mem_temp_C=None if i % 2 else 51.0, mem_used_B=2**33 + i,
        mem_total_B=80 * 2**30, sm_clock_MHz=1980.0, throttle_reasons=0x24, samples=93 + i,
        energy_mJ_start=2**63 + 11 * i, energy_mJ_end=2**63 + 11 * i + 100, flags=["short_window"] if i else [],
        energy_power_J=0.099 + i,
    )


@pytest.mark.parametrize("name", ["trace.csv", "trace.csv.gz"])
def test_round_trip_is_exact(tmp_path, name):
    rows = [
        TraceRow(window(0), workload(), kind="chunk", policy="energy", chunk_index=0, extra={"lam": 0.1}),
        TraceRow(window(1), None, kind="idle", policy="", chunk_index=None),
        TraceRow(window(2), workload("static"), kind="calibration", policy="static", chunk_index=3,
                 extra={"note": "ünïcode, \"quoted\"\nnew line"}),
    ]
    assert write_trace(tmp_path / name, rows) == 3
    back = read_trace(tmp_path / name)
    assert back == rows
    assert isinstance(back[0].window.energy_mJ_start, int)  # 2**63 + k survives exactly
    win, load, info = back[0]
    assert load.expert_counts() == [[7, 0, 1], [3, 3, 2]]
    assert info == {"kind": "chunk", "policy": "energy", "chunk_index": 0, "lam": 0.1}
    if name.endswith(".gz"):
        with gzip.open(tmp_path / name, "rt") as handle:
            assert handle.readline().startswith("kind,")


def test_plain_csv_has_the_documented_columns(tmp_path):
    path = tmp_path / "t.csv"
    with TraceWriter(path) as writer:
        writer.write(window(), workload())
        writer.write(window(1), None, kind="warmup")
    with open(path, newline="") as handle:
        cells = list(csv.DictReader(handle))
    assert REQUIRED <= set(cells[0]) and tuple(cells[0]) == COLUMNS
    assert cells[0]["policy"] == "energy"  # defaults to the workload's policy
    assert json.loads(cells[0]["expert_counts"]) == [[7, 0, 1], [3, 3, 2]]
    assert ChunkWorkload.from_dict(json.loads(cells[0]["workload_json"])) == workload()
    assert float(cells[0]["duration_s"]) == approx(1.0, n=2, scale=11.0)  # t_end − t_start (≈ 11 s), written as text
    assert cells[1]["tokens"] == "" and cells[1]["kind"] == "warmup"


def test_nan_energy_survives(tmp_path):
    w = window()
    w.energy_J = math.nan
    write_trace(tmp_path / "t.csv", [TraceRow(w, None, kind="idle")])
    assert math.isnan(read_trace(tmp_path / "t.csv")[0].window.energy_J)


def test_bad_rows_and_files_give_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="kind must be one of"):
        write_trace(tmp_path / "a.csv", [TraceRow(window(), None, kind="burst")])
    with pytest.raises(ValueError, match="JSON-serialisable"):
        write_trace(tmp_path / "b.csv", [TraceRow(window(), None, extra={"x": object()})])
    with pytest.raises(ValueError, match="repeat the row's own fields"):
        write_trace(tmp_path / "c.csv", [TraceRow(window(), None, extra={"kind": "x"})])
    with pytest.raises(FileNotFoundError):
        read_trace(tmp_path / "missing.csv")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a NECTAR trace"):
        read_trace(tmp_path / "other.csv")
    write_trace(tmp_path / "d.csv", [TraceRow(window(), workload())])
    text = (tmp_path / "d.csv").read_text().replace("[[7,0,1],[3,3,2]]", "[[7,0,1],[3,3,9]]")
    (tmp_path / "d.csv").write_text(text)
    with pytest.raises(ValueError, match="line 2.*expert_counts column disagrees"):
        read_trace(tmp_path / "d.csv")


def test_meta_json(tmp_path):
    path = write_meta(tmp_path / "run", backend="sim", preset="h100_sxm", seed=0)
    meta = read_meta(tmp_path / "run")
    assert path.name == "meta.json" and meta["preset"] == "h100_sxm" and meta["format"] == "nectar-trace/1"
    assert meta["torch_version"] == metadata.version("torch")
    assert meta["transformers_version"] == metadata.version("transformers")
    assert datetime.fromisoformat(meta["created_utc"]).tzinfo is not None
    assert isinstance(meta["command_line"], list)
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        write_meta(tmp_path / "bad.json", thing=object())


def test_measured_windows_round_trip_with_hardware_meta(tmp_path):
    clock = FakeClock()
    fake = FakeNvml(clock, 333.0)
    backend = NvmlBackend(sample_period_s=None, sync=lambda: None, nvml=fake, clock=clock, sleep=clock.advance)
    with TraceWriter(tmp_path / "trace.csv.gz") as writer:
        for i in range(3):
            w = backend.run_chunk(lambda: (clock.advance(0.5), workload())[1])
            writer.write(w, workload(), chunk_index=i)
        writer.write(backend.idle(1.0), kind="idle")
    write_hardware_meta(tmp_path, nvml=fake, model="tiny")
    rows = read_trace(tmp_path / "trace.csv.gz")
    assert [r.kind for r in rows] == ["chunk"] * 3 + ["idle"]
    assert sum(r.window.energy_J for r in rows) == approx(fake.true_energy_J(0.0, clock()), n=len(rows) + 4)
    meta = read_meta(tmp_path)
    assert meta["gpu_name"] == "Fake H100" and meta["power_limit_W"] == 700.0 and meta["model"] == "tiny"
    assert meta["backend"] == "nvml"
