"""The vectorised pricer equals the readable per-kernel roofline, and the roofline's closed forms hold."""

from dataclasses import replace

import numpy as np
import pytest

from nectar.telemetry.workload import ChunkWorkload, ExpertCost, LayerWorkload
from sim.kernels import Kernel, GEMM, MEMORY, chunk_kernels
from sim.presets import load_preset
from sim.pricing import ChunkPricer
from sim.synthetic_workload import distilgpt2_moe_workload, expert_cost
from tests.tolerance import approx

PRESET = load_preset("h100_sxm")
COSTS = [expert_cost("swiglu", 256, 1024), expert_cost("gelu", 256, 512),
         ExpertCost(0.0, 0.0, 0.0, "zero"), ExpertCost(0.0, 1024.0, 0.0, "copy"),
         ExpertCost(2048.0, 1024.0, 512.0, "constant")]


def _random_workload(rng: np.random.Generator) -> ChunkWorkload:
    """Ragged layers (different expert counts), mixed kinds, some experts without tokens."""
    batch, seq_len, n_layers = int(rng.integers(1, 5)), int(rng.integers(8, 300)), int(rng.integers(1, 5))
    tokens = batch * seq_len
    layers = []
    for _ in range(n_layers):
        n_experts = int(rng.integers(1, 7))
        costs = [COSTS[i] for i in rng.integers(0, len(COSTS), n_experts)]
        counts = [int(c) if rng.random() > 0.3 else 0 for c in rng.integers(0, 2 * tokens, n_experts)]
        layers.append(LayerWorkload(counts, costs, router_flops_per_token=2.0 * 256 * n_experts))
    return ChunkWorkload(tokens=tokens, batch=batch, seq_len=seq_len, d_model=256, n_layers=n_layers,
                         n_heads=4, vocab_size=int(rng.integers(100, 5000)), layers=layers)


def _serving_step(rng: np.random.Generator, phase: str) -> ChunkWorkload:
    """A random decode step (batch of one-token sequences with random contexts) or prefill chunk
    (one sequence after a random cached prefix), same routing generator as `_random_workload`."""
    base = _random_workload(rng)
    if phase == "decode":
        contexts = rng.integers(0, 2000, base.tokens)  # [B] cached positions of each request
        return replace(base, batch=base.tokens, seq_len=1, attention_pairs=float((contexts + 1).sum()),
                       kv_read_tokens=int(contexts.sum()), logit_tokens=base.tokens, phase="decode")
    q, p0 = base.tokens, int(rng.integers(0, 4000))
    return replace(base, batch=1, seq_len=q, attention_pairs=q * p0 + q * (q + 1) / 2, kv_read_tokens=p0,
                   logit_tokens=1, phase="prefill")


def _workload(seed: int, phase: str) -> ChunkWorkload:
    rng = np.random.default_rng(seed)
    return _random_workload(rng) if phase == "teacher" else _serving_step(rng, phase)


@pytest.mark.parametrize("phase", ["teacher", "decode", "prefill"])
@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("clock_fraction", [1.0, 0.5, 0.37])
def test_vectorised_pricer_equals_per_kernel_roofline(seed, clock_fraction, phase):
    workload = _workload(seed, phase)
    priced = ChunkPricer(PRESET).price(workload)
    reference = [sum(k.time_s(PRESET, clock_fraction) for k in phase) for phase in chunk_kernels(workload, PRESET)]
    kernels = [k for phase in chunk_kernels(workload, PRESET) for k in phase]
    n = len(kernels) + 4  # sums over the kernels (vectorised vs a loop), each kernel's roofline (÷, max, +)
    assert priced.durations_s(clock_fraction) == approx(reference, n=n)
    assert priced.flops == approx(sum(k.flops for k in kernels), n=n)
    assert priced.bytes == approx(sum(k.bytes for k in kernels), n=n)
    assert priced.compute_busy_s.sum() == approx(sum(k.compute_s(PRESET) for k in kernels), n=n)


def test_roofline_closed_forms():
    flop_rate = PRESET.peak_tflops * 1e12 * PRESET.gemm_efficiency
    byte_rate = PRESET.mem_bandwidth_GBps * 1e9 * PRESET.bandwidth_efficiency
    gemm = Kernel("gemm", flops=1e12, bytes=1e6, launches=2, kind=GEMM)
    stream = Kernel("stream", flops=0.0, bytes=1e10, launches=1, kind=MEMORY)
    # the rates (two ×), a ÷, a max, the launches (×, +): n = 8 roundings
    assert gemm.time_s(PRESET) == approx(1e12 / flop_rate + 2 * PRESET.launch_overhead_s, n=8)
    assert gemm.time_s(PRESET, 0.5) == approx(2e12 / flop_rate + 2 * PRESET.launch_overhead_s, n=8)
    assert stream.time_s(PRESET, 0.5) == approx(1e10 / byte_rate + PRESET.launch_overhead_s, n=8)


def test_expert_without_tokens_costs_nothing_and_weights_are_read_once():
    workload = distilgpt2_moe_workload(1, n_layers=1, counts=[[32768, 0, 0, 0, 0, 0, 0, 0]])
    kernels = chunk_kernels(workload, PRESET)[1]
    experts = [k for k in kernels if k.name.startswith("expert_")]
    assert [k.name for k in experts] == ["expert_0"]
    cost = workload.layers[0].expert_costs[0]
    assert experts[0].bytes == 32768 * cost.bytes + cost.weight_bytes
    assert experts[0].flops == 32768 * cost.flops


def test_attention_flops_follow_the_causal_shape():
    workload = distilgpt2_moe_workload(2, batch=2, seq_len=16, n_layers=1)
    attention = next(k for k in chunk_kernels(workload, PRESET)[1] if k.name == "attention")
    d, pairs = 768, 2 * sum(range(1, 17))  # causal (query, key) pairs over the batch
    assert attention.flops == 4.0 * pairs * d
