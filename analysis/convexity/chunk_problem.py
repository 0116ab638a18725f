"""The chunk routing problem of docs/design.md §3 in cvxpy: build, certify (DCP), solve, compare.

    minimise_p   Σ_t Σ_i c_i p_ti + λ Σ_t KL(p_t ‖ q_t)
    subject to   p_t ∈ simplex,  (1/T) Σ_t p_ti ≤ u_i,  (1/T) Σ_t Σ_i c_i p_ti ≤ B

Caps u and budget B are per-token quantities (fraction of the chunk's tokens; mean cost per
token), the same convention as `nectar.control.bias_optimizer`. Internally the problem is solved in
normalised units (objective divided by T·λ, costs by λ) so the solver sees O(1) numbers; the
reported objective is the sum form above, and the multipliers μ [E], ν are in the units of the
KKT bias b_i = −(c_i + μ_i + ν c_i)/λ.

The comparison helpers measure how far an online bias (the router's learned bias) is from the
cvxpy optimum: objective gap, distance between distributions, bias difference, constraint
violation.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import cvxpy as cp
import numpy as np

from nectar.control.bias_optimizer import (
    closed_form_p,
    kkt_bias,
    objective_of_p,
    routing_distribution,
    validate_c,
    validate_q,
)

SOLVER_PREFERENCE = ("CLARABEL", "ECOS", "SCS")
# Interior-point runs on thousands of exponential cones sometimes stall ("insufficient progress")
# at the default step; a shorter maximum step fixes every case seen so far. Tried in order.
SOLVER_ATTEMPTS = {
    "CLARABEL": ({}, {"max_step_fraction": 0.9}, {"max_step_fraction": 0.8}),
    "SCS": ({"eps_abs": 1e-9, "eps_rel": 1e-9, "max_iters": 200_000},),
}


@dataclass
class ChunkInstance:
    """One chunk problem's data: q [T, E], c [E], λ, optional caps [E] and budget."""

    q: np.ndarray
    c: np.ndarray
    lam: float
    caps: np.ndarray | None = None
    budget: float | None = None

    def __post_init__(self) -> None:
        self.q = validate_q(self.q).numpy()
        self.c = validate_c(self.c, self.q.shape[1]).numpy()
        self.lam = float(self.lam)
        if self.caps is not None:
            self.caps = validate_c(self.caps, self.q.shape[1]).numpy()

    @property
    def tokens(self) -> int:
        return self.q.shape[0]

    @property
    def experts(self) -> int:
        return self.q.shape[1]


@dataclass
class SyntheticRouterSource:
    """A stationary stream of static router distributions: q_t = softmax(offset + scale·z_t), z ~ N(0, I).

    The per-expert offsets make some experts popular, as a trained router's are.
    """

    expert_offsets: np.ndarray  # [E]
    logit_scale: float = 1.5

    def sample(self, rng: np.random.Generator, tokens: int) -> np.ndarray:
        noise = rng.standard_normal((tokens, len(self.expert_offsets)))  # [T, E]
        logits = self.expert_offsets[None, :] + self.logit_scale * noise  # [T, E]
        logits -= logits.max(axis=1, keepdims=True)
        q = np.exp(logits)  # [T, E]
        return q / q.sum(axis=1, keepdims=True)


def synthetic_setup(seed: int, experts: int = 8, cost_scale: float = 1e-4, lam_ratio: float = 0.5):
    """Seeded source, per-token expert costs c [E] (positive, in J) and λ = lam_ratio·cost_scale."""
    if experts < 2:
        raise ValueError(f"need at least 2 experts for a routing problem, got {experts}")
    rng = np.random.default_rng(seed)
    source = SyntheticRouterSource(expert_offsets=rng.normal(0.0, 0.7, size=experts))
    costs = cost_scale * rng.uniform(0.5, 1.5, size=experts)  # [E]
    return source, costs, lam_ratio * cost_scale


@dataclass
class ChunkProblem:
    """The cvxpy problem plus handles to its variable and constraints (None when absent)."""

    problem: cp.Problem
    p: cp.Variable
    cap_constraint: cp.Constraint | None
    budget_constraint: cp.Constraint | None
    objective_scale: float  # sum-form objective = problem.value * objective_scale
    dual_scale: float       # μ = cap_constraint.dual_value * dual_scale


