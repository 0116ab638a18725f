"""How an unused routing slot reaches a transformers experts module, and which way saves compute.

A NECTAR decision may leave slots unused (adaptive k: `mask` False, or `dropped`). The experts
module always takes K slots per token, so an unused slot is realised as gate 0 and either

- "zero": index = the expert of the token's first active slot. Portable and exact (the output gets
  + 0·y), but the row is still computed: no compute is saved;
- "sentinel": index = E, which the experts kernel skips: real compute saved. Support depends on
  the transformers version and the experts implementation (measured on 5.17 and 5.24):

  | impl        | 5.17                             | 5.24                                              |
  |-------------|----------------------------------|---------------------------------------------------|
  | eager       | crashes (one_hot over E classes) | skipped                                           |
  | grouped_mm  | skipped (rows past the offsets)  | skipped only with `experts._is_expert_parallel`   |
  | batched_mm  | clamped to E-1, weight 0         | skipped only with `experts._is_expert_parallel`   |

  `_is_expert_parallel` only exists in 5.24, where it switches on exactly this sentinel masking
  (`integrations/moe.py`); `attach` sets it for the length of the attachment and restores it.
  Eager support is probed with three tokens. Other implementations (GPU kernels) get "zero".

The recorder is given what the GPU computes: with "zero", every slot is a computed (token,
expert) pair (the unused ones at the first active slot's expert), so the workload saves nothing, honestly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from nectar.moe.router import RoutingDecision

DROP_MODES = ("auto", "sentinel", "zero")


def experts_implementation(experts: nn.Module) -> str:
    config = getattr(experts, "config", None)
    return str(getattr(config, "_experts_implementation", None) or "eager")


@torch.no_grad()
def _eager_skips_sentinel(experts: nn.Module) -> bool:
    """Run 3 tokens with a sentinel slot; True iff the result equals the zero-gate one."""
    weight = experts.gate_up_proj
    num_experts = int(experts.num_experts)
    x_ND = torch.randn(3, weight.shape[-1], device=weight.device, dtype=weight.dtype)
    index_NK = torch.tensor([[0, 1], [1, 0], [0, 1]], device=weight.device) % num_experts
    gates_NK = torch.tensor([[0.5, 0.0], [0.25, 0.0], [1.0, 0.0]], device=weight.device, dtype=weight.dtype)
    sentinel_NK = index_NK.clone()
    sentinel_NK[:, 1] = num_experts
    try:
        out_ND = experts(x_ND, sentinel_NK, gates_NK)
    except (RuntimeError, IndexError):
        return False
    ref_ND = experts(x_ND, index_NK, gates_NK)
    return bool(torch.isfinite(out_ND).all() and torch.allclose(out_ND, ref_ND, rtol=1e-3, atol=1e-5))


@dataclass(frozen=True)
class SentinelSupport:
    supported: bool
    needs_flag: bool   # 5.24 grouped/batched_mm: set experts._is_expert_parallel


def sentinel_support(experts: nn.Module) -> SentinelSupport:
    impl = experts_implementation(experts)
    if impl in ("grouped_mm", "batched_mm"):
        return SentinelSupport(True, hasattr(experts, "_is_expert_parallel"))
    if impl == "eager":
        return SentinelSupport(_eager_skips_sentinel(experts), False)
    return SentinelSupport(False, False)


def resolve_drop(experts: nn.Module, drop: str) -> SentinelSupport:
    """How unused slots of this experts module are realised: SentinelSupport(supported=True) means
    sentinel. ValueError for an unknown mode or a sentinel the implementation cannot skip."""
    if drop not in DROP_MODES:
        raise ValueError(f"drop must be one of {DROP_MODES}, got {drop!r}")
    if drop == "zero":
        return SentinelSupport(False, False)
    support = sentinel_support(experts)
    if drop == "sentinel" and not support.supported:
        raise ValueError(f"experts implementation {experts_implementation(experts)!r} cannot skip a sentinel "
                         "slot here; use drop='zero' or 'auto'")
    return support


def realise(decision: RoutingDecision, num_experts: int, sentinel: bool
            ) -> tuple[torch.Tensor, torch.Tensor, RoutingDecision]:
    """(index [N, K], gates [N, K], computed decision) for the experts module.

    Active slots pass through bit for bit; unused ones get gate 0 and index E (sentinel) or the
    expert of the token's first active slot (zero). The computed decision is what the recorder counts."""
    active_NK = decision.active
    gates_NK = decision.gates.masked_fill(~active_NK, 0.0)
    if sentinel:
        fill_NK = torch.full_like(decision.experts, num_experts)
    else:                                                   # the token's first active slot's expert
        first_N1 = active_NK.int().argmax(-1, keepdim=True)        # [N, 1] (first max)
        fill_NK = decision.experts.gather(1, first_N1).clamp(0, num_experts - 1).expand_as(decision.experts)
    index_NK = torch.where(active_NK, decision.experts, fill_NK)
    if sentinel:
        return index_NK, gates_NK, decision
    every_NK = torch.ones_like(active_NK)
    computed = RoutingDecision(index_NK, gates_NK, every_NK, ~every_NK, decision.probs, decision.logits)
    return index_NK, gates_NK, computed
