"""The NECTAR controller: its bias is the chunk problem's closed form at λ = μ·κ/(1 + Σν); the price
μ spends the quality budget in a synthetic environment with a known answer; limits relieve the
price and pause only as a last resort; the fast-weight step does not raise the chunk objective."""

import math

import pytest
import torch

from nectar.control.bias_optimizer import closed_form_bias
from nectar.control.controller import ControllerConfig, NectarController
from nectar.control.cost_model import OnlineCostModel
from nectar.control.energy_router import EnergyAwareRouter
from nectar.control.limits import LimitConfig
from nectar.control.observation import ChunkObservation, LayerObservation
from nectar.control.quality_guard import GuardConfig, QualityCheck
from nectar.control.routing_proxy import deviation_kl
from nectar.control.schedule import Schedule
from nectar.telemetry.window import TelemetryWindow
from nectar.telemetry.workload import ChunkWorkload, ExpertCost, LayerWorkload
from tests.tolerance import approx, assert_close, tol

FLOPS = [4e6, 4e6, 1e6, 0.0]  # two full experts, a narrow one, a zero expert


def _workload(counts):
    layer = LayerWorkload(list(counts), [ExpertCost(f, 1.0) for f in FLOPS])
    return ChunkWorkload(tokens=sum(counts), batch=1, seq_len=sum(counts), d_model=8, n_layers=1,
                         n_heads=1, vocab_size=10, layers=[layer])


def _observe(counts, logits, inputs=None, rows=16):
    inputs = torch.empty(0, 0) if inputs is None else inputs
    return ChunkObservation(0.0, 16 * rows, 1.0, _workload(counts), [LayerObservation(logits, inputs)],
                            nll_rows=torch.full((rows,), 32.0))


def _window(temp=50.0, power=400.0, energy=40.0, mem=None, t0=0.0, duration=0.1):
    return TelemetryWindow(t0, t0 + duration, energy, power, power, temp, mem_used_B=mem,
                           mem_total_B=100 if mem else None)


def _controller(guard=None, limits=None, **cfg):
    router = EnergyAwareRouter(4, cheap_experts=[2, 3])
    config = ControllerConfig(guard=guard or GuardConfig(), limits=limits or LimitConfig(), shadow_share=1 / 16, **cfg)
    return NectarController([router], config, cost_model=OnlineCostModel([FLOPS])), router


def _check(delta):
    return lambda rows: QualityCheck(2.0 + delta, 2.0, 16 * rows.numel())


def test_bias_reaches_the_closed_form_at_the_controllers_lambda():
    ctl, router = _controller(guard=GuardConfig(price_init=0.5, sensitivity=False))
    logits = torch.randn(256, 4, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        ctl.after_chunk(_observe([100, 100, 50, 6], logits), _window(), None)
    c = ctl.cost_model.expert_costs()[0].double()
    assert ctl.lam == 0.5  # no check moved the price, κ = 1 and no pressure: μ·κ/(1 + 0) exactly
    # the dual step at μ = 0, ν = 0 is this float64 closed form on the same costs, held rounded to float32
    assert_close(router.bias, closed_form_bias(c / c.max(), 0.5), n=1, dtype=torch.float32)
    assert router.bias[3] > router.bias[0]  # the zero expert is favoured over a full one


def test_price_spends_the_budget_in_an_environment_with_a_known_answer():
    """ΔNLL per token = a · deviation, with the deviation the router's own KL: the price settles
    where ΔNLL meets budget_use × bound."""
    guard = GuardConfig(price_init=5.0, sensitivity=False, budget_use=0.8, price_lr=0.3)
    ctl, router = _controller(guard=guard)
    logits = torch.randn(512, 4, generator=torch.Generator().manual_seed(1))
    slope = 0.2
    for _ in range(150):
        delta = slope * deviation_kl(router, logits)
        ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(), _check(delta))
    final = slope * deviation_kl(router, logits)
    # 5%: how close the closed loop of 150 checked chunks settles (price steps, the price table's
    # interpolation), not rounding
    assert final == pytest.approx(guard.target_delta_nll, rel=0.05)
    assert math.expm1(final) <= guard.max_ppl_increase