def _validate_constraints(instance: ChunkInstance) -> None:
    if instance.caps is not None:
        if (instance.caps <= 0).any() or (instance.caps > 1).any():
            raise ValueError(f"caps are fractions of the chunk's tokens in (0, 1], got {instance.caps}")
        if instance.caps.sum() < 1:
            raise ValueError(f"caps sum to {instance.caps.sum():.3f} < 1: infeasible")
    if instance.budget is not None and instance.budget < instance.c.min():
        raise ValueError(f"budget {instance.budget} is below the cheapest expert's cost {instance.c.min()}: infeasible")


def build_chunk_problem(q, c, lam: float, caps=None, budget: float | None = None) -> ChunkProblem:
    """Build the chunk problem with `cp.rel_entr` (KL) in normalised units; see the module docstring."""
    inst = ChunkInstance(q, c, lam, caps, budget)
    if inst.lam <= 0:
        raise ValueError(f"lam must be > 0, got {inst.lam}")
    support = inst.q > 0                                      # [T, E] experts a token may take
    if (inst.q < 0).any() or not support.any(axis=1).all():
        raise ValueError("q must be >= 0 with at least one positive entry per token (a restricted softmax)")
    _validate_constraints(inst)
    tokens, experts = inst.q.shape
    cost = inst.c / inst.lam  # [E] in units of λ
    p = cp.Variable((tokens, experts), name="p")
    q_on_support = np.where(support, inst.q, 1.0)             # KL over the support: p = 0 off it
    objective = (cp.sum(p @ cost) + cp.sum(cp.rel_entr(p, q_on_support))) / tokens
    constraints = [cp.sum(p, axis=1) == 1]
    if not support.all():
        constraints.append(cp.multiply(p, (~support).astype(float)) == 0)
    cap_constraint = budget_constraint = None
    if inst.caps is not None:
        cap_constraint = cp.sum(p, axis=0) / tokens <= inst.caps
        constraints.append(cap_constraint)
    if inst.budget is not None:
        budget_constraint = cp.sum(p @ cost) / tokens <= inst.budget / inst.lam
        constraints.append(budget_constraint)
    problem = cp.Problem(cp.Minimize(objective), constraints)
    return ChunkProblem(problem, p, cap_constraint, budget_constraint, tokens * inst.lam, inst.lam)


@dataclass
class ConvexityResult:
    """cvxpy's verdict on one chunk problem. objective is in sum form; μ, ν as in the KKT bias."""

    is_dcp: bool
    status: str
    solver: str
    objective: float          # the objective evaluated at p (the same function the online side uses)
    solver_objective: float   # the solver's own optimal value, rescaled to the sum form
    p: np.ndarray       # [T, E] solver's p, round-off clipped and rows renormalised
    mu: np.ndarray      # [E] zeros without caps
    nu: float           # 0 without a budget
    solve_time_s: float

    def kkt_bias(self, c, lam: float) -> np.ndarray:
        """b_i = −(c_i + μ_i + ν c_i)/λ from the solver's duals, mean-centred, [E]."""
        return kkt_bias(c, lam, self.mu, self.nu).numpy()


def pick_solver() -> str:
    """The first installed solver of CLARABEL, ECOS, SCS (all handle the exponential cone)."""
    installed = set(cp.installed_solvers())
    for name in SOLVER_PREFERENCE:
        if name in installed:
            return name
    raise RuntimeError(f"no exponential-cone solver installed (want one of {SOLVER_PREFERENCE}); have {sorted(installed)}")


