"""The priced interface: NECTAR's price table against putting the router at each price one by one,
the grid, the feed-forward inversion, and the controller talking to any router through it."""

import math

import pytest
import torch

from nectar.control.energy_router import EnergyAwareRouter
from nectar.control.priced import PricedRouter, PriceTable, price_for_deviation, price_grid
from nectar.control.routing_proxy import deviation_kl
from tests.tolerance import approx, assert_close, tol, tol


def _logits(n=400, e=7, seed=0):
    return torch.randn(n, e, generator=torch.Generator().manual_seed(seed)) * 2


@pytest.mark.parametrize("drop", [False, True])
@pytest.mark.parametrize("candidates", ["static-or-cheap", "all"])
def test_energy_price_table_equals_the_router_put_at_each_price(drop, candidates):
    """Per price: the table's deviation is deviation_kl of the router at that price, and its mean
    cost is the cost of the slots the router's own forward uses (a loop over prices and tokens)."""
    logits = _logits()
    cost = torch.tensor([1.0, 1.0, 0.9, 1.0, 0.4, 0.1, 0.0], dtype=torch.float64)
    router = EnergyAwareRouter(7, cheap_experts=[4, 5, 6], candidates=candidates, drop=drop, temperature=1.3)
    lams = price_grid(0.01, 10.0, per_decade=3)
    table = router.price_table(logits, cost, lams)
    for g, lam in enumerate(lams.tolist()):
        router.start_at_price(cost, lam)
        decision = router(logits)
        used = decision.experts.where(decision.mask, -1)
        slot_costs = [sum(float(cost[e]) for e in row if e >= 0) for row in used.tolist()]
        # float32 softmax and KL terms summed over ≤ 7 candidates, then a mean over 400 tokens
        assert float(table.deviation[g]) == approx(deviation_kl(router, logits), dtype=torch.float32, n=7 * 400)
        assert float(table.mean_cost[g]) == approx(sum(slot_costs) / len(slot_costs), n=400)
    # non-increasing up to the rounding of a mean over 400 tokens of float32 q (a flat tail can wobble)
    assert bool((table.deviation[1:] <= table.deviation[:-1] + tol(torch.float32, n=7 * 400)).all())


def test_a_router_in_fallback_has_no_deviation_and_its_table_is_still_the_prices():
    logits = _logits(seed=1)
    cost = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.3, 0.2, 0.0], dtype=torch.float64)
    router = EnergyAwareRouter(7, cheap_experts=[4, 5, 6], drop=True)
    router.start_at_price(cost, 0.05)
    assert router.deviation(logits) > 0
    router.adapt(fallback=True)
    assert router.deviation(logits) == 0.0
    assert isinstance(router, PricedRouter)


def test_price_grid_is_log_spaced_and_inclusive():
    lams = price_grid(0.005, 50.0, per_decade=32)
    assert float(lams[0]) == approx(0.005) and float(lams[-1]) == approx(50.0, n=4)
    ratios = lams[1:] / lams[:-1]
    # each price is one pow (a few ulps), each ratio a ÷ of two: the spread is rounding only
    assert len(lams) == 129 and float(ratios.max() - ratios.min()) <= tol(lams.dtype, n=8, scale=float(ratios.max()))
    with pytest.raises(ValueError, match="price range"):
        price_grid(1.0, 1.0)


def test_price_for_deviation_inverts_the_mean_curve_in_log_price():
    """On a curve linear in log λ the inversion is exact; outside its range it gives the grid's ends."""
    lams = price_grid(0.01, 100.0, per_decade=2)
    slope = torch.log(lams)
    a = PriceTable(lams, torch.zeros_like(lams), 10.0 - slope)                  # two layers, mean 9 − log λ
    b = PriceTable(lams, torch.zeros_like(lams), 8.0 - slope)
    assert price_for_deviation([a, b], 9.0 - math.log(0.37)) == approx(0.37, n=8)
    assert price_for_deviation([a, b], 1e6) == float(lams[0])
    assert price_for_deviation([a, b], -1e6) == float(lams[-1])
    assert a.deviation_at(0.37) == approx(10.0 - math.log(0.37), n=8)


@pytest.mark.parametrize("drop", [False, True])
def test_deviation_of_the_routing_in_force_is_the_proxys(drop):
    """deviation() reads the shared candidates; it must equal routing_proxy.deviation_kl for any
    bias and drop scale the router holds, and follow a new sample of logits (not a stale cache)."""
    router = EnergyAwareRouter(7, cheap_experts=[4, 5, 6], drop=drop)
    gen = torch.Generator().manual_seed(4)
    for seed in range(3):
        logits = _logits(seed=seed)
        router.adapt(bias=torch.randn(7, generator=gen), drop_scale=torch.rand(7, generator=gen) if drop else None)
        assert router.deviation(logits) == approx(deviation_kl(router, logits), dtype=torch.float32, n=7 * 400)
