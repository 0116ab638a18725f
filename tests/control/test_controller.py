"""The NECTAR controller: bias steps reach the closed form, thermal/power pressure, skips, pauses."""

import math

import pytest
import torch

from nectar.control.bias_optimizer import closed_form_bias
from nectar.control.controller import ControllerConfig, NectarController
from nectar.control.cost_model import OnlineCostModel
from nectar.control.energy_router import EnergyAwareRouter
from nectar.control.observation import ChunkObservation, LayerObservation
from nectar.control.quality_guard import GuardCheck, QualityGuard
from nectar.telemetry.window import TelemetryWindow
from nectar.telemetry.workload import ChunkWorkload, ExpertCost, LayerWorkload

FLOPS = [4e6, 4e6, 1e6, 0.0]  # two full experts, a narrow one, a zero expert


def _workload(counts):
    layer = LayerWorkload(list(counts), [ExpertCost(f, 1.0) for f in FLOPS])
    return ChunkWorkload(tokens=sum(counts), batch=1, seq_len=sum(counts), d_model=8, n_layers=1,
                         n_heads=1, vocab_size=10, layers=[layer])


def _observe(counts, logits, inputs=None):
    inputs = torch.empty(0, 0) if inputs is None else inputs
    return ChunkObservation(0.0, 1, 1.0, _workload(counts), [LayerObservation(logits, inputs)])


def _window(temp=50.0, power=400.0, energy=40.0, mem=None):
    return TelemetryWindow(0.0, 0.1, energy, power, power, temp, mem_used_B=mem, mem_total_B=100 if mem else None)


def _controller(**cfg):
    router = EnergyAwareRouter(4, cheap_experts=[2, 3])
    ctl = NectarController([router], OnlineCostModel([FLOPS]), QualityGuard(2.0), ControllerConfig(**cfg))
    return ctl, router


def test_bias_reaches_closed_form_for_the_cost_models_costs():
    ctl, router = _controller(lam=0.5, quality_target=None)
    logits = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        ctl.after_chunk(_observe([100, 100, 50, 6], logits), _window(), lambda: GuardCheck(2.0))
    c = ctl.cost_model.expert_costs()[0].double()
    expected = closed_form_bias(c / c.max(), 0.5)
    assert torch.allclose(router.bias.double(), expected, atol=1e-5)
    assert router.bias[3] > router.bias[0]  # the zero expert is favoured over a full one


def test_temperature_near_cap_strengthens_adaptation_and_relaxes_after():
    ctl, _ = _controller(lam=0.5, temp_cap_C=70.0, temp_margin_C=2.0, quality_target=None)
    logits = torch.zeros(8, 4)
    ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(temp=50.0), lambda: GuardCheck(2.0))
    assert ctl.lam_eff == pytest.approx(0.5)
    for _ in range(5):
        ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(temp=71.0), lambda: GuardCheck(2.0))
    hot = ctl.lam_eff
    assert hot < 0.5 / 4  # λ_eff shrinks at least four-fold while the GPU sits above the cap
    for _ in range(40):
        ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(temp=55.0), lambda: GuardCheck(2.0))
    assert ctl.lam_eff == pytest.approx(0.5)


def test_power_budget_pressure_and_pause_when_saturated():
    ctl, _ = _controller(lam=0.5, power_budget_W=300.0, max_pressure=4.0)
    logits = torch.zeros(8, 4)
    records = [ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(power=360.0), lambda: GuardCheck(2.0)) for _ in range(6)]
    assert records[-1].nu_power == pytest.approx(4.0)
    assert records[-1].pause_s > 0
    assert records[0].pause_s == 0


def test_guard_fallback_and_skips():
    ctl, router = _controller()
    logits = torch.zeros(8, 4)
    rec = ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(), lambda: GuardCheck(2.0 + math.log(1.2)))
    assert rec.fallback and router.fallback and router.alpha == 0.5
    bias = router.bias.clone()
    rec = ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(energy=float("nan")), lambda: GuardCheck(2.0))
    assert rec.skipped == "invalid_telemetry" and torch.equal(router.bias, bias)
    assert not router.fallback  # quality recovered: the adapted routing returns
    rec = ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(mem=99), lambda: GuardCheck(2.0))
    assert rec.skipped == "memory_pressure"


def test_bad_controller_options():
    for bad in (dict(lam=0.0), dict(lam=float("nan")), dict(temp_cap_C=5.0), dict(power_budget_W=-1.0)):
        with pytest.raises(ValueError):
            ControllerConfig(**bad)


def test_quality_dual_spends_the_guard_budget():
    """With a guard whose excess grows as λ shrinks, λ_q settles where the excess meets the target."""
    ctl, _ = _controller(lam=5.0, quality_target=0.7)
    logits = torch.zeros(8, 4)
    excess = lambda: 0.004 / ctl.lam_eff  # noqa: E731  more aggressive routing, more quality loss
    for _ in range(80):
        ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(), lambda: GuardCheck(2.0 + math.log1p(excess())))
    assert ctl.lam_quality == pytest.approx(0.004 / 0.007, rel=0.05)
    assert excess() <= 0.01


def test_fast_weight_router_network_takes_muon_steps_on_the_chunk_objective():
    """The optional LaCT fast-weight network beside the bias: it is stepped once per chunk on the
    chunk objective (scores → Σ c·p + λ KL), and the step does not increase that objective."""
    from nectar.control.fast_router import FastWeightRouterNet

    torch.manual_seed(0)
    net = FastWeightRouterNet(d_model=8, num_experts=4, hidden=4)
    router = EnergyAwareRouter(4, cheap_experts=[2, 3], fast_net=net)
    ctl = NectarController([router], OnlineCostModel([FLOPS]), QualityGuard(2.0),
                           ControllerConfig(lam=0.5, quality_target=None, optimizer_mode="gradient", lr=0.05))
    x = torch.randn(64, 8)
    logits = torch.randn(64, 4)
    router(logits, x)
    before = [w.clone() for w in net.fast_weights()]
    objective = lambda: (router.soft_distribution(logits, x) @ torch.tensor([1.0, 1.0, 0.25, 0.0])).mean().item()  # noqa: E731
    start = objective()
    for _ in range(5):
        ctl.after_chunk(_observe([16, 16, 16, 16], logits, x), _window(), lambda: GuardCheck(2.0))
    assert any(not torch.equal(a, b) for a, b in zip(before, net.fast_weights()))
    assert objective() <= start + 1e-6
    assert net.steps_done == 5
