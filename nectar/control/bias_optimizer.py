"""Per-chunk update of a per-expert routing bias that solves the convex chunk problem online.

For one layer and one chunk of T tokens with static router distributions q [T, E], per-token
expert costs c [E] and a quality weight λ > 0 (docs/design.md §3):

    minimise_p   Σ_t Σ_i c_i p_ti + λ Σ_t KL(p_t ‖ q_t)
    subject to   p_t ∈ simplex,
                 (1/T) Σ_t p_ti ≤ u_i          (optional caps: fraction of the chunk's tokens)
                 (1/T) Σ_t Σ_i c_i p_ti ≤ B     (optional budget: mean cost per token)

Caps and budget are *per-token* quantities, so the same configuration means the same thing for
any chunk size, and every dual step below uses chunk means. The KKT conditions give
p_t = softmax(log q_t + b) with b_i = −(c_i + μ_i + ν c_i)/λ (μ ≥ 0 caps, ν ≥ 0 budget
multipliers); without constraints b = −c/λ. Biases are gauge-free (softmax ignores a common
shift), so every bias here is mean-centred.

`BiasOptimizer.step` takes one update per chunk, in apply-then-update order: the chunk is
routed with the current bias, its statistics are recorded, then the bias changes for the next
chunk. Every step, μ and ν take one projected heavy-ball ascent step on the chunk's constraint
violations, measured at the Lagrangian's exact minimiser softmax(log q + b_KKT(μ, ν)) — the exact
gradient of the concave dual function on this chunk. The bias then moves by mode:

- "dual" (default): the bias is set to the KKT form with the chunk's current c. Without
  constraints this is the closed form after one chunk, so drifting costs are tracked with one
  chunk of lag and no transient.
- "gradient": the bias instead takes one heavy-ball step along the analytic gradient of the
  chunk Lagrangian (c_eff = c + μ + ν c), preconditioned by each expert's mean probability (a
  diagonal Fisher-like scaling that makes a unit step close to a Newton step). This is the
  LaCT-style "one optimizer step per chunk" variant; it converges to the same optimum on
  stationary chunks and follows drifting costs with a short transient.

Dual steps are dimensionless: each multiplier moves by lr·λ·violation / curvature, where the
curvature is the chunk's mean variance of the constrained quantity under p (the diagonal of the
dual Hessian, times λ), so lr = 1 is a diagonal Newton step and the update does not depend on
the units of c or on the chunk size.
Everything is computed in float64 on the CPU (inputs may be float32 or live on a GPU: one
[T, E] chunk is small), detached from any autograd graph.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Sequence

import torch

MODES = ("dual", "gradient")
_LOG_FLOOR = 1e-300  # log(0) guard for q entries that underflowed to zero
_CURVATURE_FLOOR = 1e-4  # lower bound on the dual curvature (as a variance of an indicator)


def _as_f64(x, name: str) -> torch.Tensor:
    """Convert to a float64 tensor and reject non-finite values with a clear message."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
    t = torch.as_tensor(x, dtype=torch.float64)
    if not torch.isfinite(t).all():
        raise ValueError(f"{name} contains NaN or infinite values")
    return t


def _check_lam(lam: float) -> float:
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam > 0):
        raise ValueError(f"lam (the KL weight λ) must be a finite number > 0, got {lam!r}")
    return float(lam)


def validate_q(q, atol: float = 1e-4) -> torch.Tensor:
    """Return q as float64 [T, E] after checking it holds one probability row per token."""
    q = _as_f64(q, "q")
    if q.ndim != 2 or q.shape[0] < 1 or q.shape[1] < 1:
        raise ValueError(f"q must have shape [T, E] with T, E >= 1, got {tuple(q.shape)}")
    if (q < 0).any():
        raise ValueError("q must be non-negative (rows are routing probabilities)")
    row_err = (q.sum(dim=1) - 1.0).abs().max().item()
    if row_err > atol:
        raise ValueError(f"every row of q must sum to 1 (max deviation {row_err:.2e} > {atol})")
    return q


