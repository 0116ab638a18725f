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


# ------------------------------------------------------------------ clock-locked names
@pytest.mark.parametrize("name, kind, routing, clock_MHz, adaptive", [
    ("clock:1300", "static-top", "static-top2", 1300.0, False),
    ("clock:990.5", "static-top", "static-top2", 990.5, False),
    ("static-top1@clock:1000", "static-top", "static-top1", 1000.0, False),
    ("fixed-price:2@clock:1600", "fixed-price", "fixed-price:2", 1600.0, False),
    ("nectar@clock:1300", "nectar", "nectar", 1300.0, True),
    ("nectar:nodrop@clock:1300", "nectar", "nectar:nodrop", 1300.0, True)])
def test_clock_names_parse_to_their_routing_and_clock(name, kind, routing, clock_MHz, adaptive):
    spec = parse_policy(name)
    assert (spec.name, spec.kind, spec.route_name, spec.clock_MHz, spec.adaptive) == (name, kind, routing, clock_MHz, adaptive)
    assert parse_policy(routing).clock_MHz is None and parse_policy(routing).route_name == routing


def test_a_clock_locked_router_is_its_routing_policys(layer):
    assert not policy_router("nectar:nodrop@clock:1300", layer).drop and policy_router("nectar@clock:1300", layer).drop
    assert policy_router("clock:1300", layer).k == policy_router("static-top2", layer).k == 2


@pytest.mark.parametrize("name, message", [
    ("clock:", "not a number"), ("clock:fast", "not a number"), ("clock:0", "positive"), ("clock:-5", "positive"),
    ("clock:inf", "positive"), ("nectar@clock:", "not a number"), ("clock:1300@clock:1000", "not a number"),
    ("@clock:1300", "one plain policy"), ("nectar@static-top1@clock:1300", "one plain policy"),
    ("bogus@clock:1300", "unknown policy")])
def test_malformed_clock_names_are_refused(name, message):
    with pytest.raises(ValueError, match=message):
        parse_policy(name)


def test_clock_sweep_option_and_the_lock_of_a_backend_without_one():
    from nectar.experiment.clocks import parse_clock_sweep
    from nectar.telemetry.window import lock_clock

    assert parse_clock_sweep("1980, 1600,1300") == [1980.0, 1600.0, 1300.0]
    for bad, message in [("", "at least one"), ("1300,1300", "twice"), ("1300,x", "not a number")]:
        with pytest.raises(ValueError, match=message):
            parse_clock_sweep(bad)

    class NoClock:
        name = "plain"

    with pytest.raises(ValueError, match="cannot lock its SM clock"):
        lock_clock(NoClock(), 1300.0)


def test_a_lact_expert_makes_no_ffn_cheap_and_is_not_cheap_itself():
    """Cheap is measured against the widest FFN expert: a LaCT expert several times an FFN's FLOPs
    neither turns the full FFNs into "cheap" experts (the bug the LaCT-expert frontier showed) nor
    counts as cheap; the narrow FFN, zero and copy stay cheap; the plot labels follow the same scale."""
    from nectar.experiment.outputs import _expert_label
    from nectar.experiment.policies import cheap_experts
    from nectar.telemetry.workload import widest_ffn_flops

    torch.manual_seed(0)
    specs = [{"kind": "gelu", "hidden": 64, "count": 2}, {"kind": "gelu", "hidden": 16}, {"kind": "lact", "hidden": 64},
             {"kind": "zero"}, {"kind": "copy"}]
    config = preset_config("tiny-moe", vocab_size=300, n_layer=2, n_embd=32, n_head=2, n_inner=64, n_positions=64,
                           expert_specs=specs, n_experts=0)
    layer = MoEGPT2LMHeadModel(config).moe_layers()[0][1]
    costs = [expert.cost_per_token() for expert in layer.experts]
    assert costs[3].kind == "lact" and costs[3].flops > 2 * costs[0].flops        # the LaCT expert is the costliest
    assert cheap_experts(layer) == [2, 4, 5]
    top = widest_ffn_flops(costs)
    assert [_expert_label(c.kind, c.flops / top) for c in costs] == ["full", "full", "narrow (25 %)", "lact", "zero", "copy"]
