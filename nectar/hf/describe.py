"""What each decoder block of a transformers MoE model computes per token, read from its weights.

FLOPs count matrix multiplications only (2 per multiply-add), as `nectar.moe.experts` does; bytes
count one token's activations in an unfused implementation (SwiGLU: x read, y written, gate, up and
their product each written once and read once), weights separately in `weight_bytes`.

- A routed expert is SwiGLU of width H (`experts.down_proj [E, D, H]`): 6·D·H FLOPs per token.
- Shared experts (always on): DeepSeek-V3's `shared_experts` is one fused SwiGLU of width
  n_shared·H; Qwen2-MoE's `shared_expert` is a SwiGLU behind a sigmoid scalar gate
  (`shared_expert_gate`, D → 1: +2·D FLOPs).
- The router is a D → E matmul: 2·D·E FLOPs per token.
- Dense blocks (Qwen's `mlp_only_layers` / `decoder_sparse_step`, DeepSeek's
  `first_k_dense_replace`) have a SwiGLU MLP of their own width.
Widths come from weight shapes, never from the config.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nectar.hf.families import family_of, find_moe_blocks
from nectar.telemetry.workload import ExpertCost


def swiglu_cost(d_model: int, hidden: int, dtype_bytes: int, extra_flops: float = 0.0,
                extra_weights: int = 0) -> ExpertCost:
    """One token through a bias-free SwiGLU of width `hidden` (plus an optional scalar gate)."""
    return ExpertCost(flops=6.0 * d_model * hidden + extra_flops,
                      bytes=float((2 * d_model + 6 * hidden) * dtype_bytes),
                      weight_bytes=float((3 * d_model * hidden + extra_weights) * dtype_bytes),
                      kind="ffn")


def mlp_width(mlp: nn.Module) -> int:
    """Width of a SwiGLU MLP module (`gate_proj.weight` [H, D])."""
    return int(mlp.gate_proj.weight.shape[0])


@dataclass(frozen=True)
class SharedExperts:
    """A block's always-on experts: `count` experts, `hidden` total width, scalar-gated or not."""

    count: int = 0
    hidden: int = 0
    gated: bool = False

    def cost(self, d_model: int, dtype_bytes: int) -> ExpertCost:
        gate_flops, gate_weights = (2.0 * d_model, d_model) if self.gated else (0.0, 0)
        return swiglu_cost(d_model, self.hidden, dtype_bytes, gate_flops, gate_weights)


def shared_experts_of(block: nn.Module) -> SharedExperts:
    if hasattr(block, "shared_experts"):      # DeepSeek-V3: one fused MLP of width n_shared · H
        config = getattr(block, "config", None)
        return SharedExperts(int(getattr(config, "n_shared_experts", 1) or 1), mlp_width(block.shared_experts))
    if hasattr(block, "shared_expert"):       # Qwen2-MoE: one MLP behind sigmoid(shared_expert_gate(x))
        return SharedExperts(1, mlp_width(block.shared_expert), gated=hasattr(block, "shared_expert_gate"))
    return SharedExperts()


def describe(model: nn.Module) -> list[dict]:
    """Per MoE block: family, E, K, score function, gate options, widths and per-token FLOPs."""
    out = []
    for found in find_moe_blocks(model):
        block = found.block
        family = family_of(block.gate)
        num_experts, d_model, hidden = block.experts.down_proj.shape  # [E, D, H]
        shared = shared_experts_of(block)
        gate = block.gate
        out.append({
            "name": found.name, "block_index": found.block_index, "family": family.name,
            "num_experts": int(num_experts), "top_k": family.top_k, "score_fn": family.score_fn,
            "norm_topk_prob": family.renormalizes,
            "routed_scaling_factor": float(getattr(gate, "routed_scaling_factor", 1.0)),
            "n_group": getattr(gate, "num_group", None), "topk_group": getattr(gate, "topk_group", None),
            "d_model": int(d_model), "expert_hidden": int(hidden),
            "num_shared_experts": shared.count, "shared_hidden": shared.hidden,
            "expert_flops": 6 * int(d_model) * int(hidden),
            "shared_flops": shared.cost(int(d_model), 1).flops if shared.count else 0.0,
            "router_flops": 2 * int(d_model) * int(num_experts),
            "experts_implementation": str(getattr(block.experts.config, "_experts_implementation", None) or "eager"),
        })
    return out


def dense_mlp_cost(mlp: nn.Module, dtype_bytes: int) -> ExpertCost:
    """The cost of a dense block's SwiGLU MLP per token."""
    width, d_model = mlp.gate_proj.weight.shape  # [H, D]
    return swiglu_cost(int(d_model), int(width), dtype_bytes)


def param_bytes(module: nn.Module) -> int:
    """Element size of the module's first parameter (the model's storage dtype)."""
    for param in module.parameters():
        return param.element_size()
    return torch.empty((), dtype=torch.get_default_dtype()).element_size()
