"""Lumped RC thermal model C·dT/dt = P(T) − (T − T_amb)/R, solved exactly over constant-workload segments.

Within one segment the workload (and so the dynamic power) is constant, and leakage makes power
affine in temperature: P(T) = P_ref + k·(T − T_ref). The ODE is then linear,

    C·dT/dt = (P_ref − k·T_ref + T_amb/R) − (1/R − k)·T,

with the exact solution T(t) = T_inf + (T0 − T_inf)·exp(−t/τ), τ = C/(1/R − k), and the segment's
energy ∫P dt has a closed form too. Exact steps mean no integration error however long a
segment is, and a sensor can evaluate temperature and energy at any instant inside it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class ThermalModel:
    resistance_C_per_W: float
    capacitance_J_per_C: float
    ambient_C: float

    def __post_init__(self) -> None:
        if not (self.resistance_C_per_W > 0 and self.capacitance_J_per_C > 0 and math.isfinite(self.ambient_C)):
            raise ValueError(f"thermal model needs R > 0, C > 0 and a finite ambient, got {self}")


@dataclass(frozen=True)
class Segment:
    """A constant-workload interval: power P(T) = power_ref_W + leakage_W_per_C·(T − leakage_ref_C).

    Build it with `segment(...)`, which also solves for the asymptote and the decay rate.
    """

    t_start_s: float
    temp_start_C: float
    energy_start_J: float      # cumulative true energy at t_start_s
    power_ref_W: float
    leakage_W_per_C: float
    leakage_ref_C: float
    temp_inf_C: float          # where the temperature would settle if the segment lasted forever
    rate_per_s: float          # 1/τ

    def power_at_temp(self, temp_C: float) -> float:
        return self.power_ref_W + self.leakage_W_per_C * (temp_C - self.leakage_ref_C)


def segment(model: ThermalModel, t_start_s: float, temp_start_C: float, energy_start_J: float,
            power_ref_W: float, leakage_W_per_C: float, leakage_ref_C: float) -> Segment:
    """The segment starting at (t_start_s, temp_start_C) under a constant workload."""
    conductance = 1.0 / model.resistance_C_per_W - leakage_W_per_C  # W/°C, net cooling
    if not conductance > 0:
        raise ValueError("leakage_W_per_C · R must be < 1 (thermal runaway)")
    drive = power_ref_W - leakage_W_per_C * leakage_ref_C + model.ambient_C / model.resistance_C_per_W
    return Segment(t_start_s, temp_start_C, energy_start_J, power_ref_W, leakage_W_per_C, leakage_ref_C,
                   drive / conductance, conductance / model.capacitance_J_per_C)


def temperature_at(seg: Segment, t_s: float) -> float:
    """Exact temperature at time t_s ≥ seg.t_start_s."""
    return seg.temp_inf_C + (seg.temp_start_C - seg.temp_inf_C) * math.exp(-seg.rate_per_s * (t_s - seg.t_start_s))


def energy_at(seg: Segment, t_s: float) -> float:
    """Exact cumulative energy (J) at time t_s: energy_start + ∫ P(T(t)) dt over the segment so far."""
    dt = t_s - seg.t_start_s
    settled = seg.power_at_temp(seg.temp_inf_C) * dt
    decay = -math.expm1(-seg.rate_per_s * dt) / seg.rate_per_s  # ∫ exp(−λt) dt
    return seg.energy_start_J + settled + seg.leakage_W_per_C * (seg.temp_start_C - seg.temp_inf_C) * decay


def steady_temperature(power_ref_W: float, leakage_W_per_C: float, leakage_ref_C: float, model: ThermalModel) -> float:
    """Temperature where heating equals cooling: T = T_amb + P(T)·R."""
    return segment(model, 0.0, model.ambient_C, 0.0, power_ref_W, leakage_W_per_C, leakage_ref_C).temp_inf_C
