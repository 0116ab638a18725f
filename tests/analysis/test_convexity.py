"""Tests of analysis/convexity.py, analysis/energy_assumptions.py and `nectar verify-convexity`.

References: the closed-form optimum, cvxpy's own duals (KKT reconstruction), the online
BiasOptimizer, and energy functions whose affinity/convexity is known by construction.
"""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

cp = pytest.importorskip("cvxpy")

from analysis.convexity import energy_assumptions as ea  # noqa: E402
from analysis.convexity.chunk_problem import (  # noqa: E402
    ChunkInstance,
    build_chunk_problem,
    cheapest_mean_cost,
    closed_form_reference,
    compare_bias,
    derived_constraints,
    relative_gap,
    solve_chunk_problem,
    synthetic_setup,
    topk_gap,
)
from analysis.convexity.cli import main as cli_main  # noqa: E402
from nectar.control.bias_optimizer import BiasOptimizer, BiasOptimizerConfig, objective_of_p, routing_distribution  # noqa: E402
from tests.tolerance import approx, assert_close, tol


def instance(tokens=300, seed=0, experts=6):
    source, c, lam = synthetic_setup(seed, experts=experts)
    return ChunkInstance(source.sample(np.random.default_rng(seed + 1), tokens), c, lam)


def constrained(inst):
    caps, budget = derived_constraints(inst)
    return ChunkInstance(inst.q, inst.c, inst.lam, caps, budget)


def test_problem_is_dcp_with_and_without_constraints():
    inst = instance()
    cons = constrained(inst)
    assert build_chunk_problem(inst.q, inst.c, inst.lam).problem.is_dcp()
    assert build_chunk_problem(cons.q, cons.c, cons.lam, cons.caps, cons.budget).problem.is_dcp()


@pytest.mark.parametrize("seed", [0, 1])
def test_cvxpy_matches_closed_form(seed):
    inst = instance(seed=seed)
    result = solve_chunk_problem(inst.q, inst.c, inst.lam)
    p_closed, _ = closed_form_reference(inst)
    assert result.is_dcp and result.status == cp.OPTIMAL
    # not rounding: cvxpy's interior-point answer is optimal to its stopping tolerances (duality gap
    # ~1e-8 relative): the objective is flat at the optimum (1e-7), the solver's own value of it a
    # little looser (1e-6), the point itself ~√gap off (1e-4)
    assert result.objective == pytest.approx(objective_of_p(inst.q, inst.c, inst.lam, p_closed), rel=1e-7)
    assert result.solver_objective == pytest.approx(result.objective, rel=1e-6)
    assert np.abs(result.p - p_closed).max() < 1e-4
    assert np.abs(result.mu).max() == 0 and result.nu == 0


@pytest.mark.parametrize("seed", [0, 3])
def test_kkt_bias_from_duals_reproduces_cvxpy_primal(seed):
    cons = constrained(instance(seed=seed))
    result = solve_chunk_problem(cons.q, cons.c, cons.lam, cons.caps, cons.budget)
    cheapest = int(np.argmin(cons.c))
    assert result.mu[cheapest] > 0 and result.nu > 0, "both constraints must be active for this test"
    load = result.p.mean(axis=0)
    # not rounding: the solver's feasibility and optimality tolerances (as above)
    assert load[cheapest] == pytest.approx(cons.caps[cheapest], abs=1e-6)  # the cap binds
    assert float((result.p @ cons.c).mean()) == pytest.approx(cons.budget, rel=1e-6)  # the budget binds
    p_kkt = routing_distribution(cons.q, result.kkt_bias(cons.c, cons.lam)).numpy()
    assert np.abs(p_kkt - result.p).max() < 1e-4
    p_unconstrained, _ = closed_form_reference(cons)
    # a design threshold: far above the solver's 1e-4
    assert np.abs(p_unconstrained - result.p).max() > 1e-2, "constraints must change the optimum"


@pytest.mark.parametrize("mode", ["dual", "gradient"])
def test_online_optimizer_reaches_cvxpy_with_active_cap_and_budget(mode):
    cons = constrained(instance(seed=2))
    result = solve_chunk_problem(cons.q, cons.c, cons.lam, cons.caps, cons.budget)
    opt = BiasOptimizer(cons.experts, BiasOptimizerConfig(lam=cons.lam, caps=cons.caps.tolist(), budget=cons.budget, mode=mode))
    for _ in range(150):
        opt.step(cons.q, cons.c)
    comparison = compare_bias(cons, opt.bias.numpy(), result.p, result.kkt_bias(cons.c, cons.lam))
    # not rounding: 150 online steps against the solver's tolerances (as above); the multipliers
    # are the solver's duals, accurate to ~1e-3 relative at its stopping point
    assert comparison.relative_gap <= 1e-6
    assert comparison.bias_max_abs_diff < 1e-3
    assert comparison.max_cap_violation < 1e-6 and comparison.budget_violation < 1e-6 * cons.c.max()
    assert np.allclose(opt.mu.numpy(), result.mu, rtol=1e-3, atol=1e-3 * cons.lam)
    assert opt.nu == pytest.approx(result.nu, rel=1e-3)


