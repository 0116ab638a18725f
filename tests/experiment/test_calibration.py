"""The cost calibration against the simulator's own pricing, and what a run starts from with it."""

import json

import pytest
import torch

from nectar.control.cost_model import OnlineCostModel
from nectar.control.cost_table import CostTable
from nectar.experiment.calibration import (DROP, SPREAD, CalibrationConfig, ForcedRouter, calibrate,
                                           measured_cost_model, start_costs, supports_calibration)
from nectar.experiment.forward import forward_chunk, install
from nectar.experiment.policies import policy_router, prior_costs
from nectar.experiment.runner import RunConfig, build_policy
from nectar.models.gpt2_moe import MoEGPT2LMHeadModel, preset_config
from sim.backend import create
from tests.tolerance import assert_close

SPECS = [{"kind": "gelu", "hidden": 64, "count": 3}, {"kind": "gelu", "hidden": 16}, {"kind": "zero"}, {"kind": "copy"}]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    config = preset_config("tiny-moe", vocab_size=300, n_layer=2, n_embd=32, n_head=2, n_inner=64, n_positions=64,
                           expert_specs=SPECS, n_experts=0)
    return MoEGPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def batch():
    return torch.randint(0, 300, (64, 64), generator=torch.Generator().manual_seed(1))   # a cpu-demo-sized chunk


@pytest.fixture(scope="module")
def table(model, batch):
    backend = create(seed=0)
    try:
        return calibrate(model, backend, batch, CalibrationConfig(micro_rows=32),
                         static_router=lambda layer: policy_router("static-top2", layer))
    finally:
        backend.close()


def test_forced_router_decisions():
    logits = torch.randn(7, 4)
    one = ForcedRouter(4, 2)(logits)
    assert torch.equal(one.tokens_per_expert(), torch.tensor([0, 0, 7, 0]))
    assert ForcedRouter(4, DROP)(logits).tokens_per_expert().sum() == 0
    spread = ForcedRouter(4, SPREAD)(logits)
    assert torch.equal(spread.tokens_per_expert(), torch.tensor([2, 2, 2, 1]))      # token i -> i mod 4
    assert torch.equal(spread.gates[:, 0], torch.ones(7)) and spread.dropped[:, 1].all()
    one = ForcedRouter(4, DROP, slots=1)(logits)
    assert one.experts.shape == (7, 1) and one.dropped.all()
    with pytest.raises(ValueError, match="out of range"):
        ForcedRouter(4, 4)
    with pytest.raises(ValueError, match="1 or 2 slots"):
        ForcedRouter(4, 0, slots=3)


def _priced(model, batch, expert: int) -> tuple[float, int]:
    """The simulator's own pricing of the forward forced to `expert` at full clock: (seconds, the
    tokens it priced) — the reference."""
    backend = create(seed=0)
    install(model, [ForcedRouter(layer.num_experts, expert) for _, layer in model.moe_layers()])
    workload = backend.pricing.apply(forward_chunk(model, batch, 32, "reference", max_sample_tokens=0).workload)
    return float(backend.pricer.price(workload).durations_s(1.0).sum()), workload.tokens


def test_table_matches_the_simulators_pricing(model, batch, table):
    """Per-slot marginal time of each expert = (priced forced forward − priced drop-all) / slots.
    The windows run on a cold simulated GPU (full clock), so time is the pricing's to its rounding;
    the window's duration is float64 arithmetic over a few hundred kernels."""
    layers = len(model.moe_layers())
    base_s, tokens = _priced(model, batch, DROP)
    assert_close(table.base_s_per_token * tokens, base_s, n=1000, scale=base_s, dtype=torch.float64)
    for e in range(table.num_experts):
        reference = (_priced(model, batch, e)[0] - base_s) / (layers * tokens)
        assert_close(table.expert_s_per_token[e], reference, n=1000, scale=base_s / (layers * tokens),
                     dtype=torch.float64)
    assert table.expert_kinds == ["ffn", "ffn", "ffn", "ffn", "zero", "copy"]
    assert table.expert_s_per_token[0] > table.expert_s_per_token[3] > table.expert_s_per_token[4] > 0


