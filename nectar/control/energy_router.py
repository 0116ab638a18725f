"""Routers for the energy experiments: the NECTAR energy-aware test-time router and the
static cheap-expert baseline.

Scores are the trained gate's logits plus α times a dynamic part (a per-expert bias and,
optionally, a fast-weight network of the token). Safeguards (DESIGN.md §2, step 5):

- the static top-1 expert (argmax of the trained logits) always takes the first slot;
- the remaining 1–2 slots go to the best experts by the *adapted* scores, which the energy bias
  steers towards cheap experts (narrow, zero-compute). Which experts may take them is set by
  `candidates`: "static-or-cheap" (default) — the static router's own choices or the best cheap
  experts by the trained logits, i.e. exactly the two kinds of routing the model was fine-tuned
  with (`MixedTrainingRouter`), so adaptation decides per token *whether* to go cheap and never
  leaves the trained distribution; "all" — any expert; "cheap" — cheap experts only;
- combine gates come from the unbiased static probabilities, renormalised over the chosen slots
  (the bias steers selection only, as in auxiliary-loss-free balancing);
- `fallback = True` turns the router into the static top-k router (the quality guard sets it).

The soft routing distribution p_t = softmax(logits_t/τ + α·b) is the one the convex chunk problem
of DESIGN.md §3 is about; `soft_distribution` exposes it for the chunk loss and the cvxpy check.
"""

from __future__ import annotations

from typing import Callable

import torch

from nectar.moe.router import Router, RoutingDecision


def _decision(logits: torch.Tensor, experts: torch.Tensor, temperature: float) -> RoutingDecision:
    """Decision with gates = static softmax gathered at `experts` [N, K], renormalised."""
    probs = torch.softmax(logits / temperature, dim=-1)                       # [N, E]
    chosen = probs.gather(-1, experts)                                        # [N, K]
    gates = chosen / chosen.sum(-1, keepdim=True).clamp_min(1e-12)            # [N, K]
    mask = torch.ones_like(experts, dtype=torch.bool)                         # [N, K]
    return RoutingDecision(experts, gates, mask, torch.zeros_like(mask), probs, logits)


def _static_top1_plus(scores: torch.Tensor, logits: torch.Tensor, extra: int) -> torch.Tensor:
    """[N, 1 + extra] expert ids: static argmax of `logits`, then the best `extra` by `scores`."""
    top1 = logits.argmax(-1, keepdim=True)                                    # [N, 1]
    masked = scores.scatter(-1, top1, float("-inf"))                          # [N, E]
    rest = masked.topk(extra, dim=-1).indices                                 # [N, extra]
    return torch.cat([top1, rest], dim=-1)


CANDIDATES = ("static-or-cheap", "all", "cheap")


class CheapStaticRouter(Router):
    """Static baseline with cheap experts: the static top-1 expert plus the best `extra` cheap
    experts by the trained logits. No adaptation."""

    def __init__(self, num_experts: int, cheap_experts: list[int], extra_slots: int = 1, temperature: float = 1.0):
        super().__init__(num_experts, temperature)
        _check_cheap(cheap_experts, num_experts, extra_slots)
        allowed = torch.full((num_experts,), float("-inf"))
        allowed[cheap_experts] = 0.0
        self.register_buffer("cheap_mask", allowed, persistent=False)        # [E]
        self.extra_slots = extra_slots

    @property
    def max_slots(self) -> int:
        return 1 + self.extra_slots

    def forward(self, logits: torch.Tensor) -> RoutingDecision:
        scores = logits + self.cheap_mask.to(logits.dtype)                    # [N, E]
        return _decision(logits, _static_top1_plus(scores, logits, self.extra_slots), self.temperature)


