"""Online energy cost model: recursive least squares with forgetting.

Chunk energy is modelled as affine in the chunk's duration and its per-layer, per-expert token
counts (docs/design.md, "One chunk"):

    E_chunk ≈ e0 · T + Σ_l Σ_i c[l, i] · n[l, i]

`e0` (W) absorbs idle and expert-independent power (attention, LM head, leakage); `c[l, i]`
(J/token) is the marginal energy of one token through expert i of layer l. The parameters are
fitted by RLS with an exponential forgetting factor so that they follow temperature and clock
changes. A prior makes the model usable from the first chunk and keeps the never-excited
directions sensible: measured costs where a calibration gave them (`prior_J_per_token`, a row per
layer, None for a layer it did not measure; `prior_idle_W`), else proportional to each expert's FLOPs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from nectar.telemetry.energy import window_energy_J
from nectar.telemetry.window import TelemetryWindow
from nectar.telemetry.workload import ChunkWorkload

COUNT_SCALE = 1e-3  # counts enter the regression in thousands of tokens (conditioning)


@dataclass
class CostModelConfig:
    forgetting: float = 0.99          # ρ in (0, 1]; 1 = ordinary recursive least squares
    prior_joule_per_gflop: float = 2e-3  # prior marginal energy of compute (J per GFLOP)
    prior_idle_W: float = 150.0       # prior for e0
    prior_rel_std: float = 0.5        # prior std, relative to the parameter's prior (or the mean expert prior)
    noise_J: float | None = None      # std of a chunk's energy measurement (J); None: noise_rel × first window
    noise_rel: float = 0.05           # relative measurement noise when noise_J is None
    max_cov_trace: float = 1e12       # anti-windup cap on trace(P)

    def __post_init__(self):
        if not 0 < self.forgetting <= 1:
            raise ValueError(f"forgetting must be in (0, 1], got {self.forgetting}")
        if self.prior_rel_std <= 0 or (self.noise_J is not None and self.noise_J <= 0) or self.noise_rel <= 0:
            raise ValueError("prior_rel_std, noise_J and noise_rel must be > 0")


@dataclass
class CostUpdate:
    """One RLS step: prediction before the update and its error."""

    predicted_J: float
    measured_J: float
    rel_error: float


@dataclass
class OnlineCostModel:
    """Per-expert energy costs learned from telemetry windows."""

    expert_flops: list[list[float]]          # [L][E] forward FLOPs per token, for the prior
    config: CostModelConfig = field(default_factory=CostModelConfig)
    prior_J_per_token: list[list[float] | None] | None = None   # [L][E] measured prior (None rows: FLOPs)
    prior_idle_W: float | None = None        # measured prior for e0 (None: config.prior_idle_W)

    def __post_init__(self):
        self.num_layers = len(self.expert_flops)
        self.experts_per_layer = [len(row) for row in self.expert_flops]
        measured = self.prior_J_per_token or [None] * self.num_layers
        if len(measured) != self.num_layers or any(m is not None and len(m) != len(f)
                                                    for m, f in zip(measured, self.expert_flops)):
            raise ValueError("prior_J_per_token must have one row per layer, as long as the layer's expert list")
        prior = [self.config.prior_idle_W if self.prior_idle_W is None else self.prior_idle_W]
        for row, joules in zip(self.expert_flops, measured):
            if joules is None:
                prior += [max(f, 1.0) * 1e-9 * self.config.prior_joule_per_gflop / COUNT_SCALE for f in row]
            else:
                prior += [j / COUNT_SCALE for j in joules]
        self.theta = torch.tensor(prior, dtype=torch.float64)                    # [F]
        floor = self.theta[1:].abs().mean() if len(prior) > 1 else self.theta.abs()[0]
        std = torch.maximum(self.theta.abs(), floor) * self.config.prior_rel_std  # [F]
        # Bayesian RLS with unit-variance residuals: the prior covariance in units of noise².
        # With noise_J unset, the scale is fixed at the first window (noise_rel × its energy), so
        # one setting serves a 0.3 s simulated window and a 1 s measured one alike.
        self.P = torch.diag(std**2)                                                # [F, F]
        self._noise_set = False
        if self.config.noise_J is not None:
            self._scale_prior(self.config.noise_J)
        self.history: list[CostUpdate] = []

    def _scale_prior(self, noise_J: float) -> None:
        self.P = self.P / noise_J**2
        self._noise_set = True

    def features(self, workload: ChunkWorkload, duration_s: float) -> torch.Tensor:
        """[F] regression features: chunk duration, then per-layer per-expert counts (k-tokens)."""
        if len(workload.layers) != self.num_layers:
            raise ValueError(f"workload has {len(workload.layers)} layers, cost model {self.num_layers}")
        counts = [n * COUNT_SCALE for layer in workload.layers for n in layer.tokens_per_expert]
        return torch.tensor([duration_s, *counts], dtype=torch.float64)

    def predict(self, workload: ChunkWorkload, duration_s: float) -> float:
        return float(self.features(workload, duration_s) @ self.theta)

    def update(self, workload: ChunkWorkload, window: TelemetryWindow) -> CostUpdate | None:
        """One RLS step from a chunk's workload and measured window; invalid windows are skipped."""
        if not window.is_valid():
            return None
        phi = self.features(workload, window.duration_s)                        # [F]
        predicted = float(phi @ self.theta)
        measured = window_energy_J(window)
        if not self._noise_set:
            self._scale_prior(max(self.config.noise_rel * measured, 1e-6))
        error = measured - predicted
        rho = self.config.forgetting
        P_phi = self.P @ phi                                                       # [F]
        gain = P_phi / (rho + phi @ P_phi)                                         # [F]
        self.theta = self.theta + gain * error
        self.P = (self.P - torch.outer(gain, P_phi)) / rho
        self.P = (self.P + self.P.T) / 2
        trace = float(torch.trace(self.P))
        if trace > self.config.max_cov_trace:
            self.P *= self.config.max_cov_trace / trace
        record = CostUpdate(predicted, measured, abs(error) / max(measured, 1e-12))
        self.history.append(record)
        return record

    @property
    def idle_power_W(self) -> float:
        return float(self.theta[0])

    def expert_costs(self) -> list[torch.Tensor]:
        """Per layer, [E] marginal energy in J per token (clamped at 0: energy is not negative)."""
        costs, offset = [], 1
        for num in self.experts_per_layer:
            costs.append((self.theta[offset : offset + num] * COUNT_SCALE).clamp_min(0.0).float())
            offset += num
        return costs

    def fit_residual(self, last: int = 20) -> float:
        """Mean relative a-priori prediction error over the last `last` updates (NaN if none)."""
        recent = self.history[-last:]
        return sum(r.rel_error for r in recent) / len(recent) if recent else float("nan")
