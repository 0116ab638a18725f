"""What a decode step must read, and the share of a checked step that was the check's.

`step_bytes`: the bytes a decode step's forward reads (dense and head weights, the distinct experts'
weights, the KV positions it attends to); a checked step's workload carries its ride-along check's
forward as `before` (`nectar.telemetry.workload.ChunkWorkload.before`), which reads its own.

`check_share`: NECTAR's ride-along check runs inside the step's one telemetry window (the simulator
runs both forwards back to back; the GPU measures the step as one window), so the window's energy
and time are those of the check and the policy's forward together, and no backend reports the two
apart. The check is attributed its share of the step's *predicted* cost: the bytes its forward(s)
read over the bytes every forward of the step reads (`step_bytes`). Why bytes:
- it is the same on every backend: the core never asks which backend ran the step (the window
  only says which workload it covers: the simulator's as priced, e.g. rescaled by `--price-as`,
  the GPU's as run), and the share is computed from that workload alone;
- a decode step is weight-bound: both forwards read the dense weights and their experts' whole,
  which a share by rows (the teacher-forced runner's split, `nectar.experiment.runner.run_chunk`,
  where every row costs the same) would miss: a check of 1 row of 12 reads the dense weights again
  (a quarter to a half of the step on the simulator, not 1/13 of it);
- a measured time per forward would be better but is not available: the window has one duration
  and one energy; timing the check apart on the GPU would need a device synchronisation between
  the two forwards (which changes the step it measures) or device events (a GPU-only path).
Where a step is latency-bound (small models on a captured step: each forward costs its blocks'
fixed latency), both forwards cost about the same and the byte share of a full-batch check is
about a half as well; for a check of a few rows of a large batch bytes and time part more (the
figures against the simulator's priced time: docs/serving.md, "The checks' share of NECTAR's totals").
"""

from __future__ import annotations


def step_bytes(workload) -> float:
    """Bytes a decode step must read: dense and head weights, the distinct experts' weights, the KV
    positions it attends to (activations are not counted: they stay in cache at decode sizes); a
    ride-along check's forward (`workload.before`) reads its own."""
    if workload.before is not None:
        return sum(step_bytes(part) for part in workload.forwards())
    d, dt = workload.d_model, workload.dtype_bytes
    dense = workload.n_layers * 4 * d * d * dt + workload.vocab_size * d * dt
    experts = sum(c.weight_bytes for layer in workload.layers
                  for n, c in zip(layer.tokens_per_expert, layer.expert_costs) if n > 0)
    kv = workload.n_layers * 2 * (workload.kv_read_tokens + workload.tokens) * d * dt
    return float(dense + experts + kv)


def check_share(workload) -> float:
    """The share of a step's window attributed to its ride-along check: the bytes of the forwards
    that ran before the step's own (`workload.before`, its chain) over the bytes of all of them; 0
    for a step without a check (or without a workload: idle)."""
    if workload is None or workload.before is None:
        return 0.0
    forwards = workload.forwards()
    total = sum(step_bytes(part) for part in forwards)
    return sum(step_bytes(part) for part in forwards[:-1]) / total if total > 0 else 0.0
