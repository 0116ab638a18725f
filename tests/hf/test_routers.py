"""Routers over a family's top-K against per-token references written out by hand: which slots are
kept (threshold, top-k, top-p), how they are weighed, and what the block then computes."""

import pytest
import torch

from nectar.hf.adaptive_k import AdaptiveKRouter, KAdaptation
from nectar.hf.attach import attach
from nectar.hf.families import family_of, find_moe_blocks
from nectar.hf.routers import ConfidenceRouter, FamilyTopKRouter, ThresholdRouter
from tests.hf.models import D, FAMILIES, tiny
from tests.hf.reference import (block_reference, family_gates, family_raw_scores, keep_threshold, keep_top_p,
                                ranks_of)
from tests.tolerance import approx, assert_close

N = 14


def _per_token(block, x_ND, keep_rule):
    """Per token: the family's own chosen experts (from the unattached gate), the kept slots by
    `keep_rule(weights)`, and the family's gates over them, all in plain Python."""
    family = family_of(block.gate).name
    with torch.no_grad():
        logits_NE, _, index_NK = block.gate(x_ND)
    experts, gates, weights = [], [], []
    for t in range(x_ND.shape[0]):
        raw = family_raw_scores(family, block.gate, logits_NE[t])
        chosen = index_NK[t].tolist()
        raw_K = [float(raw[e]) for e in chosen]
        w = [r / sum(raw_K) for r in raw_K]
        kept = keep_rule(w)
        experts.append(chosen)
        gates.append(family_gates(family, block.gate, raw_K, kept))
        weights.append(w)
    return experts, gates, weights


def _tau_with_margin(weights, candidates=(0.2, 0.23, 0.27, 0.3, 0.17)) -> float:
    """A threshold no token's weight lies within 1e-4 of (so fp32 and Python agree on every slot):
    1e-4 is far above the fp32 router's rounding of these weights (n · eps32 ≈ 5e-6, n = 2·16 + 2·4)."""
    for tau in candidates:
        if all(abs(w - tau) > 1e-4 for row in weights for w in row):
            return tau
    raise AssertionError("no threshold with a margin")


