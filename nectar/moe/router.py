"""The routing-decision record and the interface every router implements.

A MoE layer owns a trained gate (a linear map d_model → E logits). A *router* turns those logits
into a decision; routers are swappable without touching the gate's weights, which is how one
model runs several routing policies on the same token stream.
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

    def forward(self, logits: torch.Tensor) -> RoutingDecision:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def max_slots(self) -> int:  # K of the decisions this router returns
        raise NotImplementedError
