"""ExpertPool: stacked groups against the standalone experts they replace (forward, cost, weights),
grouping in spec order, views that write through, old per-expert state dicts, copies and casts."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from nectar.lact.expert import LaCTMoEExpert
from nectar.moe.expert_pool import (ConstantGroup, CopyGroup, ExpertPool, GELUGroup, ModuleGroup, SwiGLUGroup,
                                    ZeroGroup)
from nectar.moe.experts import ConstantExpert, CopyExpert, ExpertSpec, GELUExpert, SwiGLUExpert, ZeroExpert, build_experts
from tests.tolerance import assert_close

D = 16
SPECS = [ExpertSpec("gelu", 32, 3), ExpertSpec("gelu", 8, 2), ExpertSpec("swiglu", 24, 2), ExpertSpec("zero"),
         ExpertSpec("copy"), ExpertSpec("constant", count=2)]
POOL_N = 2 * D + 32 + 4  # an expert's reductions (D, widest hidden 32) and its activation (tests/tolerance.py)


def standalone(seed: int = 0, dtype=torch.float64) -> nn.ModuleList:
    torch.manual_seed(seed)
    experts = build_experts(SPECS, D).to(dtype)
    with torch.no_grad():
        for name, param in experts.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.2)
    return experts


def test_from_specs_groups_consecutive_identical_experts_in_spec_order():
    pool = ExpertPool.from_specs(SPECS + [ExpertSpec("gelu", 32, 1)], D)
    assert [type(g) for g in pool.groups] == [GELUGroup, GELUGroup, SwiGLUGroup, ZeroGroup, CopyGroup, ConstantGroup,
                                              GELUGroup]
    assert [g.count for g in pool.groups] == [3, 2, 2, 1, 1, 2, 1]
    assert pool.first == [0, 3, 5, 7, 8, 9, 11, 12] and len(pool) == 12
    assert pool.groups[0].c_fc.shape == (3, D, 32) and pool.groups[0].c_proj_bias.shape == (3, D)
    assert pool.groups[2].gate_up.shape == (2, D, 48) and pool.groups[2].down.shape == (2, 24, D)
    assert pool.groups[5].mixer.shape == (2, 2, D)
    assert [type(e) for e in (pool[0], pool[5], pool[7], pool[8], pool[9])] == [
        type(pool[0]), type(pool[5]), ZeroExpert, CopyExpert, type(pool[9])]
    assert isinstance(pool[0], GELUExpert) and isinstance(pool[5], SwiGLUExpert) and isinstance(pool[9], ConstantExpert)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_views_report_the_standalone_experts_costs(dtype):
    experts = standalone(dtype=dtype)
    pool = ExpertPool.from_experts(experts)
    assert len(pool) == len(experts)
    for view, expert in zip(pool, experts):
        assert view.cost_per_token() == expert.cost_per_token()
        assert view.cost_per_token(2) == expert.cost_per_token(2)
        assert view.weight_numel() == sum(p.numel() for p in expert.parameters())


def test_views_compute_what_the_standalone_experts_compute():
    experts = standalone()
    pool = ExpertPool.from_experts(experts)
    x = torch.randn(7, D, dtype=torch.float64)
    for i, (view, expert) in enumerate(zip(pool, experts)):
        assert_close(view(x), expert(x), n=POOL_N, what=f"expert {i}")
    for group, first, _ in pool.spans():  # the group's own per-expert kernel (the loop path) agrees
        assert_close(group.forward_expert(0, x), experts[first](x), n=POOL_N)


def test_from_experts_copies_weights_and_dtype_exactly():
    experts = standalone()
    pool = ExpertPool.from_experts(experts)
    assert all(p.dtype == torch.float64 for p in pool.parameters())
    assert torch.equal(pool.groups[0].c_fc[1], experts[1].c_fc.weight)
    assert torch.equal(pool.groups[2].gate_up[1, :, 24:], experts[6].up_proj.weight.T)
    assert torch.equal(pool.groups[2].down[0], experts[5].down_proj.weight.T)
    assert torch.equal(pool.groups[5].mixer[1], experts[10].mixer.weight)


def test_writing_through_a_view_writes_the_stack():
    pool = ExpertPool.from_specs(SPECS, D)
    with torch.no_grad():
        pool[1].c_fc.weight.fill_(3.0)
        pool[6].up_proj.weight.fill_(2.0)
        pool[9].constant.fill_(1.5)
    assert (pool.groups[0].c_fc[1] == 3).all() and (pool.groups[0].c_fc[0] != 3).any()
    assert (pool.groups[2].gate_up[1, :, 24:] == 2).all() and (pool.groups[2].gate_up[1, :, :24] != 2).any()
    assert (pool.groups[5].constant[0] == 1.5).all()
    assert list(pool[1].parameters()) == []  # views own nothing: no duplicate parameters


def test_old_per_expert_state_dict_loads_into_the_stacks():
    experts = standalone(seed=1)
    old_state = experts.state_dict()  # keys "<i>.c_fc.weight", ... as checkpoints had them
    assert "3.c_fc.weight" in old_state and "5.gate_proj.weight" in old_state
    pool = ExpertPool.from_specs(SPECS, D).double()
    pool.load_state_dict(old_state)  # strict
    x = torch.randn(5, D, dtype=torch.float64)
    for view, expert in zip(pool, experts):
        assert_close(view(x), expert(x), n=POOL_N)
    assert set(pool.state_dict()) == set(ExpertPool.from_specs(SPECS, D).state_dict())


def test_old_state_dict_with_a_module_expert():
    lact = [LaCTMoEExpert(D, 8, chunk_size=4), GELUExpert(D, 8)]
    old_state = nn.ModuleList(lact).state_dict()
    pool = ExpertPool.from_specs([ExpertSpec("lact", 8), ExpertSpec("gelu", 8)], D)
    assert isinstance(pool.groups[0], ModuleGroup) and isinstance(pool[0], LaCTMoEExpert)
    pool[0].chunk_size = 4
    pool.load_state_dict(old_state)
    assert torch.equal(pool[0].w0, lact[0].w0) and torch.equal(pool.groups[1].c_fc[0], lact[1].c_fc.weight)


def test_new_layout_state_dict_round_trip_and_deepcopy():
    pool = ExpertPool.from_specs(SPECS, D)
    other = ExpertPool.from_specs(SPECS, D)
    other.load_state_dict(pool.state_dict())
    x = torch.randn(4, D)
    assert all(torch.equal(a(x), b(x)) for a, b in zip(pool, other))
    clone = copy.deepcopy(pool)
    with torch.no_grad():
        clone.groups[0].c_fc.zero_()
    assert torch.equal(clone[0].c_fc.weight, torch.zeros(D, 32))  # the clone's views see the clone
    assert pool[0].c_fc.weight.abs().sum() > 0


def test_casting_the_pool_moves_what_views_read():
    pool = ExpertPool.from_specs(SPECS, D).to(torch.bfloat16)
    assert pool[0].c_fc.weight.dtype == torch.bfloat16
    assert pool[0].cost_per_token().weight_bytes == (2 * D * 32 + 32 + D) * 2


def test_bad_pools_raise():
    with pytest.raises(ValueError, match="at least one"):
        ExpertPool.from_specs([], D)
    with pytest.raises(ValueError, match="at least one"):
        ExpertPool.from_experts([])
    with pytest.raises(ValueError, match="not a nectar.moe.experts.Expert"):
        ExpertPool.from_experts([nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="same d_model"):
        ExpertPool([ZeroGroup(4, 1), CopyGroup(8, 1)])
    with pytest.raises(ValueError, match="unknown activation"):
        ExpertPool.from_specs([ExpertSpec("gelu", 8)], D, activation="nope")
    with pytest.raises(ValueError, match="unknown expert kind"):
        ExpertPool.from_specs([ExpertSpec("mlp", 8)], D)