def validate_c(c, num_experts: int | None = None) -> torch.Tensor:
    """Return c as float64 [E] after checking shape and finiteness."""
    c = _as_f64(c, "c")
    if c.ndim != 1:
        raise ValueError(f"c must be a 1-D per-expert cost vector [E], got shape {tuple(c.shape)}")
    if num_experts is not None and c.shape[0] != num_experts:
        raise ValueError(f"c has {c.shape[0]} experts but q has {num_experts}")
    return c


def centre(b: torch.Tensor) -> torch.Tensor:
    """Remove the mean: softmax(log q + b) is unchanged, and biases become comparable."""
    return b - b.mean()


def _log_q(q: torch.Tensor) -> torch.Tensor:
    return q.clamp_min(_LOG_FLOOR).log()  # [T, E]


def _objective(q: torch.Tensor, c: torch.Tensor, lam: float, p: torch.Tensor) -> float:
    """Σ c·p + λ Σ KL(p_t ‖ q_t) on validated float64 tensors (0·log 0 = 0)."""
    ratio = p.clamp_min(_LOG_FLOOR) / q.clamp_min(_LOG_FLOOR)  # [T, E]
    kl_terms = torch.where(p > 0, p * ratio.log(), torch.zeros_like(p))  # [T, E]
    return float((p @ c).sum() + lam * kl_terms.sum())


def _gradient(p: torch.Tensor, c_eff: torch.Tensor, lam: float, b: torch.Tensor) -> torch.Tensor:
    """Σ_t p_tk (d_k − p_t·d) with d = c_eff + λ b, [E]."""
    d = c_eff + lam * b  # [E]
    mean_d = p @ d  # [T]
    return (p * (d.unsqueeze(0) - mean_d.unsqueeze(1))).sum(dim=0)  # [E]


def routing_distribution(q, b) -> torch.Tensor:
    """p = softmax(log q + b), [T, E] float64."""
    q = validate_q(q)
    b = validate_c(b, q.shape[1])
    return torch.softmax(_log_q(q) + b, dim=1)  # [T, E]


def objective_of_p(q, c, lam: float, p) -> float:
    """Σ_t Σ_i c_i p_ti + λ Σ_t KL(p_t ‖ q_t) for any p [T, E] (0·log 0 = 0)."""
    q, p = validate_q(q), validate_q(p)
    if p.shape != q.shape:
        raise ValueError(f"p {tuple(p.shape)} and q {tuple(q.shape)} must have the same shape")
    return _objective(q, validate_c(c, q.shape[1]), _check_lam(lam), p)


def chunk_objective(q, c, lam: float, b) -> float:
    """The chunk objective (sum over tokens) at p = softmax(log q + b)."""
    return objective_of_p(q, c, lam, routing_distribution(q, b))


def lagrangian_gradient(q, c_eff, lam: float, b) -> torch.Tensor:
    """d/db of Σ_t [c_eff·p_t + λ KL(p_t ‖ q_t)] at p = softmax(log q + b), [E].

    With d = c_eff + λ b the per-token gradient is p_tk (d_k − p_t·d); it vanishes exactly when
    b = −c_eff/λ up to a constant, which is the KKT form. With c_eff = c this is the gradient of
    `chunk_objective`.
    """
    p = routing_distribution(q, b)  # [T, E]
    b = torch.as_tensor(b, dtype=torch.float64)
    return _gradient(p, validate_c(c_eff, p.shape[1]), _check_lam(lam), b)


def kkt_bias(c, lam: float, mu=None, nu: float = 0.0) -> torch.Tensor:
    """b_i = −(c_i + μ_i + ν c_i)/λ, mean-centred, [E] float64."""
    c, lam = validate_c(c), _check_lam(lam)
    mu_t = torch.zeros_like(c) if mu is None else validate_c(mu, c.shape[0])
    return centre(-(c + mu_t + float(nu) * c) / lam)


def closed_form_bias(c, lam: float) -> torch.Tensor:
    """Unconstrained optimum's bias b* = −c/λ, mean-centred, [E]."""
    return kkt_bias(c, lam)


def closed_form_p(q, c, lam: float) -> torch.Tensor:
    """Unconstrained optimum p*_ti ∝ q_ti exp(−c_i/λ), [T, E]."""
    return routing_distribution(q, closed_form_bias(c, lam))


