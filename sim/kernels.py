"""Workload → kernels: what one chunk asks of the GPU, kernel by kernel, with its roofline.

A chunk is split into phases: token embedding, one phase per transformer block, final norm + LM
head. Each phase holds the kernels an eager PyTorch MoE-GPT-2 launches (layer norms, qkv and
output projections, fused causal attention, residual adds, router, token dispatch, one group of
GEMMs per expert that received tokens). Per kernel the roofline gives

    compute time = flops / (peak · efficiency)        (at max clock; scales as 1/clock)
    memory time  = bytes / (bandwidth · efficiency)   (independent of the SM clock)
    kernel time  = max(compute time / clock fraction, memory time) + launches · overhead

A serving step (`ChunkWorkload.phase` "prefill" or "decode") differs in three places: attention
computes its own (query, key) pairs and also reads the cached K/V positions and writes the new
ones to the cache; and the LM head runs on `logit_tokens` rows followed by a greedy argmax (one
read of the logits) instead of the loss over every token.

A decode step on a preset with the `decode_*` fields is a *captured* step (one CUDA graph replay,
the experts one grouped GEMM over the sorted rows, as `nectar serve` runs it on an sm90 GPU): no
kernel is launched from the host (launches cost nothing), every kernel reads at
`decode_bandwidth_efficiency`, and each block adds one fixed `block_latency` of
`decode_block_latency_s + rows · decode_row_latency_s` — the time of the block's many small
kernels that its bytes do not explain (fitted on H100 decode steps:
analysis/reconcile/decode_steps.py). The embedding and head phases add none. Without those fields
a decode step is priced like any chunk.

This module is the readable definition (lists of `Kernel` records); `sim.pricing` evaluates the
same formulas vectorised over layers and experts. Experts with no tokens launch nothing and read
no weights; the MoE formulas below take scalars or numpy arrays alike so both paths share them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from nectar.telemetry.workload import ChunkWorkload
from sim.presets import GPUPreset

GEMM, ATTENTION, MEMORY = 0, 1, 2  # efficiency classes
SERVING_PHASES = ("prefill", "decode")  # steps that keep a KV cache
ROUTER_LAUNCHES = 3                # gate matmul, softmax, top-k
DISPATCH_LAUNCHES = 2              # gather, scatter-add


@dataclass(frozen=True)
class Kernel:
    """One kernel (or group of identical launches): FLOPs, bytes moved and launch count."""

    name: str
    flops: float
    bytes: float
    launches: int
    kind: int = GEMM  # GEMM | ATTENTION | MEMORY
    captured: bool = False   # inside a captured decode step: decode bandwidth, no host launches
    latency_s: float = 0.0   # fixed time (a captured block's latency), not clock-scaled

    def compute_s(self, preset: GPUPreset) -> float:
        """Compute time at the max clock."""
        if self.flops == 0:
            return 0.0
        eff = preset.attention_efficiency if self.kind == ATTENTION else preset.gemm_efficiency
        return self.flops / (preset.peak_tflops * 1e12 * eff)

    def memory_s(self, preset: GPUPreset) -> float:
        return self.bytes / (preset.mem_bandwidth_GBps * 1e9 * bandwidth_efficiency(preset, self.captured))

    def overhead_s(self, preset: GPUPreset) -> float:
        """Launch overhead (none inside a captured step) plus the fixed latency."""
        return (0.0 if self.captured else self.launches * preset.launch_overhead_s) + self.latency_s

    def time_s(self, preset: GPUPreset, clock_fraction: float = 1.0) -> float:
        """Roofline time at `clock_fraction` of the max clock, launch overhead and latency included."""
        return max(self.compute_s(preset) / clock_fraction, self.memory_s(preset)) + self.overhead_s(preset)


def is_captured(preset: GPUPreset, phase: str) -> bool:
    """A decode step on a preset with the captured-decode fields."""
    return phase == "decode" and preset.captured_decode


def bandwidth_efficiency(preset: GPUPreset, captured: bool) -> float:
    return preset.decode_bandwidth_efficiency if captured else preset.bandwidth_efficiency


def block_latency_s(preset: GPUPreset, rows: int) -> float:
    """A captured decode block's fixed latency for `rows` decode rows."""
    return preset.decode_block_latency_s + rows * preset.decode_row_latency_s


@dataclass(frozen=True)
class Shape:
    """What the shape-only kernels depend on (hashable: the pricer caches on it)."""

    tokens: int
    batch: int
    seq_len: int
    d_model: int
    n_heads: int
    vocab_size: int
    dtype_bytes: int
    attention_pairs: float = 0.0       # (query, key) pairs, causal ones for teacher-forced chunks
    kv_read_tokens: int = 0            # cached K/V positions read per layer
    logit_tokens: int | None = None    # None = every token's logits and the loss
    phase: str = ""                    # "prefill" | "decode" write K/V to the cache


def shape_of(w: ChunkWorkload) -> Shape:
    return Shape(w.tokens, w.batch, w.seq_len, w.d_model, w.n_heads, w.vocab_size, w.dtype_bytes,
                 w.query_key_pairs(), w.kv_read_tokens, w.logit_tokens, w.phase)


def attention_bytes(s: Shape) -> float:
    """Q, K, V read and the output written; cached K/V read; a serving step's new K/V written."""
    n, d, dt = s.tokens, s.d_model, s.dtype_bytes
    cache_writes = 2 * n * d * dt if s.phase in SERVING_PHASES else 0
    return 4 * n * d * dt + 2 * s.kv_read_tokens * d * dt + cache_writes


