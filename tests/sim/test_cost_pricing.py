"""The simulator priced by a measured cost table: a chunk costs the table's prediction for its
routing (checked against the table's formula written out here), scaled to the static-top2 check,
and the simulated GPU's power limit still acts on it."""

from dataclasses import replace

import pytest

from nectar.control.cost_table import CostTable
from nectar.telemetry.workload import ChunkWorkload, ExpertCost, LayerWorkload
from sim.backend import SimBackend
from sim.cost_pricing import CostTablePricer, decision_slots
from sim.presets import load_preset
from tests.tolerance import approx

KINDS = ["ffn"] * 5 + ["zero", "copy"]
EXPERT_S = [2e-6, 2.1e-6, 1.9e-6, 2e-6, 0.6e-6, 0.0, 0.2e-6]
EXPERT_J = [1e-3, 1.05e-3, 0.95e-3, 1e-3, 0.3e-3, 0.0, 0.1e-3]
CHECK = {"static-top2": {"measured_s": 1.05, "predicted_s": 1.0, "measured_J": 0.97, "predicted_J": 1.0}}
# temperature-independent power: the simulated energy of a phase is then exactly power × time
FLAT = load_preset("h100_sxm").replace(name="flat", leakage_W_per_C=0.0, sensor_noise_W=0.0)


def cost_table(layers: int = 6, micro_rows: int = 8, **changes) -> CostTable:
    """A table for the committed CPU demo model's expert pool (6 layers of 7 experts)."""
    fields = dict(gpu=FLAT.gpu_name, dispatch="loop", layers=layers, expert_kinds=KINDS, base_s_per_token=2e-5,
                  base_J_per_token=6e-3, expert_s_per_token=EXPERT_S, expert_J_per_token=EXPERT_J,
                  micro_rows=micro_rows, active_expert_s=1e-4, active_expert_J=0.03, slot_s_per_token=3e-6,
                  slot_J_per_token=8e-4, checks=CHECK)
    return CostTable(**{**fields, **changes})


def chunk(counts: list[list[int]], policy: str = "nectar", batch: int = 8, seq_len: int = 128) -> ChunkWorkload:
    costs = [ExpertCost(1.0, 1.0, 1.0, k) for k in KINDS]
    return ChunkWorkload(tokens=batch * seq_len, batch=batch, seq_len=seq_len, d_model=128, n_layers=len(counts),
                         n_heads=4, vocab_size=1000, layers=[LayerWorkload(list(c), costs) for c in counts], policy=policy)


def table_formula(counts, tokens, forwards, k, scale_s=1.05, scale_J=0.97):
    """CostTable's model written out: base and slot terms per token, experts per kept slot, and the
    fixed cost of every active expert beyond the first per layer and forward."""
    kept = [sum(row[e] for row in counts) for e in range(len(KINDS))]
    extra = forwards * sum(max(0, sum(n > 0 for n in row) - 1) for row in counts)
    seconds = (2e-5 + (k - 2) * 3e-6) * tokens + sum(s * n for s, n in zip(EXPERT_S, kept)) + 1e-4 * extra
    joules = (6e-3 + (k - 2) * 8e-4) * tokens + sum(j * n for j, n in zip(EXPERT_J, kept)) + 0.03 * extra
    return seconds * scale_s, joules * scale_J


MIXED = [[600, 500, 0, 400, 300, 200, 48]] * 3 + [[1024, 1024, 0, 0, 0, 0, 0]] * 3   # 2048 slots per layer


@pytest.mark.parametrize("policy, k", [("static-top2", 2), ("static-top1", 1), ("static-top3", 3), ("nectar", 2),
                                       ("drop-all:1-slot", 1)])
