"""Hand-built ChunkWorkloads of the DistilGPT2-shaped MoE, for calibration, tests and benchmarks.

The costs follow nectar/experts.py's conventions (FLOPs of the matmuls; activation bytes of an
eager implementation; weights separately), computed here from the shapes so that the simulator
can be exercised without building a torch model. Token counts per expert are either given or
spread as evenly as possible (top-k: every token takes k distinct experts).
"""

from __future__ import annotations

from nectar.telemetry.workload import ChunkWorkload, ExpertCost, LayerWorkload


def expert_cost(kind: str, d_model: int, hidden: int, dtype_bytes: int = 2) -> ExpertCost:
    """Per-token cost of a "gelu" (GPT-2 MLP) or "swiglu" expert of width `hidden`."""
    if kind == "gelu":
        return ExpertCost(flops=4.0 * d_model * hidden, bytes=float((2 * d_model + 4 * hidden) * dtype_bytes),
                          weight_bytes=float((2 * d_model * hidden + hidden + d_model) * dtype_bytes), kind="ffn")
    if kind == "swiglu":
        return ExpertCost(flops=6.0 * d_model * hidden, bytes=float((2 * d_model + 6 * hidden) * dtype_bytes),
                          weight_bytes=float(3 * d_model * hidden * dtype_bytes), kind="ffn")
    raise ValueError(f"unknown expert kind {kind!r}; choose 'gelu' or 'swiglu'")


def balanced_counts(tokens: int, n_experts: int, top_k: int) -> list[int]:
    """tokens·top_k assignments spread over n_experts as evenly as integers allow."""
    if not 1 <= top_k <= n_experts:
        raise ValueError(f"top_k must lie in [1, n_experts={n_experts}], got {top_k}")
    total = tokens * top_k
    return [total // n_experts + (1 if e < total % n_experts else 0) for e in range(n_experts)]


def distilgpt2_moe_workload(top_k: int = 2, *, expert: str = "swiglu", batch: int = 32, seq_len: int = 1024,
                            n_layers: int = 6, d_model: int = 768, n_heads: int = 12, n_experts: int = 8,
                            hidden: int = 3072, vocab_size: int = 50257, dtype_bytes: int = 2,
                            counts: list[list[int]] | None = None) -> ChunkWorkload:
    """One chunk of the DistilGPT2-shaped MoE; `counts` [L][E] overrides the balanced top-k split."""
    tokens = batch * seq_len
    cost = expert_cost(expert, d_model, hidden, dtype_bytes)
    if counts is None:
        counts = [balanced_counts(tokens, n_experts, top_k)] * n_layers
    if len(counts) != n_layers or any(len(c) != n_experts for c in counts):
        raise ValueError(f"counts must be [n_layers={n_layers}][n_experts={n_experts}]")
    layers = [LayerWorkload(tokens_per_expert=list(c), expert_costs=[cost] * n_experts,
                            router_flops_per_token=2.0 * d_model * n_experts) for c in counts]
    return ChunkWorkload(tokens=tokens, batch=batch, seq_len=seq_len, d_model=d_model, n_layers=n_layers,
                         n_heads=n_heads, vocab_size=vocab_size, layers=layers, dtype_bytes=dtype_bytes,
                         policy=f"top{top_k}-{expert}")