def test_sensitivity_scales_lambda_between_domains():
    """Two alternating 'domains' whose NLL costs differ 3× per unit of deviation: the sensitive
    domain's next chunk gets a larger λ (less deviation) than the cheap domain's (λ read inside a
    block, where the next chunk is of the same domain)."""
    # gross=50: no fallbacks, so that the test isolates the sensitivity scaling
    # and a check every chunk (no thinning), so that λ can follow the domain within a block
    ctl, router = _controller(guard=GuardConfig(fast_memory=0.8, slow_memory=0.05, price_lr=0.05, gross=50.0),
                              shadow_backoff=1)
    logits = torch.randn(256, 4, generator=torch.Generator().manual_seed(2))
    lam_after = {"easy": [], "hard": []}
    for i in range(60):
        domain = "hard" if (i // 5) % 2 else "easy"
        slope = 0.6 if domain == "hard" else 0.2
        ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(), _check(slope * deviation_kl(router, logits)))
        if i % 5 == 3 and i > 20:
            lam_after[domain].append(ctl.lam)
    assert sum(lam_after["hard"]) / len(lam_after["hard"]) > 1.5 * sum(lam_after["easy"]) / len(lam_after["easy"])


@pytest.mark.parametrize("slope", [0.05, 0.2, 1.0])
def test_feedforward_price_reaches_the_budget_after_one_check(slope):
    """ΔNLL = slope · deviation: after one informative check the feed-forward λ puts the next
    chunk's deviation at D* = target / slope (the closed form), where dual ascent alone is still
    far from it."""
    results = {}
    for feedforward in (True, False):
        guard = GuardConfig(price_init=10.0, feedforward=feedforward, trust=1e6)
        ctl, router = _controller(guard=guard)
        logits = torch.randn(512, 4, generator=torch.Generator().manual_seed(3))
        ctl._start([torch.tensor(FLOPS)])
        for _ in range(2):
            ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(), _check(slope * deviation_kl(router, logits)))
        results[feedforward] = slope * deviation_kl(router, logits)
    target = GuardConfig().target_delta_nll
    # the feed-forward λ interpolates the price table's deviation curve in log λ between grid prices:
    # 2% is that interpolation's accuracy, not rounding
    assert results[True] == pytest.approx(target, rel=0.02)
    assert abs(results[False] - target) > 0.1 * target


def test_start_costs_route_the_first_chunk_at_the_start_price():
    router = EnergyAwareRouter(4, cheap_experts=[2, 3], drop=True)
    config = ControllerConfig(guard=GuardConfig(price_init=0.7))
    NectarController([router], config, cost_model=OnlineCostModel([FLOPS]), start_costs=[torch.tensor(FLOPS)])
    c = torch.tensor(FLOPS, dtype=torch.float64) / max(FLOPS)
    # the router holds the float64 closed form (−c/λ mean-centred over 4 experts; c/λ) rounded to float32
    assert_close(router.bias, closed_form_bias(c, 0.7), n=1, dtype=torch.float32)
    assert_close(router.drop_scale, c / 0.7, n=1, dtype=torch.float32)


def test_a_fallback_lasts_one_chunk_and_the_next_adapted_chunk_is_checked():
    ctl, router = _controller(guard=GuardConfig(price_init=0.3))
    ctl.config.shadow_share = 1 / 64           # without the fallback rule: a check every 4th chunk
    logits = torch.randn(64, 4, generator=torch.Generator().manual_seed(4))
    checked = []

    def check(rows):
        checked.append(ctl.chunks)
        return QualityCheck(2.0 + (math.log(1.2) if ctl.chunks == 0 else 0.001), 2.0, 16 * rows.numel())

    for _ in range(4):
        ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(), check)
        if ctl.chunks == 1:
            assert router.fallback              # chunk 1 runs static
    assert not router.fallback and checked[:2] == [0, 2]


