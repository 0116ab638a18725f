"""The dropped-mass quality proxy (nectar/serving/dropped_mass.py): the routers meter exactly the
renormalised weight their batch rule drops (against a per-token loop of the rule), the run account
recovers a known linear slope in closed form, and a serving run priced by the proxy moves its price
every window, checked or not."""

import math

import pytest
import torch

from nectar.serving.batch_routers import BatchPriceRouter
from nectar.serving.dropped_mass import DroppedMassAccount, router_totals
from nectar.serving.policies import serving_router
from tests.tolerance import approx


def loop_dropped_mass(experts_NK, weights_NK, price, cost_E, k_max) -> float:
    """The batch rule token by token (module docstring of nectar.serving.batch_routers), and the
    renormalised weight of the slots it drops."""
    n_tokens = experts_NK.shape[0]
    read = {int(experts_NK[t, 0]) for t in range(n_tokens)}                    # every token's top-1
    sharers = {}
    for t in range(n_tokens):
        for k in range(k_max):
            sharers[int(experts_NK[t, k])] = sharers.get(int(experts_NK[t, k]), 0) + 1
    dropped = 0.0
    for t in range(n_tokens):
        norm = float(weights_NK[t].sum())
        for k in range(experts_NK.shape[1]):
            e, w = int(experts_NK[t, k]), float(weights_NK[t, k])
            kept = k == 0 or (k < k_max and (e in read or w >= price * float(cost_E[e]) / sharers[e]))
            dropped += 0.0 if kept else w / norm
    return dropped


@pytest.mark.parametrize("price", [0.0, 0.05, 0.3, math.inf])
def test_the_native_router_meters_the_weight_its_rule_drops(price):
    gen = torch.Generator().manual_seed(1)
    cost_E = torch.tensor([1.0, 1.0, 0.5, 1.0, 0.0, 1.0, 1.0, 0.25])
    router = BatchPriceRouter(8, 4, cost_E, price)
    want, tokens = 0.0, 0
    for n_tokens in (5, 3):                                          # two forwards: running totals
        logits = torch.randn(n_tokens, 8, generator=gen, dtype=torch.float64) * 2
        router(logits)
        top = torch.topk(torch.softmax(logits, -1), 4, dim=-1)
        want += loop_dropped_mass(top.indices, top.values, price, cost_E, 4)
        tokens += n_tokens
    assert float(router.routed_tokens_t) == tokens
    assert float(router.dropped_mass_t) == approx(want, n=64, dtype=torch.float64)
    if price == 0.0:
        assert float(router.dropped_mass_t) == 0.0


