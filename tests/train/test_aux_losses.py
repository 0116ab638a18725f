"""Null-aware balancing and the expected-compute regulariser against per-token hand computations."""

from __future__ import annotations

import math

import pytest
import torch

from nectar.moe.expert_pool import ExpertPool
from nectar.moe.experts import ExpertSpec
from nectar.moe.router import gate_decision
from nectar.train.aux_losses import (compute_costs, expected_compute_loss, full_mask, null_aware_switch_loss,
                                     relative_costs)
from tests.tolerance import approx, assert_close

FULL = torch.tensor([True, True, True, False, False])   # 3 full experts, 2 cheap ones


def decision(logits, experts, mask=None):
    return gate_decision(logits, experts, 1.0, mask)


def reference_null_aware(logits, experts, mask):
    """Per token and per slot: shares of full-expert assignments, q renormalised over full experts."""
    probs = torch.softmax(logits, -1)
    counts = torch.zeros(3)
    for t in range(experts.shape[0]):
        for k in range(experts.shape[1]):
            e = int(experts[t, k])
            if mask[t, k] and e < 3:
                counts[e] += 1
    f = counts / counts.sum()
    q = torch.stack([probs[t, :3] / probs[t, :3].sum() for t in range(probs.shape[0])]).mean(0)
    return 3 * (f * q).sum()


def test_null_aware_switch_matches_a_per_token_computation():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(40, 5, generator=g)
    experts = torch.randint(0, 5, (40, 2), generator=g)
    mask = torch.rand(40, 2, generator=g) > 0.3
    mask[:, 0] = True
    loss = null_aware_switch_loss(decision(logits, experts, mask), FULL)
    assert_close(loss, reference_null_aware(logits, experts, mask), n=2 * 40 + 2 * 5 + 4)  # means over 40 tokens, softmax over 5


def test_null_aware_switch_ignores_cheap_mass_and_is_one_when_balanced():
    experts = torch.tensor([[0, 3], [1, 4], [2, 3]] * 4)
    logits = torch.zeros(12, 5)
    balanced = null_aware_switch_loss(decision(logits, experts), FULL)
    assert float(balanced) == approx(1.0, dtype=torch.float32, n=2 * 12 + 2 * 5 + 4)
    cheap_heavy = logits.clone()
    cheap_heavy[:, 3:] = 5.0                                           # lots of probability on cheap experts
    assert float(null_aware_switch_loss(decision(cheap_heavy, experts), FULL)) == approx(1.0, dtype=torch.float32,
                                                                                           n=2 * 12 + 2 * 5 + 4)
    collapsed = null_aware_switch_loss(decision(torch.tensor([[9.0, 0, 0, 0, 0]] * 12),
                                                torch.tensor([[0, 3]] * 12)), FULL)
    # every token on full expert 0, whose share of the full experts' mass is e⁹ / (e⁹ + 2)
    assert float(collapsed) == approx(3.0 * math.exp(9) / (math.exp(9) + 2), dtype=torch.float32, n=2 * 12 + 2 * 5 + 4)
    only_cheap = null_aware_switch_loss(decision(logits, torch.tensor([[3, 4]] * 12)), FULL)
    assert float(only_cheap) == 0.0
    with pytest.raises(ValueError, match="full expert"):
        null_aware_switch_loss(decision(logits, experts), torch.zeros(5, dtype=torch.bool))


def test_expected_compute_is_the_probability_weighted_cost():
    logits = torch.randn(7, 5, generator=torch.Generator().manual_seed(1), requires_grad=True)
    costs = torch.tensor([1.0, 1.0, 1.0, 0.25, 0.0])
    loss = expected_compute_loss(decision(logits, torch.zeros(7, 2, dtype=torch.long)), costs)
    probs = torch.softmax(logits.detach(), -1)
    expected = sum(float(probs[t] @ costs) for t in range(7)) / 7
    assert float(loss.detach()) == approx(expected, dtype=torch.float32, n=7 + 5 + 2 * 5 + 4)  # softmax, ·costs, mean
    loss.backward()                                                   # lowering it moves mass to cheap experts
    assert float(logits.grad[:, 4].sum()) < 0 < float(logits.grad[:, 0].sum())


def test_relative_costs_and_full_mask_of_a_pool():
    class Layer:
        experts = ExpertPool.from_specs([ExpertSpec("gelu", 64, 2), ExpertSpec("gelu", 16, 1), ExpertSpec("zero"),
                                         ExpertSpec("copy"), ExpertSpec("constant")], 32)
    costs = relative_costs(Layer())
    assert costs[:3].tolist() == [1.0, 1.0, 0.25] and costs[3:5].tolist() == [0.0, 0.0]
    assert 0 < float(costs[5]) < 0.1
    assert full_mask(costs).tolist() == [True, True, False, False, False, False]


def test_skip_costs_reward_only_the_zero_expert_and_temperature_sharpens():
    class Layer:
        experts = ExpertPool.from_specs([ExpertSpec("gelu", 64, 2), ExpertSpec("gelu", 16, 1), ExpertSpec("zero"),
                                         ExpertSpec("copy")], 32)
    assert compute_costs(Layer(), "skip").tolist() == [1.0, 1.0, 1.0, 0.0, 1.0]
    assert torch.equal(compute_costs(Layer(), "flops"), relative_costs(Layer()))
    with pytest.raises(ValueError, match="compute costs"):
        compute_costs(Layer(), "bytes")
    logits = torch.tensor([[2.0, 1.0, 0.0, 1.5, -1.0]])
    costs = torch.tensor([1.0, 1.0, 0.25, 0.0, 0.0])
    d = decision(logits, torch.tensor([[0, 3]]))
    for tau in (1.0, 0.3):
        q = torch.softmax(logits / tau, -1)
        assert float(expected_compute_loss(d, costs, tau)) == approx(float(q[0] @ costs), dtype=torch.float32, n=5 + 2 * 5 + 4)
    # not rounding: at τ = 0.05 the runner-up (logit 1.5, cost 0) keeps e^(−0.5/0.05) ≈ 5e-5 of the mass
    assert float(expected_compute_loss(d, costs, 0.05)) == pytest.approx(1.0, abs=1e-3)  # → the top choice's cost