def test_table_predicts_the_held_out_top2_routing(table):
    """The check routing (static top-2, not a design point) is predicted from the per-expert and
    active-expert terms. 5 %: the simulator's sensor noise on ~20 ms windows and its temperature-
    dependent leakage are not in the linear model."""
    check = table.checks["static-top2"]
    assert check["predicted_s"] == pytest.approx(check["measured_s"], rel=0.05)   # model error, not rounding
    assert check["predicted_J"] == pytest.approx(check["measured_J"], rel=0.05)


def test_table_round_trips_and_rejects_bad_files(table, tmp_path):
    path = table.save(tmp_path / "t" / "cost_table.json")
    again = CostTable.load(path)
    assert again.to_dict() == table.to_dict()
    assert again.predict([[1, 0, 0, 0, 0, 0]] * 2, 10) == table.predict([[1, 0, 0, 0, 0, 0]] * 2, 10)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="cannot read cost table"):
        CostTable.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(ValueError, match="not a cost table"):
        CostTable.load(tmp_path / "other.json")


def test_predict_is_the_tables_linear_model(table):
    slots = [[10, 0, 0, 0, 5, 0], [0, 3, 0, 0, 0, 0]]
    seconds, joules = table.predict(slots, 40, forwards=2)
    extra = 2 * (1 + 0)           # layer 0 uses two experts, layer 1 one
    one_slot_s, _ = table.predict(slots, 40, forwards=2, slots_per_token=1)
    assert_close(seconds - one_slot_s, 40 * table.slot_s_per_token, n=8, scale=abs(seconds), dtype=torch.float64)
    expected_s = (40 * table.base_s_per_token + 10 * table.expert_s_per_token[0] + 5 * table.expert_s_per_token[4]
                  + 3 * table.expert_s_per_token[1] + extra * table.active_expert_s)
    expected_J = (40 * table.base_J_per_token + 10 * table.expert_J_per_token[0] + 5 * table.expert_J_per_token[4]
                  + 3 * table.expert_J_per_token[1] + extra * table.active_expert_J)
    assert_close(seconds, expected_s, n=8, scale=abs(expected_s) + 40 * table.base_s_per_token, dtype=torch.float64)
    assert_close(joules, expected_J, n=8, scale=abs(expected_J) + 40 * table.base_J_per_token, dtype=torch.float64)


def test_a_run_starts_priced_policies_from_the_table(model, table):
    cfg = RunConfig(policies=["static-top2", "fixed-price:1", "nectar", "nectar:prior"], tokens=4096,
                    chunk_tokens=1024, seq_len=64)
    layer = model.moe_layers()[0][1]
    measured = policy_router("fixed-price:1", layer, costs=table.relative_costs())
    flops = policy_router("fixed-price:1", layer)
    fixed = build_policy("fixed-price:1", model, None, cfg, table)
    assert fixed.routers[0].state_vector() == measured.state_vector()
    assert measured.state_vector() != flops.state_vector()    # the table does change the price
    nectar = build_policy("nectar", model, None, cfg, table)
    expected = [j / 1e-3 for j in table.expert_J_per_token]
    got = nectar.controller.cost_model.theta[1:]
    block = model.moe_layers()[0][0] * len(table.expert_kinds)
    assert_close(got[block:block + len(expected)], torch.tensor(expected, dtype=torch.float64).clamp_min(0), n=1,
                 dtype=torch.float64)
    assert build_policy("nectar:prior", model, None, cfg, table).controller.cost_model is None   # FLOP prior, built later
    assert all(torch.equal(a, b) for a, b in zip(start_costs(model, None), [prior_costs(l) for _, l in model.moe_layers()]))