def test_a_transformers_family_router_meters_over_the_familys_slots():
    from nectar.hf.attach import attach
    from tests.hf.models import tiny

    model = attach(tiny("olmoe", impl="grouped_mm"))
    _, layer = model.moe_layers()[0]
    router = serving_router("batch-price:0.05", layer, top_k=layer.family.top_k)
    logits = torch.randn(6, layer.num_experts, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    router(logits)
    sel = layer.family.select(logits)
    weights = sel.weights()
    want = loop_dropped_mass(sel.experts, weights, 0.05, router.cost_E, layer.family.top_k)
    assert float(router.routed_tokens_t) == 6
    assert float(router.dropped_mass_t) == approx(want, n=64, dtype=torch.float64)
    assert float(router_totals([router, router])[0]) == approx(2 * want, n=64, dtype=torch.float64)


def test_the_account_recovers_a_linear_slope_and_prices_by_it():
    account = DroppedMassAccount(layers=4)
    assert account.observe(0.0, 0.0, 3.0, 4 * 10) is None                    # no checked drops yet: no slope
    beta = 0.8
    est = account.observe(beta * 2.0, 2.0, 5.0, 4 * 20)                    # gaps exactly β · mass
    assert est.slope == approx(beta, n=4)
    assert est.spent_nats == approx(beta * (3.0 + 5.0), n=8) and est.tokens == 30
    assert est.cost_nats == approx(beta * 5.0 / 20, n=8)
    est = account.observe(beta * 1.0 + 0.4, 1.0, 0.0, 4 * 10)              # a noisier check: pooled
    pooled = (beta * 3.0 + 0.4) / 3.0
    residuals = [beta * 2.0 - pooled * 2.0, beta * 1.0 + 0.4 - pooled * 1.0]
    se = math.sqrt(sum(r * r for r in residuals)) / 3.0                     # the ratio estimator's
    assert est.slope == approx(pooled + se, n=16) and est.cost_nats == 0.0   # z = 1: the upper bound
    assert DroppedMassAccount(layers=4, z=0.0, gap_nats=1.0, checked_mass=2.0).slope_estimate() == 0.5


def test_a_proxy_run_moves_the_price_every_window(tmp_path):
    pytest.importorskip("simpy", reason="the serving loop runs on the simulator's clock (the GPU hosts have no simpy)")
    from nectar.plugins import make_backend
    from nectar.serving.controller import ServingControllerConfig
    from nectar.serving.frontier import ServingConfig, serve_policy
    from tests.serving.models import tiny_gpt2_moe
    from tests.serving.test_serve import LIMITS, TRACE

    model = tiny_gpt2_moe()
    stream = torch.randint(0, 211, (4000,), generator=torch.Generator().manual_seed(0))
    config = ServingControllerConfig(check_every=4, window_steps=2, quality_signal="proxy")
    cfg = ServingConfig(TRACE, LIMITS, policies=("static-top2", "nectar"), controller=config)
    run = serve_policy(model, make_backend("sim", seed=0, price_as="none"), "nectar", cfg, stream)
    decode_steps = sum(s.phase == "decode" for s in run.steps)
    windows = run.controller["windows"]
    with_slope = [w for w in windows if "proxy_slope" in w]
    assert with_slope and all(w["proxy_slope"] >= 0 for w in with_slope)
    assert len(windows) > decode_steps // 4                # windows without a check move the price too
    assert all(0 < w["price"] <= config.max_price for w in windows)


def _schedule(controller, windows: list[tuple[float, float]], window_steps: int) -> list[int]:
    """Drive the check schedule: each window of `window_steps` decode steps feeds the account one
    (gap, mass) pair (the checks' readings) and re-spaces the checks; returns the checked steps."""
    checked = []
    for gap, mass in windows:
        for _ in range(window_steps):
            if controller.check_due():
                checked.append(controller._steps)
            controller._steps += 1
        controller._account.observe(gap, mass, 1.0, 10.0)
        controller._space_checks()
    return checked


def test_checks_thin_out_while_they_agree_on_the_slope_and_come_back_when_they_do_not():
    from nectar.serving.controller import ServingController, ServingControllerConfig

    class Router:
        price = 0.0

    config = ServingControllerConfig(check_every=4, window_steps=4, check_backoff=8)
    controller = ServingController([Router()], [Router()], config)
    agreeing = [(0.8 * m, m) for m in (1.0, 2.0, 1.5, 1.0, 2.0, 1.0, 1.5, 2.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0)]
    checked = _schedule(controller, agreeing, 4)
    gaps = [b - a for a, b in zip(checked, checked[1:])]
    assert gaps[:3] == [4, 4, 4]                          # three checked windows before the slope counts
    assert gaps == sorted(gaps) and max(gaps) == 32 and set(gaps) <= {4, 8, 16, 32}   # doubling, capped at 4 × 8
    assert len(checked) < len(agreeing)                   # fewer checks than windows
    _schedule(controller, [(40.0, 1.0)], 4)               # a check far off the slope
    assert controller._interval == 4 and controller._next_check <= controller._steps + 4
    fixed = ServingController([Router()], [Router()], ServingControllerConfig(check_every=4, window_steps=4, check_backoff=1))
    assert _schedule(fixed, agreeing, 4) == list(range(0, 4 * len(agreeing), 4))   # backoff 1: every 4th step
