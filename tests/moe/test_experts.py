"""Experts: forward against HF's GPT-2 MLP and closed forms, cost formulas, pool building, errors."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP
from tests.tolerance import assert_close

from nectar.moe.experts import (
    EXPERT_KINDS,
    ConstantExpert,
    CopyExpert,
    Expert,
    ExpertSpec,
    GELUExpert,
    SwiGLUExpert,
    ZeroExpert,
    build_experts,
    register_expert_kind,
)

D, H = 16, 40


def gpt2_mlp(d_model: int = D, hidden: int = H) -> GPT2MLP:
    config = GPT2Config(n_embd=d_model, n_layer=1, n_head=2, resid_pdrop=0.0)
    mlp = GPT2MLP(hidden, config).double().eval()
    for param in mlp.parameters():  # HF initialises biases to zero; make them matter
        torch.nn.init.normal_(param, std=0.3)
    return mlp


def test_gelu_expert_loads_gpt2_mlp_state_dict_and_matches_it():
    mlp = gpt2_mlp()
    expert = GELUExpert(D, H).double()
    expert.load_state_dict(mlp.state_dict())  # strict: same keys and shapes
    assert set(mlp.state_dict()) == {"c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias"}
    x = torch.randn(7, D, dtype=torch.float64)
    assert_close(expert(x), mlp(x), n=2 * (D + H))  # c_fc and c_proj (sums over D and H), bias, GELU


def test_swiglu_expert_matches_closed_form():
    expert = SwiGLUExpert(D, H).double()
    x = torch.randn(5, D, dtype=torch.float64)
    gate, up, down = expert.gate_proj.weight, expert.up_proj.weight, expert.down_proj.weight
    g = x @ gate.T
    expected = ((g / (1 + torch.exp(-g))) * (x @ up.T)) @ down.T
    assert_close(expert(x), expected, n=2 * D + H + 4)  # gate and up over D, down over H, silu's exp and ÷


def test_zero_and_copy_experts():
    x = torch.randn(4, D, requires_grad=True)
    assert torch.equal(ZeroExpert(D)(x), torch.zeros(4, D))
    assert torch.equal(CopyExpert(D)(x), x)
    CopyExpert(D)(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(4, D))


def test_constant_expert_mixes_input_and_learned_vector():
    expert = ConstantExpert(D).double()
    x = torch.randn(6, D, dtype=torch.float64)
    a = torch.exp(x @ expert.mixer.weight.T)
    a = a / a.sum(-1, keepdim=True)
    expected = a[:, 0:1] * x + a[:, 1:2] * expert.constant.detach()
    assert_close(expert(x), expected, n=D + 2 + 4)  # the mixer over D, softmax over 2, exp, ÷, ×, +
    expert(x).sum().backward()
    assert expert.constant.grad.abs().sum() > 0 and expert.mixer.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype,expected_bytes", [(torch.float32, 4), (torch.bfloat16, 2), (torch.float64, 8)])
def test_cost_per_token_matches_hand_formulas(dtype, expected_bytes):
    swiglu, gelu = SwiGLUExpert(D, H).to(dtype), GELUExpert(D, H).to(dtype)
    b = expected_bytes
    s, g = swiglu.cost_per_token(), gelu.cost_per_token()
    assert (s.flops, s.weight_bytes, s.bytes, s.kind) == (2 * 3 * D * H, 3 * D * H * b, (2 * D + 6 * H) * b, "ffn")
    assert (g.flops, g.weight_bytes, g.bytes, g.kind) == (2 * 2 * D * H, (2 * D * H + H + D) * b, (2 * D + 4 * H) * b, "ffn")
    assert swiglu.cost_per_token(dtype_bytes=1).weight_bytes == 3 * D * H


def test_cost_of_zero_computation_experts():
    zero, copy, const = ZeroExpert(D).cost_per_token(2), CopyExpert(D).cost_per_token(2), ConstantExpert(D).cost_per_token(2)
    assert (zero.flops, zero.bytes, zero.weight_bytes, zero.kind) == (0, 0, 0, "zero")
    assert (copy.flops, copy.bytes, copy.weight_bytes, copy.kind) == (0, 2 * D * 2, 0, "copy")
    assert (const.flops, const.bytes, const.weight_bytes, const.kind) == (4 * D, 2 * D * 2, 3 * D * 2, "constant")


def test_build_heterogeneous_pool_in_spec_order():
    specs = [ExpertSpec("gelu", 64, 3), ExpertSpec("gelu", 16, 2), ExpertSpec("swiglu", 24), ExpertSpec("zero"),
             ExpertSpec("copy"), ExpertSpec("constant")]
    pool = build_experts(specs, D)
    assert [type(e) for e in pool] == [GELUExpert] * 5 + [SwiGLUExpert, ZeroExpert, CopyExpert, ConstantExpert]
    assert [getattr(e, "hidden", None) for e in pool] == [64, 64, 64, 16, 16, 24, None, None, None]
    assert all(e.d_model == D for e in pool)
    assert pool[0].c_fc.weight.data_ptr() != pool[1].c_fc.weight.data_ptr()  # independent weights


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["gelu", "swiglu", "zero", "copy", "constant"]),
                          st.integers(1, 8), st.integers(1, 3)), min_size=1, max_size=5))
def test_build_experts_counts_and_kinds(raw_specs):
    specs = [ExpertSpec(k, h if EXPERT_KINDS[k].needs_hidden else None, c) for k, h, c in raw_specs]
    pool = build_experts(specs, 4)
    expected_kinds = [k for k, _, c in raw_specs for _ in range(c)]
    kinds = {GELUExpert: "gelu", SwiGLUExpert: "swiglu", ZeroExpert: "zero", CopyExpert: "copy", ConstantExpert: "constant"}
    assert [kinds[type(e)] for e in pool] == expected_kinds
    x = torch.randn(3, 4)
    assert all(e(x).shape == (3, 4) for e in pool)


@pytest.mark.parametrize("specs,match", [
    ([ExpertSpec("mlp", 8)], "unknown expert kind"),
    ([ExpertSpec("gelu")], "hidden must be a positive int"),
    ([ExpertSpec("swiglu", 0)], "hidden must be a positive int"),
    ([ExpertSpec("zero", 8)], "has no hidden width"),
    ([ExpertSpec("gelu", 8, 0)], "count must be a positive int"),
    ([ExpertSpec("gelu", 8, True)], "count must be a positive int"),
    ([], "at least one"),
    (["gelu"], "expected ExpertSpec"),
])
def test_bad_specs_raise(specs, match):
    with pytest.raises(ValueError, match=match):
        build_experts(specs, D)


def test_bad_construction_and_input_raise():
    with pytest.raises(ValueError, match="d_model"):
        GELUExpert(0, 8)
    with pytest.raises(ValueError, match="hidden"):
        SwiGLUExpert(8, -1)
    with pytest.raises(ValueError, match="unknown activation"):
        GELUExpert(8, 8, activation="nope")
    with pytest.raises(ValueError, match=r"shape \[N, 16\]"):
        GELUExpert(D, H)(torch.randn(3, D + 1))
    with pytest.raises(ValueError, match=r"shape \[N, 16\]"):
        ZeroExpert(D)(torch.randn(2, 3, D))


def test_register_new_kind_builds_it():
    class ScaledCopy(Expert):
        kind = "copy"

        def forward(self, x):
            return 2 * x

        def flops_per_token(self):
            return self.d_model

        def activation_elements_per_token(self):
            return 2 * self.d_model

    register_expert_kind("scaled_copy_test", lambda d, h: ScaledCopy(d), needs_hidden=False)
    try:
        pool = build_experts([ExpertSpec("scaled_copy_test", count=2)], D)
        assert len(pool) == 2 and isinstance(pool[0], ScaledCopy)
        assert pool[0].cost_per_token(2).flops == D
        with pytest.raises(ValueError, match="has no hidden width"):
            build_experts([ExpertSpec("scaled_copy_test", hidden=4)], D)
    finally:
        EXPERT_KINDS.pop("scaled_copy_test")
