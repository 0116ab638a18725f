"""SimBackend behind the TelemetryBackend protocol: windows, inspection, and clear errors on bad input."""

import math

import pytest

from nectar.plugins import make_backend
from nectar.telemetry.window import TelemetryBackend, TelemetryWindow
from nectar.telemetry.workload import ExpertCost
from sim.backend import SimBackend
from sim.synthetic_workload import distilgpt2_moe_workload
from tests.tolerance import approx


# A chunk's clock and energy totals are sums over its thermal segments (one per kernel phase and
# clock change: a few dozen at most here) on one side, a running total on the other.
SEGMENTS_N = 64

def test_implements_the_protocol_and_is_reachable_by_name():
    backend = make_backend("sim", preset="a100_sxm", seed=1)
    assert isinstance(backend, SimBackend)
    assert isinstance(backend, TelemetryBackend)
    assert backend.name == "sim" and "A100" in backend.gpu_name()


def test_window_fields_are_sensor_values():
    backend = SimBackend(seed=0)
    workload = distilgpt2_moe_workload(2)
    window = backend.run_chunk(lambda: workload)
    assert isinstance(window, TelemetryWindow) and window.is_valid()
    assert window.t_start_s == 0 and window.t_end_s == approx(backend.state.time_s, n=SEGMENTS_N)
    assert window.gpu_temp_C == int(window.gpu_temp_C) and window.mem_temp_C == int(window.mem_temp_C)
    assert window.energy_mJ_start == int(window.energy_mJ_start)
    assert window.energy_J == approx((window.energy_mJ_end - window.energy_mJ_start) / 1e3, n=2)  # −, ÷
    assert backend.preset.memory_baseline_B < window.mem_used_B < window.mem_total_B
    assert window.sm_clock_MHz == backend.preset.max_clock_MHz
    idle = backend.idle(2.0)
    assert idle.throttle_reasons & 0x1 and idle.duration_s == approx(2.0, n=4)  # a difference of clock times
    assert idle.mean_power_W < window.mean_power_W


def test_run_chunk_calls_compute_once_and_prices_what_it_returns():
    calls = []

    def compute():
        calls.append(1)
        return distilgpt2_moe_workload(1)

    window = SimBackend(seed=0).run_chunk(compute)
    assert calls == [1] and window.workload == distilgpt2_moe_workload(1)
    with pytest.raises(ValueError, match="callable"):
        SimBackend(seed=0).run_chunk(distilgpt2_moe_workload(1))


def test_price_as_scales_every_batch_by_the_same_rows_per_row():
    from dataclasses import replace

    chunk = replace(distilgpt2_moe_workload(2, batch=2, seq_len=256), policy="nectar")
    check = replace(distilgpt2_moe_workload(2, batch=1, seq_len=256), policy="guard-shadow")
    backend = lambda: SimBackend(seed=0, price_as="distilgpt2", price_batch=8, price_chunk_rows=2)  # noqa: E731
    stream, shadow = backend().run_chunk(lambda: chunk), backend().run_chunk(lambda: check)
    assert (stream.workload.batch, stream.workload.seq_len) == (8, 1024)   # a 2-row chunk priced as 8 rows
    assert (shadow.workload.batch, shadow.workload.seq_len) == (4, 1024)   # a 1-row check in proportion
    assert SimBackend(price_as="distilgpt2").info()["priced_as"] == "distilgpt2"
    with pytest.raises(ValueError, match="price-as target"):
        SimBackend(price_as="gpt-5")


def test_state_and_truth_are_inspectable():
    backend = SimBackend(seed=0)
    start = backend.state
    backend.run_chunk(lambda: distilgpt2_moe_workload(2))
    end = backend.state
    assert end.time_s > start.time_s and end.temperature_C > start.temperature_C
    # a difference of running totals (their size is the scale) over the chunk's segments
    assert backend.last_truth.energy_J == approx(end.energy_J - start.energy_J, n=SEGMENTS_N, scale=end.energy_J)
    with pytest.raises(ValueError, match="record_trace"):
        _ = backend.trace


