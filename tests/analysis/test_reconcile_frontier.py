"""`nectar reconcile --frontier RUN_DIR`: a frontier run re-priced by its own cost table.

The identity check: the "GPU" run is itself a simulator run priced by the same table, so replaying
its recorded workloads through the simulator priced by that table must give back its own savings.
Its GPU draws temperature-independent power (no leakage) and its sensor has no noise, so what it
measured differs from the simulated truth only by the sensor's whole-milliwatt power readings.
"""

from __future__ import annotations

import json
import shutil

import pytest

from analysis.reconcile.cli import main as reconcile_main
from analysis.reconcile.frontier_replay import OUT_NAME, reconcile_frontier
from nectar.cli.frontier import main as frontier_main
from sim.presets import save_preset
from tests.sim.test_cost_pricing import FLAT, cost_table
from tests.tolerance import approx

POLICIES = "static-top2,static-top1,static-cheap,nectar"
SMALL = ["--tokens", "3072", "--chunk-tokens", "1024", "--seq-len", "128", "--no-progress", "--json"]
# not rounding: the run's energies are integrated instant-power readings in whole mW (sim/sensor.py)
# of ~330 W chunks, ≤ 1.5e-6 relative each; a saving is a ratio of two such sums
SENSOR_RESOLUTION = 1e-5


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("frontier-costs")
    table = cost_table().save(root / "table.json")
    preset = save_preset(FLAT, root / "flat.json")
    out = root / "session" / "frontier-stationary"
    out.parent.mkdir()
    assert frontier_main(["--workload", "stationary", "--policies", POLICIES, *SMALL, "--gpu", str(preset),
                          "--sim-cost-table", str(table), "--no-cost-calibration", "--out", str(out)]) == 0
    shutil.copy(table, out / "cost_table.json")      # the table it was priced by, as a GPU run's calibration writes it
    return out, preset


def test_replaying_a_table_priced_run_gives_back_its_own_savings(run):
    out, preset = run
    report = reconcile_frontier([out], preset=preset)
    own = {p["name"]: p for p in json.loads((out / "frontier.json").read_text())["policies"]}
    rows = {r["policy"]: r for r in report["rows"]}
    assert set(rows) == set(POLICIES.split(","))
    for name, r in rows.items():
        if name == "static-top2":
            assert r["gpu_saved"] is None and r["sim_saved"] is None
            continue
        # the run's accounting redone over the same windows: sums of a few windows, one ratio
        assert r["gpu_saved"] == approx(own[name]["saved"], n=16, scale=1.0)
        assert abs(r["sim_saved"] - own[name]["saved"]) <= SENSOR_RESOLUTION
        assert r["sim_dppl"] == r["gpu_dppl"] == own[name]["dppl"]
        assert r["workload"] == "stationary" and r["chunks"] == 3
    assert report["goals"]["ranking_identical"] and report["goals"]["within_2_points"] == 3
    assert report["warnings"] == []


def test_time_per_token_is_the_chunk_windows_and_the_same_simulator_prices_it_alike(run):
    """gpu_ns_per_token is the run's own chunk time over its tokens (chunks.csv, recomputed here); the
    replay by the same table and simulator gives the same time, so every row is within the 3 % goal."""
    import csv

    out, preset = run
    report = reconcile_frontier([out], preset=preset)
    rows = {r["policy"]: r for r in report["rows"]}
    chunks = [c for c in csv.DictReader((out / "chunks.csv").open()) if c["policy"] == "static-top1"]
    seconds = sum(float(c["t_end_s"]) - float(c["t_start_s"]) for c in chunks)
    assert rows["static-top1"]["gpu_ns_per_token"] == approx(1e9 * seconds / (3 * 1024), n=16, scale=3e4)
    for r in rows.values():
        assert r["time_error"] == approx(r["sim_ns_per_token"] / r["gpu_ns_per_token"] - 1.0, n=4, scale=1.0)
        assert abs(r["time_error"]) < 1e-9            # one simulator, one table: the same durations
    goals = report["goals"]
    assert goals["time_within_3_percent"] == goals["time_rows"] == len(rows)


def test_cli_writes_the_report_and_plot_beside_the_run(run, capsys):
    out, preset = run
    assert reconcile_main(["--frontier", str(out), "--preset", str(preset)]) == 0
    written = out.parent / OUT_NAME
    report = json.loads(written.read_text())
    assert report["format"] == "nectar-sim-vs-gpu/1" and written.with_suffix(".png").stat().st_size > 0
    assert {"workload", "policy", "gpu_saved", "sim_saved", "gpu_dppl", "sim_dppl"} <= set(report["rows"][0])
    assert "static-top1" in capsys.readouterr().out
    assert reconcile_main(["--frontier", str(out), "--preset", str(preset)]) == 2    # no silent overwrite
    assert "--overwrite" in capsys.readouterr().err


@pytest.mark.parametrize("missing, named", [("cost_table.json", "cost_table.json"), ("frontier.json", "frontier.json")])
def test_a_run_without_what_the_replay_needs_is_one_clear_line(run, tmp_path, capsys, missing, named):
    out, _ = run
    copy = shutil.copytree(out, tmp_path / "run")
    (copy / missing).unlink()
    assert reconcile_main(["--frontier", str(copy), "--out", str(tmp_path / "x.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and named in err and str(copy) in err
    assert not (tmp_path / "x.json").exists()


def test_trace_dir_and_frontier_exclude_each_other(run, capsys):
    out, _ = run
    assert reconcile_main([str(out), "--frontier", str(out)]) == 2
    assert reconcile_main([]) == 2
    assert "either TRACE_DIR or --frontier" in capsys.readouterr().err
