"""Prices a whole chunk at once: the roofline of every kernel, vectorised over layers and experts.

Same kernels and formulas as `sim.kernels` (the readable definition and the tests' reference).
A chunk's phases are: embed, one block per layer, head. Each block's kernels split into the
shape-only part (norms, projections, attention, residuals: identical in every block, so priced
once per `sim.kernels.Shape` — serving fields included — and cached across chunks) and the routing-dependent part (router, dispatch, one
kernel group per expert: a [L, 2+E] table per chunk). A phase's duration at clock fraction s is
Σ_k max(compute_k / s, memory_k) + launch overhead; in a captured decode step (`sim.kernels`: a
preset with the decode_* fields) the memory times use the decode bandwidth, launches cost nothing
and each block's overhead is its fixed latency instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

from nectar.telemetry.workload import ChunkWorkload
from sim import kernels as K
from sim.presets import GPUPreset
from sim.workload_arrays import workload_arrays


@dataclass
class KernelTable:
    """Per-kernel compute and memory times of R rows of kernels (zero padding costs nothing)."""

    compute_s: np.ndarray    # [R, K] compute time of each kernel at max clock
    memory_s: np.ndarray     # [R, K] memory time of each kernel
    launch_s: np.ndarray     # [R] launch overhead summed over each row's kernels
    _durations: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.compute_busy_s = self.compute_s.sum(axis=1)  # [R]
        self.memory_busy_s = self.memory_s.sum(axis=1)  # [R]

    def durations_s(self, clock_fraction: float) -> np.ndarray:
        """[R] row durations at `clock_fraction` of the max clock (memoised per fraction)."""
        if clock_fraction not in self._durations:
            kernel_s = np.maximum(self.compute_s / clock_fraction, self.memory_s)  # [R, K]
            self._durations[clock_fraction] = kernel_s.sum(axis=1) + self.launch_s
        return self._durations[clock_fraction]

    def row_duration_s(self, row: int, clock_fraction: float) -> float:
        return float(np.maximum(self.compute_s[row] / clock_fraction, self.memory_s[row]).sum() + self.launch_s[row])


@dataclass
class PricedChunk:
    """A chunk's phases: shape-only kernels per phase [P] plus routing kernels per block [L = P − 2]."""

    phase_names: list[str]   # [P]
    fixed: KernelTable       # [P, Kf] embed, the dense part of each block, head (cached per shape)
    moe: KernelTable         # [L, 2+E] router, dispatch, experts of each block
    flops: float             # totals over the chunk
    bytes: float
    _durations: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.compute_busy_s = self._per_phase(self.fixed.compute_busy_s, self.moe.compute_busy_s)  # [P]
        self.memory_busy_s = self._per_phase(self.fixed.memory_busy_s, self.moe.memory_busy_s)  # [P]

    @staticmethod
    def _per_phase(fixed: np.ndarray, moe: np.ndarray) -> np.ndarray:
        total = fixed.copy()  # [P]
        total[1:-1] += moe  # blocks only
        return total

    def durations_s(self, clock_fraction: float) -> np.ndarray:
        """[P] phase durations at `clock_fraction` of the max clock (memoised per fraction)."""
        if clock_fraction not in self._durations:
            self._durations[clock_fraction] = self._per_phase(self.fixed.durations_s(clock_fraction),
                                                              self.moe.durations_s(clock_fraction))
        return self._durations[clock_fraction]

    def phase_duration_s(self, phase: int, clock_fraction: float) -> float:
        """One phase's duration, computed afresh (the power limiter's root search)."""
        duration = self.fixed.row_duration_s(phase, clock_fraction)
        if 0 < phase < len(self.phase_names) - 1:
            duration += self.moe.row_duration_s(phase - 1, clock_fraction)
        return duration


