"""Each family's routing maths against the family's own gate module, detection and describe()."""

import pytest
import torch
from torch import nn

from nectar.hf.describe import describe
from nectar.hf.families import family_of, find_moe_blocks
from nectar.hf.routers import FamilyRouter
from tests.hf.models import D, FAMILIES, config_of, tiny
from tests.tolerance import assert_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("family", FAMILIES)
def test_family_routing_reproduces_the_gate_bit_for_bit(family, dtype):
    model = tiny(family, dtype)
    x_ND = torch.randn(23, D, dtype=dtype, generator=torch.Generator().manual_seed(3))
    for found in find_moe_blocks(model):
        logits_NE, weights_NK, index_NK = found.block.gate(x_ND)
        routing = family_of(found.block.gate)
        experts, gates = routing.route(logits_NE)
        assert torch.equal(experts, index_NK)
        assert gates.dtype == weights_NK.dtype and torch.equal(gates, weights_NK)
        decision = FamilyRouter(routing)(logits_NE)
        assert torch.equal(decision.experts, index_NK) and torch.equal(decision.gates, weights_NK)
        assert decision.mask.all() and not decision.dropped.any()
        assert_close(decision.probs.sum(-1), torch.ones(23), n=2 * routing.num_experts + 4)  # softmax, then Σ


def test_deepseek_selection_uses_the_bias_and_the_groups_but_gates_do_not():
    model = tiny("deepseek_v3", torch.float64)
    gate = find_moe_blocks(model)[0].block.gate
    x_ND = torch.randn(40, D, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    logits = gate(x_ND)[0]
    routing = family_of(gate)
    sel = routing.select(logits)
    scores_NE = torch.sigmoid(logits)
    assert torch.equal(sel.scores, scores_NE.gather(1, sel.experts))           # unbiased gate values
    groups = (sel.experts // (routing.num_experts // gate.num_group))
    assert all(len(set(row)) <= gate.topk_group for row in groups.tolist())    # at most topk_group groups
    with torch.no_grad():
        gate.e_score_correction_bias.zero_()
    assert not torch.equal(routing.select(logits).experts.sort(-1).values, sel.experts.sort(-1).values)


def test_detection_finds_only_sparse_blocks_and_rejects_unknown_routers():
    assert [f.block_index for f in find_moe_blocks(tiny("qwen2_moe"))] == [1, 2]       # mlp_only_layers=[0]
    assert [f.block_index for f in find_moe_blocks(tiny("deepseek_v3"))] == [1, 2]     # first_k_dense_replace=1

    class OtherRouter(nn.Module):
        top_k = 2
    with pytest.raises(ValueError, match="unsupported MoE router OtherRouter"):
        family_of(OtherRouter())


def test_describe_reads_widths_and_flops_from_the_weights():
    rows = {fam: describe(tiny(fam)) for fam in FAMILIES}
    q2 = rows["qwen2_moe"][0]
    assert (q2["num_experts"], q2["top_k"], q2["expert_hidden"], q2["num_shared_experts"], q2["shared_hidden"]) == (8, 3, 16, 1, 48)
    assert q2["expert_flops"] == 6 * D * 16 and q2["shared_flops"] == 6 * D * 48 + 2 * D and q2["router_flops"] == 2 * D * 8
    ds = rows["deepseek_v3"][0]
    assert (ds["score_fn"], ds["num_shared_experts"], ds["shared_hidden"], ds["n_group"], ds["topk_group"]) == ("sigmoid", 2, 32, 4, 2)
    assert ds["routed_scaling_factor"] == 2.5 and ds["shared_flops"] == 6 * D * 32
    mx = rows["mixtral"][0]
    assert mx["norm_topk_prob"] is True and mx["num_shared_experts"] == 0 and mx["expert_hidden"] == config_of("mixtral").intermediate_size
    assert rows["olmoe"][0]["expert_hidden"] == config_of("olmoe").intermediate_size and len(rows["olmoe"]) == 3
