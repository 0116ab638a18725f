"""The held-out quality-guard set: batches scored once under static routing, then checked in rotation.

`static_guard_set` scores every guard batch under static top-2 routing through the backend (its
energy is a one-time cost charged to NECTAR) and also returns the per-layer per-expert FLOPs of the
accounted workload, the cost model's prior. `guard_check` builds the callable the controller calls
after each chunk: it scores the next guard batch under the routers' current candidate and returns a
`GuardCheck` with the check's own telemetry window.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from nectar.control.quality_guard import GuardCheck
from nectar.experiment.forward import forward_chunk, install
from nectar.experiment.policies import policy_router
from nectar.telemetry.energy import window_energy_J
from nectar.telemetry.trace import TraceRow
from nectar.telemetry.window import TelemetryWindow


@dataclass
class GuardSet:
    """Held-out guard batches [check_rows, T] and their NLL under static routing."""

    batches: list[torch.Tensor]
    static_nll: list[float]
    checks: int = 0

    def next(self) -> tuple[torch.Tensor, float]:
        i = self.checks % len(self.batches)
        self.checks += 1
        return self.batches[i], self.static_nll[i]


def measured_forward(backend, model, batch: torch.Tensor, policy: str, micro_rows: int | None = None):
    """(observation, window): the chunk's forward run inside the backend's telemetry window."""
    box: dict = {}

    def compute():
        box["observation"] = forward_chunk(model, batch, micro_rows, policy)
        return box["observation"].workload

    window = backend.run_chunk(compute)
    return box["observation"], window


def static_guard_set(model, guard: torch.Tensor, backend, check_tokens: int, guard_tokens: int,
                     seq_len: int) -> tuple[GuardSet, list[list[float]], float]:
    """Score every guard batch under static top-2. Returns the guard set, the per-layer per-expert
    FLOPs (the cost model's prior) and the energy this one-time reference cost."""
    install(model, [policy_router("static-top2", layer) for _, layer in model.moe_layers()])
    rows = check_tokens // seq_len
    n_batches = guard_tokens // check_tokens
    if guard.numel() < n_batches * rows * seq_len:
        raise ValueError(f"the guard stream has {guard.numel()} tokens, fewer than guard_tokens={guard_tokens}")
    batches = list(guard[: n_batches * rows * seq_len].view(n_batches, rows, seq_len))
    nlls, energy, flops = [], 0.0, []
    for batch in batches:
        observation, window = measured_forward(backend, model, batch, "guard-static")
        nlls.append(observation.mean_nll)
        energy += window_energy_J(window)
        flops = [[c.flops for c in layer.expert_costs] for layer in window.workload.layers]
    return GuardSet(batches, nlls), flops, energy


def guard_check(model, guard: GuardSet, backend, on_window: Callable[[TelemetryWindow], None]) -> Callable[[], GuardCheck]:
    """The controller's quality check: the next guard batch under the current candidate routing;
    `on_window` receives the check's window (for the run's trace)."""
    def check() -> GuardCheck:
        batch, static_nll = guard.next()
        observation, window = measured_forward(backend, model, batch, "guard")
        on_window(window)
        return GuardCheck(observation.mean_nll, static_nll, window)
    return check