@dataclass
class BiasOptimizerConfig:
    """Settings of the per-chunk bias update (see the module docstring for units).

    caps    per-expert maximum fraction of the chunk's routing mass, each in (0, 1], Σ caps ≥ 1
    budget  maximum mean cost per token, Σ_i c_i p_ti averaged over the chunk
    lr_decay  step k uses lr / (1 + lr_decay·k): 0 tracks drift, > 0 settles on stationary data
    """

    lam: float
    lr: float = 1.0
    momentum: float = 0.5
    caps: Sequence[float] | None = None
    budget: float | None = None
    mode: str = "dual"
    lr_decay: float = 0.0
    precondition_eps: float = 1e-6

    def __post_init__(self) -> None:
        _check_lam(self.lam)
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not (0.0 <= self.momentum < 1.0):
            raise ValueError(f"momentum must be in [0, 1), got {self.momentum}")
        if not (math.isfinite(self.lr_decay) and self.lr_decay >= 0):
            raise ValueError(f"lr_decay must be >= 0, got {self.lr_decay}")
        if self.caps is not None:
            self.caps = [float(u) for u in self.caps]
            if any(not (0 < u <= 1) for u in self.caps):
                raise ValueError(f"caps are fractions of the chunk's tokens and must lie in (0, 1], got {self.caps}")
            if sum(self.caps) < 1.0:
                raise ValueError(f"caps sum to {sum(self.caps):.3f} < 1: no routing distribution can satisfy them")
        if self.budget is not None and not math.isfinite(self.budget):
            raise ValueError(f"budget must be finite, got {self.budget}")


@dataclass
class StepRecord:
    """What one chunk saw (at the bias it was routed with) and the state after the update."""

    step: int
    tokens: int
    objective: float                 # chunk objective (sum form) at the bias the chunk used
    mean_cost: float                 # (1/T) Σ_t c·p_t, comparable with the budget
    load: list[float]                # [E] (1/T) Σ_t p_ti, comparable with the caps
    cap_violation: float             # max_i (load_i − u_i), ≤ 0 when caps hold (0 without caps)
    budget_violation: float          # mean_cost − B (0 without a budget)
    grad_norm: float                 # ‖∂objective/∂b‖ per token at the bias the chunk used
    bias: list[float] = field(default_factory=list)  # [E] after the update
    mu: list[float] = field(default_factory=list)    # [E] cap multipliers after the update
    nu: float = 0.0                  # budget multiplier after the update

    def to_dict(self) -> dict:
        return asdict(self)