def test_gross_violation_falls_back_and_raises_the_price():
    ctl, router = _controller(guard=GuardConfig(price_init=0.3))
    logits = torch.zeros(8, 4)
    rec = ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(), _check(math.log(1.2)))
    assert rec.fallback and router.fallback and rec.price > 0.3
    rec = ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(), _check(0.0))
    assert not rec.fallback and not router.fallback
    rec = ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(), _check(math.nan))
    assert rec.fallback


def test_invalid_telemetry_skips_the_cost_update_only():
    ctl, router = _controller()
    logits = torch.zeros(8, 4)
    ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(), None)
    theta = ctl.cost_model.theta.clone()
    rec = ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(energy=float("nan")), None)
    assert rec.skipped == "invalid_telemetry" and torch.equal(ctl.cost_model.theta, theta)


def test_temperature_near_cap_relieves_the_price_and_relaxes_after():
    ctl, _ = _controller(guard=GuardConfig(price_init=0.5, sensitivity=False),
                         limits=LimitConfig(temp_cap_C=70.0, temp_margin_C=2.0))
    logits = torch.zeros(8, 4)
    ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(temp=50.0), None)
    assert ctl.lam == 0.5  # no check, κ = 1, ν clipped at 0: μ·κ/(1 + 0) exactly
    for i in range(5):
        ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(temp=71.0, t0=0.1 * (i + 1)), None)
    assert ctl.lam < 0.5 / 4
    for i in range(40):
        ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(temp=55.0, t0=1 + 0.1 * i), None)
    assert ctl.lam == 0.5  # ν_temp relaxed back to its clip at exactly 0


def test_memory_pressure_makes_routing_cheaper():
    ctl, _ = _controller(guard=GuardConfig(price_init=0.5, sensitivity=False), limits=LimitConfig(mem_target=0.8))
    logits = torch.zeros(8, 4)
    for _ in range(4):
        rec = ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(mem=95), None)
    assert rec.nu_mem > 0 and ctl.lam < 0.5


def test_power_budget_schedule_pauses_to_hold_the_budget():
    """A chunk at 400 W over a 300 W budget: the pause p makes (400·busy + P_idle·p)/(busy + p)
    equal to the budget less the margin, with the idle power learned from an idle window."""
    limits = LimitConfig(power_budget=Schedule.parse("0:600,1:300"), power_margin=0.0)
    ctl, _ = _controller(limits=limits)
    logits = torch.zeros(8, 4)
    early = ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(power=400.0, t0=0.0, duration=0.5), None)
    assert early.pause_s == 0.0 and early.budget_W == 600.0
    ctl.limits.observe_idle(_window(power=100.0, t0=0.5, duration=1.0))
    late = ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(power=400.0, t0=1.5, duration=0.5), None)
    assert late.budget_W == 300.0
    # the pause's formula, then this mean: a few roundings each
    assert (400.0 * 0.5 + 100.0 * late.pause_s) / (0.5 + late.pause_s) == approx(300.0, n=8)


def test_shadow_schedule_covers_the_requested_share_of_sequences():
    seen = []

    def shadow(rows):
        seen.append(rows.numel())
        return QualityCheck(2.0, 2.0, 16 * rows.numel())

    ctl, _ = _controller(shadow_backoff=1)
    ctl.config.shadow_share = 1 / 64
    for _ in range(32):
        ctl.after_chunk(_observe([2, 2, 2, 2], torch.zeros(8, 4), rows=16), _window(), shadow)
    # one row every fourth chunk of 16 rows, plus one: the first chunk runs static (no start costs),
    # so its check measures no sensitivity and the next chunk is checked too
    assert sum(seen) == 32 * 16 // 64 + 1