@pytest.mark.parametrize("batch", [8, 20])
def test_prediction_is_the_tables_formula_scaled_to_the_check(policy, k, batch):
    w = chunk(MIXED, policy, batch=batch)
    price = CostTablePricer(cost_table(), FLAT).predict(w)
    forwards = -(-batch // 8)
    assert (price.forwards, price.slots_per_token) == (forwards, k)
    expected = table_formula(MIXED, w.tokens, forwards, k)
    # sums of a few dozen products, then the check scale: n = 64 roundings
    assert (price.time_s, price.energy_J) == approx(expected, n=64)


def test_decision_slots_from_the_counts_when_the_name_does_not_say():
    three = chunk([[1024, 1024, 1024, 0, 0, 0, 0]] * 6, "threshold:0.1")
    assert decision_slots(three) == 3
    assert decision_slots(chunk([[1024, 0, 0, 0, 0, 0, 0]] * 6, "fixed-price:2")) == 2  # drops inside K = 2


def test_simulated_chunk_costs_the_prediction_on_a_temperature_independent_gpu():
    table = cost_table()
    w = chunk(MIXED, "static-top2")
    price = CostTablePricer(table, FLAT).predict(w)
    sim = SimBackend(FLAT, cost_table=table)
    sim.run_chunk(lambda: w)
    truth = sim.last_truth
    # idle·t + dynamic energy (= E − idle·t) through the power model's products and sums: n = 16
    assert truth.energy_J == approx(price.energy_J, n=16)
    assert truth.t_end_s - truth.t_start_s == approx(price.time_s, n=16)
    assert sim.info()["priced_by"] == "cost-table"


def test_energy_at_the_tables_temperature_leaves_out_its_leakage():
    preset = FLAT.replace(leakage_W_per_C=0.5, initial_temp_C=60.0)
    table = cost_table()
    w = chunk(MIXED, "static-top2")
    price = CostTablePricer(table, preset).predict(w)
    sim = SimBackend(preset, cost_table=table, cost_table_temp_C=60.0)
    sim.run_chunk(lambda: w)
    # what is left is the leakage of the temperature's move away from 60 °C over the chunk (monotonic
    # within one phase): between nothing and the end temperature's all along
    extra_J = sim.last_truth.energy_J - price.energy_J
    low, high = sorted([0.0, 0.5 * (sim.last_truth.temp_end_C - 60.0) * price.time_s])
    assert extra_J != 0 and low - 1e-9 <= extra_J <= high + 1e-9  # 1e-9 J: far below any leakage here


def test_the_power_limit_still_acts_on_a_table_priced_chunk():
    hot = cost_table(base_J_per_token=2e-5 * 745, expert_J_per_token=[s * 745 for s in EXPERT_S],
                     active_expert_J=1e-4 * 745, checks={})  # 745 W: above the 700 W limit, within full power
    w = chunk(MIXED, "static-top2")
    price = CostTablePricer(hot, FLAT).predict(w)
    sim = SimBackend(FLAT, cost_table=hot)
    window = sim.run_chunk(lambda: w)
    truth = sim.last_truth
    assert truth.t_end_s - truth.t_start_s > price.time_s                  # clocked down
    assert truth.mean_power_W <= FLAT.power_limit_W * (1 + 1e-9)
    assert window.throttle_reasons & 0x4                                   # SW power cap


def test_refusals_name_the_problem():
    table = cost_table()
    with pytest.raises(ValueError, match="6 MoE layers of 7 experts"):
        CostTablePricer(table, FLAT).predict(chunk(MIXED[:4]))
    with pytest.raises(ValueError, match="teacher-forced"):
        CostTablePricer(table, FLAT).predict(replace(chunk(MIXED), phase="prefill", batch=1, seq_len=1024,
                                                     logit_tokens=1))
    with pytest.raises(ValueError, match="price_as none"):
        SimBackend(FLAT, cost_table=table, price_as="distilgpt2")


def test_the_backend_factory_prices_as_run_with_a_table(tmp_path):
    from nectar.plugins import make_backend

    path = cost_table().save(tmp_path / "cost_table.json")
    backend = make_backend("sim", preset=FLAT, cost_table=str(path))   # price_as "auto" by default
    assert backend.info()["priced_as"] is None and backend.info()["priced_by"] == "cost-table"
