"""Tests of FastWeightRouterNet (nectar/fastweight_router.py): its gradient against LaCT's hand
formula, momentum against a hand-rolled heavy ball, weight norm, Muon, and descent on an
energy-style loss."""

from __future__ import annotations

import pytest
import torch

from nectar.lact.fastweight import row_norms, swiglu_chunk_update, zeropower_via_newtonschulz5
from nectar.control.fast_router import FastWeightRouterNet, scaled_muon
from tests.lact import NS5_GAIN
from tests.tolerance import approx, assert_close, tol, within

DOUBLE = torch.float64


# Tolerances (tests/tolerance.py): a step sums over the 16 tokens and the net's widths (d_model 10,
# hidden 6, 4 experts); with Muon, safety = NS5_GAIN (tests/lact/__init__.py).
STEP_N = 16 + 10 + 6 + 4 + 4


def make_router(**kwargs) -> FastWeightRouterNet:
    return FastWeightRouterNet(d_model=10, num_experts=4, hidden=6, **kwargs).to(DOUBLE)


def tokens(n=16, seed=0):
    return torch.randn(n, 10, dtype=DOUBLE, generator=torch.Generator().manual_seed(seed))


def hand_gradients(router, x, grad_scores):
    """∂/∂θ Σ ⟨scores, G⟩: LaCT's hand update with v = G and unit rates is exactly the matrix part."""
    ones = torch.ones(1, x.shape[0], 1, dtype=DOUBLE)
    dw0, dw1, dw2 = swiglu_chunk_update(x[None], grad_scores[None], *router.fast_weights(), ones, ones, ones)
    return dw0, dw1, dw2, grad_scores.sum(0)


def test_starts_at_zero_and_reset_restores():
    router = make_router()
    x = tokens()
    torch.testing.assert_close(router(x), torch.zeros(16, 4, dtype=DOUBLE), rtol=0, atol=0)
    router.step(torch.randn(16, 4, dtype=DOUBLE), lr=0.1)
    assert router(x).abs().max() > 1e-6  # a visible move: lr 0.1 × O(1) gradients moves scores by ~0.1
    router.reset()
    torch.testing.assert_close(router(x), torch.zeros(16, 4, dtype=DOUBLE), rtol=0, atol=0)
    assert router.steps_done == 0


def test_plain_step_is_gradient_descent_with_the_hand_gradient():
    router = make_router(weight_norm=False)
    x, grad_scores = tokens(), torch.randn(16, 4, dtype=DOUBLE, generator=torch.Generator().manual_seed(1))
    router(x)
    want = [w - 0.05 * g for w, g in zip((*router.fast_weights(), router.fast_bias), hand_gradients(router, x, grad_scores))]
    stats = router.step(grad_scores, lr=0.05)
    for got, expected in zip((*router.fast_weights(), router.fast_bias), want):
        assert_close(got, expected, n=STEP_N)
    parameters = sum(t.numel() for t in (*router.fast_weights(), router.fast_bias))
    # two norms over all fast parameters (their squares summed) and a ×
    assert stats.grad_norm > 0 and stats.update_norm == approx(0.05 * stats.grad_norm, n=2 * parameters + 4)


def test_gradient_signal_and_loss_callable_agree():
    x, grad_scores = tokens(seed=2), torch.randn(16, 4, dtype=DOUBLE, generator=torch.Generator().manual_seed(3))
    a, b = make_router(), make_router()
    a(x), b(x)
    a.step(grad_scores, lr=0.1, momentum=0.5, use_muon=True)
    stats = b.step(lambda scores: (scores * grad_scores).sum(), lr=0.1, momentum=0.5, use_muon=True)
    for got, want in zip((*b.fast_weights(), b.fast_bias), (*a.fast_weights(), a.fast_bias)):
        assert_close(got, want, n=STEP_N, safety=NS5_GAIN)  # hand vs autograd gradients, then Muon
    assert stats.loss == 0.0  # the scores were exactly zero at the first step