def test_checks_thin_out_while_they_confirm_the_model_and_return_on_a_surprise():
    """ΔNLL = 0.2 · deviation, which the sensitivity model learns: the checks back off to every
    8th chunk; when the domain turns three times as sensitive they come back at once."""
    ctl, router = _controller(guard=GuardConfig(price_lr=0.0, fast_memory=1.0), shadow_backoff=8)
    logits = torch.randn(256, 4, generator=torch.Generator().manual_seed(3))
    checked = []
    for i in range(60):
        slope = 0.2 if i < 40 else 0.6
        check = _check(slope * deviation_kl(router, logits))
        rec_chunks = ctl.chunks
        ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(), lambda rows, c=check: checked.append(rec_chunks) or c(rows))
    gaps = [b - a for a, b in zip(checked, checked[1:])]
    assert max(gaps[:8]) == 8                        # backed off while the model held
    after = [c for c in checked if c >= 40]
    assert after and after[1] - after[0] == 1        # a surprise: the next chunk is checked again


def _check_gaps(shadow_agree: float, noise_share: float) -> list[int]:
    """Chunks between checks when every check measures 0.2 · deviation plus an alternating error of
    ± noise_share × the target ΔNLL (a noisy check that is right on average)."""
    ctl, router = _controller(guard=GuardConfig(price_lr=0.0, fast_memory=1.0), shadow_backoff=8,
                              shadow_agree=shadow_agree)
    logits = torch.randn(256, 4, generator=torch.Generator().manual_seed(3))
    noise = noise_share * ctl.config.guard.target_delta_nll
    checked = []
    for i in range(40):
        check = _check(0.2 * deviation_kl(router, logits) + (noise if len(checked) % 2 else -noise))
        at = ctl.chunks
        ctl.after_chunk(_observe([2, 2, 2, 2], logits), _window(), lambda rows, c=check, at=at: checked.append(at) or c(rows))
    return [b - a for a, b in zip(checked, checked[1:])]


def test_shadow_agree_sets_how_far_a_noisy_check_may_miss_and_still_thin_the_checks():
    """Checks ± 0.3 × the target off (the fast estimate follows the last check, so each misses the
    prediction by about 0.6 × the target): a tolerance of a third of the target takes them for
    surprises (never more than 2 chunks apart); the whole target lets them back off to every 8th."""
    assert max(_check_gaps(1 / 3, 0.3)) <= 2
    assert max(_check_gaps(1.0, 0.3)) == 8
    with pytest.raises(ValueError, match="shadow_agree"):
        ControllerConfig(shadow_agree=0.0)


def test_bad_controller_options():
    for bad in (dict(cost_learning="oracle"), dict(shadow_share=0.0)):
        with pytest.raises(ValueError):
            ControllerConfig(**bad)
    for bad in (dict(max_ppl_increase=0.0), dict(budget_use=1.5), dict(price_init=-1.0)):
        with pytest.raises(ValueError):
            GuardConfig(**bad)
    for bad in (dict(temp_cap_C=5.0), dict(power_budget=Schedule.constant(-1.0)), dict(mem_target=1.5)):
        with pytest.raises(ValueError):
            LimitConfig(**bad)


def test_fast_weight_router_network_steps_do_not_raise_the_chunk_objective():
    """The optional LaCT fast-weight network beside the bias is stepped once per chunk on the
    chunk objective (Σ c·p + λ KL); a step scaled by the gradient does not increase it."""
    from nectar.control.fast_router import FastWeightRouterNet

    torch.manual_seed(0)
    net = FastWeightRouterNet(d_model=8, num_experts=4, hidden=4)
    router = EnergyAwareRouter(4, cheap_experts=[2, 3], fast_net=net)
    config = ControllerConfig(guard=GuardConfig(price_init=0.5, sensitivity=False), optimizer_mode="gradient",
                              lr=0.05, fast_lr=0.05)
    ctl = NectarController([router], config, cost_model=OnlineCostModel([FLOPS]))
    x = torch.randn(64, 8)
    logits = torch.randn(64, 4)
    before = [w.clone() for w in net.fast_weights()]
    cost = torch.tensor([1.0, 1.0, 0.25, 0.0])
    objective = lambda: (router.soft_distribution(logits, x) @ cost).mean().item()  # noqa: E731
    start = objective()
    for _ in range(5):
        ctl.after_chunk(_observe([16, 16, 16, 16], logits, x), _window(), None)
    assert any(not torch.equal(a, b) for a, b in zip(before, net.fast_weights()))
    # up to the float32 rounding of either evaluation: a mean over 64 tokens of p·c (4 experts, terms ≥ 0) with p
    # the softmax (4) of scores from the fast network (d_model 8, hidden 4)
    assert objective() <= start + tol(torch.float32, n=64 + 4 + 4 + 8 + 4, scale=start)
    assert net.steps_done == 5 and 0.05 <= router.alpha <= 1.0