def test_measured_cost_model_priors(model, table):
    cm = measured_cost_model(model, table)
    assert cm.idle_power_W == pytest.approx(table.base_power_W(), rel=1e-12)
    with pytest.raises(ValueError, match="one row per layer"):
        OnlineCostModel([[1.0, 2.0]], prior_J_per_token=[[1.0]])


def test_supports_calibration(model):
    assert supports_calibration(model)

    class Block:
        def policy_router(self, name):
            return None

    class HF:
        def moe_layers(self):
            return [(0, Block())]

    assert not supports_calibration(HF())


def test_unusable_telemetry_is_a_clear_error_and_a_run_falls_back_to_the_flop_prior(model, batch, capsys):
    from nectar.experiment.calibration import CalibrationError
    from nectar.experiment.runner import run_calibration

    class NanTelemetry:                        # every window's energy reading is NaN
        def __init__(self):
            self.sim = create(seed=0)

        def run_chunk(self, compute):
            window = self.sim.run_chunk(compute)
            window.energy_J, window.energy_power_J = float("nan"), None
            window.flags.append("nan")
            return window

    backend = NanTelemetry()
    before = [policy_router("static-top1", layer) for _, layer in model.moe_layers()]
    install(model, before)
    with pytest.raises(CalibrationError, match="telemetry is unusable"):
        calibrate(model, backend, batch, CalibrationConfig(micro_rows=32))
    cfg = RunConfig(policies=["static-top2"], tokens=4096, chunk_tokens=4096, seq_len=64, calibration=CalibrationConfig())
    assert run_calibration(model, backend, batch, cfg, progress=False) is None
    assert "cost calibration failed" in capsys.readouterr().err
    assert all(layer.router is r for (_, layer), r in zip(model.moe_layers(), before))    # routers restored


def test_the_calibration_keeps_the_dispatch_it_measured_fastest(model, batch, monkeypatch):
    """With the grouped path enabled on the CPU (as the dispatch tests do), the calibration times the
    static forward in both paths on a wall-clock backend and leaves the layers on the faster one;
    on a device where only the loop runs it leaves them alone."""
    import time

    import nectar.moe.dispatch as dispatch_module

    class WallClock:      # windows timed by the host clock (what the dispatch choice compares); their
        def __init__(self):   # energies stay the simulator's: the per-expert points must not hang on the host's load
            self.sim = create(seed=0)

        def run_chunk(self, compute):
            start = time.perf_counter()
            window = self.sim.run_chunk(compute)
            window.t_start_s, window.t_end_s = 0.0, time.perf_counter() - start
            return window

    static = lambda layer: policy_router("static-top2", layer)      # noqa: E731
    layers = [layer for _, layer in model.moe_layers()]
    assert calibrate(model, create(seed=0), batch, CalibrationConfig(micro_rows=32), static_router=static).dispatch_s == {}
    monkeypatch.setattr(dispatch_module, "GROUPED_MM_DEVICE_TYPES", {"cpu": {torch.float32}})
    if dispatch_module.dispatch_path(batch.new_zeros(1, 32, dtype=torch.float32), layers[0].experts, True) != "grouped":
        pytest.skip("torch._grouped_mm does not run on this CPU build")
    table = calibrate(model, WallClock(), batch, CalibrationConfig(micro_rows=32), static_router=static)
    fastest = min(table.dispatch_s, key=table.dispatch_s.get)
    assert set(table.dispatch_s) == {"loop", "grouped"}
    assert all(layer.grouped == (fastest == "grouped") for layer in layers) and table.dispatch == fastest
    for layer in layers:
        layer.grouped = False


