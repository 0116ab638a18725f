"""Policy names → routers: `fixed-price:L` is NECTAR's router where the chunk problem puts it at
price L with the FLOP prior (checked against the closed form and a per-token loop of the drop rule),
and names are parsed strictly."""

import pytest
import torch

from nectar.control.bias_optimizer import closed_form_bias
from nectar.control.energy_router import EnergyAwareRouter
from nectar.experiment.policies import parse_policy, policy_router, prior_costs
from nectar.models.gpt2_moe import MoEGPT2LMHeadModel, preset_config
from tests.conftest import SPECS
from tests.tolerance import approx, assert_close


@pytest.fixture(scope="module")
def layer():
    config = preset_config("tiny-moe", vocab_size=64, n_layer=1, n_embd=32, n_head=2, n_inner=64, n_positions=32,
                           expert_specs=SPECS, n_experts=0)
    model = MoEGPT2LMHeadModel(config)
    return next(layer for _, layer in model.moe_layers())


def test_prior_costs_are_the_flops_normalised(layer):
    flops = [float(e.cost_per_token().flops) for e in layer.experts]
    costs = prior_costs(layer)
    assert costs.tolist() == approx([f / max(flops) for f in flops], dtype=costs.dtype, n=2)  # one ÷ (and a cast)


@pytest.mark.parametrize("price", [0.5, 2.0])
def test_fixed_price_router_is_the_closed_form_frozen(layer, price):
    router = policy_router(f"fixed-price:{price}", layer)
    c = prior_costs(layer)
    assert isinstance(router, EnergyAwareRouter) and router.drop
    # kept in the router's dtype: −c/λ centred over the experts, c/λ
    assert_close(router.bias, closed_form_bias(c, price), n=2 * layer.num_experts + 4)
    assert_close(router.drop_scale, c / price, n=2)
    assert not parse_policy(f"fixed-price:{price}").adaptive
    logits = torch.randn(300, layer.num_experts, generator=torch.Generator().manual_seed(0))
    decision = router(logits)
    probs = torch.softmax(logits, -1)
    for t in range(logits.shape[0]):                       # the drop rule, token by token
        e1, e2 = decision.experts[t].tolist()
        w = probs[t, e2] / (probs[t, e1] + probs[t, e2])
        assert bool(decision.mask[t, 1]) == bool(-torch.log1p(-w) >= c[e2] / price)


@pytest.mark.parametrize("name", ["fixed-price:0", "fixed-price:-1", "fixed-price:x"])
def test_fixed_price_needs_a_positive_number(name):
    with pytest.raises(ValueError, match="fixed-price"):
        parse_policy(name)


def test_nectar_drops_and_nodrop_does_not(layer):
    assert policy_router("nectar", layer).drop and not policy_router("nectar:nodrop", layer).drop
