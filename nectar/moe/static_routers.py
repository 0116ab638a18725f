"""Static routers: gate logits [N, E] -> RoutingDecision (top-k, capacity-limited, top-p).

Conventions shared by all routers here:
- scores = logits / temperature. The softmax temperature lives in the router (not in the gate)
  so that one trained gate can be routed sharper or flatter without touching its weights.
- Selection uses scores + `selection_bias` (auxiliary-loss-free balancing, DeepSeek-V3; energy
  biases of adaptive routers use the same buffer); gates use the unbiased softmax(scores).
- With `renormalize`, the gates of a token's chosen slots are rescaled to sum to 1.
- Everything is deterministic: ties are broken by torch.topk / stable sorts, capacity overflow
  is resolved first-come in token order.
Low-precision logits (fp16/bf16) are put through the softmax in fp32 and cast back.
"""

from __future__ import annotations

import math

import torch

from nectar.moe.router import Router, RoutingDecision


def _check_positive_int(name: str, value: object) -> int:
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


def chosen_gates(probs: torch.Tensor, experts: torch.Tensor, mask: torch.Tensor | None, renormalize: bool) -> torch.Tensor:
    """[N, K] gates: probs at the chosen experts, 0 on unused slots (mask None: all used),
    optionally rescaled to sum to 1 over the used slots."""
    gates_NK = probs.gather(-1, experts)  # [N, K]
    if mask is not None:
        gates_NK = gates_NK * mask
    if renormalize:
        gates_NK = gates_NK / gates_NK.sum(-1, keepdim=True).clamp_min(torch.finfo(gates_NK.dtype).tiny)
    return gates_NK


class TopKRouter(Router):
    """Dropless top-k: each token takes the k experts with the highest (biased) scores."""

    def __init__(self, num_experts: int, k: int, temperature: float = 1.0, renormalize: bool = True):
        super().__init__(num_experts, temperature)
        _check_positive_int("k", k)
        if k > num_experts:
            raise ValueError(f"k={k} exceeds num_experts={num_experts}")
        self.k = k
        self.renormalize = renormalize

    @property
    def max_slots(self) -> int:
        return self.k

    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(probs [N, E], experts [N, k]) for validated logits."""
        scores_NE = logits / self.temperature if self.temperature != 1.0 else logits
        probs_NE = stable_softmax(scores_NE)
        selection_NE = scores_NE + self.selection_bias.to(scores_NE.dtype)
        experts_NK = torch.topk(selection_NE.detach(), self.k, dim=-1, sorted=True).indices  # [N, k]
        return probs_NE, experts_NK

    def forward(self, logits: torch.Tensor) -> RoutingDecision:
        check_logits(logits, self.num_experts)
        probs_NE, experts_NK = self.select(logits)
        mask_NK = torch.ones_like(experts_NK, dtype=torch.bool)
        gates_NK = chosen_gates(probs_NE, experts_NK, None, self.renormalize)
        return RoutingDecision(experts_NK, gates_NK, mask_NK, torch.zeros_like(mask_NK), probs_NE, logits)


class CapacityRouter(TopKRouter):
    """Switch-style top-k with an expert capacity of ceil(capacity_factor · N · k / E) slots.

    A (token, slot) pair beyond its expert's capacity is marked `dropped` (its gate becomes 0,
    the slot stays in `mask`), first-come in token order; gates are renormalised over the chosen
    slots before dropping, so a token with nothing dropped gets the same output as under
    `TopKRouter`.
    """

    def __init__(self, num_experts: int, k: int, capacity_factor: float = 1.25, temperature: float = 1.0,
                 renormalize: bool = True, min_capacity: int = 1):
        super().__init__(num_experts, k, temperature, renormalize)
        if not (isinstance(capacity_factor, (int, float)) and capacity_factor > 0 and math.isfinite(capacity_factor)):
            raise ValueError(f"capacity_factor must be a finite number > 0, got {capacity_factor!r}")
        if isinstance(min_capacity, bool) or not isinstance(min_capacity, int) or min_capacity < 0:
            raise ValueError(f"min_capacity must be an int >= 0, got {min_capacity!r}")
        self.capacity_factor = float(capacity_factor)
        self.min_capacity = min_capacity

    def capacity(self, num_tokens: int) -> int:
        """Slots each expert accepts for a batch of `num_tokens` tokens."""
        return max(self.min_capacity, math.ceil(self.capacity_factor * num_tokens * self.k / self.num_experts))

    def forward(self, logits: torch.Tensor) -> RoutingDecision:
        decision = super().forward(logits)
        dropped_NK = overflow_mask(decision.experts, self.num_experts, self.capacity(logits.shape[0]))
        decision.dropped = dropped_NK
        decision.gates = decision.gates.masked_fill(dropped_NK, 0.0)
        return decision


def overflow_mask(experts: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """[N, K] bool: pairs whose position in their expert's queue (token-major order) >= capacity."""
    expert_P = experts.reshape(-1)                                    # [N*K], token-major
    order_P = torch.argsort(expert_P.to(torch.int32), stable=True)    # queue order within each expert
    counts_E = torch.zeros(num_experts, dtype=torch.long, device=experts.device).scatter_add_(
        0, expert_P, torch.ones_like(expert_P))                       # no host read, unlike bincount
    starts_E = counts_E.cumsum(0) - counts_E                          # first sorted row of each expert
    rank_P = torch.arange(expert_P.numel(), device=experts.device) - starts_E[expert_P[order_P]]
    position_P = torch.empty_like(rank_P).index_put((order_P,), rank_P)  # back to token-major order
    return (position_P >= capacity).reshape(experts.shape)


