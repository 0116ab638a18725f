"""Check the "mild energy-model assumptions" of docs/design.md §3 on data instead of assuming them.

1. Affine: chunk energy ≈ intercept + e_0·duration + Σ_f a_f·load_f (loads = tokens per expert,
   flattened over layers). `fit_affine_energy` fits it by least squares and reports residuals,
   and which chunks miss by more than a relative tolerance (where the assumption fails).
2. Convex: E((x + y)/2) ≤ (E(x) + E(y))/2 along interpolations between load vectors.
   `midpoint_convexity` evaluates an energy oracle (the simulator) at x, y and the midpoint;
   `find_midpoint_triples` finds such triples inside unstructured measured traces;
   `midpoint_check` judges energies already measured at (x, midpoint, y).

Everything takes plain arrays so that simulated and measured traces go through the same code.
`simulated_energy_fn` wraps the simulator backend (reached through `nectar.plugins`, so this
module imports without `sim`) as such an oracle.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
from scipy.spatial import cKDTree

from nectar.telemetry.workload import ChunkWorkload, ExpertCost, LayerWorkload


def _as_matrix(loads, name: str = "loads") -> np.ndarray:
    arr = np.asarray(loads, dtype=float)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2 or arr.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [N, F] array, got shape {np.shape(loads)}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


def _as_vector(values, n: int, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=float).reshape(-1)
    if arr.shape[0] != n:
        raise ValueError(f"{name} has {arr.shape[0]} entries, expected {n} (one per chunk)")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return arr


@dataclass
class Residuals:
    """An energy model's predictions judged against measured chunk energies."""

    measured: np.ndarray   # [N] J
    predicted: np.ndarray  # [N] J
    rel_tol: float

    @property
    def relative(self) -> np.ndarray:
        """[N] (measured − predicted) / measured."""
        return (self.measured - self.predicted) / self.measured

    @property
    def rel_rmse(self) -> float:
        return float(np.sqrt((self.relative**2).mean()))

    @property
    def max_rel(self) -> float:
        return float(np.abs(self.relative).max())

    @property
    def failing(self) -> list[int]:
        """Chunks whose |relative residual| exceeds rel_tol: where the model fails."""
        return [int(i) for i in np.flatnonzero(np.abs(self.relative) > self.rel_tol)]

    @property
    def passes(self) -> bool:
        return not self.failing

    def summary(self) -> dict:
        return {"chunks": int(self.measured.size), "rel_rmse": self.rel_rmse, "max_rel_residual": self.max_rel,
                "rel_tol": self.rel_tol, "failing_chunks": len(self.failing), "passes": self.passes}


def _positive_energies(energy_J, n: int) -> np.ndarray:
    y = _as_vector(energy_J, n, "energy_J")
    if (y <= 0).any():
        raise ValueError("energy_J must be > 0 for every chunk (relative residuals divide by it)")
    return y


def _design(loads, duration_s, intercept: bool) -> np.ndarray:
    """[N, F (+1 duration) (+1 intercept)] regression matrix."""
    X = _as_matrix(loads)
    columns = [X]
    if duration_s is not None:
        columns.append(_as_vector(duration_s, X.shape[0], "duration_s")[:, None])
    if intercept:
        columns.append(np.ones((X.shape[0], 1)))
    return np.hstack(columns)


@dataclass
class AffineFit:
    """Least-squares affine model energy ≈ intercept + Σ a_f load_f (+ e_0·duration)."""

    theta: np.ndarray     # [F (+1 duration) (+1 intercept)] J per token, J/s, J
    intercept: bool
    uses_duration: bool
    rank: int             # rank of the design (loads with a fixed total are collinear with the intercept)
    r2: float
    in_sample: Residuals

    @property
    def passes(self) -> bool:
        """Affine to within rel_tol on every fitted chunk."""
        return self.in_sample.passes

    @property
    def failing(self) -> list[int]:
        return self.in_sample.failing

    def predict(self, loads, duration_s=None) -> np.ndarray:
        if self.uses_duration != (duration_s is not None):
            raise ValueError("pass duration_s exactly when the fit used it")
        design = _design(loads, duration_s, self.intercept)
        if design.shape[1] != self.theta.shape[0]:
            raise ValueError(f"loads have {design.shape[1]} columns with extras; the fit has {self.theta.shape[0]}")
        return design @ self.theta

    def residuals_on(self, loads, energy_J, duration_s=None) -> Residuals:
        """Judge the fit on other chunks (e.g. held out, or a load range it was not fitted on)."""
        predicted = self.predict(loads, duration_s)
        return Residuals(_positive_energies(energy_J, predicted.shape[0]), predicted, self.in_sample.rel_tol)

    def summary(self) -> dict:
        return {**self.in_sample.summary(), "rank": self.rank, "r2": self.r2}


