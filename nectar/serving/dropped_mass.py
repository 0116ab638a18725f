"""A quality proxy that costs no forward: the routing weight NECTAR's serving routers drop.

Every batch-price router meters, on the device, the renormalised weight of the slots it does not
keep (`DevicePrice._meter`). Summed over the MoE layers, that *dropped mass* per token is known for
every generated token at no cost, while the quality gap (nats) is known only on the few checked
steps. To first order a token's NLL gap is proportional to the weight its routing dropped, so the
controller estimates one slope β (nats per unit of dropped mass, pooled over every check of the
run, at whatever price it ran) and prices the run's account and the current window by β · mass:

    β̂ = Σ_checks gap / Σ_checks mass(checked rows),   spent ≈ β̂ · M_run,   cost now ≈ β̂ · m_window.

The checks then estimate one number for the whole run instead of the cost of the price in force,
and the proxy follows every move of the price and of the load between checks. A check's mass is
its step's mass per token times the rows it checked (the step's rows share the price). A few
checked tokens give a noisy β̂ (one window of negative gaps sets it to 0, and the price climbs
unchecked), so the account prices by an upper bound, β̂ + z · se(β̂), the ratio estimator's
standard error from the checked windows' residuals, Σ_w (g_w − β̂ m_w)² / (Σ_w m_w)².
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


def router_totals(routers: list) -> torch.Tensor:
    """[2] float64 on the routers' device: Σ dropped mass and Σ routed tokens, over the layers."""
    return torch.stack([torch.stack([r.dropped_mass_t for r in routers]).sum(),
                        torch.stack([r.routed_tokens_t for r in routers]).sum()])


def step_mass_per_token(before: torch.Tensor, after: torch.Tensor, layers: int) -> torch.Tensor:
    """Dropped mass per token of the forward between two `router_totals` (summed over the layers; 0-d)."""
    delta = after - before
    return delta[0] / (delta[1] / layers).clamp_min(1.0)


@dataclass
class ProxyEstimate:
    """What the controller's law needs, from the proxy: the run's spent nats and tokens, the window's cost."""

    spent_nats: float
    tokens: float
    cost_nats: float     # per token, at the window's dropped mass
    slope: float         # β̂, nats per unit of dropped mass


@dataclass
class DroppedMassAccount:
    """The run's pooled slope and dropped-mass totals (host floats, updated once a window)."""

    layers: int
    z: float = 1.0                     # the slope priced is β̂ + z · se(β̂)
    min_checked_mass: float = 1e-3     # below this the checks have seen no drops: no slope yet
    gap_nats: float = 0.0              # Σ checked gaps
    checked_mass: float = 0.0          # Σ dropped mass on the checked rows
    run_mass: float = 0.0              # Σ dropped mass (over the layers) of every token so far
    run_tokens: float = 0.0
    checked_windows: list = field(default_factory=list)   # (gap, mass) of every window with checks

    def observe(self, gap_nats: float, checked_mass: float, window_mass: float, window_routed: float) -> ProxyEstimate | None:
        """A window's checked gap and mass, and its totals over every routed token (summed over the
        layers); None until the checks have seen enough dropped mass to give a slope."""
        self.gap_nats += gap_nats
        self.checked_mass += checked_mass
        if checked_mass > 0:
            self.checked_windows.append((gap_nats, checked_mass))
        tokens = window_routed / self.layers
        self.run_mass += window_mass
        self.run_tokens += tokens
        if self.checked_mass < self.min_checked_mass or tokens <= 0:
            return None
        slope = max(self.slope_estimate() + self.z * self.slope_error(), 0.0)
        return ProxyEstimate(slope * self.run_mass, self.run_tokens, slope * window_mass / tokens, slope)

    def slope_estimate(self) -> float:
        """β̂: the pooled ratio of checked gaps to checked mass."""
        return self.gap_nats / self.checked_mass

    def slope_error(self) -> float:
        """se(β̂) from the checked windows' residuals (0 with a single window: nothing to spread)."""
        beta = self.slope_estimate()
        residual = sum((g - beta * m) ** 2 for g, m in self.checked_windows)
        return math.sqrt(residual) / self.checked_mass