class ChunkPricer:
    """Turns ChunkWorkloads into PricedChunks for one preset."""

    def __init__(self, preset: GPUPreset):
        self.preset = preset
        self._flop_rate = np.array([preset.peak_tflops * 1e12 * preset.gemm_efficiency,
                                    preset.peak_tflops * 1e12 * preset.attention_efficiency, np.inf])  # [3]
        self._fixed = lru_cache(maxsize=16)(self._fixed_table)

    def _byte_rate(self, captured: bool) -> float:
        return self.preset.mem_bandwidth_GBps * 1e9 * K.bandwidth_efficiency(self.preset, captured)

    def _fixed_table(self, shape: K.Shape, n_layers: int) -> tuple[KernelTable, float, float]:
        """The shape-only kernels of every phase, and their total FLOPs and bytes."""
        phases = [K.embedding_kernels(shape), *[K.attention_block_kernels(shape)] * n_layers, K.head_kernels(shape)]
        width = max(len(ks) for ks in phases)
        flops, nbytes = np.zeros((len(phases), width)), np.zeros((len(phases), width))  # [P, Kf]
        kind = np.zeros((len(phases), width), dtype=int)  # [P, Kf] efficiency class
        for p, ks in enumerate(phases):
            flops[p, : len(ks)], nbytes[p, : len(ks)] = [k.flops for k in ks], [k.bytes for k in ks]
            kind[p, : len(ks)] = [k.kind for k in ks]
        captured = K.is_captured(self.preset, shape.phase)
        if captured:  # no host launches; each block's fixed latency
            launch_s = np.zeros(len(phases))  # [P]
            launch_s[1:-1] = K.block_latency_s(self.preset, shape.tokens)
        else:
            launch_s = np.array([sum(k.launches for k in ks) for ks in phases]) * self.preset.launch_overhead_s  # [P]
        table = KernelTable(flops / self._flop_rate[kind], nbytes / self._byte_rate(captured), launch_s)
        return table, float(flops.sum()), float(nbytes.sum())

    def _moe_table(self, w: ChunkWorkload) -> tuple[KernelTable, float, float]:
        """Router, dispatch and expert kernels of every block: [L, 2+E]."""
        a, p = workload_arrays(w), self.preset
        n_layers, width = a.counts.shape
        flops, nbytes = np.empty((n_layers, 2 + width)), np.empty((n_layers, 2 + width))  # [L, 2+E]
        flops[:, 0], nbytes[:, 0] = K.router_flops_bytes(w.tokens, w.d_model, w.dtype_bytes, a.n_experts, a.router_flops)
        flops[:, 1], nbytes[:, 1] = 0.0, K.dispatch_bytes(a.counts.sum(axis=1), w.d_model, w.dtype_bytes)
        per_expert = np.where(a.flops > 0, p.launches_per_expert, np.where(a.bytes > 0, p.launches_per_light_expert, 0))
        per_expert *= a.counts > 0  # [L, E] launches; experts without tokens launch nothing
        runs = per_expert > 0  # [L, E]
        expert_flops, expert_bytes = K.expert_flops_bytes(a.counts, a.flops, a.bytes, a.weight_bytes)  # [L, E]
        flops[:, 2:], nbytes[:, 2:] = expert_flops * runs, expert_bytes * runs
        launches = K.ROUTER_LAUNCHES + K.DISPATCH_LAUNCHES + per_expert.sum(axis=1)  # [L]
        captured = K.is_captured(p, w.phase)
        launch_s = np.zeros(n_layers) if captured else launches * p.launch_overhead_s  # [L]
        table = KernelTable(flops / self._flop_rate[K.GEMM], nbytes / self._byte_rate(captured), launch_s)
        return table, float(flops.sum()), float(nbytes.sum())

    def price(self, w: ChunkWorkload) -> PricedChunk:
        moe, moe_flops, moe_bytes = self._moe_table(w)  # validates the workload first
        fixed, fixed_flops, fixed_bytes = self._fixed(K.shape_of(w), w.n_layers)
        return PricedChunk(K.phase_names(w.n_layers), fixed, moe, fixed_flops + moe_flops, fixed_bytes + moe_bytes)


def kv_cache_B(workload: ChunkWorkload) -> int:
    """K and V of every layer for the cached positions read, plus a serving step's new ones."""
    positions = workload.kv_read_tokens + (workload.tokens if workload.phase in K.SERVING_PHASES else 0)
    return 2 * workload.n_layers * positions * workload.d_model * workload.dtype_bytes


def memory_footprint_B(workload: ChunkWorkload, preset: GPUPreset) -> int:
    """Device memory in use: baseline + weights (dense and every expert) + the chunk's activations
    + the KV cache it touches."""
    d, v, dt = workload.d_model, workload.vocab_size, workload.dtype_bytes
    dense_weights = (v * d + workload.seq_len * d + workload.n_layers * 4 * d * d) * dt
    expert_weights = sum(c.weight_bytes for layer in workload.layers for c in layer.expert_costs)
    # residual stream, qkv, hidden; logits (+ loss) of the logit rows
    activations = (workload.tokens * 8 * d + workload.logit_rows() * 2 * v) * dt
    total = preset.memory_baseline_B + dense_weights + expert_weights + activations + kv_cache_B(workload)
    return int(min(total, preset.memory_total_B))