def test_online_gap_shrinks_from_static_routing_to_solver_accuracy():
    cons = constrained(instance(seed=4))
    result = solve_chunk_problem(cons.q, cons.c, cons.lam, cons.caps, cons.budget)
    opt = BiasOptimizer(cons.experts, BiasOptimizerConfig(lam=cons.lam, caps=cons.caps.tolist(), budget=cons.budget))
    gaps = []
    for _ in range(40):
        opt.step(cons.q, cons.c)
        gaps.append(compare_bias(cons, opt.bias.numpy(), result.p, result.kkt_bias(cons.c, cons.lam)).relative_gap)
    # design thresholds: far from the optimum at the start, at the solver's accuracy after 40 steps
    assert gaps[0] > 1e-2, "static routing must be far from the constrained optimum"
    assert gaps[-1] < 1e-5 and gaps[-1] < 1e-4 * gaps[0]


def test_infeasible_and_invalid_instances_are_rejected():
    inst = instance(tokens=50)
    with pytest.raises(ValueError, match="sum to"):
        build_chunk_problem(inst.q, inst.c, inst.lam, caps=np.full(inst.experts, 0.1))
    with pytest.raises(ValueError, match="cheapest"):
        build_chunk_problem(inst.q, inst.c, inst.lam, budget=0.5 * inst.c.min())
    q_empty = inst.q.copy()
    q_empty[0] = 0.0
    with pytest.raises(ValueError):
        build_chunk_problem(q_empty, inst.c, inst.lam)
    with pytest.raises(ValueError, match="experts"):
        build_chunk_problem(inst.q, inst.c[:-1], inst.lam)


@pytest.mark.filterwarnings("ignore:Solution may be inaccurate")
def test_solver_settings_ladder_retries_and_reports(monkeypatch):
    from analysis.convexity import chunk_problem as convexity

    inst = instance(tokens=60)
    monkeypatch.setitem(convexity.SOLVER_ATTEMPTS, "CLARABEL", ({"max_iter": 1}, {}))
    result = solve_chunk_problem(inst.q, inst.c, inst.lam, solver="CLARABEL")
    assert result.status == cp.OPTIMAL and result.solver == "CLARABEL"
    monkeypatch.setitem(convexity.SOLVER_ATTEMPTS, "CLARABEL", ({"max_iter": 1},))
    with pytest.raises(RuntimeError, match="max_iter=1"):
        solve_chunk_problem(inst.q, inst.c, inst.lam, solver="CLARABEL")


def test_cheapest_mean_cost_matches_linear_program():
    c = np.array([3.0, 1.0, 2.0, 5.0])
    caps = np.array([1.0, 0.3, 0.4, 1.0])
    loads = cp.Variable(4)
    lp = cp.Problem(cp.Minimize(c @ loads), [cp.sum(loads) == 1, loads >= 0, loads <= caps])
    lp.solve()
    assert cheapest_mean_cost(c, caps) == pytest.approx(lp.value, rel=1e-8)  # not rounding: the LP solver's tolerance


@pytest.mark.parametrize("k", [1, 2])
def test_topk_gap_counts_selections_like_a_per_token_loop(k):
    inst = instance(tokens=80, seed=6)
    bias = -inst.c / inst.lam
    gap = topk_gap(inst.q, bias, inst.c, k)
    counts = np.zeros(inst.experts)
    for t in range(inst.tokens):
        scores = [np.log(inst.q[t, i]) + bias[i] for i in range(inst.experts)]
        for i in sorted(range(inst.experts), key=lambda i: -scores[i])[:k]:
            counts[i] += 1
    assert_close(gap.realised_load, counts / (k * inst.tokens), n=2)  # whole counts, ×, ÷
    # softmax(log q + b) over the experts, a mean over the tokens
    assert_close(gap.expected_load, routing_distribution(inst.q, bias).numpy().mean(axis=0),
                 n=inst.tokens + 2 * inst.experts + 8)
    assert gap.realised_cost == approx(float(inst.c @ gap.realised_load), n=inst.experts)