def embedding_kernels(s: Shape) -> list[Kernel]:
    """Token and position embedding gathers plus their sum."""
    nd = s.tokens * s.d_model * s.dtype_bytes
    return [Kernel("wte_gather", 0.0, 2 * nd, 1, MEMORY), Kernel("wpe_gather", 0.0, 2 * nd, 1, MEMORY),
            Kernel("embed_add", 0.0, 3 * nd, 1, MEMORY)]


def attention_block_kernels(s: Shape) -> list[Kernel]:
    """The dense part of one transformer block (everything but the MoE feed-forward)."""
    n, d, dt = s.tokens, s.d_model, s.dtype_bytes
    nd = n * d * dt
    return [
        Kernel("ln_1", 0.0, 2 * nd, 1, MEMORY),
        Kernel("qkv_proj", 2.0 * n * d * 3 * d, nd + 3 * nd + 3 * d * d * dt, 1, GEMM),
        Kernel("attention", 4.0 * s.attention_pairs * d, attention_bytes(s), 1, ATTENTION),  # QKᵀ and AV, all heads
        Kernel("out_proj", 2.0 * n * d * d, 2 * nd + d * d * dt, 1, GEMM),
        Kernel("residual_1", 0.0, 3 * nd, 1, MEMORY),
        Kernel("ln_2", 0.0, 2 * nd, 1, MEMORY),
        Kernel("residual_2", 0.0, 3 * nd, 1, MEMORY),
    ]


def head_kernels(s: Shape) -> list[Kernel]:
    """Final layer norm and tied LM head on the logit rows, then the loss over the logits (in fp32,
    as HF computes it) for a teacher-forced chunk, or a greedy argmax (one read of the logits)."""
    n = s.tokens if s.logit_tokens is None else s.logit_tokens
    d, v, dt = s.d_model, s.vocab_size, s.dtype_bytes
    head = [Kernel("ln_f", 0.0, 2 * n * d * dt, 1, MEMORY),
            Kernel("lm_head", 2.0 * n * d * v, (n * d + n * v + v * d) * dt, 1, GEMM)]
    if s.logit_tokens is None:
        return head + [Kernel("loss", 0.0, n * v * (dt + 4 + 4), 2, MEMORY)]  # upcast logits to fp32, log-softmax + NLL
    return head + [Kernel("argmax", 0.0, n * v * dt, 1, MEMORY)]


# ---------------------------------------------------------------- MoE formulas (scalars or arrays)
def router_flops_bytes(tokens, d_model, dtype_bytes, n_experts, router_flops_per_token):
    """Gate matmul over all tokens; fp32 logits written then read by softmax/top-k."""
    return tokens * router_flops_per_token, tokens * d_model * dtype_bytes + 2 * tokens * n_experts * 4


def dispatch_bytes(routed_tokens, d_model, dtype_bytes):
    """Gather routed rows (read + write) and scatter-add outputs (read, read-modify-write)."""
    return 5.0 * routed_tokens * d_model * dtype_bytes


def expert_flops_bytes(count, flops_per_token, bytes_per_token, weight_bytes):
    """An expert's work: per-token FLOPs and activations, plus its weights once if it has tokens."""
    return count * flops_per_token, count * bytes_per_token + weight_bytes * (count > 0)


def expert_launches(flops_per_token: float, bytes_per_token: float, preset: GPUPreset) -> int:
    """Matmul experts launch `launches_per_expert` kernels, copy/constant ones fewer, zero experts none."""
    if flops_per_token > 0:
        return preset.launches_per_expert
    return preset.launches_per_light_expert if bytes_per_token > 0 else 0


def moe_kernels(workload: ChunkWorkload, layer_index: int, preset: GPUPreset) -> list[Kernel]:
    """Router, dispatch and one kernel group per expert that received tokens."""
    layer = workload.layers[layer_index]
    n, d, dt = workload.tokens, workload.d_model, workload.dtype_bytes
    router = router_flops_bytes(n, d, dt, len(layer.tokens_per_expert), layer.router_flops_per_token)
    kernels = [Kernel("router", *router, ROUTER_LAUNCHES, GEMM),
               Kernel("dispatch", 0.0, dispatch_bytes(sum(layer.tokens_per_expert), d, dt), DISPATCH_LAUNCHES, MEMORY)]
    for e, (count, cost) in enumerate(zip(layer.tokens_per_expert, layer.expert_costs)):
        launches = expert_launches(cost.flops, cost.bytes, preset)
        if count > 0 and launches > 0:
            flops, nbytes = expert_flops_bytes(count, cost.flops, cost.bytes, cost.weight_bytes)
            kernels.append(Kernel(f"expert_{e}", flops, nbytes, launches, GEMM))
    return kernels


def chunk_kernels(workload: ChunkWorkload, preset: GPUPreset) -> list[list[Kernel]]:
    """The kernels of every phase, [P][K]: embed, one block per layer, head."""
    s = shape_of(workload)
    blocks = [attention_block_kernels(s) + moe_kernels(workload, l, preset) for l in range(workload.n_layers)]
    phases = [embedding_kernels(s), *blocks, head_kernels(s)]
    if not is_captured(preset, workload.phase):
        return phases
    latency = Kernel("block_latency", 0.0, 0.0, 0, MEMORY, latency_s=block_latency_s(preset, workload.tokens))
    phases = [[replace(k, captured=True) for k in ks] for ks in phases]
    return [phases[0], *(ks + [replace(latency, captured=True)] for ks in phases[1:-1]), phases[-1]]


def phase_names(n_layers: int) -> list[str]:
    return ["embed", *(f"block_{l}" for l in range(n_layers)), "head"]
