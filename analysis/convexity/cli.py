"""`nectar verify-convexity`: solve the chunk problem in cvxpy and compare the online router with it.

Inputs:
  - default: a seeded synthetic chunk (q = softmax of random logits with per-expert offsets,
    positive costs c in J/token, λ = half the cost scale); the online BiasOptimizer runs over
    `--chunks` fresh chunks drawn from the same source (it never sees the evaluation instance).
  - `--run DIR`: reads DIR/convexity_instance.npz with q [T, E], c [E], lam (scalar) and
    optionally bias_online [E] (the router's learned bias at the end of the run), caps [E]
    (fractions of tokens) and budget (mean cost per token). Without bias_online the
    BiasOptimizer runs over chunks resampled (with replacement) from the instance's tokens.
    If DIR/energy_trace.npz exists (loads [N, F], energy_J [N], optional duration_s [N]) the
    energy assumptions are also checked on it ("measured").
  - `--trace FILE`: check the energy assumptions on a NECTAR trace (nectar.telemetry.trace format; its valid
    chunk windows with a workload and a non-zero energy reading).

Two problems are solved. "unconstrained" has a closed form; the top-level JSON keys is_dcp,
cvxpy_objective, online_objective, relative_gap refer to it. "constrained" uses the run's caps
and budget, or `derived_constraints` (both binding). Its main comparison uses stationary chunks
(the instance itself, chunk after chunk) because the constrained optimum depends on the
instance's tokens: with chunks drawn from the source, even the population optimum misses the
instance's optimum by a sampling floor, which is reported beside the sampled-chunk gap.

Exit status: 0 when both problems are DCP, solved, and the main comparisons are within --goal;
1 when a check fails; 2 for unusable input (a missing or malformed --run, --trace or --export),
which is found before anything is solved. The last line is a one-line verdict that says why it
passes or fails; progress goes to stderr. Energy-assumption failures are findings: reported, not
counted in the exit status (they test the energy model the problem assumes, not the solver or the
router; the simulator's dense–sparse violations are its known failure at zero load), and a note
before the verdict says so.
"""

from __future__ import annotations

import argparse
import math
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np

from nectar.cli.common import cli_errors, non_negative_int, parser, positive_float, positive_int, strict_json, wrap_note

if TYPE_CHECKING:  # pragma: no cover  (cvxpy and torch are imported when the command runs, not for --help)
    from analysis.convexity.chunk_problem import ChunkInstance, SyntheticRouterSource

INSTANCE_FILE = "convexity_instance.npz"
TRACE_FILE = "energy_trace.npz"
FLOOR_SAMPLE_FACTOR = 4  # the population optimum is estimated on 4·T fresh tokens