def test_relative_gap():
    # |a − b| / |b| of numbers near 1: the difference cancels terms of size 1 (the scale)
    assert relative_gap(1.001, 1.0) == approx(1e-3, n=2, scale=1.0)
    assert relative_gap(0.999, 1.0) == approx(1e-3, n=2, scale=1.0)


# ------------------------------------------------------------------ energy assumptions
def random_loads(n=60, features=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.uniform(100, 2000, size=(n, features))


def test_affine_fit_recovers_an_affine_energy_and_passes():
    loads = random_loads()
    coefficients = np.linspace(1e-4, 3e-4, loads.shape[1])
    energy = 2.0 + loads @ coefficients
    fit = ea.fit_affine_energy(loads, energy, rel_tol=1e-6)
    # exact data: least squares (sums over 60 rows, 9 unknowns) amplifies rounding by the
    # column-scaled design's condition number; normwise over the scaled unknowns (as in
    # tests/analysis/test_report.py)
    design = np.column_stack([loads, np.ones(len(loads))])
    columns = np.abs(design).max(axis=0)
    kappa = float(np.linalg.cond(design / columns))
    n = 60 * 9
    scales = np.abs(np.r_[coefficients, 2.0] * columns).max() / columns
    assert fit.passes and fit.in_sample.max_rel <= tol(float, n=n, safety=kappa)
    assert_close(fit.theta[:-1], coefficients, n=n, safety=kappa, scale=scales[:-1])
    assert fit.theta[-1] == approx(2.0, n=n, safety=kappa, scale=scales[-1])


def test_affine_fit_with_noise_passes_at_the_noise_level():
    loads = random_loads(seed=1)
    energy = 2.0 + loads.sum(axis=1) * 1e-4
    noisy = energy * (1 + 1e-3 * np.random.default_rng(2).standard_normal(energy.shape))
    assert ea.fit_affine_energy(loads, noisy, rel_tol=5e-3).passes


def test_affine_fit_detects_a_quadratic_energy():
    loads = random_loads(seed=3)
    energy = 2.0 + 1e-4 * loads.sum(axis=1) + 2e-8 * (loads**2).sum(axis=1)
    fit = ea.fit_affine_energy(loads, energy, rel_tol=1e-3)
    assert not fit.passes and fit.in_sample.max_rel > 1e-3  # beyond the fit's own rel_tol


def test_affine_fit_uses_duration_and_judges_other_chunks():
    loads = random_loads(seed=4)
    duration = 0.01 + 1e-6 * loads.sum(axis=1)
    energy = 50.0 * duration + loads @ np.full(loads.shape[1], 1e-4)
    fit = ea.fit_affine_energy(loads[:40], energy[:40], duration[:40], rel_tol=1e-6)
    assert fit.passes
    held_out = fit.residuals_on(loads[40:], energy[40:], duration[40:])
    assert held_out.passes
    stepped = energy[40:] + 0.05 * (loads[40:, 0] > 1000)  # an effect the affine model cannot have
    assert not fit.residuals_on(loads[40:], stepped, duration[40:]).passes
    with pytest.raises(ValueError, match="duration"):
        fit.predict(loads[40:])


def test_midpoint_check_flags_a_concave_energy_and_passes_convex_ones():
    a, b = random_loads(20, seed=5), random_loads(20, seed=6)
    concave = lambda x: float(np.sqrt(x.sum()))  # noqa: E731
    convex = lambda x: float(1.0 + (x**2).sum() * 1e-6)  # noqa: E731
    affine = lambda x: float(1.0 + x.sum() * 1e-3)  # noqa: E731
    assert not ea.midpoint_convexity(concave, a, b, rel_tol=1e-6).passes
    assert ea.midpoint_convexity(convex, a, b, rel_tol=0.0).passes
    affine_check = ea.midpoint_convexity(affine, a, b, rel_tol=1e-9)
    # f(mid) − (f(a) + f(b))/2 of an affine f: rounding of the sums over the 8 loads and a few ops,
    # relative to f's size
    size = max(affine(x) for x in np.vstack([a, b]))
    assert affine_check.passes and np.abs(affine_check.excess).max() <= tol(float, n=3 * 8 + 6, scale=size)


def test_midpoint_triples_are_found_in_an_unstructured_trace():
    rng = np.random.default_rng(7)
    loads = rng.uniform(0, 1000, size=(30, 4))
    loads[5] = 0.5 * (loads[2] + loads[9])  # plant one midpoint
    triples = ea.find_midpoint_triples(loads, match_tol=1e-6)
    assert triples == [(2, 5, 9)]
    concave_energy = np.sqrt(loads.sum(axis=1)) + 1.0
    check = ea.midpoint_convexity_from_trace(loads, concave_energy, match_tol=1e-6, rel_tol=1e-9)
    assert check.summary()["triples"] == 1 and not check.passes


def test_moe_workload_places_loads_in_every_layer():
    template = ea.distilgpt2_moe_template(experts=4)
    workload = ea.moe_workload([10, 0, 30.4, 5], template)
    assert workload.expert_counts() == [[10, 0, 30, 5]] * 6
    with pytest.raises(ValueError, match="non-negative"):
        ea.moe_workload([-1, 0, 0, 0], template)


def test_simulated_energy_is_deterministic_and_grows_with_routed_tokens():
    pytest.importorskip("sim.backend")
    template = ea.distilgpt2_moe_template()
    energy = ea.simulated_energy_fn(template)
    top1 = np.full(8, template.tokens / 8)
    top2 = 2 * top1
    assert energy(top1) == energy(top1)
    assert energy(top2) > energy(top1) > 0


def write_energy_trace(path, energy_of_loads, chunks=40, seed=0):
    """A NECTAR trace of chunk windows whose energy is energy_of_loads(loads [E]), plus rows to skip."""
    from nectar.telemetry.window import TelemetryWindow
    from nectar.telemetry.trace import TraceRow, write_trace

    rng = np.random.default_rng(seed)
    template = ea.distilgpt2_moe_template(experts=4)
    rows, t = [], 0.0
    for index in range(chunks):
        loads = rng.integers(200, 3000, size=4)
        energy = float(energy_of_loads(loads))
        window = TelemetryWindow(t, t + 1.0, energy, energy, energy, 60.0)
        rows.append(TraceRow(window, ea.moe_workload(loads, template), kind="chunk", chunk_index=index))
        t += 1.0
    rows.append(TraceRow(TelemetryWindow(t, t + 1.0, 80.0, 80.0, 80.0, 40.0), None, kind="idle"))
    rows.append(TraceRow(TelemetryWindow(t, t + 0.01, 0.0, 0.0, 0.0, 40.0), ea.moe_workload([1, 1, 1, 1], template)))
    write_trace(path, rows)
    return template


def test_trace_arrays_read_chunk_windows_of_a_nectar_trace(tmp_path):
    from nectar.telemetry.trace import read_trace

    path = tmp_path / "trace.csv.gz"
    write_energy_trace(path, lambda x: 100.0 + 0.01 * x.sum())
    arrays = ea.trace_arrays(read_trace(path))
    assert arrays.loads.shape == (40, 6 * 4) and arrays.skipped == 2  # idle + zero-energy rows
    assert_close(arrays.energy_J, 100.0 + 0.01 * arrays.loads[:, :4].sum(axis=1), n=4 + 2)  # Σ of 4, ×, +
    assert np.array_equal(arrays.loads[:, :4], arrays.loads[:, 4:8])  # whole counts: every layer the same


@pytest.mark.parametrize("kind, affine", [("affine", True), ("quadratic", False)])
def test_cli_checks_a_trace(tmp_path, capsys, kind, affine):
    energy = {"affine": lambda x: 100.0 + 0.01 * x.sum(), "quadratic": lambda x: 100.0 + 1e-5 * (x.astype(float) ** 2).sum()}
    path = tmp_path / "trace.csv"
    write_energy_trace(path, energy[kind])
    cli_main(["--trace", str(path), "--json", "--tokens", "100", "--chunks", "5", "--chunk-tokens", "50"])
    measured = json.loads(capsys.readouterr().out)["energy_assumptions"]["measured"]
    assert measured["available"] and measured["rows_skipped"] == 2
    assert measured["affine"]["passes"] is affine


# ------------------------------------------------------------------ CLI
def test_cli_synthetic_json_and_export(tmp_path, capsys):
    export = tmp_path / "instance.npz"
    rc = cli_main(["--seed", "1", "--json", "--no-energy", "--tokens", "200", "--chunks", "30",
                   "--chunk-tokens", "100", "--export", str(export)])
    report = json.loads(capsys.readouterr().out)
    assert rc == 0
    assert report["is_dcp"] is True and report["relative_gap"] <= 1e-3  # the CLI's goal
    # the same function on the same numbers (JSON keeps every bit)
    assert report["relative_gap"] == approx(relative_gap(report["online_objective"], report["cvxpy_objective"]), n=1)
    assert report["constrained"]["meets_goal"] and report["constrained"]["nu"] > 0
    assert report["verdict"].startswith("verdict: PASS — both chunk problems are DCP and the online router is "
                                        "within the goal of cvxpy's optimum (relative gap ")
    data = np.load(export)
    assert data["q"].shape == data["p_online"].shape == (200, 8) and data["c"].shape == (8,)
    inst = ChunkInstance(data["q"], data["c"], float(data["lam"]))
    p_closed, _ = closed_form_reference(inst)
    # unconstrained: the online router's bias is the closed form after one chunk; p = softmax(log q + b)
    assert_close(data["p_online"], p_closed, n=2 * 8 + 8)


def test_cli_reads_a_run_directory(tmp_path, capsys):
    inst = instance(tokens=200, seed=5)
    cons = constrained(inst)
    wrong_bias = np.zeros(inst.experts)  # a router that never adapted: must miss the goal
    np.savez(tmp_path / "convexity_instance.npz", q=inst.q, c=inst.c, lam=inst.lam,
             caps=cons.caps, budget=cons.budget, bias_online=wrong_bias)
    rc = cli_main(["--run", str(tmp_path), "--json", "--no-energy", "--chunks", "30", "--chunk-tokens", "100"])
    report = json.loads(capsys.readouterr().out)
    assert rc == 1
    assert report["constrained"]["online_source"] == "run (bias_online)"
    assert not report["constrained"]["meets_goal"]
    assert report["unconstrained"]["meets_goal"]  # optimizer run on the instance's tokens
    assert re.match(r"verdict: FAIL — constrained gap \S+ above the goal \(relative gap", report["verdict"])


def test_cli_reports_a_missing_run_file(tmp_path, capsys):
    """Unusable input is exit status 2 (a failed check is 1), with one line naming the file."""
    assert cli_main(["--run", str(tmp_path), "--no-energy"]) == 2
    err = capsys.readouterr().err
    assert "convexity_instance.npz" in err and "Traceback" not in err


def test_restricted_support_matches_the_closed_form():
    """q with zeros (the router's second-slot candidates only): cvxpy's optimum keeps p = 0 off the
    support and equals the closed form p ∝ q·exp(−c/λ) on it."""
    inst = instance(tokens=40)
    rng = np.random.default_rng(5)
    q = inst.q.copy()
    for row in q:
        row[rng.choice(len(row), size=len(row) - 2, replace=False)] = 0.0   # two candidates per token
    q = q / q.sum(axis=1, keepdims=True)
    result = solve_chunk_problem(q, inst.c, inst.lam)
    expected = q * np.exp(-inst.c / inst.lam)
    expected = expected / expected.sum(axis=1, keepdims=True)
    assert np.abs(result.p - expected).max() < 1e-4                     # interior-point accuracy
    assert (result.p[q == 0] < 1e-7).all()  # not rounding: an interior point stops this close to p = 0


def test_cheapest_feasible_cost_equals_the_greedy_fill_on_full_support():
    """The LP floor (any support) agrees with the closed-form greedy fill where every expert is allowed."""
    from analysis.convexity.chunk_problem import cheapest_feasible_cost

    inst = instance(tokens=30)
    caps = np.full(inst.experts, 0.3)
    # not rounding: the LP solver's tolerance
    assert cheapest_feasible_cost(inst.q, inst.c, caps) == pytest.approx(cheapest_mean_cost(inst.c, caps), rel=1e-7)


def _energy_section(dense_violations: int, active_failing: int) -> dict:
    fit = lambda failing, n: {"chunks": n, "failing_chunks": failing, "rel_tol": 0.01, "passes": failing == 0}  # noqa: E731
    mid = lambda bad, n: {"triples": n, "violations": bad, "rel_tol": 1e-3, "passes": bad == 0}  # noqa: E731
    return {"simulated": {"available": True, "affine": fit(0, 40), "affine_on_sparse": fit(37, 40),
                          "affine_with_active_indicator": fit(active_failing, 80), "midpoint": mid(dense_violations, 20),
                          "midpoint_dense_sparse": mid(20, 20)}}


def test_the_energy_note_says_why_violations_do_not_fail_the_verdict():
    from analysis.convexity.cli import energy_note

    note = energy_note(_energy_section(0, 0))
    assert note.startswith("energy assumptions are findings, not part of the verdict")
    assert "with every expert busy the affine model (0/40 chunks beyond 1e-02) and midpoint convexity (0/20 violations) hold" in note
    assert "the 20/20 dense–sparse violations and 37/40 sparse chunks off the fit are where the affine model is known to fail" in note
    assert "indicator restores the fit (0/80" in note and "docs/convexity.md §5" in note
    bad = energy_note(_energy_section(3, 5))
    assert "(3/20 violations) do NOT hold" in bad and "does NOT restore the fit (5/80" in bad
    assert energy_note(None) is None and energy_note({"simulated": {"available": False, "reason": "x"}}) is None
