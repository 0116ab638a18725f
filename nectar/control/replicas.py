"""NECTAR on data-parallel replicas: one controller state, held identically by every replica.

Each replica (one process, one GPU) runs a contiguous share of every chunk's sequences. After the
chunk, the replicas exchange what the controller reads, so that every replica runs the *same*
controller step on the *same* inputs — the inputs one process would have had on the whole chunk —
and every replica keeps one identical bias without broadcasting it:

* the observation (`combine_observations`): NLL sums, tokens, expert counts and the workload are
  summed, the per-sequence NLL is gathered in rank order (rank r holds rows [r·m, (r+1)·m)), the
  routing agreement is token-weighted, and each layer's strided sample of gate logits and inputs
  is gathered in rank order — the single-process sample of the concatenated rows when the sample
  stride divides a share's tokens (always when the chunk has ≤ the sample budget of tokens);
* the telemetry window (`combine_windows`): the node's energy is the sum of each GPU's energy (each
  by the one rule, `window_energy_J`), the duration the longest GPU's, mean and peak power the sums,
  the temperature the hottest GPU's (a cap must hold on every GPU, so the hottest one drives the
  shared pressure), memory pressure the fullest GPU's, the SM clock the slowest; each GPU's
  temperature, energy, power and duration are kept in the window (`ReplicaWindow.per_replica`);
* the paired quality check (`ReplicaGroup.quality_check`): the controller picks rows of the whole
  chunk (its generator is in the same state on every replica); each replica re-runs under static
  routing the picked rows it holds inside its chunk window (the check rides along), and the static
  NLL sums and token counts are summed.
A power budget therefore applies to the replicas' summed power. Collectives: `all_gather_object`
for the small records, tensor `all_gather` for the samples (gloo on CPU, NCCL on GPUs, where
`torch.cuda.set_device` must have been called). `data_parallel(group)` makes a group the active
one; `nectar.experiment.runner.run_experiment` then runs in data-parallel mode.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator

import torch
import torch.distributed as dist

from nectar.control.observation import ChunkObservation, LayerObservation
from nectar.control.quality_guard import QualityCheck
from nectar.telemetry.energy import window_energy_J
from nectar.telemetry.window import TelemetryWindow
from nectar.telemetry.workload import merge_workloads


@dataclass
class ReplicaWindow(TelemetryWindow):
    """The node's window over several GPUs, with each GPU's own readings (rank order)."""

    replica_temp_C: list[float] = field(default_factory=list)
    replica_energy_J: list[float] = field(default_factory=list)
    replica_power_W: list[float] = field(default_factory=list)
    replica_duration_s: list[float] = field(default_factory=list)

    def per_replica(self) -> dict[str, list[float]]:
        """Each GPU's readings, for a trace row's extras."""
        return {"replica_temp_C": list(self.replica_temp_C), "replica_energy_J": list(self.replica_energy_J),
                "replica_power_W": list(self.replica_power_W), "replica_duration_s": list(self.replica_duration_s)}


def replica_extra(window: TelemetryWindow) -> dict:
    """A window's per-GPU readings as a trace row's extras ({} for a one-GPU window)."""
    return window.per_replica() if isinstance(window, ReplicaWindow) else {}


# ------------------------------------------------------------------------------------ pure combiners

def _nan_safe(values: list[float], pick) -> float:
    """pick(values), NaN if any value is NaN (max/min of Python floats would depend on order)."""
    return math.nan if any(math.isnan(v) for v in values) else pick(values)


def _optional(values: list, pick):
    present = [v for v in values if v is not None]
    return pick(present) if present else None


def combine_windows(windows: list[TelemetryWindow | None]) -> ReplicaWindow | None:
    """One window for GPUs that ran side by side (None entries: a GPU that ran nothing)."""
    ran = [w for w in windows if w is not None]
    if not ran:
        return None
    energy = [window_energy_J(w) for w in ran]               # each GPU's energy by the one rule
    duration = max(w.duration_s for w in ran)
    t_end = max(w.t_end_s for w in ran)
    temps = [float(w.gpu_temp_C) for w in ran]
    fullest = max(ran, key=lambda w: w.memory_pressure if w.memory_pressure is not None else -1.0)
    workloads = [w.workload for w in ran]
    node_energy = math.fsum(energy) if all(math.isfinite(e) for e in energy) else math.nan
    return ReplicaWindow(
        t_start_s=t_end - duration, t_end_s=t_end,
        energy_J=node_energy, energy_power_J=node_energy,     # window_energy_J(node) = Σ GPUs' energy
        mean_power_W=sum(w.mean_power_W for w in ran), peak_power_W=sum(w.peak_power_W for w in ran),
        gpu_temp_C=_nan_safe(temps, max),
        mem_temp_C=_optional([w.mem_temp_C for w in ran], max),
        mem_used_B=fullest.mem_used_B, mem_total_B=fullest.mem_total_B,
        sm_clock_MHz=_optional([w.sm_clock_MHz for w in ran], min),
        throttle_reasons=_bit_or(w.throttle_reasons for w in ran),
        samples=min(w.samples for w in ran),
        energy_mJ_start=None, energy_mJ_end=None,             # several counters are not one counter
        flags=sorted({flag for w in ran for flag in w.flags}),
        workload=None if any(w is None for w in workloads) else merge_workloads(workloads),
        replica_temp_C=temps, replica_energy_J=energy, replica_power_W=[w.mean_power_W for w in ran],
        replica_duration_s=[w.duration_s for w in ran],
    )


def _bit_or(values) -> int:
    out = 0
    for v in values:
        out |= int(v)
    return out


def combine_observations(observations: list[ChunkObservation]) -> ChunkObservation:
    """The observation of the concatenated chunk from the observations of its row shares (rank order)."""
    if not observations:
        raise ValueError("combine_observations needs at least one observation")
    first = observations[0]
    if any(len(o.layers) != len(first.layers) for o in observations):
        raise ValueError("replicas observed different numbers of MoE layers")
    tokens = [o.workload.tokens for o in observations]
    layers = [LayerObservation(_cat([o.layers[i].logits for o in observations]),
                               _cat([o.layers[i].inputs for o in observations]))
              for i in range(len(first.layers))]
    nll_rows = torch.cat([o.nll_rows.double().cpu() for o in observations])          # [B] rank order
    # forward_chunk's NLL sum is the sum of its per-sequence NLLs: summed the same way over the
    # gathered rows it is one process's sum bit for bit (when the rows are)
    nll_sum = float(nll_rows.sum()) if nll_rows.numel() else sum(o.nll_sum for o in observations)
    return ChunkObservation(
        nll_sum=nll_sum, nll_tokens=sum(o.nll_tokens for o in observations),
        agreement=sum(o.agreement * n for o, n in zip(observations, tokens)) / max(sum(tokens), 1),
        workload=merge_workloads([o.workload for o in observations], first.workload.policy), layers=layers,
        nll_rows=nll_rows)


def _cat(pieces: list[torch.Tensor]) -> torch.Tensor:
    """Rows of every piece in order; empty pieces ([0] or [0, 0]) take the others' trailing shape."""
    full = [p for p in pieces if p.numel()]
    if not full:
        return pieces[0]
    return torch.cat([p.to(full[0].device) for p in full])