def build_parser() -> argparse.ArgumentParser:
    p = parser("nectar verify-convexity", __doc__)
    p.add_argument("--run", type=Path, help=f"run directory holding {INSTANCE_FILE} (and optionally {TRACE_FILE}); "
                   "default: a synthetic instance")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the synthetic instance and of chunk sampling")
    p.add_argument("--json", action="store_true", help="print the report as JSON (the verdict goes to stderr)")
    p.add_argument("--export", type=Path, help="write q, c, lam, p_online (unconstrained) to this .npz (default: none)")
    p.add_argument("--overwrite", action="store_true", help="let --export replace an existing file")
    p.add_argument("--tokens", type=positive_int, default=2048, help="synthetic instance size T")
    p.add_argument("--experts", type=positive_int, default=8, help="synthetic number of experts E")
    p.add_argument("--chunks", type=positive_int, default=200, help="online chunks before the comparison")
    p.add_argument("--chunk-tokens", type=positive_int, default=1024, help="tokens per sampled online chunk")
    p.add_argument("--mode", choices=("dual", "gradient"), default="dual", help="BiasOptimizer mode")
    p.add_argument("--goal", type=positive_float, default=1e-3, help="largest acceptable relative objective gap")
    p.add_argument("--no-energy", action="store_true", help="skip the energy-assumption checks")
    p.add_argument("--sim-preset", default="h100_sxm", help="simulator preset for the energy checks")
    p.add_argument("--trace", type=Path, help="a NECTAR trace (nectar.telemetry.trace format, .csv or .csv.gz) to check"
                   " the energy assumptions on (\"measured\"; default: none)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def check_inputs(args: argparse.Namespace):
    """Everything that can be wrong with the input, before any solving (ValueError → exit 2).
    Returns the rows of --trace (None without it)."""
    from nectar.experiment.outputs import check_out_file

    if args.export is not None:
        if args.export.suffix != ".npz":
            raise ValueError(f"--export {args.export} must end in .npz")
        check_out_file(args.export, args.overwrite, "--export")
    if args.run is not None:
        if not args.run.is_dir():
            raise ValueError(f"--run {args.run} is not a run directory")
        load_run_instance(args.run)  # raises on a missing or malformed instance
    if args.trace is None:
        return None
    from nectar.telemetry.trace import read_trace

    if not args.trace.is_file():
        raise ValueError(f"--trace {args.trace} does not exist")
    try:
        rows = read_trace(args.trace)
    except (OSError, EOFError, ValueError) as exc:
        raise ValueError(f"--trace {args.trace} cannot be read: {exc}") from None
    if not rows:
        raise ValueError(f"--trace {args.trace} has no rows")
    return rows


@dataclass
class Setup:
    """The instances to verify and where online chunks come from."""

    base: ChunkInstance                       # unconstrained
    constrained: ChunkInstance
    sample_chunk: Callable[[], np.ndarray]    # one online chunk q [C, E] per call
    chunk_description: str
    source: SyntheticRouterSource | None = None   # synthetic only: for the sampling floor
    run_bias: np.ndarray | None = None            # --run only: the router's learned bias
    run_bias_problem: str | None = None           # which problem run_bias solved


def synthetic_instances(args: argparse.Namespace) -> Setup:
    from analysis.convexity.chunk_problem import ChunkInstance, derived_constraints, synthetic_setup

    source, costs, lam = synthetic_setup(args.seed, experts=args.experts)
    base = ChunkInstance(source.sample(np.random.default_rng(args.seed + 1), args.tokens), costs, lam)
    chunk_rng = np.random.default_rng(args.seed + 2)
    return Setup(base, with_constraints(base, *derived_constraints(base)),
                 lambda: source.sample(chunk_rng, args.chunk_tokens), "fresh chunks from the synthetic source", source)


def load_run_instance(run_dir: Path) -> tuple["ChunkInstance", np.ndarray | None]:
    """Read DIR/convexity_instance.npz → (instance with the run's caps/budget, bias_online or None)."""
    from analysis.convexity.chunk_problem import ChunkInstance

    path = run_dir / INSTANCE_FILE
    if not path.is_file():
        raise ValueError(f"{path} not found; a run directory must hold {INSTANCE_FILE} with q, c, lam "
                         "(`nectar run` writes it when the nectar policy ran)")
    try:
        with np.load(path, allow_pickle=False) as data:
            missing = {"q", "c", "lam"} - set(data.files)
            if missing:
                raise ValueError(f"{path} lacks {sorted(missing)} (needs q [T, E], c [E], lam)")
            caps = data["caps"] if "caps" in data.files else None
            budget = float(data["budget"]) if "budget" in data.files else None
            bias = data["bias_online"] if "bias_online" in data.files else None
            instance = ChunkInstance(data["q"], data["c"], float(data["lam"]), caps, budget)
    except (OSError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as exc:  # truncated / not a zip / wrong dtype
        raise ValueError(f"{path} cannot be read: {exc}") from None
    return instance, bias


def run_instances(args: argparse.Namespace) -> Setup:
    from analysis.convexity.chunk_problem import derived_constraints

    instance, bias = load_run_instance(args.run)
    base = with_constraints(instance, None, None)
    has_constraints = instance.caps is not None or instance.budget is not None
    constrained = instance if has_constraints else with_constraints(base, *derived_constraints(base))
    chunk_rng = np.random.default_rng(args.seed)
    sample = lambda: instance.q[chunk_rng.integers(0, instance.tokens, size=args.chunk_tokens)]  # noqa: E731
    problem = "constrained" if has_constraints else "unconstrained"
    return Setup(base, constrained, sample, "chunks resampled from the instance's tokens",
                 run_bias=bias, run_bias_problem=problem if bias is not None else None)


def with_constraints(instance: "ChunkInstance", caps, budget) -> "ChunkInstance":
    from analysis.convexity.chunk_problem import ChunkInstance

    return ChunkInstance(instance.q, instance.c, instance.lam, caps, budget)


def run_online(instance: "ChunkInstance", sample_chunk: Callable[[], np.ndarray], args: argparse.Namespace) -> np.ndarray:
    """The BiasOptimizer (default settings, --mode) after args.chunks chunks; returns its bias [E]."""
    from nectar.control.bias_optimizer import BiasOptimizer, BiasOptimizerConfig

    caps = None if instance.caps is None else instance.caps.tolist()
    config = BiasOptimizerConfig(lam=instance.lam, caps=caps, budget=instance.budget, mode=args.mode)
    optimizer = BiasOptimizer(instance.experts, config)
    for _ in range(args.chunks):
        optimizer.step(sample_chunk(), instance.c)
    return optimizer.bias.numpy()


def verify(instance: "ChunkInstance", bias_online: np.ndarray, online_source: str, goal: float):
    """Solve with cvxpy; compare with the online bias and, unconstrained, the closed form → (report, result)."""
    from analysis.convexity.chunk_problem import (closed_form_reference, compare_bias, compare_distribution,
                                                  solve_chunk_problem, topk_gap)
    from nectar.control.bias_optimizer import routing_distribution

    result = solve_chunk_problem(instance.q, instance.c, instance.lam, instance.caps, instance.budget)
    kkt_bias = result.kkt_bias(instance.c, instance.lam)
    online = compare_bias(instance, bias_online, result.p, kkt_bias)
    kkt_p = routing_distribution(instance.q, kkt_bias).numpy()  # [T, E]
    report = {
        "is_dcp": result.is_dcp, "status": result.status, "solver": result.solver,
        "solve_time_s": result.solve_time_s, "cvxpy_objective": result.objective,
        "cvxpy_solver_objective": result.solver_objective,
        "online_objective": online.online_objective, "relative_gap": online.relative_gap,
        "goal": goal, "meets_goal": online.relative_gap <= goal, "online_source": online_source,
        "online_max_abs_dp": online.max_abs_dp, "online_bias_max_abs_diff": online.bias_max_abs_diff,
        "online_max_cap_violation": online.max_cap_violation, "online_budget_violation": online.budget_violation,
        "kkt_p_max_abs_diff": float(np.abs(kkt_p - result.p).max()),
        "caps": None if instance.caps is None else instance.caps.tolist(), "budget": instance.budget,
        "mu": result.mu.tolist(), "nu": result.nu,
        "bias_online": np.asarray(bias_online).tolist(), "bias_kkt": kkt_bias.tolist(),
    }
    report["topk"] = [topk_gap(instance.q, bias_online, instance.c, k).to_dict() for k in (1, 2)]
    if instance.caps is None and instance.budget is None:
        p_closed, _ = closed_form_reference(instance)
        closed = compare_distribution(instance, result.p, p_closed)
        report.update(closed_form_objective=closed.reference_objective, cvxpy_vs_closed_form_gap=closed.relative_gap,
                      cvxpy_vs_closed_form_max_abs_dp=closed.max_abs_dp)
    return report, result


def online_bias(setup: Setup, problem: str, instance: "ChunkInstance", sample_chunk, args) -> tuple[np.ndarray, str]:
    """The run's own bias where it solved this problem, else a fresh BiasOptimizer run."""
    if setup.run_bias is not None and setup.run_bias_problem == problem:
        return np.asarray(setup.run_bias, dtype=float), "run (bias_online)"
    label = f"BiasOptimizer({args.mode}) after {args.chunks} chunks"
    return run_online(instance, sample_chunk, args), label


def unconstrained_section(setup: Setup, args: argparse.Namespace):
    bias, label = online_bias(setup, "unconstrained", setup.base, setup.sample_chunk, args)
    if not label.startswith("run"):
        label += f", {setup.chunk_description} ({args.chunk_tokens} tokens)"
    return verify(setup.base, bias, label, args.goal)


def constrained_section(setup: Setup, args: argparse.Namespace) -> dict:
    instance = setup.constrained
    stationary = lambda: instance.q  # noqa: E731  the same chunk every time
    bias, label = online_bias(setup, "constrained", instance, stationary, args)
    if not label.startswith("run"):
        label += ", stationary chunks (the instance itself)"
    report, result = verify(instance, bias, label, args.goal)
    from analysis.convexity.chunk_problem import compare_bias

    sampled_bias = run_online(instance, setup.sample_chunk, args)
    sampled = compare_bias(instance, sampled_bias, result.p, result.kkt_bias(instance.c, instance.lam))
    report["sampled_chunks"] = {
        "online_source": f"BiasOptimizer({args.mode}) after {args.chunks} {setup.chunk_description} ({args.chunk_tokens} tokens)",
        "relative_gap": sampled.relative_gap, "max_cap_violation": sampled.max_cap_violation,
        "budget_violation": sampled.budget_violation, "sampling_floor_gap": sampling_floor(setup, instance, result, args),
    }
    return report


def sampling_floor(setup: Setup, instance: "ChunkInstance", result, args) -> float | None:
    """Gap to the instance optimum of the optimum on 4·T fresh tokens (a population proxy):
    what a perfect learner of the source's optimum gets on this instance. None for run instances."""
    from analysis.convexity.chunk_problem import compare_bias, solve_chunk_problem

    if setup.source is None:
        return None
    fresh = setup.source.sample(np.random.default_rng(args.seed + 3), FLOOR_SAMPLE_FACTOR * instance.tokens)
    population = solve_chunk_problem(fresh, instance.c, instance.lam, instance.caps, instance.budget)
    population_bias = population.kkt_bias(instance.c, instance.lam)
    return compare_bias(instance, population_bias, result.p, result.kkt_bias(instance.c, instance.lam)).relative_gap


def energy_section(args: argparse.Namespace, trace_rows=None) -> dict:
    """Energy assumptions on the simulator and, with --trace or --run, on the measured data."""
    from analysis.convexity import energy_assumptions as ea

    try:
        section = {"simulated": ea.check_simulated(preset=args.sim_preset, seed=args.seed)}
    except (RuntimeError, TypeError, ValueError, AttributeError) as exc:
        section = {"simulated": {"available": False, "reason": f"simulator failed: {exc!r}"}}
    if trace_rows is not None:
        section["measured"] = trace_assumptions(args.trace, trace_rows)
    elif args.run is not None:
        section["measured"] = measured_assumptions(args.run / TRACE_FILE)
    return section


def measured_assumptions(path: Path) -> dict:
    from analysis.convexity import energy_assumptions as ea

    if not path.is_file():
        return {"available": False, "reason": f"{path} not found"}
    with np.load(path) as data:
        duration = data["duration_s"] if "duration_s" in data.files else None
        return ea.check_trace(data["loads"], data["energy_J"], duration)


def trace_assumptions(path: Path, rows) -> dict:
    """The energy assumptions on a trace's chunk windows; a trace too small to judge is a finding."""
    from analysis.convexity import energy_assumptions as ea

    try:
        arrays = ea.trace_arrays(rows)
        report = ea.check_trace(arrays.loads, arrays.energy_J, arrays.duration_s)
    except ValueError as exc:
        return {"available": False, "reason": f"{path}: {exc}"}
    return {**report, "trace": str(path), "rows_skipped": arrays.skipped}


def _progress(args: argparse.Namespace, message: str) -> None:
    if not args.no_progress:
        print(f"verify-convexity: {message}", file=sys.stderr, flush=True)


def verdict(report: dict, goal: float) -> tuple[bool, str]:
    """(passed, one line saying why) for the two main comparisons: both chunk problems DCP and the
    online router's objective within `goal` of cvxpy's optimum."""
    gaps = ", ".join(f"{report[name]['relative_gap']:.2e} {name}" for name in ("unconstrained", "constrained"))
    failed = []
    for name in ("unconstrained", "constrained"):
        s = report[name]
        if not s["is_dcp"]:
            failed.append(f"{name} problem not DCP")
        if not s["meets_goal"]:
            failed.append(f"{name} gap {s['relative_gap']:.2e} above the goal")
    if not failed:
        return True, (f"verdict: PASS — both chunk problems are DCP and the online router is within the goal of "
                      f"cvxpy's optimum (relative gap {gaps}; goal ≤ {goal:.0e})")
    return False, f"verdict: FAIL — {'; '.join(failed)} (relative gap {gaps}; goal ≤ {goal:.0e})"


def energy_note(section: dict | None) -> str | None:
    """Why the energy-assumption findings, violations included, do not enter the verdict (None when
    they were not checked): they test the energy model the convex problem assumes, not the solver
    or the online router, and the simulator's violations are where that model is known to fail."""
    if not section:
        return None
    parts = []
    sim = section.get("simulated", {})
    if sim.get("available"):
        dense_fit, dense_mid = sim["affine"], sim["midpoint"]
        sparse_fit, sparse_mid = sim["affine_on_sparse"], sim["midpoint_dense_sparse"]
        active = sim["affine_with_active_indicator"]
        busy = (f"with every expert busy the affine model ({dense_fit['failing_chunks']}/{dense_fit['chunks']} chunks "
                f"beyond {dense_fit['rel_tol']:.0e}) and midpoint convexity ({dense_mid['violations']}/"
                f"{dense_mid['triples']} violations) {'hold' if dense_fit['passes'] and dense_mid['passes'] else 'do NOT hold'}")
        idle = (f"the {sparse_mid['violations']}/{sparse_mid['triples']} dense–sparse violations and "
                f"{sparse_fit['failing_chunks']}/{sparse_fit['chunks']} sparse chunks off the fit are where the affine "
                "model is known to fail: an idle expert skips its kernel launches and weight reads, a fixed cost "
                "at zero load, so switching an expert off is a discrete decision outside the convex problem "
                f"(docs/convexity.md §5); a per-expert 'active' indicator "
                f"{'restores' if active['passes'] else 'does NOT restore'} the fit ({active['failing_chunks']}/"
                f"{active['chunks']} beyond {active['rel_tol']:.0e})")
        parts.append(f"simulator: {busy}; {idle}")
    measured = section.get("measured", {})
    if measured.get("available"):
        parts.append(f"measured: {measured['affine']['failing_chunks']}/{measured['affine']['chunks']} chunks off the "
                     f"affine fit, {measured['midpoint']['violations']}/{measured['midpoint']['triples']} midpoint "
                     "violations (findings on the data, reported as they are)")
    if not parts:
        return None
    return ("energy assumptions are findings, not part of the verdict (they test the energy model the convex "
            "problem assumes, not the solver or the online router): " + "; ".join(parts) + ".")


@cli_errors("verify-convexity")
def main(argv: list[str] | None = None) -> int:
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    trace_rows = check_inputs(args)
    _progress(args, "loading cvxpy and the instance")
    setup = run_instances(args) if args.run is not None else synthetic_instances(args)
    _progress(args, f"unconstrained problem: cvxpy and {args.chunks} online chunks")
    unconstrained, result = unconstrained_section(setup, args)
    _progress(args, "constrained problem (caps and budget)")
    constrained = constrained_section(setup, args)
    report = {key: unconstrained[key] for key in ("is_dcp", "cvxpy_objective", "online_objective", "relative_gap")}
    report["instance"] = {"source": str(args.run) if args.run else "synthetic", "seed": args.seed,
                          "tokens": setup.base.tokens, "experts": setup.base.experts,
                          "lam": setup.base.lam, "c": setup.base.c.tolist()}
    report.update(unconstrained=unconstrained, constrained=constrained)
    if not args.no_energy:
        _progress(args, "energy assumptions (simulator" + (", measured trace)" if trace_rows or args.run else ")"))
        report["energy_assumptions"] = energy_section(args, trace_rows)
    if args.export is not None:
        export(args.export, setup.base, np.asarray(unconstrained["bias_online"]), result.p)
    ok, line = verdict(report, args.goal)
    report["verdict"] = line
    note = energy_note(report.get("energy_assumptions"))
    if note is not None:
        report["energy_note"] = note
    if args.json:
        print(strict_json(report, indent=2))
        print(line, file=sys.stderr)
    else:
        print(format_text(report))
        if note is not None:
            print(wrap_note(note))
        print(line)
    return 0 if ok else 1


def export(path: Path, instance: "ChunkInstance", bias_online: np.ndarray, p_cvxpy: np.ndarray) -> None:
    """q [T, E], c [E], lam, p_online [T, E] (and bias_online [E], p_cvxpy [T, E]) of the unconstrained
    instance, written atomically."""
    from nectar.control.bias_optimizer import routing_distribution
    from nectar.experiment.outputs import atomic_write

    p_online = routing_distribution(instance.q, bias_online).numpy()
    atomic_write(path, lambda tmp: np.savez_compressed(tmp, q=instance.q, c=instance.c, lam=instance.lam,
                                                       p_online=p_online, bias_online=bias_online, p_cvxpy=p_cvxpy))


def _fmt(value) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2e}"


def format_text(report: dict) -> str:
    inst = report["instance"]
    lines = [f"chunk problem: {inst['source']} (seed {inst['seed']}), T={inst['tokens']}, E={inst['experts']}, λ={inst['lam']:.3g}"]
    for name in ("unconstrained", "constrained"):
        lines += _format_problem(name, report[name])
    for where, section in report.get("energy_assumptions", {}).items():
        lines += _format_energy(where, section)
    return "\n".join(lines)


def _format_problem(name: str, s: dict) -> list[str]:
    lines = [
        f"[{name}] is_dcp={s['is_dcp']} {s['solver']} {s['status']} in {s['solve_time_s']:.2f}s",
        f"  cvxpy objective {s['cvxpy_objective']:.9g}   online objective {s['online_objective']:.9g}",
        f"  relative gap {s['relative_gap']:.2e} (goal ≤ {s['goal']:.0e}: {'met' if s['meets_goal'] else 'MISSED'}),"
        f" max |Δp| {s['online_max_abs_dp']:.2e}, max |Δbias| {s['online_bias_max_abs_diff']:.2e}",
        f"  online: {s['online_source']}",
        f"  KKT bias from cvxpy duals reproduces cvxpy p to {s['kkt_p_max_abs_diff']:.2e}; ν={s['nu']:.4g}, max μ={max(s['mu']):.3g}",
    ]
    if "cvxpy_vs_closed_form_gap" in s:
        lines.append(f"  cvxpy vs closed form: gap {s['cvxpy_vs_closed_form_gap']:.2e}, max |Δp| {s['cvxpy_vs_closed_form_max_abs_dp']:.2e}")
    for gap in s["topk"]:
        lines.append(f"  top-{gap['k']} selection vs soft routing: max load gap {gap['max_abs_load_gap']:.3f},"
                     f" cost per token {gap['realised_cost']:.4g} realised vs {gap['expected_cost']:.4g} expected")
    if "sampled_chunks" in s:
        sc = s["sampled_chunks"]
        lines.append(f"  sampled chunks: gap {sc['relative_gap']:.2e} (sampling floor {_fmt(sc['sampling_floor_gap'])}),"
                     f" cap violation {sc['max_cap_violation']:.2e}, budget violation {sc['budget_violation']:.2e}")
    return lines


ENERGY_LABELS = {
    "affine": "affine fit", "affine_on_sparse": "affine fit judged on sparse loads (idle experts)",
    "affine_with_active_indicator": "affine + per-expert 'active' indicator, all loads",
    "midpoint": "midpoint convexity", "midpoint_dense_sparse": "midpoint convexity, dense–sparse pairs",
}


def _format_energy(where: str, section: dict) -> list[str]:
    if not section.get("available"):
        return [f"[energy/{where}] skipped: {section['reason']}"]
    lines = []
    for key, label in ENERGY_LABELS.items():
        if key not in section:
            continue
        s = section[key]
        if key.startswith("affine"):
            lines.append(f"[energy/{where}] {label}: rel RMSE {s['rel_rmse']:.2e}, max {s['max_rel_residual']:.2e},"
                         f" {s['failing_chunks']}/{s['chunks']} chunks beyond {s['rel_tol']:.0e}")
        else:
            lines.append(f"[energy/{where}] {label}: {s['violations']}/{s['triples']} violations,"
                         f" max excess {_fmt(s['max_excess'])} (tol {s['rel_tol']:.0e})")
    return lines


if __name__ == "__main__":
    raise SystemExit(main())
