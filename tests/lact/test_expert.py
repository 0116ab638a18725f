"""Tests of LaCTMoEExpert (nectar/lact_expert.py): stream semantics against the functional kernel,
gradients, use inside a MoELayer against the per-token reference dispatch, and its cost count
against torch's own FLOP counter."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from nectar.moe.dispatch import reference_dispatch
from nectar.moe.experts import EXPERT_KINDS, ExpertSpec, SwiGLUExpert, ZeroExpert, build_experts
from nectar.lact.fastweight import row_norms, swiglu_apply, swiglu_fast_weight
from nectar.lact.expert import LaCTMoEExpert
from nectar.moe.layer import MoELayer
from nectar.moe.static_routers import TopKRouter
from tests.lact import NS5_GAIN
from tests.tolerance import approx, assert_close, within

DOUBLE = torch.float64
# Tolerances (tests/tolerance.py): n counts the stream's tokens (every fast weight sums the updates
# of all earlier tokens, every gradient the backward of all later ones) plus the reductions of the
# projections and readout around the kernel (d_model each) and of the fast-weight apply (hidden);
# make_expert uses Muon, so safety = NS5_GAIN (tests/lact/__init__.py).


def make_expert(seed=0, **kwargs) -> LaCTMoEExpert:
    torch.manual_seed(seed)
    options = dict(d_model=12, hidden=16, chunk_size=4, num_heads=2, use_muon=True, use_momentum=True, base_lr=0.5)
    options.update(kwargs)
    expert = LaCTMoEExpert(**options).to(DOUBLE)
    with torch.no_grad():  # non-trivial learning-rate and momentum heads
        expert.lr_proj.weight.normal_(0, 0.3)
        if expert.momentum_proj is not None:
            expert.momentum_proj.weight.normal_(0, 0.3)
    return expert


def kernel_reference(expert: LaCTMoEExpert, x: torch.Tensor):
    """The whole stream in one call of the functional kernel, then the expert's readout."""
    inputs = expert.project(x)
    weights = (expert.w0, expert.w1, expert.w2)
    out, final = swiglu_fast_weight(
        inputs.q, inputs.k, inputs.v, *weights, inputs.lr0, inputs.lr1, inputs.lr2, expert.chunk_size,
        use_muon=expert.use_muon, momentum=inputs.momentum, weight_norm=expert.weight_norm, causal=True,
    )
    return expert.readout(out), final


