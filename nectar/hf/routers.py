"""Static NECTAR routers over a pretrained family's own top-K choice (no test-time adaptation).

Every router here runs the family's selection (`FamilyRouting.select`), keeps a subset of its K
slots and weighs the kept slots with the family's gate formula (`FamilyRouting.gates`). Slots stay
in the family's order (unused ones are masked), so with every slot kept the decision is the
family's own, bit for bit, and so is the model's output.

- `FamilyRouter`: the family's top-K (the model as trained);
- `FamilyTopKRouter(k)`: the k slots of largest weight (k = K: the family's top-K);
- `ThresholdRouter(τ)`: static top-1 plus every slot whose renormalised weight is ≥ τ
  (`nectar.hf.threshold.keep_mask`; τ = 0: top-K, τ > 1/2: top-1) — a point of the static frontier;
- `ConfidenceRouter(p)`: per token, the fewest slots of largest weight whose renormalised weights
  sum to at least p (top-p over the family's own top-K).
Slot weights are the raw gate values renormalised over the K chosen slots; "largest weight" is
the static top-1 (for DeepSeek-V3: the largest unbiased sigmoid score among the chosen experts).

`renormalize` says how the kept slots are weighed: "family" (default) applies the family's formula
to the kept slots (Mixtral and `norm_topk_prob` families renormalise over them, the others keep
their raw probabilities); "mass" rescales the kept gates so that they sum to what all K gates sum
to (for families that do not renormalise, the output keeps its scale).
Routers ignore `selection_bias` (DeepSeek-V3's own selection bias lives in its gate).
"""

from __future__ import annotations

import torch

from nectar.hf.families import FamilyRouting
from nectar.hf.threshold import check_threshold, keep_mask, slot_ranks
from nectar.moe.router import Router, RoutingDecision, check_logits, check_positive_int

RENORMALIZE = ("family", "mass")


class FamilyRouter(Router):
    """The family's own top-K; subclasses keep fewer slots by overriding `keep`."""

    def __init__(self, family: FamilyRouting, renormalize: str = "family"):
        super().__init__(family.num_experts)
        if renormalize not in RENORMALIZE:
            raise ValueError(f"renormalize must be one of {RENORMALIZE}, got {renormalize!r}")
        self.family = family
        self.renormalize = renormalize

    @property
    def max_slots(self) -> int:
        return self.family.top_k

    def keep(self, weights: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor | None:
        """[N, K] bool slots to keep (None: all)."""
        return None

    def keep_slots(self, sel, weights: torch.Tensor) -> torch.Tensor | None:
        """[N, K] bool slots to keep given the whole selection (routers that need the chosen
        experts override this; the default ranks the slots and asks `keep`)."""
        return self.keep(weights, slot_ranks(weights))

    def forward(self, logits: torch.Tensor, inputs: torch.Tensor | None = None) -> RoutingDecision:
        check_logits(logits, self.num_experts)
        sel = self.family.select(logits)
        weights_NK = sel.weights()
        mask_NK = self.keep_slots(sel, weights_NK)
        all_NK = torch.ones_like(sel.experts, dtype=torch.bool)
        mask_NK = all_NK if mask_NK is None else mask_NK
        gates_NK = self.family.gates(sel.scores, mask_NK, logits.dtype)
        if self.renormalize == "mass":
            full_N1 = self.family.gates(sel.scores, all_NK, logits.dtype).sum(-1, keepdim=True)
            gates_NK = gates_NK * (full_N1 / gates_NK.sum(-1, keepdim=True))
        return RoutingDecision(sel.experts, gates_NK, mask_NK, torch.zeros_like(mask_NK), sel.probs, logits)


class FamilyTopKRouter(FamilyRouter):
    """The k slots of largest weight among the family's top-K."""

    def __init__(self, family: FamilyRouting, k: int, renormalize: str = "family"):
        super().__init__(family, renormalize)
        check_positive_int("k", k)
        if k > family.top_k:
            raise ValueError(f"k={k} exceeds the family's top-k ({family.top_k})")
        self.k = k

    def keep(self, weights: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor | None:
        return None if self.k == self.family.top_k else ranks < self.k


class ThresholdRouter(FamilyRouter):
    """Static top-1 plus every slot of renormalised weight ≥ τ (fixed τ)."""

    def __init__(self, family: FamilyRouting, threshold: float = 0.0, renormalize: str = "family"):
        super().__init__(family, renormalize)
        self.threshold = check_threshold(threshold)

    @property
    def effective_threshold(self) -> float:
        return self.threshold

    def keep(self, weights: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor | None:
        tau = self.effective_threshold
        return None if tau <= 0.0 else keep_mask(weights, ranks, tau)


class ConfidenceRouter(FamilyRouter):
    """Top-p over the family's top-K: the fewest largest slots whose weights reach p (at least one)."""

    def __init__(self, family: FamilyRouting, p: float, renormalize: str = "family"):
        super().__init__(family, renormalize)
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 < p <= 1.0:
            raise ValueError(f"p must be in (0, 1], got {p!r}")
        self.p = float(p)

    def keep(self, weights: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor | None:
        by_rank_NK = torch.zeros_like(weights).scatter(-1, ranks, weights)    # weights in rank order
        before_NK = by_rank_NK.cumsum(-1) - by_rank_NK                       # mass of larger slots
        return before_NK.gather(-1, ranks) < self.p                            # rank 0: 0 < p always