def test_experts_of_one_shape_share_the_mean_of_their_marginals(model, batch):
    """Windows whose energy carries ±20 % noise (seeded): the three identical GELU experts get one
    cost, the mean of their own raw marginals (kept in expert_raw_*); experts of other shapes keep
    their own; with pooling off the raw marginals are the table's."""
    class Noisy:
        def __init__(self):
            self.sim, self.rng = create(seed=0), torch.Generator().manual_seed(3)

        def run_chunk(self, compute):
            window = self.sim.run_chunk(compute)
            factor = 1.0 + 0.4 * (float(torch.rand(1, generator=self.rng)) - 0.5)
            window.energy_J *= factor
            window.energy_power_J = None if window.energy_power_J is None else window.energy_power_J * factor
            return window

    static = lambda layer: policy_router("static-top2", layer)      # noqa: E731
    pooled = calibrate(model, Noisy(), batch, CalibrationConfig(micro_rows=32), static_router=static)
    raw = calibrate(model, Noisy(), batch, CalibrationConfig(micro_rows=32, pool_shapes=False), static_router=static)
    assert raw.expert_raw_J_per_token is None and pooled.expert_raw_J_per_token == raw.expert_J_per_token
    same = raw.expert_J_per_token[:3]
    assert max(same) - min(same) > 0.05 * abs(sum(same) / 3)              # the noise is there to pool
    for values, raws in ((pooled.expert_J_per_token, raw.expert_J_per_token),
                         (pooled.expert_s_per_token, raw.expert_s_per_token)):
        assert values[:3] == pytest.approx([sum(raws[:3]) / 3] * 3, rel=1e-12)
        assert values[3:] == raws[3:]


def test_a_settle_runs_the_points_routing_before_its_window(model, batch, monkeypatch):
    """settle_s adds un-timed forwards of each point's own routing before its window: a fraction
    settle_s / window_s of the window's rows, whole micro-batches."""
    import nectar.experiment.calibration as calibration

    calls = []
    real = calibration.forward_chunk
    monkeypatch.setattr(calibration, "forward_chunk",
                        lambda m, rows, micro, name, **kw: calls.append((name, rows.shape[0])) or real(m, rows, micro, name, **kw))
    config = CalibrationConfig(micro_rows=8, window_s=1.0, settle_s=0.5, choose_dispatch=False)
    calibrate(model, create(seed=0), batch, config)
    window_rows = max(r for name, r in calls if name == "drop-all")
    settles = [r for name, r in calls if name == "expert:1"]
    assert settles == [max(8, -(-window_rows // 2 // 8) * 8), window_rows]   # settle, then the measured window
    with pytest.raises(ValueError, match="settle_s"):
        CalibrationConfig(settle_s=-1)


def test_a_lact_expert_gets_a_measured_row_like_any_other():
    """A pool with a LaCT fast-weight expert (Algorithm 1) calibrates through the same design points:
    its row has kind "lact" and the marginal the simulator's own pricing gives its forced forward,
    so the priced policies start from what its update costs, not from a guess."""
    torch.manual_seed(0)
    specs = [{"kind": "gelu", "hidden": 64, "count": 2}, {"kind": "lact", "hidden": 64}, {"kind": "zero"}]
    config = preset_config("tiny-moe", vocab_size=300, n_layer=2, n_embd=32, n_head=2, n_inner=64, n_positions=64,
                           expert_specs=specs, n_experts=0)
    model = MoEGPT2LMHeadModel(config).eval()
    batch = torch.randint(0, 300, (64, 64), generator=torch.Generator().manual_seed(1))
    assert supports_calibration(model)
    table = calibrate(model, create(seed=0), batch, CalibrationConfig(micro_rows=32),
                      static_router=lambda layer: policy_router("static-top2", layer))
    assert table.expert_kinds == ["ffn", "ffn", "lact", "zero"]
    base_s, tokens = _priced(model, batch, DROP)
    reference = (_priced(model, batch, 2)[0] - base_s) / (2 * tokens)
    assert_close(table.expert_s_per_token[2], reference, n=1000, scale=base_s / (2 * tokens), dtype=torch.float64)
    assert table.relative_costs()[2] > 1.0 == max(table.relative_costs()[:2])   # costlier than an FFN, which sets the scale