def fit_affine_energy(loads, energy_J, duration_s=None, intercept: bool = True, rel_tol: float = 0.02) -> AffineFit:
    """Fit energy ≈ intercept + Σ a_f load_f (+ e_0·duration) by least squares (numpy lstsq).

    loads [N, F], energy_J [N] (> 0), duration_s [N] optional. Needs N > number of parameters.
    """
    design = _design(loads, duration_s, intercept)  # [N, P]
    y = _positive_energies(energy_J, design.shape[0])
    if design.shape[0] <= design.shape[1]:
        raise ValueError(f"need more chunks ({design.shape[0]}) than parameters ({design.shape[1]}) to judge a fit")
    theta, _, rank, _ = np.linalg.lstsq(design, y, rcond=None)
    fitted = design @ theta  # [N]
    total = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float(((y - fitted) ** 2).sum()) / total if total > 0 else float("nan")
    return AffineFit(theta, intercept, duration_s is not None, int(rank), r2, Residuals(y, fitted, rel_tol))


@dataclass
class MidpointCheck:
    """Midpoint convexity judged on energies at (x, (x+y)/2, y) triples."""

    excess: np.ndarray        # [K] (E(mid) − (E(x)+E(y))/2) / ((E(x)+E(y))/2); > 0 leans concave
    rel_tol: float
    violations: list[int] = field(default_factory=list)  # triples with excess > rel_tol

    @property
    def passes(self) -> bool:
        return not self.violations

    @property
    def max_excess(self) -> float:
        return float(self.excess.max()) if self.excess.size else float("nan")

    def summary(self) -> dict:
        return {"triples": int(self.excess.size), "max_excess": self.max_excess,
                "rel_tol": self.rel_tol, "violations": len(self.violations), "passes": self.passes}


def midpoint_check(energy_a, energy_mid, energy_b, rel_tol: float = 1e-3) -> MidpointCheck:
    """Judge measured energies at x, the midpoint and y: a violation when E(mid) exceeds the chord by rel_tol."""
    e_a = np.asarray(energy_a, dtype=float).reshape(-1)
    e_mid = _as_vector(energy_mid, e_a.shape[0], "energy_mid")
    e_b = _as_vector(energy_b, e_a.shape[0], "energy_b")
    if not np.isfinite(e_a).all():
        raise ValueError("energy_a contains NaN or infinite values")
    chord = 0.5 * (e_a + e_b)  # [K]
    if (chord <= 0).any():
        raise ValueError("energies must be positive")
    excess = (e_mid - chord) / chord
    return MidpointCheck(excess, rel_tol, [int(i) for i in np.flatnonzero(excess > rel_tol)])


def midpoint_convexity(energy_fn: Callable[[np.ndarray], float], loads_a, loads_b, rel_tol: float = 1e-3) -> MidpointCheck:
    """Evaluate an energy oracle at x, (x+y)/2 and y for each pair of load vectors [K, F]."""
    a = _as_matrix(loads_a, "loads_a")
    b = _as_matrix(loads_b, "loads_b")
    if a.shape != b.shape:
        raise ValueError(f"loads_a {a.shape} and loads_b {b.shape} must have the same shape")
    mid = 0.5 * (a + b)
    energies = [[float(energy_fn(x)) for x in rows] for rows in (a, mid, b)]
    return midpoint_check(*energies, rel_tol=rel_tol)


def find_midpoint_triples(loads, match_tol: float) -> list[tuple[int, int, int]]:
    """(i, k, j) with loads[k] within match_tol (Euclidean) of (loads[i] + loads[j])/2, i < j, k ∉ {i, j}."""
    X = _as_matrix(loads)
    if match_tol <= 0:
        raise ValueError(f"match_tol must be > 0, got {match_tol}")
    tree = cKDTree(X)
    i_idx, j_idx = np.triu_indices(X.shape[0], k=1)
    mids = 0.5 * (X[i_idx] + X[j_idx])  # [pairs, F]
    triples = []
    for i, j, hits in zip(i_idx, j_idx, tree.query_ball_point(mids, r=match_tol)):
        triples.extend((int(i), int(k), int(j)) for k in hits if k != i and k != j)
    return triples


