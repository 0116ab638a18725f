"""Presets are data: shipped files load, round-trip, validate, and drive the simulator."""

import json

import pytest

from sim.backend import SimBackend
from sim.presets import PRESET_DIR, GPUPreset, list_presets, load_preset, save_preset
from sim.synthetic_workload import distilgpt2_moe_workload


def test_shipped_presets_load_and_differ():
    assert {"h100_sxm", "a100_sxm"} <= set(list_presets())
    h100, a100 = load_preset("h100_sxm"), load_preset("a100_sxm")
    assert h100.power_limit_W == 700.0 and h100.slowdown_C == 89.0
    assert 75.0 <= h100.idle_power_W <= 120.0
    assert a100.power_limit_W == 400.0 and a100.peak_tflops < h100.peak_tflops
    assert "H100" in h100.gpu_name and "A100" in a100.gpu_name


def test_save_then_load_round_trips(tmp_path):
    preset = load_preset("h100_sxm").replace(gemm_efficiency=0.31, ambient_C=30.0)
    path = save_preset(preset, tmp_path / "custom.json")
    assert load_preset(path) == preset
    assert load_preset(str(path)) == preset
    assert load_preset(preset) is preset


def test_every_field_is_in_the_json_file():
    data = json.loads((PRESET_DIR / "h100_sxm.json").read_text())
    assert set(data) == set(load_preset("h100_sxm").to_dict())


@pytest.mark.parametrize("change,match", [
    ({"gemm_efficiency": 1.5}, "gemm_efficiency"),
    ({"thermal_resistance_C_per_W": -0.1}, "thermal_resistance_C_per_W"),
    ({"leakage_W_per_C": 20.0}, "runaway"),
    ({"throttled_clock_MHz": 5000.0}, "throttled_clock_MHz"),
    ({"power_limit_W": 50.0}, "power_limit_W"),
    ({"launches_per_expert": 2.5}, "integer"),
    ({"peak_tflops": float("nan")}, "finite"),
    ({"no_such_field": 1}, "unknown preset field"),
])
def test_bad_values_are_rejected_with_the_field_named(change, match):
    with pytest.raises(ValueError, match=match):
        load_preset("h100_sxm").replace(**change)


def test_bad_files_and_names_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown GPU preset 'b200'.*h100_sxm"):
        load_preset("b200")
    with pytest.raises(ValueError, match="does not exist"):
        load_preset(tmp_path / "missing.json")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_preset(broken)
    partial = tmp_path / "partial.json"
    data = load_preset("h100_sxm").to_dict()
    del data["ambient_C"]
    partial.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="missing field.*ambient_C"):
        load_preset(partial)
    with pytest.raises(ValueError, match="GPUPreset"):
        save_preset({"name": "x"}, tmp_path / "x.json")


def test_simulator_reruns_from_a_modified_preset_object():
    """Calibration changes fields and re-runs: a GEMM-bound chunk gets faster with faster GEMMs."""
    base = load_preset("h100_sxm_datasheet")   # room to double its GEMM efficiency below 1
    faster = base.replace(gemm_efficiency=2 * base.gemm_efficiency)
    workload = distilgpt2_moe_workload(2)
    times = []
    for preset in (base, faster):
        backend = SimBackend(preset, seed=0)
        backend.run_chunk(lambda: workload)
        times.append(backend.last_truth.t_end_s)
    assert times[1] < 0.8 * times[0]
    assert isinstance(faster, GPUPreset)


def test_a100_preset_runs_and_is_slower_than_h100():
    workload = distilgpt2_moe_workload(2)
    durations = {}
    for name in ("h100_sxm", "a100_sxm"):
        backend = SimBackend(name, seed=0)
        window = backend.run_chunk(lambda: workload)
        durations[name] = window.duration_s
        assert window.mem_total_B == backend.preset.memory_total_B
        assert backend.gpu_name() == backend.preset.gpu_name
    assert durations["a100_sxm"] > 1.3 * durations["h100_sxm"]