def solve_chunk_problem(q, c, lam: float, caps=None, budget: float | None = None, solver: str | None = None) -> ConvexityResult:
    """Build, check `is_dcp()`, solve (settings ladder of SOLVER_ATTEMPTS), return the optimum and multipliers."""
    solver = solver or pick_solver()
    start, failures = time.perf_counter(), []
    for settings in SOLVER_ATTEMPTS.get(solver, ({},)):
        built = build_chunk_problem(q, c, lam, caps, budget)  # fresh: a re-solve may keep old settings
        if not built.problem.is_dcp():
            raise RuntimeError("the chunk problem is not DCP; the formulation is broken")
        label = solver + "".join(f" {k}={v}" for k, v in settings.items())
        try:
            built.problem.solve(solver=solver, **settings)
        except cp.error.SolverError as exc:
            failures.append(f"{label}: {exc}")
            continue
        if built.problem.status in (cp.INFEASIBLE, cp.INFEASIBLE_INACCURATE):
            raise ValueError("the chunk problem is infeasible: caps and budget cannot be met together")
        if built.problem.status == cp.OPTIMAL:
            return _result(built, label, time.perf_counter() - start, q, c, lam)
        failures.append(f"{label}: status {built.problem.status}")
    raise RuntimeError("no solver attempt reached an optimal status: " + "; ".join(failures))


def _result(built: ChunkProblem, label: str, elapsed: float, q, c, lam: float) -> ConvexityResult:
    experts = np.asarray(c).shape[0]
    mu = np.zeros(experts) if built.cap_constraint is None else np.maximum(built.cap_constraint.dual_value, 0.0) * built.dual_scale
    nu = 0.0 if built.budget_constraint is None else max(float(built.budget_constraint.dual_value), 0.0)
    p = _project_rows(np.asarray(built.p.value))
    return ConvexityResult(True, built.problem.status, label, objective_of_p(q, c, lam, p),
                           float(built.problem.value) * built.objective_scale, p, mu, nu, elapsed)


def _project_rows(p: np.ndarray) -> np.ndarray:
    """Clip solver round-off (tiny negatives) and renormalise rows, [T, E]."""
    p = np.clip(p, 0.0, None)
    return p / p.sum(axis=1, keepdims=True)


def relative_gap(value: float, optimum: float) -> float:
    """|value − optimum| / max(|optimum|, 1e-300)."""
    return abs(value - optimum) / max(abs(optimum), 1e-300)


@dataclass
class OnlineComparison:
    """How close p = softmax(log q + b) is to a reference optimum p* (cvxpy or closed form)."""

    online_objective: float
    reference_objective: float
    relative_gap: float
    max_abs_dp: float            # max_t,i |p_ti − p*_ti|
    bias_max_abs_diff: float     # max_i |b_i − b*_i| after mean-centring both
    max_cap_violation: float     # max_i (load_i − u_i)+, 0 without caps
    budget_violation: float      # (mean cost − B)+, 0 without a budget

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def compare_distribution(instance: ChunkInstance, p, reference_p) -> OnlineComparison:
    """Compare a routing distribution p [T, E] with a reference optimum p* [T, E] (no bias involved)."""
    p = np.asarray(p, dtype=float)
    online_obj = objective_of_p(instance.q, instance.c, instance.lam, p)
    reference_obj = objective_of_p(instance.q, instance.c, instance.lam, reference_p)
    load = p.mean(axis=0)  # [E]
    cap_violation = 0.0 if instance.caps is None else max(float((load - instance.caps).max()), 0.0)
    mean_cost = float((p @ instance.c).mean())
    budget_violation = 0.0 if instance.budget is None else max(mean_cost - instance.budget, 0.0)
    return OnlineComparison(online_obj, reference_obj, relative_gap(online_obj, reference_obj),
                            float(np.abs(p - reference_p).max()), float("nan"), cap_violation, budget_violation)


def compare_bias(instance: ChunkInstance, bias, reference_p, reference_bias) -> OnlineComparison:
    """Compare the online bias b [E] (p = softmax(log q + b)) with a reference optimum (p* [T, E], b* [E])."""
    p = routing_distribution(instance.q, bias).numpy()  # [T, E]
    result = compare_distribution(instance, p, reference_p)
    centred = np.asarray(bias, dtype=float) - np.mean(bias)
    reference = np.asarray(reference_bias, dtype=float) - np.mean(reference_bias)
    result.bias_max_abs_diff = float(np.abs(centred - reference).max())
    return result


def closed_form_reference(instance: ChunkInstance) -> tuple[np.ndarray, np.ndarray]:
    """Unconstrained optimum (p* [T, E], b* [E]) in closed form."""
    p = closed_form_p(instance.q, instance.c, instance.lam).numpy()
    return p, kkt_bias(instance.c, instance.lam).numpy()


