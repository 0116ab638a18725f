"""The online cost model: RLS against the closed-form regularised least-squares solution."""

import pytest
import torch

from nectar.control.cost_model import COUNT_SCALE, CostModelConfig, OnlineCostModel
from nectar.telemetry.window import TelemetryWindow
from nectar.telemetry.workload import ChunkWorkload, ExpertCost, LayerWorkload
from tests.tolerance import assert_close


def _workload(counts):
    layers = [LayerWorkload(list(row), [ExpertCost(1e6, 1e3)] * len(row)) for row in counts]
    return ChunkWorkload(tokens=sum(counts[0]), batch=1, seq_len=sum(counts[0]), d_model=8,
                         n_layers=len(counts), n_heads=1, vocab_size=10, layers=layers)


def _window(energy, duration):
    return TelemetryWindow(0.0, duration, energy, energy / duration, energy / duration, 50.0)


def test_rls_equals_closed_form_ridge_solution():
    gen = torch.Generator().manual_seed(0)
    flops = [[1e6, 2e6, 5e5], [1e6, 1e6, 1e5]]
    model = OnlineCostModel(flops, CostModelConfig(forgetting=1.0, noise_J=1e-4, max_cov_trace=1e30))
    theta0, P0 = model.theta.clone(), model.P.clone()
    true = torch.tensor([120.0, 0.004, 0.006, 0.001, 0.003, 0.002, 0.0005], dtype=torch.float64)
    rows, ys = [], []
    for _ in range(40):
        counts = torch.randint(0, 3000, (2, 3), generator=gen).tolist()
        duration = float(torch.rand(1, generator=gen)) * 0.5 + 0.1
        wl = _workload(counts)
        phi = model.features(wl, duration)
        y = float(phi @ true)
        rows.append(phi)
        ys.append(y)
        model.update(wl, _window(y, duration))
    Phi, Y = torch.stack(rows), torch.tensor(ys, dtype=torch.float64)
    P0_inv = torch.linalg.inv(P0)
    expected = torch.linalg.solve(P0_inv + Phi.T @ Phi, P0_inv @ theta0 + Phi.T @ Y)
    # RLS (40 rank-one updates of a 7×7 system) vs one direct solve: rounding in sums over the 40
    # rows and 7 features, amplified by the normal equations' condition number (the safety)
    kappa = torch.linalg.cond(P0_inv + Phi.T @ Phi).item()
    assert_close(model.theta, expected, n=40 * 7, safety=kappa)
    # not rounding: the ridge prior pulls θ off the truth by a relative ≲ 1e-3 here, and the
    # noise-free predictions by less than 1e-6 of the energies
    assert torch.allclose(model.theta, true, rtol=1e-3)
    assert model.fit_residual(last=5) < 1e-6


def test_forgetting_tracks_a_cost_change():
    model = OnlineCostModel([[1e6, 1e6]], CostModelConfig(forgetting=0.9, noise_J=0.01))
    gen = torch.Generator().manual_seed(1)
    for cost in (0.002, 0.006):  # the expert-0 cost quadruples half way (a hotter, slower GPU)
        for _ in range(60):
            a, b = torch.randint(0, 4000, (2,), generator=gen).tolist()
            energy = 100.0 * 0.2 + cost / COUNT_SCALE * a * COUNT_SCALE + 0.002 * b
            model.update(_workload([[a, b]]), _window(energy, 0.2))
    # not rounding: forgetting 0.9 keeps 0.9^60 ≈ 2e-3 of the old cost's evidence, and the noise
    # prior (0.01 J) regularises: the new cost is tracked to 2 %
    assert model.expert_costs()[0][0].item() == pytest.approx(0.006, rel=0.02)


def test_invalid_windows_are_skipped_and_bad_config_rejected():
    model = OnlineCostModel([[1e6]])
    theta = model.theta.clone()
    assert model.update(_workload([[10]]), _window(float("nan"), 0.1)) is None
    assert torch.equal(model.theta, theta)
    with pytest.raises(ValueError):
        CostModelConfig(forgetting=0.0)
    with pytest.raises(ValueError):
        model.features(_workload([[1], [2]]), 0.1)
