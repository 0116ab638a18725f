"""No policy's forward reads more tensor values to the host than any other: the routers and their
drop decisions stay on the device, so the count is the dispatch's own (one per layer on the CPU's
loop path) whatever the policy. And the counter itself counts what it claims to."""

import torch

from nectar.experiment.forward import install
from nectar.experiment.host_reads import count_host_reads
from nectar.experiment.policies import policy_router
from nectar.models.gpt2_moe import MoEGPT2LMHeadModel, preset_config
from tests.conftest import SPECS

POLICIES = ("static-top2", "static-top1", "static-top3", "static-cheap", "fixed-bias:0", "fixed-bias:2",
            "fixed-price:0.5", "fixed-price:1e9", "top-p:0.5", "mix:0.3", "pi-share:0.3", "nectar", "nectar:fast",
            "nectar:nodrop")


def test_the_counter_counts_each_kind_of_host_read():
    t = torch.tensor([1.5, 2.0])
    with count_host_reads() as counts:
        t[0].item(), t.tolist(), bool(t[0] > 0), int(t[1]), float(t[0]), t.nonzero()
    assert dict(counts) == {"item": 1, "tolist": 1, "__bool__": 1, "__int__": 1, "__float__": 1, "nonzero": 1}
    t.tolist()
    assert counts["tolist"] == 1                                       # closed: nothing counted any more


def test_host_reads_per_forward_do_not_depend_on_the_policy():
    torch.manual_seed(0)
    config = preset_config("tiny-moe", vocab_size=100, n_layer=2, n_embd=32, n_head=2, n_inner=64,
                           n_positions=64, expert_specs=SPECS, n_experts=0)
    model = MoEGPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(1))
    seen = {}
    for name in POLICIES:
        install(model, [policy_router(name, layer) for _, layer in model.moe_layers()])
        with torch.no_grad(), count_host_reads() as counts:
            model(input_ids=ids, use_cache=False)
        seen[name] = dict(counts)
    assert all(counts == seen["static-top2"] for counts in seen.values()), seen
    assert seen["static-top2"].get("tolist") == 2                      # the loop dispatch's counts, once a layer