def test_momentum_and_muon_follow_the_heavy_ball_recipe():
    router = make_router(weight_norm=False)
    x, grad_scores = tokens(seed=4), torch.randn(16, 4, dtype=DOUBLE, generator=torch.Generator().manual_seed(5))
    lr, beta = 0.02, 0.9
    router(x)
    g1 = hand_gradients(router, x, grad_scores)
    router.step(grad_scores, lr=lr, momentum=beta, use_muon=True)
    after_first = [t.clone() for t in (*router.fast_weights(), router.fast_bias)]
    g2 = hand_gradients(router, x, grad_scores)
    router.step(grad_scores, lr=lr, momentum=beta, use_muon=True)
    for index, (got, start) in enumerate(zip((*router.fast_weights(), router.fast_bias), after_first)):
        velocity = -g2[index] + beta * -g1[index]
        step = velocity if index == 3 else scaled_muon(velocity)
        assert_close(got, start + lr * step, n=2 * STEP_N, safety=NS5_GAIN)  # two steps, Muon


def test_weight_norm_keeps_slow_row_norms():
    router = make_router()
    x = tokens(seed=6)
    for seed in range(5):
        router(x)
        router.step(torch.randn(16, 4, dtype=DOUBLE, generator=torch.Generator().manual_seed(seed)), lr=1.0, use_muon=True)
    for fast, slow in zip(router.fast_weights(), router.slow_weights()):
        assert not within(fast, slow, n=5 * STEP_N, safety=NS5_GAIN)[0]  # moved by more than rounding
        # not rounding: weight norm divides by ‖w‖ + WEIGHT_NORM_EPS (1e-5), so the norms land a
        # relative 1e-5/‖w‖ short of their targets; 1e-4 allows row norms down to 0.1
        torch.testing.assert_close(row_norms(fast), row_norms(slow), rtol=1e-4, atol=0)


@pytest.mark.parametrize("momentum, use_muon, lr", [(None, False, 0.5), (0.5, False, 0.3), (0.5, True, 0.02)])
def test_steps_descend_an_energy_style_loss(momentum, use_muon, lr):
    """Expected energy Σ_t softmax(static_t + scores_t) · cost plus a small KL-like pull: decreases."""
    router = make_router()
    x = tokens(64, seed=7)
    static = torch.randn(64, 4, dtype=DOUBLE, generator=torch.Generator().manual_seed(8))
    cost = torch.tensor([4.0, 1.0, 2.0, 3.0], dtype=DOUBLE)

    def energy(scores):
        return (torch.softmax(static + scores, dim=-1) @ cost).mean() + 0.01 * (scores**2).mean()

    losses = []
    for _ in range(15):
        router(x)
        losses.append(router.step(energy, lr=lr, momentum=momentum, use_muon=use_muon).loss)
    assert losses[-1] < losses[0] - 0.1, losses


def test_bad_inputs():
    router = make_router()
    with pytest.raises(ValueError, match="forward"):
        router.step(torch.zeros(3, 4, dtype=DOUBLE), lr=0.1)
    with pytest.raises(ValueError, match=r"\[N, 10\]"):
        router(torch.zeros(3, 9, dtype=DOUBLE))
    router(tokens(3))
    with pytest.raises(ValueError, match="shape"):
        router.step(torch.zeros(4, 4, dtype=DOUBLE), lr=0.1)
    with pytest.raises(ValueError, match="scalar"):
        router.step(lambda s: s, lr=0.1)
    with pytest.raises(ValueError, match="momentum"):
        router.step(torch.zeros(3, 4, dtype=DOUBLE), lr=0.1, momentum=1.5)
    with pytest.raises(ValueError, match="lr"):
        router.step(torch.zeros(3, 4, dtype=DOUBLE), lr=-1.0)
    with pytest.raises(ValueError, match="hidden"):
        FastWeightRouterNet(8, 4, hidden=0)


def test_muon_step_scales_with_the_gradient_so_a_vanishing_gradient_moves_nothing():
    g = torch.randn(3, 8, 5, dtype=DOUBLE, generator=torch.Generator().manual_seed(9))
    step = scaled_muon(g)
    norm_n = 2 * 8 * 5 + 4  # two Frobenius norms over 8·5 entries, a ÷ and a ×
    assert_close(torch.linalg.matrix_norm(step), torch.linalg.matrix_norm(g), n=norm_n)   # the gradient's length
    direction = zeropower_via_newtonschulz5(g)
    cosine = (step * direction).sum((-2, -1)) / (torch.linalg.matrix_norm(step) * torch.linalg.matrix_norm(direction))
    assert torch.all(cosine >= 1 - tol(DOUBLE, n=3 * norm_n))                             # Muon's direction
    tiny = 1e-12 * g                                                                      # no amplification:
    assert_close(torch.linalg.matrix_norm(scaled_muon(tiny)), torch.linalg.matrix_norm(tiny), n=norm_n)