class EnergyAwareRouter(Router):
    """NECTAR's test-time router: static logits + α·(bias + fast_net(x)), with safeguards."""

    def __init__(
        self,
        num_experts: int,
        cheap_experts: list[int],
        extra_slots: int = 1,
        temperature: float = 1.0,
        candidates: str = "static-or-cheap",
        fallback_k: int = 2,
        fast_net: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        super().__init__(num_experts, temperature)
        _check_cheap(cheap_experts, num_experts, extra_slots)
        if candidates not in CANDIDATES:
            raise ValueError(f"candidates must be one of {CANDIDATES}, got {candidates!r}")
        if not 1 <= fallback_k <= num_experts:
            raise ValueError(f"fallback_k must be in [1, {num_experts}], got {fallback_k}")
        self.cheap_experts = list(cheap_experts)
        self.extra_slots = extra_slots
        self.candidates = candidates
        cheap_mask = torch.full((num_experts,), float("-inf"))
        cheap_mask[cheap_experts] = 0.0
        self.register_buffer("cheap_mask", cheap_mask, persistent=False)       # [E]
        self.fallback_k = fallback_k
        self.fast_net = fast_net
        self.register_buffer("bias", torch.zeros(num_experts), persistent=False)  # [E]
        self.alpha = 1.0            # mixing coefficient in [0, 1], adapted by the controller
        self.fallback = False       # True → static top-k routing
        self.last_inputs: torch.Tensor | None = None  # [N, D] gate inputs, for the fast net
        self.last_logits: torch.Tensor | None = None  # [N, E] the matching gate logits

    @property
    def max_slots(self) -> int:
        return max(1 + self.extra_slots, self.fallback_k)

    def dynamic_scores(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, E] the dynamic part: per-expert bias plus the fast-weight network's output."""
        dyn = self.bias.to(logits.dtype).expand_as(logits)                     # [N, E]
        if self.fast_net is not None and self.last_inputs is not None:
            dyn = dyn + self.fast_net(self.last_inputs.float()).to(logits.dtype)
        return dyn

    def soft_distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, E] p = softmax(logits/τ + α·dynamic): the convex problem's routing distribution."""
        return torch.softmax(logits / self.temperature + self.alpha * self.dynamic_scores(logits), dim=-1)

    def forward(self, logits: torch.Tensor) -> RoutingDecision:
        self.last_logits = logits.detach()
        if self.fallback:
            experts = logits.topk(self.fallback_k, dim=-1).indices             # [N, k]
            return _decision(logits, experts, self.temperature)
        scores = logits / self.temperature + self.alpha * self.dynamic_scores(logits)  # [N, E]
        scores = scores + self._allowed(logits)
        return _decision(logits, _static_top1_plus(scores, logits, self.extra_slots), self.temperature)

    def _allowed(self, logits: torch.Tensor) -> torch.Tensor:
        """[N, E] 0 where an expert may take a remaining slot, -inf elsewhere."""
        cheap = self.cheap_mask.to(logits.dtype).expand_as(logits)             # [N, E]
        if self.candidates == "all":
            return torch.zeros_like(logits)
        if self.candidates == "cheap":
            return cheap
        k = 1 + self.extra_slots
        static = logits.topk(k, dim=-1).indices                                  # [N, k]
        not_top1 = torch.zeros_like(logits).scatter(-1, static[:, :1], float("-inf"))  # [N, E]
        best_cheap = (logits + cheap + not_top1).topk(self.extra_slots, dim=-1).indices  # [N, extra]
        allowed = torch.full_like(logits, float("-inf"))
        allowed.scatter_(-1, torch.cat([static, best_cheap], dim=-1), 0.0)
        return allowed

    def attach(self, layer: torch.nn.Module) -> None:
        """Capture the gate's inputs of `layer` (a MoELayer) so the fast net can see the tokens."""
        def keep_inputs(_module, args, _output):
            self.last_inputs = args[0].detach()

        layer.gate.register_forward_hook(keep_inputs)


def _check_cheap(cheap: list[int], num_experts: int, extra_slots: int) -> None:
    if not cheap:
        raise ValueError("at least one cheap expert is needed")
    if any(not 0 <= i < num_experts for i in cheap):
        raise ValueError(f"cheap expert ids {cheap} out of range for {num_experts} experts")
    if not 1 <= extra_slots <= 2:
        raise ValueError(f"extra_slots must be 1 or 2, got {extra_slots}")


class MixedTrainingRouter(Router):
    """Fine-tuning router that teaches the model to live with cheap second slots.

    Static top-k, except that for a random `cheap_prob` share of tokens the slots after the first
    go to the best cheap experts by the trained logits (as `CheapStaticRouter` would choose).
    Gates are the static softmax gathered at the chosen experts and renormalised, so the gate
    keeps learning from every token. Seeded: the same generator state gives the same choices.
    """

    def __init__(self, num_experts: int, cheap_experts: list[int], k: int = 2, cheap_prob: float = 0.3,
                 temperature: float = 1.0, seed: int = 0):
        super().__init__(num_experts, temperature)
        _check_cheap(cheap_experts, num_experts, k - 1 if k > 1 else 1)
        if not 0.0 <= cheap_prob <= 1.0:
            raise ValueError(f"cheap_prob must be in [0, 1], got {cheap_prob}")
        self.k = k
        self.cheap_prob = cheap_prob
        self.cheap = CheapStaticRouter(num_experts, cheap_experts, extra_slots=k - 1, temperature=temperature)
        self.generator = torch.Generator().manual_seed(seed)

    @property
    def max_slots(self) -> int:
        return self.k

    def forward(self, logits: torch.Tensor) -> RoutingDecision:
        static = logits.topk(self.k, dim=-1).indices                              # [N, k]
        cheap = self.cheap(logits.detach()).experts                               # [N, k]
        pick = torch.rand(logits.shape[0], generator=self.generator) < self.cheap_prob  # [N]
        experts = torch.where(pick.to(logits.device).unsqueeze(-1), cheap, static)  # [N, k]
        return _decision(logits, experts, self.temperature)
