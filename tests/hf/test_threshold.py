"""choose_threshold and its objective against a brute-force loop over thresholds and tokens."""

import pytest
import torch

from nectar.hf.adaptive_k import AdaptiveKRouter
from nectar.hf.families import family_of, find_moe_blocks
from nectar.hf.threshold import DEFAULT_GRID, choose_threshold, threshold_objective
from tests.hf.models import tiny
from tests.hf.reference import brute_force_objective
from tests.tolerance import approx, assert_close


def _sample(n=60, k=4, e=12, seed=0):
    gen = torch.Generator().manual_seed(seed)
    raw = torch.rand(n, k, generator=gen) ** 3 + 1e-3
    weights = raw / raw.sum(-1, keepdim=True)
    experts = torch.stack([torch.randperm(e, generator=gen)[:k] for _ in range(n)])
    cost = torch.rand(e, generator=gen) + 0.5
    return weights, experts, cost


@pytest.mark.parametrize("lam", [0.0, 0.3, 1.0, 5.0])
def test_objective_and_choice_equal_brute_force(lam):
    weights, experts, cost = _sample(seed=int(lam * 10))
    grid = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 1.0]
    result = threshold_objective(weights, experts, cost, lam, grid)
    brute = [brute_force_objective(weights, experts, cost, lam, tau) for tau in grid]
    # means over the N tokens of sums over the K slots (kept shares, telescoped log differences): the
    # objective's terms are all ≥ 0, so the value itself is the scale
    n_tokens, k = weights.shape
    assert_close(result.objective, torch.tensor(brute, dtype=torch.float64), n=n_tokens + 3 * k)
    best = min(range(len(grid)), key=lambda i: (round(brute[i], 12), grid[i]))
    assert choose_threshold(weights, experts, cost, lam, grid) == grid[best]


def test_ties_and_weights_on_grid_points_equal_brute_force():
    """Slots whose weight sits exactly on a grid point are kept there (w ≥ τ); tied slots go together."""
    weights = torch.tensor([[0.5, 0.25, 0.25, 0.0], [0.25, 0.25, 0.25, 0.25], [0.1, 0.6, 0.2, 0.1],
                            [1.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    experts = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [4, 5, 6, 7], [7, 0, 1, 2]])
    cost = torch.arange(1.0, 9.0)
    grid = [0.0, 0.1, 0.2, 0.25, 0.3, 0.5, 0.6, 1.0]
    for lam in (0.0, 0.7):
        result = threshold_objective(weights, experts, cost, lam, grid)
        brute = [brute_force_objective(weights, experts, cost, lam, tau) for tau in grid]
        assert_close(result.objective, torch.tensor(brute, dtype=torch.float64), n=4 + 3 * 4)  # as above: N = K = 4
    one_slot = threshold_objective(weights[:, :1] * 0 + 1, experts[:, :1], cost, 0.5, grid)   # K = 1: nothing to drop
    assert (one_slot.mean_k == 1).all() and (one_slot.mean_kl == 0).all()


def test_extremes_of_lambda_and_grid_order():
    weights, experts, cost = _sample(seed=3)
    assert choose_threshold(weights, experts, cost, 1e6) == 0.0           # quality only: keep the top-K
    top1 = choose_threshold(weights, experts, cost, 0.0)                     # energy only: the smallest τ giving top-1
    result = threshold_objective(weights, experts, cost, 0.0)
    assert result.mean_k[result.grid == top1].item() == 1.0
    assert choose_threshold(weights, experts, cost, 0.5, [0.3, 0.0, 0.1]) == choose_threshold(weights, experts, cost, 0.5, [0.0, 0.1, 0.3])
    assert result.mean_kl[0] == 0.0 and (result.mean_k.diff() <= 0).all()    # τ = 0 is the static top-K


def test_bad_inputs_are_refused():
    weights, experts, cost = _sample()
    with pytest.raises(ValueError, match="lam"):
        choose_threshold(weights, experts, cost, -1.0)
    with pytest.raises(ValueError, match="grid value"):
        choose_threshold(weights, experts, cost, 0.1, [0.0, 2.0])
    with pytest.raises(ValueError, match="per-expert"):
        choose_threshold(weights, experts, cost[:3], 0.1)
    with pytest.raises(ValueError, match="equal non-empty"):
        choose_threshold(weights[:, :2], experts, cost, 0.1)
    with pytest.raises(ValueError, match="finite"):
        choose_threshold(weights * float("nan"), experts, cost, 0.1)


def test_router_chooses_from_its_own_gate_logits():
    model = tiny("deepseek_v3", torch.float64)
    routing = family_of(find_moe_blocks(model)[0].block.gate)
    logits = torch.randn(80, routing.num_experts, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    router = AdaptiveKRouter(routing)
    sel = routing.select(logits)
    cost = torch.linspace(1.0, 2.0, routing.num_experts)
    for lam in (0.05, 0.5):
        assert router.choose_threshold(logits, cost, lam) == choose_threshold(sel.weights(), sel.experts, cost, lam)
    assert 1.0 in DEFAULT_GRID and 0.0 in DEFAULT_GRID
    assert router.deviation(logits) == 0.0 and router.deviation(logits[:0]) == 0.0        # τ = 0: static
    router.adapt(threshold=1.0)                                                          # top-1 only
    top1_kl = -torch.log(sel.weights().max(-1).values.double() / sel.weights().double().sum(-1)).mean()
    # a mean over the 80 tokens of −log(w₁ / Σ w), Σ over the K slots
    assert router.deviation(logits) == approx(float(top1_kl), n=80 + 2 * sel.weights().shape[-1])
    router.adapt(alpha=0.0)                                                              # the guard's α scales τ
    assert router.deviation(logits) == 0.0


@pytest.mark.parametrize("family", ["deepseek_v3", "olmoe"])
def test_price_table_gives_the_deviation_and_cost_of_every_price(family):
    """The controller reads deviations off one price table per chunk; at each grid price the table
    must hold what choosing the threshold at that λ and measuring the routing gives (exact: the
    table reads the same threshold objective the choice minimises)."""
    from nectar.control.priced import price_grid

    model = tiny(family, torch.float64)
    routing = family_of(find_moe_blocks(model)[0].block.gate)
    logits = torch.randn(120, routing.num_experts, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    router = AdaptiveKRouter(routing)
    cost = torch.linspace(0.5, 1.0, routing.num_experts, dtype=torch.float64)
    lams = price_grid(0.01, 20.0, per_decade=4)
    table = router.price_table(logits, cost, lams)
    for g, lam in enumerate(lams.tolist()):
        tau = router.choose_threshold(logits, cost, lam)
        router.adapt(threshold=tau)
        # both are means over the 120 tokens, binned over a grid of different length
        assert float(table.deviation[g]) == approx(router.deviation(logits), n=120)
        experts, weights = router.slot_weights(logits)
        expected_cost = float(threshold_objective(weights, experts, cost, lam, [tau]).expected_cost[0])
        assert float(table.mean_cost[g]) == approx(expected_cost, n=120)