@pytest.mark.parametrize("pieces", [[3, 7, 1, 9, 4], [24], [4, 4, 4, 4, 4, 4], [1] * 24])
def test_stream_in_pieces_equals_one_kernel_call(pieces):
    expert = make_expert()
    x = torch.randn(sum(pieces), expert.d_model, dtype=DOUBLE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want_y, want_weights = kernel_reference(expert, x)
        got = [expert(part) for part in x.split(pieces)]
    n = len(x) + 2 * expert.d_model + expert.hidden
    assert_close(torch.cat(got), want_y, n=n, safety=NS5_GAIN, what="outputs")
    assert expert.state.chunks_done == 6 and expert.state.pending_tokens == 0
    for got_w, want_w in zip(expert.fast_weights(), want_weights):
        assert_close(got_w, want_w, n=n, safety=NS5_GAIN, what="fast weights")


def test_weight_norm_holds_over_many_chunks_and_reset_restores_slow_weights():
    expert = make_expert(base_lr=5.0)
    slow = expert.fast_weights()
    x = torch.randn(40, expert.d_model, dtype=DOUBLE, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        first = expert(x)
        for w_now, w_slow in zip(expert.fast_weights(), slow):
            assert not within(w_now, w_slow, n=len(x))[0]  # moved by more than rounding
            # not rounding: weight norm divides by ‖w‖ + WEIGHT_NORM_EPS (1e-5), so the norms land
            # a relative 1e-5/‖w‖ short of their targets; 1e-4 allows row norms down to 0.1
            torch.testing.assert_close(row_norms(w_now), row_norms(w_slow), rtol=1e-4, atol=0)
        expert.reset()
        for w_now, w_slow in zip(expert.fast_weights(), slow):
            torch.testing.assert_close(w_now, w_slow, rtol=0, atol=0)
        again = expert(x)
    torch.testing.assert_close(again, first, rtol=0, atol=0)


def test_later_tokens_never_change_earlier_outputs():
    expert = make_expert()
    x = torch.randn(13, expert.d_model, dtype=DOUBLE, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        base = expert(x)
        expert.reset()
        changed = x.clone()
        changed[9:] += 1.0
        out = expert(changed)
    torch.testing.assert_close(out[:9], base[:9], rtol=0, atol=0)
    assert not within(out[9:], base[9:], n=len(x) + 2 * expert.d_model + expert.hidden, safety=NS5_GAIN)[0]


def test_adapt_off_answers_with_frozen_weights():
    expert = make_expert()
    x = torch.randn(10, expert.d_model, dtype=DOUBLE, generator=torch.Generator().manual_seed(4))
    expert.adapt = False
    with torch.no_grad():
        frozen = expert(x)
        inputs = expert.project(x)

        want = expert.readout(swiglu_apply(inputs.q, expert.w0, expert.w1, expert.w2))
    assert_close(frozen, want, n=2 * expert.d_model + expert.hidden)  # no update: projection, apply, readout
    assert expert.state.chunks_done == 0


def test_gradients_within_a_call_match_the_kernel_graph():
    expert = make_expert()
    x = torch.randn(11, expert.d_model, dtype=DOUBLE, generator=torch.Generator().manual_seed(5))
    probe = torch.randn(11, expert.d_model, dtype=DOUBLE, generator=torch.Generator().manual_seed(6))
    params = [expert.w0, expert.w1, expert.w2, expert.qkv_proj.weight, expert.lr_proj.weight, expert.o_proj.weight]
    want = torch.autograd.grad((kernel_reference(expert, x)[0] * probe).sum(), params)
    expert.reset()
    got = torch.autograd.grad((expert(x) * probe).sum(), params)
    for g, w in zip(got, want):
        assert g.abs().sum() > 0
        assert_close(g, w, n=len(x) + 2 * expert.d_model + expert.hidden, safety=NS5_GAIN, what="gradient")
    expert.reset()
    expert(x).sum().backward()  # the carried state is detached: a second call backpropagates alone
    expert(x).sum().backward()


def test_inside_moe_layer_matches_per_token_reference_dispatch():
    torch.manual_seed(7)
    d_model = 12
    experts = [SwiGLUExpert(d_model, 8), make_expert(seed=8, chunk_size=3), ZeroExpert(d_model), make_expert(seed=9, chunk_size=2)]
    layer = MoELayer(d_model, [e.to(DOUBLE) for e in experts], TopKRouter(num_experts=4, k=2)).to(DOUBLE)
    x = torch.randn(2, 9, d_model, dtype=DOUBLE)
    with torch.no_grad():
        y = layer(x)
        counts = layer.last_metrics.tokens_per_expert
        for expert in layer.experts:
            if isinstance(expert, LaCTMoEExpert):
                expert.reset()
        # The reference calls each expert one token at a time, in token order: the same stream.
        want = reference_dispatch(x.reshape(-1, d_model), layer.last_decision, layer.experts).reshape(x.shape)
    assert counts[1] >= 3 and counts[3] >= 2, counts  # both LaCT experts took at least one update
    # a LaCT expert sees at most all 18 tokens; the gate mixing adds a sum over the k = 2 experts
    assert_close(y, want, n=x.shape[0] * x.shape[1] + 2 * d_model + 16 + 2, safety=NS5_GAIN)
    costs = layer.last_metrics.workload.expert_costs
    assert costs[1].kind == "lact" and costs[1].flops > 0


def test_registered_as_expert_kind():
    assert "lact" in EXPERT_KINDS
    pool = build_experts([ExpertSpec("swiglu", hidden=32, count=2), ExpertSpec("lact", hidden=32)], d_model=16)
    assert isinstance(pool[2], LaCTMoEExpert) and pool[2].hidden == 32
    assert pool[2](torch.randn(5, 16)).shape == (5, 16)


@pytest.mark.parametrize("use_muon, num_heads", [(False, 1), (True, 2)])
def test_cost_per_token_matches_torch_flop_counter_over_one_chunk(use_muon, num_heads):
    expert = LaCTMoEExpert(16, 24, chunk_size=8, num_heads=num_heads, use_muon=use_muon, use_momentum=True)
    x = torch.randn(8, 16)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        expert(x)
    assert expert.state.chunks_done == 1
    assert expert.cost_per_token().flops * 8 == approx(counter.get_total_flops(), n=2)  # ÷ 8 and × 8


def test_bad_configuration_and_input():
    with pytest.raises(ValueError, match="must divide"):
        LaCTMoEExpert(10, 16, num_heads=3)
    with pytest.raises(ValueError, match="chunk_size"):
        LaCTMoEExpert(8, 16, chunk_size=0)
    with pytest.raises(ValueError, match="base_lr"):
        LaCTMoEExpert(8, 16, base_lr=0.0)
    with pytest.raises(ValueError, match=r"\[N, 8\]"):
        LaCTMoEExpert(8, 16)(torch.randn(2, 3, 8))
