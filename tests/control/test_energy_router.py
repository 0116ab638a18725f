"""Energy-aware router safeguards, the cheap static baseline, and the quality guard."""

import pytest
import torch

from nectar.control.energy_router import EnergyAwareRouter
from nectar.moe.static_routers import CheapStaticRouter, TopKRouter
from tests.tolerance import approx, assert_close


def _logits(n=64, e=6, seed=0):
    return torch.randn(n, e, generator=torch.Generator().manual_seed(seed)) * 2


def test_static_top1_always_kept_whatever_the_bias():
    logits = _logits()
    router = EnergyAwareRouter(6, cheap_experts=[4, 5], candidates="all")
    router.bias = torch.tensor([-50.0, -50, -50, -50, 0, 0])
    d = router(logits)
    assert torch.equal(d.experts[:, 0], logits.argmax(-1))
    top1 = logits.argmax(-1)
    cheap_second = d.experts[:, 1]
    # a strongly negative bias on full experts sends the second slot to a cheap expert
    assert all(int(e) in (4, 5) for e, t in zip(cheap_second, top1) if int(t) not in (4, 5))
    assert_close(d.gates.sum(-1), torch.ones(64), n=6)  # two gates renormalised (a +, two ÷) and summed


def test_zero_bias_equals_static_top2_and_fallback_equals_static():
    logits = _logits(seed=1)
    router = EnergyAwareRouter(6, cheap_experts=[5])
    ref = TopKRouter(6, 2)(logits)
    d = router(logits)
    assert torch.equal(torch.sort(d.experts, -1).values, torch.sort(ref.experts, -1).values)
    router.bias = torch.tensor([-9.0, 3, -9, 0, 0, 9])
    router.fallback = True
    d = router(logits)
    assert torch.equal(d.experts, ref.experts)
    assert_close(d.gates, ref.gates, n=2 * 6 + 4)  # softmax over 6 experts, renormalised over 2


def test_soft_distribution_is_the_convex_problems_form():
    logits = _logits(seed=2)
    router = EnergyAwareRouter(6, cheap_experts=[5], temperature=1.5)
    router.adapt(bias=torch.linspace(-1, 1, 6), alpha=0.5)   # α weighs only a fast net's part
    q = torch.softmax(logits / 1.5, -1)
    expected = torch.softmax(q.log() + router.bias, -1)
    # float32: softmax(logits / T) over 6, its log, + bias, softmax over 6 again
    assert_close(router.soft_distribution(logits), expected, n=2 * (2 * 6 + 4))


def test_adaptation_is_read_and_written_through_one_record():
    router = EnergyAwareRouter(4, cheap_experts=[3])
    router.adapt(bias=torch.tensor([0.0, 0.0, 0.0, 2.0]), alpha=0.3, fallback=True)
    state = router.adaptation()
    assert state.bias.tolist() == [0.0, 0.0, 0.0, 2.0] and state.alpha == 0.3 and state.fallback
    state.bias[0] = 9.0                                    # a copy: the router is unchanged
    assert router.bias[0] == 0.0
    with pytest.raises(ValueError, match="bias"):
        router.adapt(bias=torch.zeros(5))
    with pytest.raises(ValueError, match="alpha"):
        router.adapt(alpha=1.5)


def test_second_slot_candidates_exclude_the_static_top1():
    from nectar.control.routing_proxy import allowed_distribution

    logits = _logits(n=200, seed=6)
    router = EnergyAwareRouter(6, cheap_experts=[4, 5])
    q = allowed_distribution(router, logits)
    top1 = logits.argmax(-1)
    assert torch.all(q.gather(-1, top1[:, None]) == 0)
    assert_close(q.sum(-1), torch.ones(200), n=2 * 6 + 4)
    assert int((q > 0).sum(-1).max()) <= 2                    # the static second choice and the best cheap one


def test_restrict_to_cheap_and_cheap_static_router():
    logits = _logits(seed=3)
    router = EnergyAwareRouter(6, cheap_experts=[2, 5], candidates="cheap")
    second = router(logits).experts[:, 1]
    assert set(second.tolist()) <= {2, 5}
    static = CheapStaticRouter(6, cheap_experts=[2, 5])(logits)
    expect = torch.where(logits[:, 2] >= logits[:, 5], 2, 5)
    top1 = logits.argmax(-1)
    keep = (top1 != 2) & (top1 != 5)
    assert torch.equal(static.experts[keep, 1], expect[keep])


def test_bad_router_arguments():
    with pytest.raises(ValueError):
        EnergyAwareRouter(4, cheap_experts=[])
    with pytest.raises(ValueError):
        EnergyAwareRouter(4, cheap_experts=[7])
    with pytest.raises(ValueError):
        CheapStaticRouter(4, cheap_experts=[1], extra_slots=3)