def midpoint_convexity_from_trace(loads, energy_J, match_tol: float, rel_tol: float = 0.01) -> MidpointCheck:
    """Midpoint convexity on an unstructured trace, using the triples it happens to contain."""
    X = _as_matrix(loads)
    y = _as_vector(energy_J, X.shape[0], "energy_J")
    triples = np.array(find_midpoint_triples(X, match_tol), dtype=int).reshape(-1, 3)
    return midpoint_check(y[triples[:, 0]], y[triples[:, 1]], y[triples[:, 2]], rel_tol=rel_tol)


def moe_workload(loads, template: ChunkWorkload) -> ChunkWorkload:
    """The template chunk with every MoE layer's tokens_per_expert set from loads ([E] or [L·E])."""
    flat = np.rint(np.asarray(loads, dtype=float)).astype(int).reshape(-1)
    if (flat < 0).any():
        raise ValueError("loads must be non-negative token counts")
    experts = len(template.layers[0].tokens_per_expert)
    per_layer = np.tile(flat, len(template.layers)) if flat.size == experts else flat
    if per_layer.size != experts * len(template.layers):
        raise ValueError(f"loads have {flat.size} entries; expected {experts} or {experts * len(template.layers)}")
    layers = [
        LayerWorkload(tokens_per_expert=[int(n) for n in per_layer[l * experts:(l + 1) * experts]],
                      expert_costs=list(layer.expert_costs), router_flops_per_token=layer.router_flops_per_token)
        for l, layer in enumerate(template.layers)
    ]
    return replace(template, layers=layers, policy="energy-assumption-probe")


def distilgpt2_moe_template(experts: int = 8, batch: int = 8, seq_len: int = 512, d_ff: int = 3072) -> ChunkWorkload:
    """A DistilGPT2-shaped MoE chunk (6 layers, d=768, SwiGLU experts of width d_ff, bf16), zero loads."""
    d_model, dtype_bytes = 768, 2
    cost = ExpertCost(flops=2.0 * 3 * d_model * d_ff, bytes=dtype_bytes * (2 * d_model + 3 * d_ff),
                      weight_bytes=dtype_bytes * 3 * d_model * d_ff, kind="ffn")
    layers = [LayerWorkload(tokens_per_expert=[0] * experts, expert_costs=[cost] * experts,
                            router_flops_per_token=2.0 * d_model * experts) for _ in range(6)]
    return ChunkWorkload(tokens=batch * seq_len, batch=batch, seq_len=seq_len, d_model=d_model, n_layers=6,
                         n_heads=12, vocab_size=50257, layers=layers, dtype_bytes=dtype_bytes)


def simulated_energy_fn(template: ChunkWorkload, preset: str = "h100_sxm", seed: int = 0) -> Callable[[np.ndarray], float]:
    """Energy oracle backed by the simulator: a fresh, seeded backend per call, so every load
    vector is priced from the same initial thermal state (the static energy-vs-load map).

    Returns the window's noise-free energy (`last_truth`) when the backend keeps it: one chunk is
    far shorter than the ~100 ms energy-counter period, so the sensor reading alone is mostly 0.
    """
    from nectar.plugins import make_backend

    def energy(loads: np.ndarray) -> float:
        backend = make_backend("sim", preset=preset, seed=seed)
        try:
            window = backend.run_chunk(lambda: moe_workload(loads, template))
            truth = getattr(backend, "last_truth", None)
            return float(truth.energy_J if truth is not None else window.energy_J)
        finally:
            backend.close()

    return energy


def probe_loads(rng: np.random.Generator, template: ChunkWorkload, count: int, concentration: tuple[float, float],
                top_k: tuple[float, float] = (1.0, 3.0)) -> np.ndarray:
    """Load vectors [count, E]: a total of k·tokens slots (k uniform in top_k, as top-1..3 routing
    would give) shared by Dirichlet weights whose concentration spans `concentration` (small:
    a few experts take everything and the others idle; large: balanced)."""
    experts = len(template.layers[0].tokens_per_expert)
    alphas = np.geomspace(*concentration, count)  # [count]
    shares = np.stack([rng.dirichlet(np.full(experts, a)) for a in alphas])  # [count, E]
    totals = rng.uniform(*top_k, size=count) * template.tokens  # [count]
    return np.rint(shares * totals[:, None])


