"""The fine-tuning router: trains the MoE for the routings it will be served with.

Every token takes the trained gate's top-2 (the static top-1 may itself be a cheap expert), except
for two random, disjoint shares of tokens:
- `cheap_prob`: the second slot goes to the best cheap expert by the trained logits (what
  `static-cheap` and NECTAR's cheap second slot do, as `MixedTrainingRouter`);
- `single_prob`: the second slot is left empty and the first slot's gate is 1 (what `static-top1`
  does, and what a token gets when NECTAR's second slot is a zero expert).
Gates are the static softmax at the chosen experts, renormalised over the used slots, so every
routing is exactly one of the policies the frontier runs. Seeded: the same generator state gives
the same choices; the random numbers are drawn on the logits' device (no host round trip).
"""

from __future__ import annotations

import torch

from nectar.moe.router import Router, RoutingDecision, gate_decision
from nectar.moe.static_routers import check_cheap, static_top1_plus


class AdaptiveTrainingRouter(Router):
    """logits [N, E] -> top-2 / top-1 + cheap / top-1 decisions in the shares above."""

    def __init__(self, num_experts: int, cheap_experts: list[int], cheap_prob: float = 0.3,
                 single_prob: float = 0.0, temperature: float = 1.0, seed: int = 0):
        super().__init__(num_experts, temperature)
        check_cheap(cheap_experts, num_experts, 1)
        if num_experts < 2:
            raise ValueError("the training router needs at least two experts")
        if not (0.0 <= cheap_prob and 0.0 <= single_prob and cheap_prob + single_prob <= 1.0):
            raise ValueError(f"cheap_prob and single_prob must be >= 0 with a sum <= 1, got {cheap_prob}, {single_prob}")
        self.cheap_prob, self.single_prob, self.seed = float(cheap_prob), float(single_prob), seed
        allowed = torch.full((num_experts,), float("-inf"))
        allowed[cheap_experts] = 0.0
        self.register_buffer("cheap_mask", allowed, persistent=False)   # [E]
        self._generators: dict[str, torch.Generator] = {}

    @property
    def max_slots(self) -> int:
        return 2

    def _uniform(self, n: int, device: torch.device) -> torch.Tensor:
        key = str(device)
        if key not in self._generators:
            self._generators[key] = torch.Generator(device=device).manual_seed(self.seed)
        return torch.rand(n, generator=self._generators[key], device=device)

    def forward(self, logits: torch.Tensor, inputs: torch.Tensor | None = None) -> RoutingDecision:
        scores = logits.detach() + self.selection_bias.to(logits.dtype)                  # selection only
        static_N2 = scores.topk(2, dim=-1).indices                                        # [N, 2]
        cheap_N2 = static_top1_plus(scores + self.cheap_mask.to(scores.dtype), scores, 1)  # [N, 2]
        u_N = self._uniform(logits.shape[0], logits.device)
        use_cheap_N = u_N < self.cheap_prob
        single_N = (u_N >= self.cheap_prob) & (u_N < self.cheap_prob + self.single_prob)
        experts_N2 = torch.where(use_cheap_N.unsqueeze(-1), cheap_N2, static_N2)
        mask_N2 = torch.ones_like(experts_N2, dtype=torch.bool)
        mask_N2[:, 1] = ~single_N
        return gate_decision(logits, experts_N2, self.temperature, mask_N2)
