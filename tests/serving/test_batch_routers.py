"""The batch rule against a per-token, per-slot Python loop, and its two ends (λ = 0, λ = ∞)."""

import math

import pytest
import torch

from nectar.hf.routers import FamilyTopKRouter
from nectar.serving.batch_routers import BatchPriceFamilyRouter, BatchPriceRouter, batch_keep
from nectar.serving.policies import parse_serving, serving_router
from nectar.hf.attach import attach
from tests.hf.models import tiny
from tests.serving.models import tiny_gpt2_moe


def _loop_keep(experts, ranks, weights, k_max, price, cost):
    """The rule written out token by token."""
    n, k = experts.shape
    read = {int(experts[t, j]) for t in range(n) for j in range(k) if ranks[t, j] == 0}
    sharers = {}
    for t in range(n):
        for j in range(k):
            if ranks[t, j] < k_max:
                sharers[int(experts[t, j])] = sharers.get(int(experts[t, j]), 0) + 1
    keep = torch.zeros(n, k, dtype=torch.bool)
    for t in range(n):
        for j in range(k):
            e = int(experts[t, j])
            if ranks[t, j] == 0:
                keep[t, j] = True
            elif ranks[t, j] < k_max:
                keep[t, j] = e in read or (price != math.inf and float(weights[t, j]) >= price * float(cost[e]) / sharers[e])
    return keep


@pytest.mark.parametrize("price", [0.0, 0.05, 0.3, math.inf])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_keep_equals_the_per_slot_loop(price, seed):
    gen = torch.Generator().manual_seed(seed)
    n, e, k = 9, 12, 4
    logits = torch.randn(n, e, generator=gen)
    top = torch.topk(torch.softmax(logits, -1), k)
    weights = top.values / top.values.sum(-1, keepdim=True)
    ranks = torch.stack([torch.randperm(k, generator=gen) for _ in range(n)])   # any slot order
    cost = torch.rand(e, generator=gen)
    got = batch_keep(top.indices, ranks, weights, 3, price, cost)
    assert torch.equal(got, _loop_keep(top.indices, ranks, weights, 3, price, cost))


def test_price_zero_is_static_top_k_and_every_token_keeps_its_top1():
    model = tiny_gpt2_moe()
    layer = model.moe_layers()[0][1]
    logits = torch.randn(7, layer.num_experts)
    free = BatchPriceRouter(layer.num_experts, 2, torch.ones(layer.num_experts), price=0.0)(logits)
    assert free.mask.all()
    aware = serving_router("batch-aware:2", layer, top_k=2)(logits)
    assert aware.mask[:, 0].all()
    read = set(aware.experts[:, 0].tolist())
    assert all((e in read) == bool(m) for e, m in zip(aware.experts[:, 1].tolist(), aware.mask[:, 1].tolist()))


def test_family_router_keeps_the_family_order_and_gates():
    model = attach(tiny("olmoe"))
    _, layer = model.moe_layers()[0]
    logits = torch.randn(6, layer.num_experts)
    full = FamilyTopKRouter(layer.family, layer.top_k)(logits)
    free = BatchPriceFamilyRouter(layer.family, layer.top_k, torch.ones(layer.num_experts), price=0.0)(logits)
    assert torch.equal(free.experts, full.experts) and torch.equal(free.gates, full.gates)


@pytest.mark.parametrize("name,error", [("batch-aware", "needs a value"), ("batch-aware:1.5", "whole number"),
                                        ("batch-price:-1", ">= 0"), ("batch-price:x", "not a number")])
def test_bad_serving_names_fail_with_one_line(name, error):
    with pytest.raises(ValueError, match=error):
        parse_serving(name)


def test_batch_aware_above_the_models_k_is_refused():
    layer = tiny_gpt2_moe().moe_layers()[0][1]
    with pytest.raises(ValueError, match="exceeds the model's top-k"):
        serving_router("batch-aware:3", layer, top_k=2)