def _bad(mutate):
    workload = distilgpt2_moe_workload(2, n_layers=2)
    mutate(workload)
    return workload


@pytest.mark.parametrize("mutate,match", [
    (lambda w: setattr(w, "tokens", 7), "batch\\*seq_len"),
    (lambda w: setattr(w, "n_layers", 3), "n_layers"),
    (lambda w: setattr(w, "d_model", 0), "d_model"),
    (lambda w: setattr(w.layers[0], "tokens_per_expert", [1, 2]), "must match"),
    (lambda w: setattr(w.layers[1], "tokens_per_expert", [-1] + [5] * 7), "non-negative integers"),
    (lambda w: setattr(w.layers[1], "tokens_per_expert", [1.5] * 8), "non-negative integers"),
    (lambda w: setattr(w.layers[0], "expert_costs", [ExpertCost(math.nan, 1.0)] * 8), "finite"),
    (lambda w: setattr(w.layers[0], "router_flops_per_token", -1.0), "router_flops_per_token"),
])
def test_bad_workloads_are_rejected_clearly(mutate, match):
    with pytest.raises(ValueError, match=match):
        SimBackend(seed=0).run_chunk(lambda: _bad(mutate))


def test_bad_arguments_are_rejected_clearly():
    with pytest.raises(ValueError, match="ChunkWorkload"):
        SimBackend().run_chunk(lambda: {"tokens": 1})
    with pytest.raises(ValueError, match="idle seconds"):
        SimBackend().idle(-1.0)
    with pytest.raises(ValueError, match="seed"):
        SimBackend(seed=-3)
    with pytest.raises(ValueError, match="faults"):
        SimBackend(faults=42)
    with pytest.raises(ValueError, match="unknown fault"):
        SimBackend(faults="melt:1")
    with pytest.raises(ValueError, match="slowdown"):
        SimBackend(ambient_C=95.0)
    with pytest.raises(ValueError, match="power_limit_W"):
        SimBackend(power_limit_W=10.0)
    with pytest.raises(ValueError, match="unknown GPU preset"):
        SimBackend(preset="tpu")


def test_closed_backend_refuses_work():
    with SimBackend() as backend:
        backend.idle(0.1)
    with pytest.raises(RuntimeError, match="closed"):
        backend.run_chunk(lambda: distilgpt2_moe_workload(1))


def test_prices_the_workload_the_core_model_produced():
    """A tiny MoE-GPT-2 from nectar.models.gpt2_moe routes a real batch; the simulator prices exactly its counts."""
    torch = pytest.importorskip("torch")
    from nectar.models.gpt2_moe import MoEGPT2Config, MoEGPT2LMHeadModel
    from sim.kernels import chunk_kernels

    torch.manual_seed(0)
    config = MoEGPT2Config(n_layer=2, n_embd=32, n_head=4, n_inner=64, vocab_size=97, n_positions=32,
                           n_experts=4, moe_top_k=2)
    model = MoEGPT2LMHeadModel(config).eval()
    energies = {}
    for k in (1, 2):
        model.set_router_by_name("topk", k=k)
        with torch.no_grad():
            model(torch.randint(0, 97, (2, 16)))
        workload = model.chunk_workload(2, 16, policy=f"top{k}")
        backend = SimBackend(seed=0)
        backend.run_chunk(lambda: workload)
        energies[k] = backend.last_truth.energy_J
        block = chunk_kernels(workload, backend.preset)[1]
        layer = workload.layers[0]
        expected = sum(n * c.flops for n, c in zip(layer.tokens_per_expert, layer.expert_costs))
        assert sum(kern.flops for kern in block if kern.name.startswith("expert_")) == approx(expected, n=len(block) + 4)
        assert sum(layer.tokens_per_expert) == k * 32
    assert energies[2] > energies[1]