# ------------------------------------------------------------------------------------ the group

class ReplicaGroup:
    """This process's place among data-parallel replicas (an initialised torch.distributed group)."""

    def __init__(self, group: Any = None):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError("data-parallel replicas need an initialised torch.distributed process group")
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        nccl = dist.get_backend(group) == "nccl"
        self.device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    # ------------------------------------------------------------------ shares of a chunk
    def share_rows(self, rows: int) -> int:
        """Sequences of a `rows`-sequence chunk on each replica (ValueError unless divisible)."""
        if rows % self.world_size:
            raise ValueError(f"data-parallel replicas: a chunk of {rows} sequences cannot be split evenly over "
                             f"{self.world_size} replicas; choose --chunk-tokens / --seq-len as a multiple of "
                             f"{self.world_size}")
        return rows // self.world_size

    def local_rows(self, chunk: torch.Tensor) -> torch.Tensor:
        """This replica's contiguous share [m, T] of a chunk [rows, T]."""
        m = self.share_rows(chunk.shape[0])
        return chunk[self.rank * m:(self.rank + 1) * m]

    def rows_here(self, rows: torch.Tensor, share: int) -> torch.Tensor:
        """[r'] the rows of the whole chunk (`rows` [r]) this replica holds, as indices into its share."""
        low = self.rank * share
        return rows[(rows >= low) & (rows < low + share)] - low

    def sample_tokens(self, total: int) -> int:
        """Each replica's share of the controller's sample budget `total` (same stride as one process
        when `world_size` divides `total`)."""
        return max(1, total // self.world_size)

    # ------------------------------------------------------------------ collectives
    def gather_objects(self, obj: Any) -> list[Any]:
        """Every replica's `obj` (picklable, no device tensors), in rank order."""
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def gather_rows(self, x: torch.Tensor, shapes: list[tuple[int, ...]]) -> list[torch.Tensor]:
        """Every replica's `x` [n_r, ...] (their `shapes`, from `gather_objects`), padded to one size for
        a tensor all_gather and cut back; returned on this replica's collective device."""
        full = [s for s in shapes if math.prod(s)]
        if not full:
            return [torch.empty(s, dtype=x.dtype) for s in shapes]
        trailing = full[0][1:]
        if any(s[1:] != trailing for s in full):
            raise ValueError(f"replicas sampled tensors of different widths: {shapes}")
        n_max = max(s[0] for s in shapes)
        buf = torch.zeros((n_max, *trailing), dtype=x.dtype, device=self.device)    # [n_max, ...]
        if x.numel():
            buf[: x.shape[0]] = x.to(self.device)
        out = [torch.empty_like(buf) for _ in range(self.world_size)]
        dist.all_gather(out, buf, group=self.group)
        return [o[: s[0]] for o, s in zip(out, shapes)]

    def check_same(self, settings: dict[str, Any]) -> None:
        """ValueError on every replica unless all replicas hold the same `settings` (flat dict)."""
        gathered = self.gather_objects(settings)
        for key in sorted(set().union(*gathered)):
            values = [g.get(key) for g in gathered]
            for rank, value in enumerate(values):
                if value != values[0]:
                    raise ValueError(f"data-parallel replicas disagree on {key}: rank 0 has {values[0]!r}, "
                                     f"rank {rank} has {value!r}; start every replica with the same arguments")

    # ------------------------------------------------------------------ the controller's inputs
    def observation(self, local: ChunkObservation, with_inputs: bool = True) -> ChunkObservation:
        """The observation of the whole chunk (every replica gets the same one). `with_inputs=False`
        leaves the gate inputs out (nothing reads them without a fast-weight router network)."""
        light = replace(local, layers=[], nll_rows=local.nll_rows.double().cpu())
        shapes = [(tuple(l.logits.shape), tuple(l.inputs.shape)) for l in local.layers]
        gathered = self.gather_objects((light, shapes))
        per_rank = [[] for _ in range(self.world_size)]
        for i, layer in enumerate(local.layers):
            logits = self.gather_rows(layer.logits, [g[1][i][0] for g in gathered])
            inputs = (self.gather_rows(layer.inputs, [g[1][i][1] for g in gathered]) if with_inputs
                      else [layer.inputs[:0]] * self.world_size)
            for rank in range(self.world_size):
                per_rank[rank].append(LayerObservation(logits[rank], inputs[rank]))
        return combine_observations([replace(g[0], layers=layers) for g, layers in zip(gathered, per_rank)])

    def window(self, local: TelemetryWindow | None) -> ReplicaWindow | None:
        """The node's window from every replica's window of the same step."""
        return combine_windows(self.gather_objects(local))

    def quality_check(self, rows: torch.Tensor, observation: ChunkObservation,
                      local: tuple[torch.Tensor, int, TelemetryWindow] | None) -> QualityCheck:
        """The paired check of `rows` of the whole chunk: the adapted NLL from the combined
        `observation`, the static NLL of the replicas' re-runs of the rows they hold (`local` = (static
        per-sequence NLL [r'], tokens, window) of this replica's re-run, None if it held none)."""
        if local is not None:
            local = (local[0].double().cpu(), local[1], local[2])
        parts = [p for p in self.gather_objects(local) if p is not None]
        if not parts:
            raise ValueError("no replica re-ran any of the quality check's rows")
        static_rows = torch.cat([p[0] for p in parts])                    # [r] in the order of `rows`
        static_tokens = sum(p[1] for p in parts)
        adapted_sum, tokens = observation.rows_nll(rows)
        return QualityCheck(adapted_sum / tokens, float(static_rows.sum()) / static_tokens, tokens,
                            combine_windows([p[2] for p in parts]))


# ------------------------------------------------------------------------------------ the active group

_ACTIVE: list[ReplicaGroup] = []


@contextmanager
def data_parallel(group: ReplicaGroup) -> Iterator[ReplicaGroup]:
    """Within the block, experiments run data-parallel over `group` (see `active`)."""
    _ACTIVE.append(group)
    try:
        yield group
    finally:
        _ACTIVE.pop()


def active() -> ReplicaGroup | None:
    """The replica group an experiment started now runs over (None: one process)."""
    return _ACTIVE[-1] if _ACTIVE else None

