"""Routers against per-token Python references: top-k, capacity drops, top-p, bias, errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from nectar.moe.static_routers import CapacityRouter, TopKRouter, TopPRouter, make_router
from nectar.moe.router import Router
from tests.tolerance import assert_close


def softmax_rows(a: np.ndarray) -> np.ndarray:
    e = np.exp(a - a.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def distinct_logits(n: int, e: int, seed: int) -> torch.Tensor:
    """Logits with well-separated values per row, so rankings are unambiguous."""
    g = torch.Generator().manual_seed(seed)
    ranks = torch.stack([torch.randperm(e, generator=g) for _ in range(n)]).double()
    return ranks * 0.37 + 0.01 * torch.rand(n, e, generator=g, dtype=torch.float64)


def reference_topk(logits: np.ndarray, k: int, temperature: float, bias: np.ndarray, renormalize: bool):
    probs = softmax_rows(logits / temperature)
    experts, gates = [], []
    for t in range(logits.shape[0]):
        order = sorted(range(logits.shape[1]), key=lambda i: -(logits[t, i] / temperature + bias[i]))[:k]
        g = probs[t, order]
        experts.append(order)
        gates.append(g / g.sum() if renormalize else g)
    return np.array(experts), np.array(gates), probs


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), e=st.integers(1, 9), data=st.data(), temperature=st.sampled_from([0.5, 1.0, 2.0]),
       renormalize=st.booleans(), seed=st.integers(0, 10_000))
def test_topk_matches_per_token_reference(n, e, data, temperature, renormalize, seed):
    k = data.draw(st.integers(1, e))
    logits = distinct_logits(n, e, seed)
    router = TopKRouter(e, k, temperature=temperature, renormalize=renormalize).double()
    decision = router(logits)
    experts, gates, probs = reference_topk(logits.numpy(), k, temperature, np.zeros(e), renormalize)
    assert torch.equal(decision.experts, torch.from_numpy(experts))
    assert_close(decision.gates, gates, n=2 * e + 4)  # softmax (max, sum over e, exp, ÷), renormalisation
    assert_close(decision.probs, probs, n=2 * e + 4)
    assert decision.mask.all() and not decision.dropped.any()
    assert torch.equal(decision.logits, logits)


def test_selection_bias_changes_choice_not_gate_source():
    e, k = 6, 2
    logits = distinct_logits(20, e, 1)
    router = TopKRouter(e, k).double()
    bias = torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 50.0], dtype=torch.float64)
    router.selection_bias.copy_(bias)
    decision = router(logits)
    experts, gates, probs = reference_topk(logits.numpy(), k, 1.0, bias.numpy(), True)
    assert (decision.experts[:, 0] == 5).all()  # the bias forces expert 5 first
    assert torch.equal(decision.experts, torch.from_numpy(experts))
    assert_close(decision.gates, gates, n=2 * e + 4)  # from unbiased probs
    assert_close(decision.probs, softmax_rows(logits.numpy()), n=2 * e + 4)


@pytest.mark.parametrize("router", [TopKRouter(5, 2), TopPRouter(5, p=0.7)])
def test_gate_gradients_pass_gradcheck(router):
    logits = distinct_logits(4, 5, 3).requires_grad_()
    router = router.double()
    assert torch.autograd.gradcheck(lambda z: router(z).gates, (logits,))


def reference_capacity(experts: np.ndarray, capacity: int) -> np.ndarray:
    load, dropped = {}, np.zeros(experts.shape, dtype=bool)
    for t in range(experts.shape[0]):
        for s in range(experts.shape[1]):
            i = int(experts[t, s])
            dropped[t, s] = load.get(i, 0) >= capacity
            load[i] = load.get(i, 0) + 1
    return dropped


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 40), e=st.integers(1, 8), data=st.data(), seed=st.integers(0, 10_000),
       capacity_factor=st.sampled_from([0.25, 0.5, 1.0, 1.25, 4.0]))
def test_capacity_drops_exactly_the_overflow(n, e, data, seed, capacity_factor):
    k = data.draw(st.integers(1, e))
    logits = distinct_logits(n, e, seed)
    logits[:, 0] += 3.0  # skew toward expert 0 so that it overflows
    router = CapacityRouter(e, k, capacity_factor=capacity_factor).double()
    capacity = router.capacity(n)
    assert capacity == max(1, math.ceil(capacity_factor * n * k / e))
    decision = router(logits)
    topk = TopKRouter(e, k).double()(logits)
    assert torch.equal(decision.experts, topk.experts) and decision.mask.all()
    expected_dropped = reference_capacity(decision.experts.numpy(), capacity)
    assert np.array_equal(decision.dropped.numpy(), expected_dropped)
    loads = np.bincount(decision.experts.numpy().ravel(), minlength=e)
    assert decision.dropped_count() == int(np.maximum(loads - capacity, 0).sum())
    assert (decision.tokens_per_expert().numpy() == np.minimum(loads, capacity)).all()
    kept = ~decision.dropped
    assert_close(decision.gates[kept], topk.gates[kept], n=2 * 5 + 4)
    assert (decision.gates[decision.dropped] == 0).all()


def reference_topp(probs: np.ndarray, p: float, max_k: int):
    chosen = []
    for row in probs:
        order, mass = [], 0.0
        for i in sorted(range(len(row)), key=lambda j: -row[j]):
            if mass >= p or len(order) == max_k:
                break
            order.append(i)
            mass += row[i]
        chosen.append(order)
    return chosen


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 12), e=st.integers(1, 9), data=st.data(), seed=st.integers(0, 10_000),
       p=st.sampled_from([0.05, 0.3, 0.5, 0.8, 0.95]))
def test_topp_matches_per_token_reference(n, e, data, seed, p):
    max_k = data.draw(st.none() | st.integers(1, e))
    logits = distinct_logits(n, e, seed)
    decision = TopPRouter(e, p=p, max_k=max_k).double()(logits)
    probs = softmax_rows(logits.numpy())
    chosen = reference_topp(probs, p, max_k or e)
    assert decision.experts.shape == (n, max_k or e)
    for t, order in enumerate(chosen):
        assert decision.mask[t].sum() == len(order)
        assert decision.experts[t, : len(order)].tolist() == order
        g = probs[t, order]
        assert_close(decision.gates[t, : len(order)], g / g.sum(), n=2 * e + 4)
        assert (decision.gates[t, len(order):] == 0).all()


def test_topp_small_p_is_top1():
    logits = distinct_logits(10, 6, 4)
    decision = TopPRouter(6, p=1e-6).double()(logits)
    assert decision.mask.sum(1).eq(1).all()
    assert torch.equal(decision.experts[:, 0], logits.argmax(-1))
    assert torch.equal(decision.gates[:, 0], torch.ones(10, dtype=torch.float64))


def test_low_precision_logits_softmax_in_fp32():
    logits = distinct_logits(8, 4, 5).float()
    d16 = TopKRouter(4, 2)(logits.bfloat16())
    d32 = TopKRouter(4, 2)(logits)
    assert d16.probs.dtype == torch.bfloat16
    # the softmax runs in fp32 and rounds once to bf16; the logits were rounded to bf16 first,
    # and exp turns a logit's relative error (≤ |logit| · eps) into the probability's: n = 1 + max|logit|
    assert_close(d16.probs, d32.probs, n=1 + int(logits.abs().max().ceil()))


def test_deterministic_repeat():
    logits = torch.randn(64, 8)
    for router in (TopKRouter(8, 2), CapacityRouter(8, 2, 0.5), TopPRouter(8, 0.6)):
        a, b = router(logits), router(logits)
        assert torch.equal(a.experts, b.experts) and torch.equal(a.dropped, b.dropped) and torch.equal(a.gates, b.gates)


def test_make_router_by_name():
    assert isinstance(make_router("topk", 8, k=2), TopKRouter)
    capacity = make_router("capacity", 8, k=1, capacity_factor=2.0)
    assert isinstance(capacity, CapacityRouter) and capacity.capacity(8) == 2
    topp = make_router("topp", 8, p=0.4, max_k=3)
    assert isinstance(topp, TopPRouter) and topp.max_slots == 3
    assert all(isinstance(r, Router) for r in (capacity, topp))


@pytest.mark.parametrize("build,match", [
    (lambda: make_router("expert-choice", 4), "unknown router"),
    (lambda: make_router("topk", 4, kk=2), "bad arguments"),
    (lambda: TopKRouter(4, 5), "exceeds num_experts"),
    (lambda: TopKRouter(4, 0), "k must be a positive int"),
    (lambda: TopKRouter(0, 1), "num_experts"),
    (lambda: TopKRouter(4, 1, temperature=0.0), "temperature"),
    (lambda: CapacityRouter(4, 1, capacity_factor=0), "capacity_factor"),
    (lambda: TopPRouter(4, p=0.0), "p must be in"),
    (lambda: TopPRouter(4, p=1.5), "p must be in"),
    (lambda: TopPRouter(4, max_k=5), "exceeds num_experts"),
])
def test_bad_router_arguments_raise(build, match):
    with pytest.raises(ValueError, match=match):
        build()


@pytest.mark.parametrize("logits,match", [
    (torch.randn(3, 5), r"shape \[N, 4\]"),
    (torch.randn(2, 3, 4), r"shape \[N, 4\]"),
    (torch.ones(3, 4, dtype=torch.long), "floating point"),
])
def test_bad_logits_raise(logits, match):
    for router in (TopKRouter(4, 2), CapacityRouter(4, 2), TopPRouter(4)):
        with pytest.raises(ValueError, match=match):
            router(logits)
