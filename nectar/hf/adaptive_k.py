"""NECTAR's energy knob for pretrained experts: per-token adaptive k over the family's own top-K.

No retraining: the gate is the model's own. Per token the static top-1 expert is always kept and a
slot of rank ≥ 1 is kept iff its renormalised weight among the top-K is at least the effective
threshold α·τ (`nectar.hf.threshold.keep_mask`); kept slots are weighed the family's way
(`nectar.hf.routers`). τ = 0 (or fallback) is the family's top-K exactly; τ > 1/2 is top-1.

What adapts — τ, α and fallback — is one `KAdaptation` record, read with `adaptation()` and written
with `adapt(...)`, like `nectar.control.energy_router.EnergyAwareRouter`: the quality guard's α
scales the threshold down (α = 1 full adaptation, α → 0 static) and fallback restores the static
top-K. The controller reaches it through the priced interface (`nectar.control.priced`): its price
table tabulates cost and KL of every grid threshold once per chunk (`threshold_objective`) and maps
each price λ to the threshold minimising cost + λ·KL; its step at λ takes that threshold;
`deviation` is the KL of the routing in force, the quantity the quality guard relates to the
measured NLL increase. It needs a chunk's gate logits to choose, so it starts static.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nectar.control.priced import PriceStep, PriceTable, StepConfig
from nectar.hf.families import FamilyRouting
from nectar.hf.routers import ThresholdRouter
from nectar.hf.threshold import DEFAULT_GRID, ThresholdObjective, check_threshold, choose_threshold, threshold_objective


@dataclass
class KAdaptation:
    """The adaptable state of one AdaptiveKRouter.

    threshold  τ in [0, 1]: a slot of rank ≥ 1 is kept iff its renormalised weight ≥ α·τ
    alpha      the quality guard's mixing coefficient in [0, 1]
    fallback   True: route as the family's static top-K
    """

    threshold: float = 0.0
    alpha: float = 1.0
    fallback: bool = False


class AdaptiveKRouter(ThresholdRouter):
    """ThresholdRouter whose threshold, α and fallback the controller adapts."""

    # The controller's start price for this family: a KL step of a pretrained top-K router costs far
    # more perplexity per unit than NECTAR's fine-tuned second slot (at 0.3 the small OLMoE's first
    # adapted chunk ran at +26 % perplexity on the H200), so it starts careful.
    START_PRICE = 10.0

    def __init__(self, family: FamilyRouting, threshold: float = 0.0, renormalize: str = "family"):
        super().__init__(family, threshold, renormalize)
        self.alpha = 1.0
        self.fallback = False

    @property
    def effective_threshold(self) -> float:
        return 0.0 if self.fallback else self.alpha * self.threshold

    def adaptation(self) -> KAdaptation:
        """A copy of the current adaptable state."""
        return KAdaptation(self.threshold, self.alpha, self.fallback)

    def adapt(self, threshold: float | None = None, alpha: float | None = None, fallback: bool | None = None) -> None:
        """Set any of τ, α and fallback (the only way the controller changes the router)."""
        if threshold is not None:
            self.threshold = check_threshold(threshold)
        if alpha is not None:
            self.alpha = check_threshold(alpha, "alpha")
        if fallback is not None:
            self.fallback = bool(fallback)

    @torch.no_grad()
    def slot_weights(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(experts [n, K], renormalised weights [n, K]) of the family's top-K for logits [n, E]."""
        sel = self.family.select(logits)
        return sel.experts, sel.weights()

    def deviation(self, logits: torch.Tensor) -> float:
        """Mean KL(adapted ‖ static) over a sample of gate logits [n, E] of the routing in force
        (−log of the kept share of the renormalised top-K weight; 0 for an empty sample or in
        fallback)."""
        if logits.numel() == 0 or self.fallback:
            return 0.0
        experts, weights = self.slot_weights(logits)
        return float(threshold_objective(weights, experts, 0.0, 0.0, [self.effective_threshold]).mean_kl[0])

    def threshold_table(self, logits: torch.Tensor, cost, grid=DEFAULT_GRID) -> ThresholdObjective:
        """Mean cost and mean KL of every grid threshold on a sample of gate logits [n, E]: what
        `choose_threshold` minimises for any λ (cost + λ·KL), computed once."""
        experts, weights = self.slot_weights(logits)
        return threshold_objective(weights, experts, cost, 0.0, grid)

    # ---- the priced interface (nectar.control.priced) ------------------------------------------

    def configure_pricing(self, config: StepConfig) -> None:
        """Nothing to configure: the step takes the table's threshold at the price."""

    def price_table(self, logits: torch.Tensor, cost: torch.Tensor, lams: torch.Tensor) -> PriceTable:
        """At each price of `lams` [G]: the cost and KL of the grid threshold minimising cost + λ·KL
        (the smallest on ties), from one threshold table of the sample [n, E]."""
        objective = self.threshold_table(logits, cost)
        lams = lams.to(torch.float64)
        best_G = torch.argmin(objective.expected_cost[None] + lams[:, None] * objective.mean_kl[None], dim=-1)
        return PriceTable(lams, objective.expected_cost[best_G], objective.mean_kl[best_G], detail=objective)

    def adapt_at_price(self, step: PriceStep) -> None:
        """Take the threshold minimising cost + λ·KL on the chunk's table (built here if absent)."""
        objective = step.table.detail if step.table is not None else self.threshold_table(step.logits, step.cost)
        self.adapt(threshold=objective.threshold_at(step.lam), fallback=step.fallback)

    def start_at_price(self, cost: torch.Tensor, lam: float) -> None:
        """Stay static: a threshold is chosen on a chunk's gate logits, which the start has not seen."""

    def state_vector(self) -> list[float]:
        return [self.threshold]

    def choose_threshold(self, logits: torch.Tensor, cost, lam: float, grid=DEFAULT_GRID) -> float:
        """The threshold minimising mean cost + λ·KL on a sample of this layer's gate logits [n, E]
        (`cost`: a scalar or [E] per-expert cost, e.g. J per token)."""
        experts, weights = self.slot_weights(logits)
        return choose_threshold(weights, experts, cost, lam, grid)