def derived_constraints(instance: ChunkInstance) -> tuple[np.ndarray, float]:
    """Caps and budget that both bind at the optimum: the cheapest expert (where an energy budget
    pushes load) capped at 80% of its unconstrained optimal load above what tokens with no other
    candidate must give it, and a budget halfway between the cheapest mean cost the caps allow (on
    q's support) and the unconstrained optimum's mean cost."""
    p_star, _ = closed_form_reference(instance)
    cheapest = int(np.argmin(instance.c))
    support = instance.q > 0                                                   # [T, E]
    forced = float((support.sum(axis=1) == 1)[support[:, cheapest]].sum()) / instance.tokens
    caps = np.ones(instance.experts)
    caps[cheapest] = forced + 0.8 * (float(p_star[:, cheapest].mean()) - forced)
    unconstrained_cost = float((p_star @ instance.c).mean())
    floor = cheapest_mean_cost(instance.c, caps) if support.all() else cheapest_feasible_cost(instance.q, instance.c, caps)
    return caps, 0.5 * (floor + unconstrained_cost)


def cheapest_feasible_cost(q: np.ndarray, c: np.ndarray, caps: np.ndarray) -> float:
    """min (1/T) Σ_t Σ_i c_i p_ti over p ≥ 0 on q's support with rows summing to 1 and mean loads
    ≤ caps: a linear program (scipy's HiGHS); ValueError when the caps cannot be met."""
    from scipy.optimize import linprog
    from scipy.sparse import eye, kron

    tokens, experts = q.shape
    rows = kron(eye(tokens), np.ones((1, experts)))                           # Σ_i p_ti = 1
    loads = kron(np.ones((1, tokens)), eye(experts)) / tokens                  # mean load per expert
    bounds = [(0.0, 1.0 if on else 0.0) for on in (q > 0).ravel()]
    result = linprog(np.tile(c, tokens) / tokens, A_ub=loads, b_ub=caps, A_eq=rows, b_eq=np.ones(tokens),
                     bounds=bounds, method="highs")
    if result.status != 0:
        raise ValueError(f"caps {caps} cannot be met on this instance's support: {result.message}")
    return float(result.fun)


def cheapest_mean_cost(c: np.ndarray, caps: np.ndarray) -> float:
    """min Σ_i c_i L_i over mean loads with Σ L_i = 1, 0 ≤ L_i ≤ caps_i (fill the cheapest first)."""
    remaining, cost = 1.0, 0.0
    for i in np.argsort(c):
        take = min(float(caps[i]), remaining)
        cost, remaining = cost + take * float(c[i]), remaining - take
    return cost


@dataclass
class TopKGap:
    """Soft routing (the convex problem's variable) vs the discrete top-k selection it drives."""

    k: int
    expected_load: np.ndarray   # [E] (1/T) Σ_t p_ti with p = softmax(log q + b)
    realised_load: np.ndarray   # [E] share of the chunk's k·T slots each expert computes
    max_abs_load_gap: float
    expected_cost: float        # per-token Σ_i c_i expected_load_i
    realised_cost: float        # per-token Σ_i c_i realised_load_i

    def to_dict(self) -> dict:
        return {"k": self.k, "expected_load": self.expected_load.tolist(), "realised_load": self.realised_load.tolist(),
                "max_abs_load_gap": self.max_abs_load_gap, "expected_cost": self.expected_cost,
                "realised_cost": self.realised_cost}


def topk_gap(q, bias, c, k: int = 1) -> TopKGap:
    """Select each token's k highest biased scores log q + b (the router's selection bias) and
    compare the realised expert loads with the soft distribution's expected loads."""
    p = routing_distribution(q, bias).numpy()  # [T, E]
    tokens, experts = p.shape
    if not 1 <= k <= experts:
        raise ValueError(f"k must be in [1, {experts}], got {k}")
    chosen = np.argsort(-np.log(p), axis=1, kind="stable")[:, :k]  # [T, k]; same order as log q + b
    realised = np.bincount(chosen.reshape(-1), minlength=experts) / (k * tokens)  # [E]
    expected = p.mean(axis=0)  # [E]
    cost = np.asarray(c, dtype=float)
    return TopKGap(k, expected, realised, float(np.abs(realised - expected).max()),
                   float(cost @ expected), float(cost @ realised))
