"""The adaptive-k rule for pretrained experts, and the threshold that minimises cost + λ·KL.

Over a family's own top-K choice, let w [N, K] be the chosen slots' raw gate values renormalised
over the K slots (sum 1 per token) and rank 0 the slot of largest w (the static top-1 expert).

Rule (`keep_mask`): a slot is kept iff it is the static top-1 or its w ≥ τ. τ = 0 keeps the
family's top-K; any τ > 1/2 keeps the top-1 alone (a slot of rank ≥ 1 has w ≤ 1/2).

Objective of a threshold on an observed sample (`threshold_objective`), per token t:
  cost_t(τ) = Σ_{kept j} c[e_tj]                       (e.g. J per token through each expert)
  KL_t(τ)   = KL(a_t ‖ w_t) = −log Σ_{kept j} w_tj     (a_t: w_t restricted to the kept slots and
                                                       renormalised, the adapted distribution)
  J(τ) = mean_t cost_t(τ) + λ · mean_t KL_t(τ)
`choose_threshold` returns the grid's minimiser (the smallest τ among ties: the most conservative).
Everything is vectorised over the grid: [G, N, K] tensors, one pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

DEFAULT_GRID = tuple(round(0.01 * i, 2) for i in range(51)) + (1.0,)


def slot_ranks(weights: torch.Tensor) -> torch.Tensor:
    """[N, K] long rank of each slot by weight, descending (ties: earlier slot first)."""
    order_NK = torch.sort(weights, dim=-1, descending=True, stable=True).indices
    return torch.argsort(order_NK, dim=-1)


def keep_mask(weights: torch.Tensor, ranks: torch.Tensor, threshold: float | torch.Tensor) -> torch.Tensor:
    """[..., N, K] bool: the static top-1 slot, and every slot whose weight reaches the threshold.
    `threshold` may be a float or a [G, 1, 1] tensor (a grid, broadcast)."""
    return (ranks == 0) | (weights >= threshold)


def check_threshold(value: float, name: str = "threshold") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


@dataclass
class ThresholdObjective:
    """The objective's parts on each grid point [G] (grid ascending)."""

    grid: torch.Tensor           # [G]
    expected_cost: torch.Tensor  # [G] mean per-token cost of the kept slots
    mean_kl: torch.Tensor        # [G] mean KL(adapted ‖ static) in nats
    mean_k: torch.Tensor         # [G] mean kept slots per token
    objective: torch.Tensor      # [G] expected_cost + λ · mean_kl


def _check_sample(weights: torch.Tensor, experts: torch.Tensor) -> None:
    if weights.dim() != 2 or weights.shape != experts.shape or weights.shape[0] == 0:
        raise ValueError(f"weights and experts must be equal non-empty [N, K] tensors, got "
                         f"{list(weights.shape)} and {list(experts.shape)}")
    if not torch.isfinite(weights).all() or (weights < 0).any():
        raise ValueError("weights must be finite and non-negative")


def _slot_costs(cost, experts: torch.Tensor) -> torch.Tensor:
    """[N, K] cost of each chosen slot from a scalar or a per-expert [E] cost."""
    cost_t = torch.as_tensor(cost, dtype=torch.float64)
    if not torch.isfinite(cost_t).all() or (cost_t < 0).any():
        raise ValueError("costs must be finite and non-negative")
    if cost_t.dim() == 0:
        return cost_t.expand(experts.shape)
    if cost_t.dim() != 1 or int(experts.max()) >= cost_t.numel():
        raise ValueError(f"cost must be a scalar or a per-expert [E] vector covering every chosen expert, "
                         f"got shape {list(cost_t.shape)}")
    return cost_t[experts.cpu()]


def threshold_objective(weights: torch.Tensor, experts: torch.Tensor, cost, lam: float,
                        grid=DEFAULT_GRID) -> ThresholdObjective:
    """The objective on every grid point for a sample: weights [N, K] (renormalised over the
    top-K), experts [N, K], cost a scalar or [E] per expert, λ ≥ 0 (cost units per nat)."""
    _check_sample(weights, experts)
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    grid_G = torch.as_tensor(sorted(check_threshold(float(t), "grid value") for t in grid), dtype=torch.float64)
    if grid_G.numel() == 0:
        raise ValueError("the threshold grid is empty")
    w_NK = weights.detach().cpu().double()
    ranks_NK = slot_ranks(w_NK)
    keep_GNK = keep_mask(w_NK, ranks_NK, grid_G.view(-1, 1, 1))             # [G, N, K]
    slot_cost_NK = _slot_costs(cost, experts.detach())                     # [N, K]
    cost_GN = (slot_cost_NK * keep_GNK).sum(-1)                             # [G, N]
    kept_GN = (w_NK * keep_GNK).sum(-1).clamp_min(1e-300)                   # [G, N]
    kl_GN = (-torch.log(kept_GN / w_NK.sum(-1))).clamp_min(0.0)             # [G, N] (w re-normalised exactly)
    expected, kl = cost_GN.mean(-1), kl_GN.mean(-1)
    return ThresholdObjective(grid_G, expected, kl, keep_GNK.sum(-1).double().mean(-1), expected + lam * kl)


def choose_threshold(weights: torch.Tensor, experts: torch.Tensor, cost, lam: float, grid=DEFAULT_GRID) -> float:
    """The grid threshold minimising mean cost + λ · mean KL on the sample (smallest on ties)."""
    result = threshold_objective(weights, experts, cost, lam, grid)
    best = result.objective.min()
    return float(result.grid[(result.objective <= best).nonzero()[0, 0]])