@pytest.mark.parametrize("overshoot", [5.0, 20.0])
def test_a_gross_violation_raises_the_price_in_proportion_to_its_size(overshoot):
    """μ after a check measuring `overshoot` × the target NLL increase: the usual dual step, then
    × overshoot (at least × 2) with a fallback — one violation brings a far too low price near the
    right scale instead of doubling it check after check."""
    from nectar.control.quality_guard import QualityGuard

    cfg = GuardConfig(price_init=0.3)
    guard = QualityGuard(cfg)
    delta = overshoot * cfg.target_delta_nll
    check = QualityCheck(adapted_nll=3.0 + delta, static_nll=3.0, tokens=256)
    verdict = guard.judge(check, deviation=1.0)
    stepped = 0.3 * math.exp(cfg.price_lr * 2.0)                   # the relative error clips at 2
    # × the overshoot the check measures, (3 + δ) − 3 over the target: δ carries the rounding of 3 + δ,
    # u·3 ≫ u·δ, so the nominal `overshoot` is the reference only to ≈ 3/δ ulps (≈ 75 at 5×)
    measured = check.delta_nll / cfg.target_delta_nll
    assert measured == approx(overshoot, n=2, scale=overshoot * (3.0 + delta) / delta)  # the rounding of 3 + δ, ÷
    assert verdict.fallback and guard.price == approx(stepped * measured, n=6)  # ×, exp, ×, ×, ÷ on either side


def test_checks_that_find_no_cost_grow_the_deviation_by_trust_each():
    """A probe, then checks that measure nothing: each next target is `trust` × the deviation the
    latest check ran at (not × a running average of them), until the measured sensitivity says stop."""
    from nectar.control.quality_guard import QualityGuard

    cfg = GuardConfig(price_init=1.0, trust=3.0)
    guard = QualityGuard(cfg)
    assert guard.target_deviation() is None                                   # nothing checked: no basis
    guard.judge(QualityCheck(adapted_nll=3.0, static_nll=3.0, tokens=256), deviation=0.0)
    assert guard.target_deviation() == cfg.target_delta_nll                   # the probe: ÷ a unit sensitivity, exact
    deviation = 0.01
    for _ in range(3):
        guard.judge(QualityCheck(adapted_nll=3.0, static_nll=3.0, tokens=256), deviation=deviation)
        assert guard.target_deviation() == 3.0 * deviation                    # trust × deviation: the same one ×
        deviation *= 3.0
    slope = 0.05                                                              # now a cost: target / s, below the cap
    guard.judge(QualityCheck(adapted_nll=3.0 + slope * deviation, static_nll=3.0, tokens=256), deviation=deviation)
    m, ema_delta, ema_dev = cfg.fast_memory, 0.0, 0.01                        # the fast estimate, by hand
    # the last ΔNLL as the check measures it, adapted − static: slope·deviation carries the rounding of
    # 3.0 + slope·deviation (≈ 3 / 0.0135 ≈ 220 ulps of it), which is the input, not the guard's arithmetic
    for d, nll in [(0.03, 0.0), (0.09, 0.0), (deviation, (3.0 + slope * deviation) - 3.0)]:
        ema_delta, ema_dev = m * nll + (1 - m) * ema_delta, m * d + (1 - m) * ema_dev
    expected = cfg.target_delta_nll / (ema_delta / ema_dev)
    # 3 EMA steps of 4 roundings each (0.03, 0.09 written vs 0.01·3, 0.01·3·3 computed), then ÷, ÷
    assert expected < 3.0 * deviation and guard.target_deviation() == approx(expected, n=14)
