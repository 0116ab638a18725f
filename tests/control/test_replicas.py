"""The data-parallel combiners (nectar.control.replicas) against hand-computed node values: the
node's window sums energy and power, takes the longest duration and the hottest / fullest / slowest
GPU, keeps each GPU's readings; the combined observation concatenates rows and sums counts. The
collectives themselves are tested on gloo process groups in tests/experiment/test_data_parallel.py."""

import math

import pytest
import torch

from nectar.control.observation import ChunkObservation, LayerObservation
from nectar.control.replicas import ReplicaWindow, combine_observations, combine_windows, replica_extra
from nectar.telemetry.energy import window_energy_J
from nectar.telemetry.window import TelemetryWindow
from nectar.telemetry.workload import ChunkWorkload, ExpertCost, LayerWorkload
from tests.tolerance import approx


def _workload(counts, batch):
    layer = LayerWorkload(list(counts), [ExpertCost(1e6, 8.0), ExpertCost(0.0, 0.0, kind="zero")], dropped_tokens=1)
    return ChunkWorkload(tokens=batch * 4, batch=batch, seq_len=4, d_model=8, n_layers=1, n_heads=1,
                         vocab_size=10, layers=[layer], policy="nectar")


def _window(t0, duration, energy, power, temp, used, clock, flags=(), reasons=0, samples=5, workload=None):
    return TelemetryWindow(t0, t0 + duration, energy, power, power + 50, temp, mem_temp_C=temp + 3,
                           mem_used_B=used, mem_total_B=1000, sm_clock_MHz=clock, throttle_reasons=reasons,
                           samples=samples, energy_mJ_start=1e6, energy_mJ_end=1e6 + 1e3 * energy, flags=list(flags),
                           energy_power_J=energy * 0.9, workload=workload)


def test_node_window_sums_energy_and_takes_the_worst_gpu():
    a = _window(10.0, 1.0, 300.0, 300.0, 61.0, 200, 1980.0, ["x"], reasons=1, samples=9, workload=_workload([3, 1], 1))
    b = _window(10.2, 1.3, 450.0, 346.0, 74.0, 900, 1755.0, ["y"], reasons=4, samples=7, workload=_workload([1, 5], 2))
    c = _window(9.9, 0.2, 40.0, 200.0, 58.0, 500, 1900.0, samples=3, workload=_workload([2, 2], 1))   # short
    node = combine_windows([a, None, b, c])             # None: a GPU that ran nothing in this step
    assert isinstance(node, ReplicaWindow)
    each = [300.0, 450.0, 40.0 * 0.9]                    # the short window's energy is its integrated power
    assert node.replica_energy_J == each
    assert node.energy_J == window_energy_J(node) == approx(sum(each), n=3)  # a sum of 3
    # durations are differences of clock times of size ≤ 11.5 s: that is their rounding's scale
    assert node.t_end_s == 11.5 and node.duration_s == approx(1.3, n=2, scale=11.5)
    assert node.mean_power_W == 846.0 and node.peak_power_W == 846.0 + 150
    assert node.gpu_temp_C == 74.0 and node.replica_temp_C == [61.0, 74.0, 58.0]
    assert node.mem_temp_C == 77.0 and node.memory_pressure == 0.9
    assert node.sm_clock_MHz == 1755.0 and node.throttle_reasons == 5 and node.samples == 3
    assert node.flags == ["x", "y"]
    assert node.energy_mJ_start is None and node.energy_mJ_end is None
    assert node.workload.expert_counts() == [[6, 8]] and node.workload.tokens == 16 and node.workload.batch == 4
    assert node.workload.layers[0].dropped_tokens == 3
    assert replica_extra(node)["replica_duration_s"] == approx([1.0, 1.3, 0.2], n=2, scale=11.5)
    assert replica_extra(a) == {}


def test_one_bad_gpu_makes_the_node_window_invalid():
    good = _window(0.0, 1.0, 300.0, 300.0, 60.0, 200, 1980.0)
    bad = _window(0.0, 1.0, math.nan, math.nan, math.nan, 200, 1980.0)
    for order in ([good, bad], [bad, good]):
        node = combine_windows(order)
        assert math.isnan(node.energy_J) and math.isnan(node.gpu_temp_C) and not node.is_valid()
    assert combine_windows([None, None]) is None


def _observation(rows, counts, agreement, generator):
    nll_rows = torch.rand(rows, generator=generator, dtype=torch.float64) * 10
    logits, inputs = torch.randn(rows * 2, 2, generator=generator), torch.randn(rows * 2, 3, generator=generator)
    return ChunkObservation(float(nll_rows.sum()), rows * 3, agreement, _workload(counts, rows),
                            [LayerObservation(logits, inputs)], nll_rows=nll_rows)


def test_combined_observation_is_the_concatenated_chunk():
    g = torch.Generator().manual_seed(0)
    parts = [_observation(2, [3, 5], 0.5, g), _observation(2, [4, 4], 1.0, g), _observation(2, [8, 0], 0.75, g)]
    node = combine_observations(parts)
    assert torch.equal(node.nll_rows, torch.cat([p.nll_rows for p in parts]))
    # 6 rows summed at once vs three sums of 2 summed; a token-weighted mean of three agreements
    assert node.nll_sum == float(node.nll_rows.sum()) == approx(sum(p.nll_sum for p in parts), n=6)
    assert node.nll_tokens == 18 and node.agreement == approx(0.75, n=3 + 3)
    assert node.workload.expert_counts() == [[15, 9]] and node.workload.tokens == 24
    assert torch.equal(node.layers[0].logits, torch.cat([p.layers[0].logits for p in parts]))
    assert torch.equal(node.layers[0].inputs, torch.cat([p.layers[0].inputs for p in parts]))
    assert node.rows_nll(torch.tensor([1, 4])) == (float(parts[0].nll_rows[1] + parts[2].nll_rows[0]), 6)
    with pytest.raises(ValueError, match="at least one"):
        combine_observations([])