class BiasOptimizer:
    """Online per-chunk solver of the chunk problem; call `step(q_chunk, c)` once per chunk."""

    def __init__(self, num_experts: int, config: BiasOptimizerConfig):
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if config.caps is not None and len(config.caps) != num_experts:
            raise ValueError(f"caps has {len(config.caps)} entries but there are {num_experts} experts")
        self.num_experts = num_experts
        self.config = config
        self.caps = None if config.caps is None else torch.tensor(config.caps, dtype=torch.float64)
        self.reset()

    def reset(self) -> None:
        """Back to static routing: zero bias, multipliers and momentum buffers."""
        zeros = lambda: torch.zeros(self.num_experts, dtype=torch.float64)  # noqa: E731
        self.bias, self.bias_velocity = zeros(), zeros()
        self.mu, self.mu_velocity = zeros(), zeros()
        self.nu, self.nu_velocity = 0.0, 0.0
        self.steps = 0

    def state_dict(self) -> dict:
        return {
            "bias": self.bias.clone(), "bias_velocity": self.bias_velocity.clone(),
            "mu": self.mu.clone(), "mu_velocity": self.mu_velocity.clone(),
            "nu": self.nu, "nu_velocity": self.nu_velocity, "steps": self.steps,
        }

    def load_state_dict(self, state: dict) -> None:
        for name in ("bias", "bias_velocity", "mu", "mu_velocity"):
            setattr(self, name, validate_c(state[name], self.num_experts).clone())
        self.nu, self.nu_velocity = float(state["nu"]), float(state["nu_velocity"])
        self.steps = int(state["steps"])

    def routing_distribution(self, q_chunk) -> torch.Tensor:
        """p = softmax(log q + bias) for the current bias, [T, E]."""
        return routing_distribution(q_chunk, self.bias)

    def step(self, q_chunk, c) -> StepRecord:
        """Route the chunk with the current bias, record it, then update bias and multipliers."""
        q = validate_q(q_chunk)
        if q.shape[1] != self.num_experts:
            raise ValueError(f"q_chunk has {q.shape[1]} experts, optimizer was built for {self.num_experts}")
        c = validate_c(c, self.num_experts)
        self._check_budget_feasible(c)
        log_q = _log_q(q)  # [T, E]
        p_used = torch.softmax(log_q + self.bias, dim=1)  # [T, E] what this chunk was routed with
        record = self._observe(q, c, p_used)
        lr = self.config.lr / (1.0 + self.config.lr_decay * self.steps)
        # dual gradient = constraint violations of the Lagrangian's exact minimiser at (μ, ν)
        p_dual = torch.softmax(log_q + kkt_bias(c, self.config.lam, self.mu, self.nu), dim=1)  # [T, E]
        self._dual_ascent(p_dual, c, lr)
        if self.config.mode == "dual":
            self.bias = kkt_bias(c, self.config.lam, self.mu, self.nu)
        else:
            self._primal_step(p_used, c, lr)
        self.steps += 1
        record.bias, record.mu, record.nu = self.bias.tolist(), self.mu.tolist(), self.nu
        return record

    def _check_budget_feasible(self, c: torch.Tensor) -> None:
        budget = self.config.budget
        if budget is not None and budget < c.min().item():
            raise ValueError(f"budget {budget} is below the cheapest expert's cost {c.min().item()}: infeasible")

    def _observe(self, q: torch.Tensor, c: torch.Tensor, p: torch.Tensor) -> StepRecord:
        tokens = q.shape[0]
        load = p.mean(dim=0)  # [E]
        mean_cost = float((p @ c).mean())
        cap_violation = 0.0 if self.caps is None else float((load - self.caps).max())
        budget_violation = 0.0 if self.config.budget is None else mean_cost - self.config.budget
        grad = _gradient(p, c, self.config.lam, self.bias) / tokens  # [E]
        return StepRecord(
            step=self.steps, tokens=tokens, objective=_objective(q, c, self.config.lam, p),
            mean_cost=mean_cost, load=load.tolist(), cap_violation=cap_violation,
            budget_violation=budget_violation, grad_norm=float(grad.norm()),
        )

    def _primal_step(self, p: torch.Tensor, c: torch.Tensor, lr: float) -> None:
        """Preconditioned heavy-ball step on b for the Lagrangian with c_eff = c + μ + ν c."""
        c_eff = c + self.mu + self.nu * c  # [E]
        grad = _gradient(p, c_eff, self.config.lam, self.bias) / p.shape[0]  # [E]
        precond = p.mean(dim=0) + self.config.precondition_eps  # [E]
        direction = grad / precond / self.config.lam  # [E] dimensionless
        self.bias_velocity = self.config.momentum * self.bias_velocity - lr * direction
        self.bias = centre(self.bias + self.bias_velocity)

    def _dual_ascent(self, p: torch.Tensor, c: torch.Tensor, lr: float) -> None:
        """Projected heavy-ball ascent on μ ≥ 0 and ν ≥ 0 from per-token constraint violations,
        each coordinate scaled by λ / (its dual curvature): a diagonal Newton step at lr = 1."""
        lam, momentum = self.config.lam, self.config.momentum
        if self.caps is not None:
            violation = p.mean(dim=0) - self.caps  # [E]
            curvature = (p * (1 - p)).mean(dim=0).clamp_min(_CURVATURE_FLOOR)  # [E] mean Var of the indicator
            target = (self.mu + momentum * self.mu_velocity + lr * lam * violation / curvature).clamp_min(0.0)
            self.mu_velocity, self.mu = target - self.mu, target
        if self.config.budget is not None:
            mean_c = p @ c  # [T]
            violation = float(mean_c.mean()) - self.config.budget
            spread = float(c.max() - c.min()) ** 2 + 1e-300
            variance = float((p @ (c * c) - mean_c**2).mean())  # mean over tokens of Var_p(c)
            curvature = max(variance, _CURVATURE_FLOOR * spread)
            target = max(0.0, self.nu + momentum * self.nu_velocity + lr * lam * violation / curvature)
            self.nu_velocity, self.nu = target - self.nu, target