class TopPRouter(Router):
    """Top-p (dynamic-k): a token takes experts in descending probability until the cumulative
    probability reaches p (at least one expert, at most `max_k`, default E).

    With a nonzero `selection_bias` the order and the stopping rule use softmax(scores + bias);
    gates always come from the unbiased softmax(scores). Unused slots have mask False, gate 0.
    """

    def __init__(self, num_experts: int, p: float = 0.5, max_k: int | None = None, temperature: float = 1.0,
                 renormalize: bool = True):
        super().__init__(num_experts, temperature)
        if not (isinstance(p, (int, float)) and 0 < p <= 1):
            raise ValueError(f"p must be in (0, 1], got {p!r}")
        max_k = num_experts if max_k is None else _check_positive_int("max_k", max_k)
        if max_k > num_experts:
            raise ValueError(f"max_k={max_k} exceeds num_experts={num_experts}")
        self.p = float(p)
        self.max_k = max_k
        self.renormalize = renormalize

    @property
    def max_slots(self) -> int:
        return self.max_k

    def forward(self, logits: torch.Tensor) -> RoutingDecision:
        check_logits(logits, self.num_experts)
        scores_NE = logits / self.temperature
        probs_NE = stable_softmax(scores_NE)
        selection_NE = stable_softmax((scores_NE + self.selection_bias.to(scores_NE.dtype)).detach())
        sorted_NE, order_NE = torch.sort(selection_NE, dim=-1, descending=True, stable=True)
        mass_before_NE = sorted_NE.cumsum(-1) - sorted_NE  # probability already taken before each slot
        experts_NK = order_NE[:, : self.max_k]              # [N, K]
        mask_NK = mass_before_NE[:, : self.max_k] < self.p  # slot 0 always (mass before = 0 < p)
        mask_NK[:, 0] = True
        gates_NK = chosen_gates(probs_NE, experts_NK, mask_NK, self.renormalize)
        return RoutingDecision(experts_NK, gates_NK, mask_NK, torch.zeros_like(mask_NK), probs_NE, logits)


ROUTERS: dict[str, type[Router]] = {"topk": TopKRouter, "capacity": CapacityRouter, "topp": TopPRouter}


def make_router(name: str, num_experts: int, **kwargs) -> Router:
    """Build a router by name: "topk" (k=...), "capacity" (k=..., capacity_factor=...), "topp" (p=...)."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose one of {sorted(ROUTERS)}")
    try:
        return ROUTERS[name](num_experts, **kwargs)
    except TypeError as exc:
        raise ValueError(f"bad arguments for router {name!r}: {exc}") from exc