def test_mixed_training_router_mixes_cheap_second_slots_at_the_asked_rate():
    from nectar.moe.static_routers import MixedTrainingRouter

    logits = _logits(n=4000, seed=4)
    router = MixedTrainingRouter(6, cheap_experts=[4, 5], k=2, cheap_prob=0.3, seed=0)
    d = router(logits)
    static = logits.topk(2, -1).indices
    assert torch.equal(d.experts[:, 0], static[:, 0])
    changed = (d.experts[:, 1] != static[:, 1]).float().mean().item()
    # a token is re-routed with probability 0.3, unless its static second expert already is the cheap pick
    assert 0.15 < changed <= 0.33
    again = MixedTrainingRouter(6, cheap_experts=[4, 5], k=2, cheap_prob=0.3, seed=0)(logits)
    assert torch.equal(again.experts, d.experts)
    with pytest.raises(ValueError):
        MixedTrainingRouter(6, cheap_experts=[4], cheap_prob=1.5)


def test_static_or_cheap_candidates_choose_between_the_trained_routings():
    logits = _logits(n=500, seed=5)
    router = EnergyAwareRouter(6, cheap_experts=[4, 5])
    static = TopKRouter(6, 2)(logits).experts
    cheap = CheapStaticRouter(6, cheap_experts=[4, 5])(logits).experts
    for bias in (torch.zeros(6), torch.tensor([-9.0, -9, -9, -9, 0, 0]), torch.tensor([0.0, 0, 0, 0, -9, -9])):
        router.bias = bias
        second = router(logits).experts[:, 1]
        assert bool(((second == static[:, 1]) | (second == cheap[:, 1])).all())
    router.bias = torch.tensor([-9.0, -9, -9, -9, 0, 0])
    assert torch.equal(router(logits).experts[:, 1], cheap[:, 1])
    with pytest.raises(ValueError):
        EnergyAwareRouter(6, cheap_experts=[4], candidates="some")


def test_drop_rule_is_the_per_token_minimiser_of_cost_plus_dropped_mass_kl():
    """Slot 2 is dropped exactly where c_e < λ·(−log(1 − w)) fails, i.e. where the closed-form
    per-token comparison 'saved cost c_e vs λ × KL of the dropped gate mass' favours dropping."""
    torch.manual_seed(3)
    num, lam = 6, 0.5
    cost = torch.tensor([0.0, 0.1, 0.3, 0.05, 0.2, 0.4])                           # [E] saved J per slot
    router = EnergyAwareRouter(num, cheap_experts=[3], drop=True)
    router.adapt(drop_scale=cost / lam)
    logits = torch.randn(500, num) * 2                                             # [N, E]
    decision = router(logits)
    probs = torch.softmax(logits, -1)
    for n in range(logits.shape[0]):
        e1, e2 = decision.experts[n].tolist()
        w = probs[n, e2] / (probs[n, e1] + probs[n, e2])
        drop_better = cost[e2] > lam * -torch.log1p(-w)                            # keep costs c, drop costs λ·KL
        assert bool(decision.mask[n, 1]) == (not bool(drop_better))
    assert 0 < int((~decision.mask[:, 1]).sum()) < logits.shape[0]                 # both outcomes occur
    kept = decision.gates[decision.mask[:, 1]]
    dropped = decision.gates[~decision.mask[:, 1]]
    assert_close(kept.sum(-1), torch.ones(len(kept)), n=6)  # two gates renormalised and summed
    assert_close(dropped[:, 0], torch.ones(len(dropped)), n=6) and bool((dropped[:, 1] == 0).all())


def test_drop_needs_a_drop_router_and_counts_in_the_deviation():
    from nectar.control.routing_proxy import deviation_kl, drop_kl

    plain = EnergyAwareRouter(4, cheap_experts=[3])
    with pytest.raises(ValueError, match="drop=True"):
        plain.adapt(drop_scale=torch.ones(4))
    router = EnergyAwareRouter(4, cheap_experts=[3], drop=True)
    with pytest.raises(ValueError, match=">= 0"):
        router.adapt(drop_scale=-torch.ones(4))
    logits = torch.randn(300, 4)
    assert drop_kl(router, logits) == 0.0
    base = deviation_kl(router, logits)
    router.adapt(drop_scale=torch.full((4,), 0.3))
    decision = router(logits)
    probs = torch.softmax(logits, -1)
    q = probs.gather(-1, decision.experts)
    w = q[:, 1] / q.sum(-1)
    expected = float((-torch.log1p(-w) * ~decision.mask[:, 1]).mean())            # independent per-token sum
    # float32 means over the 300 tokens of terms with a softmax, a ÷ and a log1p each
    kl = dict(dtype=torch.float32, n=logits.shape[0] + 2 * 4 + 4)
    assert drop_kl(router, logits) == approx(expected, **kl)
    assert deviation_kl(router, logits) == approx(base + expected, **kl)
