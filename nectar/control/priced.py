"""The one interface between the controller and an adaptive router: routing at a price.

Every adaptive router (NECTAR's energy-aware router, the adaptive-k router of pretrained
transformers MoEs) offers the same four things, and the controller uses nothing else:

- `price_table(logits, cost, lams)`: on a sample of the chunk's gate logits [n, E] and the
  normalised per-expert costs [E], what the router's routing would be at every quality price λ of
  a grid — its mean cost per token and its deviation from static routing (mean KL, nats). One
  vectorised pass per chunk and layer; the feed-forward price reads deviations off it.
- `deviation(logits)`: the deviation of the routing in force (0 in fallback).
- `adapt_at_price(step)`: take the chunk's step at price λ (`PriceStep`), and return the chunk
  problem it solved (for analysis) or None.
- `start_at_price(cost, lam)`: route the first chunk where the chunk problem puts these costs at λ
  (a router that needs gate logits to choose stays static).

plus `configure_pricing(config)` (a fresh controller's step settings: optimiser state starts
anew), `state_vector()` (what the log records after each chunk), `START_PRICE`, `alpha`,
`fallback` and `num_experts`.

The price grid is log-spaced over the guard's price range (`price_grid`); deviations between
grid points are read by linear interpolation in log λ (`PriceTable.deviation_at`), and
`price_for_deviation` inverts the layers' mean curve (deviation does not increase with λ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

POINTS_PER_DECADE = 12      # grid density: adjacent prices differ by 21 %; deviations between them are interpolated


@dataclass
class PriceTable:
    """One layer's routing at each price of a grid.

    lams        [G] ascending quality prices λ
    mean_cost   [G] mean normalised cost per token of the slots the routing uses
    deviation   [G] mean KL of that routing to static routing (nats), non-increasing in λ
    detail      the router's own record behind the table (e.g. adaptive k's threshold objective)
    """

    lams: torch.Tensor
    mean_cost: torch.Tensor
    deviation: torch.Tensor
    detail: Any = None

    def deviation_at(self, lam: float) -> float:
        """The deviation at λ: linear in log λ between grid points, the end value outside."""
        return float(_interp(math.log(lam), self.lams.log(), self.deviation))


@dataclass
class StepConfig:
    """How a router takes its step at a price (the controller's settings a router may use)."""

    lr: float = 1.0                    # bias optimiser: step size, momentum and mode (dual | gradient)
    momentum: float = 0.5
    mode: str = "dual"
    fast_lr: float = 0.5               # fast-weight router network: step size, momentum, Muon
    fast_momentum: float = 0.5
    fast_muon: bool = True
    alpha_lr: float = 0.5              # mixing coefficient α of the fast network: step and floor
    alpha_min: float = 0.05


@dataclass
class PriceStep:
    """One chunk's step for one layer: the price and what the chunk showed.

    lam       the quality price λ of the chunk problem
    cost      [E] normalised per-expert costs
    fallback  route as static for the next chunk
    logits    [n, E] the sample of the chunk's gate logits
    inputs    [n, D] the gate's inputs of the same tokens
    table     this chunk's price table of the layer (None: not built)
    """

    lam: float
    cost: torch.Tensor
    fallback: bool
    logits: torch.Tensor
    inputs: torch.Tensor
    table: PriceTable | None = None


@runtime_checkable
class PricedRouter(Protocol):
    START_PRICE: float
    num_experts: int
    alpha: float
    fallback: bool

    def configure_pricing(self, config: StepConfig) -> None: ...

    def price_table(self, logits: torch.Tensor, cost: torch.Tensor, lams: torch.Tensor) -> PriceTable: ...

    def deviation(self, logits: torch.Tensor) -> float: ...

    def adapt_at_price(self, step: PriceStep) -> dict | None: ...

    def start_at_price(self, cost: torch.Tensor, lam: float) -> None: ...

    def state_vector(self) -> list[float]: ...


def price_grid(low: float, high: float, per_decade: int = POINTS_PER_DECADE) -> torch.Tensor:
    """[G] float64 log-spaced prices from `low` to `high` inclusive."""
    if not (0 < low < high and math.isfinite(high)):
        raise ValueError(f"the price range must satisfy 0 < low < high < inf, got ({low}, {high})")
    points = max(2, math.ceil(per_decade * math.log10(high / low)) + 1)
    return torch.logspace(math.log10(low), math.log10(high), points, dtype=torch.float64)


def price_for_deviation(tables: list[PriceTable], target: float) -> float:
    """The smallest λ at which the layers' mean deviation (interpolated in log λ) is at most
    `target`: the grid's first price at or below it, refined between it and the price before;
    the grid's ends when the target is out of the curve's range."""
    lams = tables[0].lams
    mean_dev = torch.stack([t.deviation for t in tables]).mean(0)              # [G]
    below = (mean_dev <= target).nonzero()
    if below.numel() == 0:
        return float(lams[-1])
    g = int(below[0])
    if g == 0:
        return float(lams[0])
    d0, d1 = float(mean_dev[g - 1]), float(mean_dev[g])
    share = (d0 - target) / (d0 - d1) if d0 > d1 else 1.0
    log_lam = (1 - share) * math.log(float(lams[g - 1])) + share * math.log(float(lams[g]))
    return math.exp(log_lam)


def _interp(x: float, xs: torch.Tensor, ys: torch.Tensor) -> float:
    """Piecewise-linear y(x) through ascending xs [G] (constant beyond the ends)."""
    if x <= float(xs[0]):
        return float(ys[0])
    if x >= float(xs[-1]):
        return float(ys[-1])
    g = int(torch.searchsorted(xs, torch.tensor(x, dtype=xs.dtype)))
    share = (x - float(xs[g - 1])) / (float(xs[g]) - float(xs[g - 1]))
    return (1 - share) * float(ys[g - 1]) + share * float(ys[g])
