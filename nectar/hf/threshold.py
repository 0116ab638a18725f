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
The objective is computed for every grid point in one pass over the sample's slots.
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

    def index_at(self, lam: float) -> int:
        """The grid index minimising expected_cost + λ · mean_kl at any λ (the smallest τ on ties)."""
        return int(torch.argmin(self.expected_cost + lam * self.mean_kl))

    def threshold_at(self, lam: float) -> float:
        return float(self.grid[self.index_at(lam)])


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
    top-K), experts [N, K], cost a scalar or [E] per expert, λ ≥ 0 (cost units per nat).

    One pass over the N·K slots, not the grid: with a token's slots sorted by weight, the kept set
    at grid point g is a prefix of m_t(g) slots, and a slot of weight w stays kept for the u grid
    points ≤ w (`searchsorted`); each slot's cost and each step of the token's KL are added into
    the bin where they start to count, and cumulative sums over the bins (all terms ≥ 0, so no
    cancellation) give every grid point at once."""
    _check_sample(weights, experts)
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise ValueError(f"lam must be a finite number >= 0, got {lam!r}")
    grid_G = torch.as_tensor(sorted(check_threshold(float(t), "grid value") for t in grid), dtype=torch.float64)
    if grid_G.numel() == 0:
        raise ValueError("the threshold grid is empty")
    n_tokens, n_grid = weights.shape[0], grid_G.numel()
    w_NK = weights.detach().cpu().double()
    order_NK = torch.sort(w_NK, dim=-1, descending=True, stable=True).indices    # slot of rank r at column r
    w_NK = w_NK.gather(-1, order_NK)
    cost_NK = _slot_costs(cost, experts.detach()).gather(-1, order_NK)
    kept_until_NK = torch.searchsorted(grid_G, w_NK, right=True)                  # kept at grid g iff g < u
    kept_until_NK[:, 0] = n_grid                                                  # the static top-1: always
    expected = _count_kept(kept_until_NK, cost_NK, n_grid) / n_tokens             # [G]
    mean_k = _count_kept(kept_until_NK, torch.ones_like(cost_NK), n_grid) / n_tokens
    share_NK = (w_NK.cumsum(-1) / w_NK.sum(-1, keepdim=True)).clamp_min(1e-300)  # kept share of the first m slots
    kl_NK = (-torch.log(share_NK)).clamp_min(0.0)                                 # KL when m = column + 1 slots are kept
    step_NK = kl_NK[:, :-1] - kl_NK[:, 1:]                                        # ≥ 0: dropping slot m + 1
    dropped = _binned(kept_until_NK[:, 1:], step_NK, n_grid).cumsum(0)[:n_grid]   # [G] KL added by the drops
    kl = dropped / n_tokens + kl_NK[:, -1].mean()                                  # [G]
    return ThresholdObjective(grid_G, expected, kl, mean_k, expected + lam * kl)


def _binned(index: torch.Tensor, values: torch.Tensor, n_grid: int) -> torch.Tensor:
    """[G + 1] the sum of `values` falling into each bin 0..G of `index` (same shapes)."""
    return torch.zeros(n_grid + 1, dtype=torch.float64).scatter_add_(0, index.reshape(-1), values.reshape(-1))


def _count_kept(kept_until_NK: torch.Tensor, value_NK: torch.Tensor, n_grid: int) -> torch.Tensor:
    """[G] Σ over slots of value · [g < kept_until] for every grid index g (a reverse cumulative
    sum over the bin where each slot stops being kept)."""
    return _binned(kept_until_NK, value_NK, n_grid).flip(0).cumsum(0).flip(0)[1:]


def choose_threshold(weights: torch.Tensor, experts: torch.Tensor, cost, lam: float, grid=DEFAULT_GRID) -> float:
    """The grid threshold minimising mean cost + λ · mean KL on the sample (smallest on ties)."""
    return threshold_objective(weights, experts, cost, lam, grid).threshold_at(lam)
