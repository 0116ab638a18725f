"""Static routers: gate logits [N, E] -> RoutingDecision. Nothing here adapts at test time.

- `TopKRouter`, `CapacityRouter`, `TopPRouter`: the trained gate's top-k (dropless or with a
  capacity), or top-p dynamic-k routing (a token takes experts until their mass reaches p);
- `CheapStaticRouter`: the static top-1 expert plus the best cheap expert(s) by the trained logits;
- `MixedTrainingRouter`: the fine-tuning router that sends a random share of second slots to
  cheap experts, so that the model learns to live with them.

Conventions shared by all routers here:
- scores = logits / temperature. The softmax temperature lives in the router (not in the gate)
  so that one trained gate can be routed sharper or flatter without touching its weights.
- Selection uses scores + `selection_bias` (auxiliary-loss-free balancing, DeepSeek-V3; energy
  biases of adaptive routers use the same buffer); gates use the unbiased softmax(scores).
- With `renormalize`, the gates of a token's chosen slots are rescaled to sum to 1.
- Everything is deterministic: ties are broken by torch.topk / stable sorts, capacity overflow
  is resolved first-come in token order.
Gates come from `nectar.moe.router`'s one gates path (fp32 softmax for low-precision logits).
"""

from __future__ import annotations

import math

import torch

from nectar.moe import fused_router
from nectar.moe.router import (Router, RoutingDecision, check_logits, check_positive_int, chosen_gates,
                               gate_decision, stable_softmax)


class TopKRouter(Router):
    """Dropless top-k: each token takes the k experts with the highest (biased) scores."""

    def __init__(self, num_experts: int, k: int, temperature: float = 1.0, renormalize: bool = True):
        super().__init__(num_experts, temperature)
        check_positive_int("k", k)
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

    def forward(self, logits: torch.Tensor, inputs: torch.Tensor | None = None) -> RoutingDecision:
        check_logits(logits, self.num_experts)
        if self.k <= fused_router.MAX_K and fused_router.fusable(logits, self.temperature):
            fused = fused_router.topk_decision(logits, self.k, self.selection_bias, self.renormalize)  # one kernel
            if fused is not None:
                return fused
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

    def forward(self, logits: torch.Tensor, inputs: torch.Tensor | None = None) -> RoutingDecision:
        decision = super().forward(logits, inputs)
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
        max_k = num_experts if max_k is None else check_positive_int("max_k", max_k)
        if max_k > num_experts:
            raise ValueError(f"max_k={max_k} exceeds num_experts={num_experts}")
        self.p = float(p)
        self.max_k = max_k
        self.renormalize = renormalize

    @property
    def max_slots(self) -> int:
        return self.max_k

    def forward(self, logits: torch.Tensor, inputs: torch.Tensor | None = None) -> RoutingDecision:
        check_logits(logits, self.num_experts)
        if self.max_k <= fused_router.MAX_K and fused_router.fusable(logits, self.temperature):
            fused = fused_router.top_p_decision(logits, self.p, self.max_k, self.selection_bias, self.renormalize)
            if fused is not None:                                                      # one kernel on a GPU
                return fused
        scores_NE = logits / self.temperature
        probs_NE = stable_softmax(scores_NE)
        selection_NE = stable_softmax((scores_NE + self.selection_bias.to(scores_NE.dtype)).detach())
        if self.max_k < self.num_experts:                    # the K best only: no full sort
            sorted_NK, experts_NK = torch.topk(selection_NE, self.max_k, dim=-1, sorted=True)   # [N, K]
        else:
            sorted_NK, experts_NK = torch.sort(selection_NE, dim=-1, descending=True, stable=True)
        mass_before_NK = sorted_NK.cumsum(-1) - sorted_NK    # probability already taken before each slot
        mask_NK = mass_before_NK < self.p                    # slot 0 always (mass before = 0 < p)
        mask_NK[:, 0] = True
        gates_NK = chosen_gates(probs_NE, experts_NK, mask_NK, self.renormalize)
        return RoutingDecision(experts_NK, gates_NK, mask_NK, torch.zeros_like(mask_NK), probs_NE, logits)


def static_top1_plus(scores: torch.Tensor, logits: torch.Tensor, extra: int) -> torch.Tensor:
    """[N, 1 + extra] expert ids: static argmax of `logits`, then the best `extra` by `scores`."""
    top1 = logits.argmax(-1, keepdim=True)                                    # [N, 1]
    masked = scores.scatter(-1, top1, float("-inf"))                          # [N, E]
    rest = masked.topk(extra, dim=-1).indices                                 # [N, extra]
    return torch.cat([top1, rest], dim=-1)


