"""On the GPU, no policy's MoE layers wait for the host: gate → router → grouped dispatch and the
routing recorder of every policy run under `torch.cuda.set_sync_debug_mode("error")`, which raises
on any synchronising call. (The transformers GPT-2 body around the layers makes one sync of its
own per forward, in its causal-mask preparation; it is not NECTAR's and the same for every policy.)"""

import pytest
import torch

from nectar.experiment.policies import policy_router
from nectar.models.gpt2_moe import MoEGPT2LMHeadModel, preset_config
from nectar.moe.dispatch import dispatch_path

POLICIES = ("static-top2", "static-top1", "static-top3", "static-cheap", "fixed-bias:0", "fixed-bias:2",
            "fixed-price:0.5", "fixed-price:1e9", "top-p:0.5", "mix:0.3", "pi-share:0.3", "nectar", "nectar:nodrop")
EXPERTS = [{"kind": "gelu", "hidden": 256, "count": 3}, {"kind": "gelu", "hidden": 64}, {"kind": "zero"},
           {"kind": "copy"}]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("policy", POLICIES)
def test_every_policys_moe_layers_run_without_a_host_sync(policy):
    torch.manual_seed(0)
    config = preset_config("tiny-moe", vocab_size=256, n_layer=2, n_embd=128, n_head=2, n_inner=256,
                           n_positions=64, expert_specs=EXPERTS, n_experts=0)
    model = MoEGPT2LMHeadModel(config).to("cuda", torch.bfloat16).eval()
    layers = [layer for _, layer in model.moe_layers()]
    x = torch.randn(4096, config.n_embd, device="cuda", dtype=torch.bfloat16)
    for layer in layers:
        layer.grouped = True
        layer.router = policy_router(policy, layer).to("cuda")
    assert dispatch_path(x, layers[0].experts, True) == "grouped"
    recorder = model.new_recorder(sample_stride=4, max_sample_tokens=1024)
    with torch.no_grad(), model.recording(recorder):
        for layer in layers:
            layer(x)                                             # warm-up: probes and lazy buffers
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            for layer in layers:
                layer(x)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
