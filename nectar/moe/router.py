"""The routing-decision record, the interface every router implements, and the one gates path.

A MoE layer owns a trained gate (a linear map d_model → E logits). A *router* turns those logits
(and, if it wants them, the gate's inputs) into a decision; routers are swappable without touching
the gate's weights, which is how one model runs several routing policies on the same token stream.

Every router computes its combine gates here (`gate_probs`, `chosen_gates`, `gate_decision`):
the softmax runs in at least fp32 whatever the logits' dtype (bf16 on a GPU), so that static and
adaptive routers weigh the same expert outputs identically.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class RoutingDecision:
    """One routing decision for N tokens over E experts with at most K slots per token.

    experts  [N, K] long   expert index per slot (any valid index where the slot is unused)
    gates    [N, K] float  combine weight per slot (0 where the slot is unused or dropped)
    mask     [N, K] bool   slot chosen by the router
    dropped  [N, K] bool   slot chosen but dropped (capacity overflow); dropped ⊆ mask
    probs    [N, E] float  full routing distribution (softmax of the *unbiased* scores)
    logits   [N, E] float  raw gate logits (before any selection bias)
    """

    experts: torch.Tensor
    gates: torch.Tensor
    mask: torch.Tensor
    dropped: torch.Tensor
    probs: torch.Tensor
    logits: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.probs.shape[-1]

    @property
    def active(self) -> torch.Tensor:
        """[N, K] bool: slots that are computed (chosen and not dropped)."""
        return self.mask & ~self.dropped

    def tokens_per_expert(self) -> torch.Tensor:
        """[E] long: number of (token, slot) pairs each expert computes."""
        idx = self.experts[self.active]
        return torch.bincount(idx, minlength=self.num_experts)

    def dropped_count(self) -> int:
        return int(self.dropped.sum())


class Router(nn.Module):
    """Base class: `forward(logits [N, E]) -> RoutingDecision`.

    `selection_bias` [E] (a buffer, default zeros) is added to the scores for *selection only*;
    gates are computed from the unbiased scores (auxiliary-loss-free balancing, DeepSeek-V3).
    """

    def __init__(self, num_experts: int, temperature: float = 1.0):
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"num_experts must be >= 1, got {num_experts}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.num_experts = num_experts
        self.temperature = temperature
        self.register_buffer("selection_bias", torch.zeros(num_experts), persistent=False)

    def forward(self, logits: torch.Tensor, inputs: torch.Tensor | None = None) -> RoutingDecision:  # pragma: no cover
        """logits [N, E] -> decision; `inputs` [N, D] are the gate's inputs (used by adaptive routers)."""
        raise NotImplementedError

    @property
    def max_slots(self) -> int:  # K of the decisions this router returns
        raise NotImplementedError


# ---------------------------------------------------------------------------- the gates path


def check_positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def check_logits(logits: torch.Tensor, num_experts: int) -> None:
    """Raise ValueError unless logits is a floating [N, num_experts] tensor."""
    if not isinstance(logits, torch.Tensor):
        raise ValueError(f"router expects a torch.Tensor of logits, got {type(logits).__name__}")
    if logits.dim() != 2 or logits.shape[1] != num_experts:
        raise ValueError(f"router expects logits of shape [N, {num_experts}], got {list(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"router logits must be floating point, got {logits.dtype}")


def stable_softmax(scores: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim, computed in at least fp32, returned in the scores' dtype."""
    if scores.dtype in (torch.float16, torch.bfloat16):
        return torch.softmax(scores.float(), dim=-1).to(scores.dtype)
    return torch.softmax(scores, dim=-1)


def gate_probs(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """[N, E] the static routing distribution softmax(logits / τ) (fp32 softmax)."""
    return stable_softmax(logits / temperature if temperature != 1.0 else logits)


def chosen_gates(probs: torch.Tensor, experts: torch.Tensor, mask: torch.Tensor | None, renormalize: bool) -> torch.Tensor:
    """[N, K] gates: probs at the chosen experts, 0 on unused slots (mask None: all used),
    optionally rescaled to sum to 1 over the used slots."""
    gates_NK = probs.gather(-1, experts)  # [N, K]
    if mask is not None:
        gates_NK = gates_NK * mask
    if renormalize:
        gates_NK = gates_NK / gates_NK.sum(-1, keepdim=True).clamp_min(torch.finfo(gates_NK.dtype).tiny)
    return gates_NK


def gate_decision(logits: torch.Tensor, experts: torch.Tensor, temperature: float,
                  mask: torch.Tensor | None = None) -> RoutingDecision:
    """Decision for chosen `experts` [N, K] (slots `mask`, default all): gates are the static
    softmax gathered at the chosen experts and renormalised over the used slots."""
    return probs_decision(logits, gate_probs(logits, temperature), experts, mask)


def probs_decision(logits: torch.Tensor, probs_NE: torch.Tensor, experts: torch.Tensor,
                   mask: torch.Tensor | None = None) -> RoutingDecision:
    """`gate_decision` from the static softmax probs [N, E] already computed (one softmax a forward)."""
    mask_NK = torch.ones_like(experts, dtype=torch.bool) if mask is None else mask
    gates_NK = chosen_gates(probs_NE, experts, None if mask is None else mask_NK, renormalize=True)
    return RoutingDecision(experts, gates_NK, mask_NK, torch.zeros_like(mask_NK), probs_NE, logits)
