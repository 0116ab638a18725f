"""Anti-collapse tools at uniform and collapsed routing (closed forms) and against scipy/numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.special import logsumexp, rel_entr
from scipy.stats import entropy

from nectar.moe.balancing import (
    aux_free_bias_update,
    entropy_regularizer,
    importance_loss,
    kl_to_uniform,
    router_z_loss,
    routing_entropy,
    switch_load_balancing_loss,
)
from nectar.moe.static_routers import TopKRouter
from tests.tolerance import approx, assert_close

E, N = 8, 32
# Tolerances (tests/tolerance.py): the losses below are means over the N tokens of sums over the
# E experts, with a log or exp per term: n = N + E + 4 roundings on the longest path.
NE = N + E + 4


def uniform_probs(n: int = N, e: int = E) -> torch.Tensor:
    return torch.full((n, e), 1.0 / e, dtype=torch.float64)


def collapsed_probs(n: int = N, e: int = E) -> torch.Tensor:
    probs = torch.zeros(n, e, dtype=torch.float64)
    probs[:, 3] = 1.0
    return probs


def random_probs(n: int, e: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, e, generator=g, dtype=torch.float64) * 2, dim=-1)


def test_switch_loss_closed_forms():
    balanced_top1 = torch.arange(N) % E
    assert switch_load_balancing_loss(uniform_probs(), balanced_top1).item() == approx(1.0, n=NE)
    assert switch_load_balancing_loss(collapsed_probs()).item() == approx(E, n=NE)


@settings(max_examples=25, deadline=None)
@given(n=st.integers(1, 30), e=st.integers(1, 9), seed=st.integers(0, 10_000))
def test_switch_loss_matches_loop(n, e, seed):
    probs = random_probs(n, e, seed)
    top1 = probs.argmax(-1).numpy()
    p = probs.numpy()
    expected = e * sum((top1 == i).mean() * p[:, i].mean() for i in range(e))
    assert switch_load_balancing_loss(probs).item() == approx(expected, n=n + e + 4)


def test_switch_loss_uses_dispatched_top_choice_of_a_decision():
    logits = torch.randn(N, E, dtype=torch.float64)
    router = TopKRouter(E, 2).double()
    router.selection_bias[5] = 100.0  # every token's dispatched first choice becomes expert 5
    decision = router(logits)
    loss = switch_load_balancing_loss(decision)
    assert loss.item() == approx(E * decision.probs[:, 5].mean().item(), n=NE)
    probs = decision.probs.clone().requires_grad_()
    switch_load_balancing_loss(probs, decision.experts).backward()
    expected_grad = torch.zeros(N, E, dtype=torch.float64)
    expected_grad[:, 5] = E / N  # dL/dp_t5 = E · f_5 / N with f_5 = 1
    assert_close(probs.grad, expected_grad, n=NE)


def test_router_z_loss_matches_scipy():
    logits = torch.randn(N, E, dtype=torch.float64) * 3
    expected = np.mean(logsumexp(logits.numpy(), axis=-1) ** 2)
    assert router_z_loss(logits).item() == approx(expected, n=NE)
    assert router_z_loss(torch.zeros(4, E, dtype=torch.float64)).item() == approx(math.log(E) ** 2, n=NE)


def test_routing_entropy_closed_forms_and_scipy():
    uniform = routing_entropy(uniform_probs())
    assert uniform.token.item() == approx(math.log(E), n=NE) and uniform.marginal.item() == approx(math.log(E), n=NE)
    collapsed = routing_entropy(collapsed_probs())
    assert collapsed.token.item() == 0.0 and collapsed.marginal.item() == 0.0
    spread = routing_entropy(torch.eye(E, dtype=torch.float64).repeat(3, 1))  # one-hot, balanced
    assert spread.token.item() == 0.0 and spread.marginal.item() == approx(math.log(E), n=NE)
    probs = random_probs(N, E, 0)
    r = routing_entropy(probs)
    assert r.token.item() == approx(entropy(probs.numpy(), axis=-1).mean(), n=NE)
    assert r.marginal.item() == approx(entropy(probs.numpy().mean(0)), n=NE)


def test_kl_to_uniform_closed_forms_and_scipy():
    # 0 from terms p·log(p·E) that cancel: the scale is their size, log E
    assert kl_to_uniform(uniform_probs()).item() == approx(0.0, n=NE, scale=math.log(E))
    assert kl_to_uniform(collapsed_probs()).item() == approx(math.log(E), n=NE)
    probs = random_probs(N, E, 1)
    expected = rel_entr(probs.numpy().mean(0), np.full(E, 1.0 / E)).sum()
    assert kl_to_uniform(probs).item() == approx(expected, n=NE, scale=math.log(E))  # terms of size ≤ log E


def test_entropy_regularizer_is_negative_mutual_information():
    sharp_balanced = torch.eye(E, dtype=torch.float64).repeat(2, 1)
    # 0 as a difference of two entropies of size ≤ log E: that is the scale
    assert entropy_regularizer(sharp_balanced, 1.0, 1.0).item() == approx(-math.log(E), n=NE)
    assert entropy_regularizer(uniform_probs(), 1.0, 1.0).item() == approx(0.0, n=NE, scale=math.log(E))
    assert entropy_regularizer(collapsed_probs(), 1.0, 1.0).item() == approx(0.0, n=NE, scale=math.log(E))
    assert entropy_regularizer(uniform_probs()).item() == approx(-math.log(E), n=NE)  # marginal only
    probs = random_probs(N, E, 2).numpy()
    joint = probs / N  # p(token, expert) with tokens uniform
    mutual_information = rel_entr(joint, np.full((N, 1), 1.0 / N) * probs.mean(0)).sum()
    got = entropy_regularizer(torch.from_numpy(probs), 1.0, 1.0).item()
    assert got == approx(-mutual_information, n=N * E + 4, scale=math.log(E))  # scipy sums all N·E terms


def test_importance_loss_closed_forms():
    assert importance_loss(uniform_probs()).item() == approx(0.0, n=NE, scale=1.0)  # a variance over mean²
    assert importance_loss(collapsed_probs()).item() == approx(E - 1, n=NE)


def test_aux_free_update_moves_toward_balance_and_is_centred():
    bias = torch.zeros(4)
    new = aux_free_bias_update(bias, torch.tensor([10, 0, 5, 1]), gamma=0.1)
    delta = new - bias
    # float32, centred: 4 steps of size 0.1 minus their mean; the sum's terms total 4 · 0.1 · 2
    assert_close(delta.sum(), 0.0, dtype=torch.float32, n=2 * 4, scale=0.8)
    assert delta[0] < 0 and delta[1] > 0 and delta[3] > 0  # over-loaded down, under-loaded up
    raw = 0.1 * np.sign(4.0 - np.array([10, 0, 5, 1]))
    assert_close(delta, raw - raw.mean(), dtype=torch.float32, n=2 * 4)
    assert torch.equal(aux_free_bias_update(bias, torch.tensor([3, 3, 3, 3])), bias)


def test_aux_free_bias_balances_a_skewed_router():
    torch.manual_seed(0)
    logits = torch.randn(512, E) + torch.linspace(0, 3, E)  # strongly prefers high experts
    router = TopKRouter(E, 2)

    def max_violation() -> float:
        load = router(logits).tokens_per_expert().float()
        return float(load.max() / load.mean() - 1)

    before = max_violation()
    for _ in range(300):
        load = router(logits).tokens_per_expert()
        router.selection_bias.copy_(aux_free_bias_update(router.selection_bias, load, gamma=0.02))
    after = max_violation()
    assert before > 1.0 and after < 0.2 * before
    # centred at every step: the sum drifts by one float32 centring (n = 2E) per update, 300 updates
    assert_close(router.selection_bias.sum(), 0.0, n=300 * 2 * E, scale=router.selection_bias.abs().sum().item())


@pytest.mark.parametrize("call,match", [
    (lambda: switch_load_balancing_loss(torch.rand(3)), r"shape \[N>0, E>0\]"),
    (lambda: switch_load_balancing_loss(torch.rand(3, 4), torch.zeros(2, dtype=torch.long)), "top1 must have shape"),
    (lambda: router_z_loss(torch.zeros(0, 4)), "router logits"),
    (lambda: kl_to_uniform(torch.ones(3, 4, dtype=torch.long)), "floating point"),
    (lambda: aux_free_bias_update(torch.zeros(4), torch.zeros(3)), "must match"),
    (lambda: aux_free_bias_update(torch.zeros(4), torch.zeros(4), gamma=-1.0), "gamma"),
    (lambda: aux_free_bias_update(torch.zeros(2), torch.tensor([1, -1])), "non-negative"),
])
def test_bad_inputs_raise(call, match):
    with pytest.raises(ValueError, match=match):
        call()