@pytest.mark.parametrize("drop", ["auto", "zero"])
@pytest.mark.parametrize("impl", ["eager", "batched_mm"])
@pytest.mark.parametrize("family", FAMILIES)
def test_threshold_router_computes_the_per_token_reference(family, impl, drop):
    model = tiny(family, torch.float64, impl)
    block = find_moe_blocks(model)[-1].block
    x_ND = torch.randn(N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    _, _, weights = _per_token(block, x_ND, lambda w: [True] * len(w))
    tau = _tau_with_margin(weights)
    experts, gates, _ = _per_token(block, x_ND, lambda w: keep_threshold(w, tau))
    assert any(not all(g != 0 for g in row) for row in gates), "the threshold should drop some slots"
    attached = attach(model, lambda layer: ThresholdRouter(layer.family, tau), drop=drop)
    with torch.no_grad():
        out_ND = block(x_ND[None]).reshape(N, D)
    attached.detach()
    # the gates come from fp32 softmaxes (over ≤ 16 experts) renormalised over ≤ 4 kept slots; the
    # fp64 expert sums are far below that
    assert_close(out_ND, block_reference(block, x_ND, experts, gates), dtype=torch.float32, n=2 * 16 + 2 * 4)


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_rules_match_per_token_loops(family):
    model = tiny(family, torch.float64)
    block = find_moe_blocks(model)[0].block
    x_ND = torch.randn(40, D, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    routing = family_of(block.gate)
    logits = block.gate(x_ND)[0].detach()
    _, _, weights = _per_token(block, x_ND, lambda w: [True] * len(w))
    K = routing.top_k
    for router, rule in [
        (FamilyTopKRouter(routing, 1), lambda w: [r < 1 for r in ranks_of(w)]),
        (FamilyTopKRouter(routing, 2), lambda w: [r < 2 for r in ranks_of(w)]),
        (ThresholdRouter(routing, 1.0), lambda w: [r == 0 for r in ranks_of(w)]),
        (ThresholdRouter(routing, 0.0), lambda w: [True] * K),
        (ConfidenceRouter(routing, 0.6), lambda w: keep_top_p(w, 0.6)),
        (ConfidenceRouter(routing, 0.85), lambda w: keep_top_p(w, 0.85)),
    ]:
        decision = router(logits)
        assert decision.mask.tolist() == [rule(w) for w in weights], type(router).__name__
        assert decision.gates[~decision.mask].abs().sum() == 0


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe"])
def test_mass_renormalisation_keeps_the_total_gate_of_a_non_normalising_family(family):
    model = tiny(family, torch.float64)
    routing = family_of(find_moe_blocks(model)[0].block.gate)
    assert not routing.renormalizes
    logits = torch.randn(30, routing.num_experts, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    full = FamilyTopKRouter(routing, routing.top_k)(logits)
    kept = FamilyTopKRouter(routing, 1, renormalize="family")(logits)
    mass = FamilyTopKRouter(routing, 1, renormalize="mass")(logits)
    top1 = full.gates.max(-1).values
    n = 2 * routing.num_experts + 2 * routing.top_k  # a softmax and a sum over the top-K
    assert_close(kept.gates.sum(-1), top1, n=n)                        # family: raw probability
    assert_close(mass.gates.sum(-1), full.gates.sum(-1), n=n)          # mass: the top-K total


def test_adaptive_router_state_alpha_and_fallback():
    routing = family_of(find_moe_blocks(tiny("olmoe", torch.float64))[0].block.gate)
    logits = torch.randn(50, routing.num_experts, dtype=torch.float64, generator=torch.Generator().manual_seed(8))
    router = AdaptiveKRouter(routing)
    assert router.adaptation() == KAdaptation(0.0, 1.0, False)
    static = router(logits)
    router.adapt(threshold=0.3)
    assert torch.equal(router(logits).mask, ThresholdRouter(routing, 0.3)(logits).mask)
    router.adapt(alpha=0.5)                                                     # the guard halves α: τ_eff = 0.15
    assert router.effective_threshold == approx(0.15, n=1)  # 0.3 × 0.5
    assert torch.equal(router(logits).mask, ThresholdRouter(routing, 0.15)(logits).mask)
    router.adapt(fallback=True)
    back = router(logits)
    assert torch.equal(back.gates, static.gates) and back.mask.all()
    assert router.adaptation() == KAdaptation(0.3, 0.5, True)
    for bad in (dict(threshold=1.5), dict(alpha=-0.1), dict(threshold=True)):
        with pytest.raises(ValueError):
            router.adapt(**bad)
    with pytest.raises(ValueError, match="exceeds the family's top-k"):
        FamilyTopKRouter(routing, routing.top_k + 1)
    with pytest.raises(ValueError, match="p must be in"):
        ConfidenceRouter(routing, 0.0)
    with pytest.raises(ValueError, match="renormalize"):
        ThresholdRouter(routing, 0.1, renormalize="sum")


class _GarbageInUnusedSlots(ThresholdRouter):
    """A router that leaves rubbish (index -1, gate 7) in its unused slots: the hook must ignore it."""

    def forward(self, logits, inputs=None):
        decision = super().forward(logits, inputs)
        decision.experts = decision.experts.masked_fill(~decision.mask, -1)
        decision.gates = decision.gates.masked_fill(~decision.mask, 7.0)
        return decision


@pytest.mark.parametrize("drop", ["auto", "zero"])
@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_unused_slots_are_ignored_whatever_they_hold(family, drop):
    model = tiny(family, torch.float64, "eager")
    block = find_moe_blocks(model)[-1].block
    x_ND = torch.randn(N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    outs = []
    for router in (ThresholdRouter, _GarbageInUnusedSlots):
        attached = attach(model, lambda layer: router(layer.family, 0.25), drop=drop)
        with torch.no_grad():
            outs.append(block(x_ND[None]))
        attached.detach()
    assert torch.equal(outs[0], outs[1])