def check_cheap(cheap: list[int], num_experts: int, extra_slots: int) -> None:
    if not cheap:
        raise ValueError("at least one cheap expert is needed")
    if any(not 0 <= i < num_experts for i in cheap):
        raise ValueError(f"cheap expert ids {cheap} out of range for {num_experts} experts")
    if not 1 <= extra_slots <= 2:
        raise ValueError(f"extra_slots must be 1 or 2, got {extra_slots}")


class CheapStaticRouter(Router):
    """Static baseline with cheap experts: the static top-1 expert plus the best `extra` cheap
    experts by the trained logits. No adaptation."""

    def __init__(self, num_experts: int, cheap_experts: list[int], extra_slots: int = 1, temperature: float = 1.0):
        super().__init__(num_experts, temperature)
        check_cheap(cheap_experts, num_experts, extra_slots)
        allowed = torch.full((num_experts,), float("-inf"))
        allowed[cheap_experts] = 0.0
        self.register_buffer("cheap_mask", allowed, persistent=False)        # [E]
        self.extra_slots = extra_slots

    @property
    def max_slots(self) -> int:
        return 1 + self.extra_slots

    def forward(self, logits: torch.Tensor, inputs: torch.Tensor | None = None) -> RoutingDecision:
        if self.extra_slots == 1 and fused_router.fusable(logits, self.temperature):
            fused = fused_router.cheap_decision(logits, self.cheap_mask)               # one kernel on a GPU
            if fused is not None:
                return fused
        scores = logits + self.cheap_mask.to(logits.dtype)                    # [N, E]
        return gate_decision(logits, static_top1_plus(scores, logits, self.extra_slots), self.temperature)


class MixedTrainingRouter(Router):
    """Fine-tuning router that teaches the model to live with cheap second slots.

    Static top-k, except that for a random `cheap_prob` share of tokens the slots after the first
    go to the best cheap experts by the trained logits (as `CheapStaticRouter` would choose).
    Gates are the static softmax gathered at the chosen experts and renormalised, so the gate
    keeps learning from every token. Seeded: the same generator state gives the same choices. The
    random draw is made on the logits' device (one generator per device, seeded alike), so that a
    GPU forward copies nothing from the host.
    """

    def __init__(self, num_experts: int, cheap_experts: list[int], k: int = 2, cheap_prob: float = 0.3,
                 temperature: float = 1.0, seed: int = 0):
        super().__init__(num_experts, temperature)
        check_cheap(cheap_experts, num_experts, k - 1 if k > 1 else 1)
        if not 0.0 <= cheap_prob <= 1.0:
            raise ValueError(f"cheap_prob must be in [0, 1], got {cheap_prob}")
        self.k = k
        self.cheap_prob = cheap_prob
        self.cheap = CheapStaticRouter(num_experts, cheap_experts, extra_slots=k - 1, temperature=temperature)
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self._device_generators: dict[torch.device, torch.Generator] = {}

    @property
    def max_slots(self) -> int:
        return self.k

    def forward(self, logits: torch.Tensor, inputs: torch.Tensor | None = None) -> RoutingDecision:
        static = logits.topk(self.k, dim=-1).indices                              # [N, k]
        cheap = self.cheap(logits.detach()).experts                               # [N, k]
        pick = torch.rand(logits.shape[0], generator=self._generator(logits.device), device=logits.device)  # [N]
        experts = torch.where((pick < self.cheap_prob).unsqueeze(-1), cheap, static)  # [N, k]
        return gate_decision(logits, experts, self.temperature)


    def _generator(self, device: torch.device) -> torch.Generator:
        """The CPU generator on the CPU, else this device's own (seeded like it on first use)."""
        if device.type == "cpu":
            return self.generator
        if device not in self._device_generators:
            self._device_generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return self._device_generators[device]


ROUTERS: dict[str, type[Router]] = {"topk": TopKRouter, "capacity": CapacityRouter, "topp": TopPRouter}


def make_router(name: str, num_experts: int, **kwargs) -> Router:
    """Build a router by name: "topk" (k=...), "capacity" (k=..., capacity_factor=...), "topp" (p=...)."""
    if name not in ROUTERS:
        raise ValueError(f"unknown router {name!r}; choose one of {sorted(ROUTERS)}")
    try:
        return ROUTERS[name](num_experts, **kwargs)
    except TypeError as exc:
        raise ValueError(f"bad arguments for router {name!r}: {exc}") from exc
