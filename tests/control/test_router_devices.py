"""The controller reads the chunk's logits on the host while the routers live on the GPU: every
router method the controller calls takes host logits (found by the first GPU run with measured
costs, where `deviation` mixed a CUDA buffer into CPU arithmetic)."""

import pytest
import torch

from nectar.experiment.policies import policy_router
from nectar.models.gpt2_moe import MoEGPT2LMHeadModel, preset_config

EXPERTS = [{"kind": "gelu", "hidden": 64, "count": 3}, {"kind": "gelu", "hidden": 16}, {"kind": "zero"}, {"kind": "copy"}]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", ["nectar", "fixed-price:1", "nectar:nodrop"])
def test_controller_methods_take_host_logits_with_the_router_on_the_gpu(policy):
    config = preset_config("tiny-moe", vocab_size=64, n_layer=1, n_embd=32, n_head=2, n_inner=64, n_positions=32,
                           expert_specs=EXPERTS, n_experts=0)
    layer = MoEGPT2LMHeadModel(config).moe_layers()[0][1]
    router = policy_router(policy, layer).to("cuda")
    logits = torch.randn(16, layer.num_experts)
    on_host = policy_router(policy, layer)
    # fp32 on two devices: the KL sums over E experts in a different order (a deviation near 0 is absolute)
    assert router.deviation(logits) == pytest.approx(on_host.deviation(logits), rel=1e-5, abs=1e-6)
    costs = torch.rand(layer.num_experts, dtype=torch.float64)
    lams = torch.tensor([0.1, 1.0, 10.0], dtype=torch.float64)
    assert router.price_table(logits, costs, lams) is not None