def check_simulated(preset: str = "h100_sxm", seed: int = 0, count: int = 40, rel_tol: float = 0.01,
                    midpoint_tol: float = 1e-3) -> dict:
    """Both assumptions on simulator-priced DistilGPT2-MoE chunks.

    The affine model is fitted on "dense" probes (every expert busy) and then judged on "sparse"
    probes (some experts idle or nearly so), where launch overheads and skipped weight reads
    are expected to break it. A second fit on all probes adds one "expert active" indicator
    (load > 0) per expert: if that restores affinity, idle experts explain the failure.
    Midpoint convexity is tested on dense–dense and dense–sparse pairs.
    Returns {"available": False, "reason": ...} when the simulator cannot be loaded.
    """
    template = distilgpt2_moe_template()
    energy_fn = simulated_energy_fn(template, preset=preset, seed=seed)
    rng = np.random.default_rng(seed)
    dense = probe_loads(rng, template, count, concentration=(1.0, 20.0))  # [count, E]
    sparse = probe_loads(rng, template, count, concentration=(0.02, 0.3))  # [count, E]
    try:
        dense_energy = np.array([energy_fn(x) for x in dense])  # [count]
    except RuntimeError as exc:  # nectar.plugins: backend module missing
        return {"available": False, "reason": f"simulator unavailable: {exc}"}
    sparse_energy = np.array([energy_fn(x) for x in sparse])  # [count]
    fit = fit_affine_energy(dense, dense_energy, rel_tol=rel_tol)
    sparse_residuals = fit.residuals_on(sparse, sparse_energy)
    both, both_energy = np.vstack([dense, sparse]), np.concatenate([dense_energy, sparse_energy])
    with_active = fit_affine_energy(np.hstack([both, both > 0]), both_energy, rel_tol=rel_tol)
    half = count // 2
    return {
        "available": True, "preset": preset, "chunk_tokens": template.tokens,
        "mean_energy_per_token_J": float(dense_energy.mean() / template.tokens),
        "affine": fit.summary(),
        "affine_with_active_indicator": with_active.summary(),
        "affine_on_sparse": {**sparse_residuals.summary(),
                             "idle_experts_of_failing": [int((sparse[i] == 0).sum()) for i in sparse_residuals.failing],
                             "min_load_of_failing": [float(sparse[i].min()) for i in sparse_residuals.failing]},
        "midpoint": midpoint_convexity(energy_fn, dense[:half], dense[half:2 * half], rel_tol=midpoint_tol).summary(),
        "midpoint_dense_sparse": midpoint_convexity(energy_fn, dense[:half], sparse[:half], rel_tol=midpoint_tol).summary(),
    }


@dataclass
class TraceArrays:
    """Chunk windows of a NECTAR trace as arrays for the checks above."""

    loads: np.ndarray       # [N, L·E] tokens per expert, layers flattened
    energy_J: np.ndarray    # [N]
    duration_s: np.ndarray  # [N]
    skipped: int            # rows left out: not a chunk, no workload, invalid or zero-energy window


def trace_arrays(rows) -> TraceArrays:
    """Loads, energies and durations of the valid chunk windows of `nectar.telemetry.trace.read_trace(path)`.

    Zero-energy windows are left out: they are shorter than the energy counter's period and
    measured nothing (see docs/design.md §5), which no energy model should be asked to fit.
    """
    loads, energy, duration, skipped = [], [], [], 0
    for row in rows:
        usable = row.kind == "chunk" and row.workload is not None and row.window.is_valid() and row.window.energy_J > 0
        if not usable:
            skipped += 1
            continue
        loads.append(np.concatenate([np.asarray(c, dtype=float) for c in row.workload.expert_counts()]))
        energy.append(row.window.energy_J)
        duration.append(row.window.duration_s)
    if not loads:
        raise ValueError("the trace has no valid chunk window with a workload and a non-zero energy reading")
    widths = {len(x) for x in loads}
    if len(widths) != 1:
        raise ValueError(f"chunk workloads have different layer/expert shapes ({sorted(widths)}); split the trace")
    return TraceArrays(np.stack(loads), np.array(energy), np.array(duration), skipped)


def check_trace(loads, energy_J, duration_s=None, rel_tol: float = 0.05, match_frac: float = 0.02,
                midpoint_tol: float = 0.02) -> dict:
    """Both assumptions on a measured trace; midpoint triples match within match_frac of the mean load norm."""
    X = _as_matrix(loads)
    fit = fit_affine_energy(X, energy_J, duration_s, rel_tol=rel_tol)
    scale = float(np.linalg.norm(X, axis=1).mean())
    midpoints = midpoint_convexity_from_trace(X, energy_J, match_tol=max(match_frac * scale, 1e-12), rel_tol=midpoint_tol)
    return {"available": True, "affine": fit.summary(), "affine_failing_chunks": fit.failing,
            "midpoint": midpoints.summary()}
