"""Tests of nectar/bias_optimizer.py against independent references.

References: a per-token Python loop for the objective, autograd for the gradient, scipy's
L-BFGS for the unconstrained minimum, and the KKT conditions (primal and dual feasibility,
complementary slackness, stationarity) as an optimality certificate for the constrained problem.
No cvxpy here: the core must be testable where only torch is installed (tests/test_convexity.py
compares with cvxpy).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from nectar.control.bias_optimizer import (
    BiasOptimizer,
    BiasOptimizerConfig,
    chunk_objective,
    closed_form_bias,
    closed_form_p,
    kkt_bias,
    lagrangian_gradient,
    routing_distribution,
)
from tests.tolerance import approx, assert_close, tol

DOUBLE = torch.float64


def make_chunk(tokens=256, experts=6, seed=0, spread=1.5):
    """q [T, E] from random logits with per-expert offsets, costs c [E] > 0, λ."""
    gen = torch.Generator().manual_seed(seed)
    offsets = torch.randn(experts, generator=gen, dtype=DOUBLE) * 0.7
    logits = offsets + spread * torch.randn(tokens, experts, generator=gen, dtype=DOUBLE)  # [T, E]
    q = torch.softmax(logits, dim=1)
    c = 0.5 + torch.rand(experts, generator=gen, dtype=DOUBLE)  # [E]
    return q, c, 0.5


def objective_loop(q, c, lam, p):
    """Σ_t Σ_i c_i p_ti + λ Σ_t Σ_i p_ti log(p_ti / q_ti), one token and one expert at a time."""
    total = 0.0
    for t in range(q.shape[0]):
        for i in range(q.shape[1]):
            pti, qti = float(p[t, i]), float(q[t, i])
            total += float(c[i]) * pti + (lam * pti * math.log(pti / qti) if pti > 0 else 0.0)
    return total


def binding_constraints(q, c, lam):
    """Cap the cheapest expert at 80% of its unconstrained optimal load (the budget pushes load
    towards it, so the cap binds) and a budget a quarter of the way from the unconstrained mean
    cost down to the cheapest cost the cap allows (so the budget binds too)."""
    p_star = closed_form_p(q, c, lam)
    cheapest = int(c.argmin())
    caps = [1.0] * q.shape[1]
    caps[cheapest] = 0.8 * float(p_star[:, cheapest].mean())
    second = float(c[torch.arange(len(c)) != cheapest].min())
    lowest = caps[cheapest] * float(c[cheapest]) + (1 - caps[cheapest]) * second
    cost_star = float((p_star @ c).mean())
    return caps, cost_star - 0.25 * (cost_star - lowest)


def assert_kkt(q, c, lam, caps, budget, bias, mu, nu, tol):
    """Optimality certificate of p = softmax(log q + bias) for the convex chunk problem.

    tol is a convergence tolerance of the iterative method under test (its KKT residual after a
    number of steps), not rounding: the callers say where theirs comes from."""
    p = routing_distribution(q, bias)
    load, cost = p.mean(dim=0), float((p @ c).mean())
    caps_t = torch.tensor(caps, dtype=DOUBLE)
    assert float((load - caps_t).max()) <= tol, "cap violated"
    assert cost - budget <= tol * float(c.max()), "budget violated"
    assert (mu >= 0).all() and nu >= 0, "multipliers must be non-negative"
    assert float((mu * (caps_t - load)).abs().max()) <= tol * lam, "cap complementary slackness"
    assert abs(nu * (budget - cost)) <= tol * float(c.max()), "budget complementary slackness"
    stationary = kkt_bias(c, lam, mu, nu)
    assert torch.allclose(bias - bias.mean(), stationary, atol=tol), "bias is not the KKT form"


def test_objective_matches_per_token_loop():
    q, c, lam = make_chunk(tokens=20, experts=4, seed=1)
    b = torch.tensor([0.3, -0.2, 0.5, -0.6], dtype=DOUBLE)
    p = routing_distribution(q, b)
    # a sum of T·E terms c·p + λ·p·log(p/q), each with a log and a few ×, ÷
    assert chunk_objective(q, c, lam, b) == approx(objective_loop(q, c, lam, p), n=q.numel() + 8)


def test_routing_distribution_is_softmax_of_biased_logits():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(10, 5, generator=gen, dtype=DOUBLE)
    b = torch.randn(5, generator=gen, dtype=DOUBLE)
    q = torch.softmax(logits, dim=1)
    # log of a softmax (its rounding relative to |log q| ≤ a few), + b, a softmax over 5: n = 2·5 + 8
    assert_close(routing_distribution(q, b), torch.softmax(logits + b, dim=1), n=2 * 5 + 8)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradient_matches_autograd(seed):
    q, c, lam = make_chunk(tokens=50, experts=5, seed=seed)
    gen = torch.Generator().manual_seed(seed + 10)
    b = torch.randn(5, generator=gen, dtype=DOUBLE)
    c_eff = c + torch.rand(5, generator=gen, dtype=DOUBLE)  # a Lagrangian's effective cost
    b_var = b.clone().requires_grad_(True)
    p = torch.softmax(q.log() + b_var, dim=1)
    lagrangian = (p @ c_eff).sum() + lam * (p * (p / q).log()).sum()
    (expected,) = torch.autograd.grad(lagrangian, b_var)
    assert_close(lagrangian_gradient(q, c_eff, lam, b), expected, n=q.shape[0] + 2 * 5 + 8)  # Σ over tokens


def test_closed_form_matches_numerical_minimum():
    scipy_optimize = pytest.importorskip("scipy.optimize")
    q, c, lam = make_chunk(tokens=100, experts=5, seed=3)
    fun = lambda b: chunk_objective(q, c, lam, torch.tensor(b))  # noqa: E731
    jac = lambda b: lagrangian_gradient(q, c, lam, torch.tensor(b)).numpy()  # noqa: E731
    res = scipy_optimize.minimize(fun, np.zeros(5), jac=jac, method="L-BFGS-B", options={"gtol": 1e-12, "ftol": 1e-15})
    b_star = closed_form_bias(c, lam)
    # the closed form is the minimum: no worse than the numerical one beyond the objective's rounding
    assert chunk_objective(q, c, lam, b_star) <= res.fun + tol(float, n=q.numel() + 8, scale=abs(res.fun))
    # not rounding: L-BFGS-B stops once f changes by < ftol·|f| (1e-15); f is quadratic near the
    # minimum, so its bias is only found to ~√(ftol·|f| / curvature) ~ 1e-6: 1e-4 bounds that
    assert np.allclose(res.x - res.x.mean(), b_star.numpy(), atol=1e-4)


def test_closed_form_bias_is_centred_minus_cost_over_lambda():
    c = torch.tensor([1.0, 2.0, 4.0], dtype=DOUBLE)
    b = closed_form_bias(c, 0.5)
    assert float(b.sum()) == approx(0.0, n=2 * 3, scale=float(b.abs().sum()))  # centred: Σ of 3 minus their mean
    assert_close(b[1:] - b[:-1], -(c[1:] - c[:-1]) / 0.5, n=6, scale=float(b.abs().max()))


def test_dual_mode_unconstrained_is_exact_after_one_chunk():
    q, c, lam = make_chunk(seed=4)
    opt = BiasOptimizer(q.shape[1], BiasOptimizerConfig(lam=lam))
    record = opt.step(q, c)
    assert record.step == 0 and record.tokens == q.shape[0]
    assert record.objective == approx(chunk_objective(q, c, lam, torch.zeros(q.shape[1])), n=q.numel() + 8)
    assert_close(opt.bias, closed_form_bias(c, lam), n=2 * q.shape[1] + 4)  # −c/λ centred over the experts


@pytest.mark.parametrize("momentum", [0.0, 0.5])
def test_gradient_mode_converges_to_closed_form(momentum):
    q, c, lam = make_chunk(seed=5)
    opt = BiasOptimizer(q.shape[1], BiasOptimizerConfig(lam=lam, mode="gradient", momentum=momentum))
    objectives = [opt.step(q, c).objective for _ in range(60)]
    # not rounding: what 60 gradient steps reach (a convergence tolerance)
    assert torch.allclose(opt.bias, closed_form_bias(c, lam), atol=1e-6)
    assert objectives[-1] < objectives[0]
    assert opt.step(q, c).grad_norm < 1e-8  # converged: the gradient after 61 steps


@pytest.mark.parametrize("mode", ["dual", "gradient"])
def test_converges_to_kkt_point_with_active_cap_and_budget(mode):
    q, c, lam = make_chunk(seed=6)
    caps, budget = binding_constraints(q, c, lam)
    opt = BiasOptimizer(q.shape[1], BiasOptimizerConfig(lam=lam, caps=caps, budget=budget, mode=mode))
    for _ in range(150):
        opt.step(q, c)
    # clearly positive multipliers (not rounding: "binds" means well away from 0)
    assert float(opt.mu.max()) > 1e-3 and opt.nu > 1e-3, "both constraints should bind"
    assert_kkt(q, c, lam, caps, budget, opt.bias, opt.mu, opt.nu, tol=1e-7)  # the KKT residual after 150 steps


def test_constrained_optimum_beats_feasible_perturbations():
    q, c, lam = make_chunk(seed=7)
    caps, budget = binding_constraints(q, c, lam)
    opt = BiasOptimizer(q.shape[1], BiasOptimizerConfig(lam=lam, caps=caps, budget=budget))
    for _ in range(150):
        opt.step(q, c)
    best = chunk_objective(q, c, lam, opt.bias)
    gen = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(200):
        b = opt.bias + 0.05 * torch.randn(q.shape[1], generator=gen, dtype=DOUBLE)
        p = routing_distribution(q, b)
        if (p.mean(dim=0) <= torch.tensor(caps, dtype=DOUBLE)).all() and float((p @ c).mean()) <= budget:
            checked += 1
            # a 0.05 perturbation raises a strictly convex objective far above rounding
            assert chunk_objective(q, c, lam, b) >= best - tol(float, n=q.numel() + 8, scale=abs(best))
    assert checked > 0


@pytest.mark.parametrize("mode", ["dual", "gradient"])
def test_tracks_drifting_costs(mode):
    q, c0, lam = make_chunk(seed=8)
    experts = q.shape[1]
    phase = torch.arange(experts, dtype=DOUBLE) * 2 * math.pi / experts
    cost_at = lambda k: c0 + 0.3 * torch.sin(phase + 0.02 * k)  # noqa: E731  slow drift
    tracking = BiasOptimizer(experts, BiasOptimizerConfig(lam=lam, mode=mode))
    errors, frozen_errors = [], []
    for k in range(300):
        tracking.step(q, cost_at(k))
        if k == 20:
            frozen = tracking.bias.clone()
        if k >= 20:
            target = closed_form_bias(cost_at(k + 1), lam)  # the next chunk's optimum
            errors.append(float((tracking.bias - target).abs().max()))
            frozen_errors.append(float((frozen - target).abs().max()))
    per_chunk_move = max(float((closed_form_bias(cost_at(k + 1), lam) - closed_form_bias(cost_at(k), lam)).abs().max())
                         for k in range(300))
    bound = 1.01 * per_chunk_move if mode == "dual" else 10 * per_chunk_move
    assert max(errors) <= bound
    assert max(frozen_errors) > 20 * max(errors), "the drift must matter for this test to mean anything"


def test_units_and_chunk_size_do_not_change_the_trajectory():
    q, c, lam = make_chunk(seed=9)
    caps, budget = binding_constraints(q, c, lam)
    scale = 1e-4  # costs in J instead of arbitrary units
    base = BiasOptimizer(q.shape[1], BiasOptimizerConfig(lam=lam, caps=caps, budget=budget, mode="gradient"))
    scaled = BiasOptimizer(q.shape[1], BiasOptimizerConfig(lam=lam * scale, caps=caps, budget=budget * scale, mode="gradient"))
    doubled = BiasOptimizer(q.shape[1], BiasOptimizerConfig(lam=lam, caps=caps, budget=budget, mode="gradient"))
    q2 = torch.cat([q, q])  # the same chunk twice: the same per-token problem
    for _ in range(10):
        base.step(q, c)
        scaled.step(q, c * scale)
        doubled.step(q2, c)
    # the same trajectory in exact arithmetic; rounding differs in each of the 10 steps' sums over
    # the tokens and experts (doubled: twice the tokens)
    n = 10 * (2 * q.numel() + 8)
    assert_close(scaled.bias, base.bias, n=n, what="costs in other units")
    assert_close(doubled.bias, base.bias, n=n, what="each token twice")
    assert_close(scaled.mu, base.mu * scale, n=n, what="cap multipliers in other units")


def test_state_dict_round_trip_and_reset():
    q, c, lam = make_chunk(seed=10)
    caps, budget = binding_constraints(q, c, lam)
    config = BiasOptimizerConfig(lam=lam, caps=caps, budget=budget, mode="gradient")
    first = BiasOptimizer(q.shape[1], config)
    for _ in range(5):
        first.step(q, c)
    second = BiasOptimizer(q.shape[1], config)
    second.load_state_dict(first.state_dict())
    a, b = first.step(q, c), second.step(q, c)
    assert a.bias == b.bias and a.mu == b.mu and a.nu == b.nu and a.step == b.step == 5
    first.reset()
    assert first.steps == 0 and float(first.bias.abs().max()) == 0.0 and first.nu == 0.0


def test_accepts_float32_and_autograd_inputs():
    q, c, lam = make_chunk(seed=11)
    q32 = q.float().requires_grad_(True)
    q32 = q32 / q32.sum(dim=1, keepdim=True)  # part of a graph, float32
    opt = BiasOptimizer(q.shape[1], BiasOptimizerConfig(lam=lam))
    opt.step(q32, c.float())
    assert opt.bias.dtype == DOUBLE
    assert_close(opt.bias, closed_form_bias(c.float().double(), lam), dtype=torch.float32, n=2 * q.shape[1] + 4)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lam": 0.0}, "lam"),
        ({"lam": 1.0, "mode": "adam"}, "mode"),
        ({"lam": 1.0, "momentum": 1.0}, "momentum"),
        ({"lam": 1.0, "caps": [0.2, 0.2, 0.2]}, "sum"),
        ({"lam": 1.0, "caps": [1.5, 0.5, 0.5]}, "caps"),
        ({"lam": 1.0, "lr": -1.0}, "lr"),
    ],
)
def test_bad_config_is_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BiasOptimizerConfig(**kwargs)


def test_bad_step_inputs_are_rejected():
    q, c, lam = make_chunk(experts=3, seed=12)
    opt = BiasOptimizer(3, BiasOptimizerConfig(lam=lam, budget=0.1))
    with pytest.raises(ValueError, match="below the cheapest"):
        opt.step(q, c)  # costs are >= 0.5
    opt = BiasOptimizer(3, BiasOptimizerConfig(lam=lam))
    with pytest.raises(ValueError, match="sum to 1"):
        opt.step(q * 2, c)
    with pytest.raises(ValueError, match="experts"):
        opt.step(q[:, :2] / q[:, :2].sum(dim=1, keepdim=True), c[:2])
    with pytest.raises(ValueError, match="NaN"):
        opt.step(q, torch.tensor([1.0, float("nan"), 1.0]))
    with pytest.raises(ValueError, match="caps has"):
        BiasOptimizer(4, BiasOptimizerConfig(lam=lam, caps=[0.5, 0.5, 0.5]))
