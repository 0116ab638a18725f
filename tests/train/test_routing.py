"""The fine-tuning router: its three kinds of rows are exactly static top-2, static-cheap and
static top-1 decisions, in the requested shares, seeded."""

from __future__ import annotations

import pytest
import torch

from nectar.moe.static_routers import CheapStaticRouter, TopKRouter
from nectar.train.routing import AdaptiveTrainingRouter
from tests.tolerance import assert_close

CHEAP = [4, 5, 6]


def test_rows_are_top2_cheap_or_top1_in_the_requested_shares():
    logits = torch.randn(6000, 7, generator=torch.Generator().manual_seed(0))
    router = AdaptiveTrainingRouter(7, CHEAP, cheap_prob=0.3, single_prob=0.2, seed=1)
    d = router(logits)
    top2 = TopKRouter(7, 2)(logits)
    cheap = CheapStaticRouter(7, CHEAP)(logits)
    top1 = TopKRouter(7, 1)(logits)
    single = ~d.mask[:, 1]
    is_top2 = (d.experts == top2.experts).all(-1) & ~single
    is_cheap = (d.experts == cheap.experts).all(-1) & ~single
    assert bool((is_top2 | is_cheap | single).all())
    assert abs(float(single.float().mean()) - 0.2) < 0.02  # not rounding: binomial sd √(0.16/6000) ≈ 0.005, ×4
    differ = (cheap.experts != top2.experts).any(-1)                  # rows where the two policies disagree
    # not rounding: a random 30 % of the rows where the policies differ; over 6000 rows the share's
    # binomial standard deviation is ≈ 0.006, so 0.03 is five of them
    assert float((is_cheap & ~is_top2).float().mean()) == pytest.approx(0.3 * float(differ.float().mean()), abs=0.03)
    assert_close(d.gates[single, 0], torch.ones(int(single.sum())), n=4)  # one gate renormalised: p / p
    assert torch.equal(d.experts[single, 0], top1.experts[single, 0])  # indices
    assert_close(d.gates[is_top2], top2.gates[is_top2], n=2 * 7 + 4)  # softmax over 7, renormalised over 2
    assert_close(d.gates[is_cheap], cheap.gates[is_cheap], n=2 * 7 + 4)
    assert torch.equal(d.experts, AdaptiveTrainingRouter(7, CHEAP, 0.3, 0.2, seed=1)(logits).experts)
    assert not torch.equal(d.experts, AdaptiveTrainingRouter(7, CHEAP, 0.3, 0.2, seed=2)(logits).experts)


def test_gates_carry_gradient_and_bad_shares_are_refused():
    logits = torch.randn(50, 7, requires_grad=True)
    AdaptiveTrainingRouter(7, CHEAP, 0.5, 0.0)(logits).gates[:, 0].sum().backward()
    assert logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="sum <= 1"):
        AdaptiveTrainingRouter(7, CHEAP, 0.7, 0.5)
    with pytest.raises(ValueError):
        AdaptiveTrainingRouter(7, [], 0.3)
