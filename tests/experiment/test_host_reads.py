"""No policy's forward reads a tensor value to the host in the grouped dispatch: the routers, their
drop decisions, the dispatch, the routing recorder and the GPT-2 body around the MoE layers all
stay on the device (0 reads per forward, every policy). The loop dispatch reads its counts once a
layer, whatever the policy. And the counter itself counts what it claims to (every kind of read
that would make a GPU wait), and leaves torch as it found it."""

import pytest
import torch

import nectar.moe.dispatch as dispatch_module
from nectar.experiment.forward import install
from nectar.experiment.host_reads import count_host_reads
from nectar.experiment.policies import NECTAR_VARIANTS, policy_router
from nectar.experiment.policy_lists import ADAPTIVE, STATIC_FRONTIER
from nectar.moe.dispatch import dispatch_path, grouped_mm_usable
from tests.conftest import tiny_moe

# Every policy a MoE-DistilGPT2 runs ("threshold:T" routes pretrained transformers MoE models only),
# with the identical-routing pair of static top-2 (fixed-bias:0, fixed-price:1e9).
POLICIES = sorted({*STATIC_FRONTIER, *ADAPTIVE, *NECTAR_VARIANTS, "static-top3", "fixed-bias:0", "fixed-price:1e9",
                   "pi-share:0.3"})


def test_the_counter_counts_each_kind_of_host_read():
    t = torch.tensor([1.5, 2.0])
    mask = t > 1.6
    with count_host_reads() as counts:
        t[0].item(), t.tolist(), bool(t[0] > 0), int(t[1]), float(t[0]), t.nonzero()
    assert dict(counts) == {"item": 1, "tolist": 1, "__bool__": 1, "__int__": 1, "__float__": 1, "nonzero": 1}
    t.tolist()
    assert counts["tolist"] == 1                                       # closed: nothing counted any more
    u = t.clone()
    with count_host_reads() as counts:
        t[mask], t[:, None][mask], t[0, None][mask[:1]]                # boolean-mask indexing
        u[mask] = 0.0
        u.index_put_((mask,), torch.tensor(1.0))
        torch.nonzero(t), torch.where(mask), t.argwhere(), t.masked_select(mask)
        t.unique(), torch.unique(t), torch.bincount(torch.tensor([0, 1]))  # Tensor.unique: counted once
        torch.repeat_interleave(torch.tensor([1, 2])), t.repeat_interleave(torch.tensor([1, 2]))
        torch.equal(t, t), torch.allclose(t, t), t.cpu(), t.numpy(), 2.0 in t
    assert dict(counts) == {"mask_index": 5, "nonzero": 1, "where": 1, "argwhere": 1, "masked_select": 1, "unique": 2,
                            "bincount": 1, "repeat_interleave": 2, "equal": 1, "allclose": 1, "cpu": 1, "numpy": 1,
                            "item": 1}                                 # `in` reads with .item()


def test_the_counter_ignores_what_never_waits_for_the_gpu():
    t = torch.tensor([1.5, 2.0])
    index = torch.tensor([1, 0])
    with count_host_reads() as counts:
        t[index], t[0], t[..., :1], t[None], torch.where(t > 1.6, t, 0.0), t.masked_fill(t > 1.6, 0.0)
        t.repeat_interleave(2), t.repeat_interleave(torch.tensor([1, 2]), output_size=3)
        u = t.clone()
        u[index] = 0.0
        u.index_put_((index,), torch.tensor(1.0))
        torch._assert_async(torch.tensor(True))                        # async on a GPU, a plain assert on the CPU
        (t > 0).all(), t.sum(), t.topk(1), torch.argsort(t)
    assert dict(counts) == {}


def test_the_counter_leaves_torch_as_it_found_it():
    names = ("item", "__bool__", "__getitem__", "__setitem__", "unique", "repeat_interleave", "index_put_")
    before = ({n: vars(torch.Tensor).get(n) for n in names}, torch.nonzero, torch.where, torch.unique, torch.equal)
    with pytest.raises(RuntimeError), count_host_reads():
        raise RuntimeError("a failing forward")
    assert ({n: vars(torch.Tensor).get(n) for n in names}, torch.nonzero, torch.where, torch.unique, torch.equal) == before


@pytest.fixture(scope="module")
def model():
    return tiny_moe()


@pytest.fixture
def grouped_on_cpu(monkeypatch):
    """The grouped (GPU) dispatch path on the CPU, where it is off by default."""
    monkeypatch.setattr(dispatch_module, "GROUPED_MM_DEVICE_TYPES", {"cpu": {torch.float32}})
    if not grouped_mm_usable(torch.randn(4, 32)):
        pytest.skip("torch._grouped_mm is not usable on this CPU build")


def reads_per_forward(model, policy: str, grouped: bool) -> dict:
    """Host reads of one forward of `policy` as the experiment runs it (no mask, no cache, a routing
    recorder on every MoE layer), after a warm-up forward."""
    ids = torch.randint(0, 100, (4, 32), generator=torch.Generator().manual_seed(1))
    install(model, [policy_router(policy, layer) for _, layer in model.moe_layers()])
    for _, layer in model.moe_layers():
        layer.grouped = grouped
    recorder = model.new_recorder(sample_stride=4, max_sample_tokens=64)
    with torch.no_grad(), model.recording(recorder):
        model(input_ids=ids, use_cache=False)
        with count_host_reads() as counts:
            model(input_ids=ids, use_cache=False)
    return dict(counts)


@pytest.mark.parametrize("policy", POLICIES)
def test_a_grouped_forward_reads_nothing_whatever_the_policy(model, grouped_on_cpu, policy):
    assert dispatch_path(torch.randn(4, 32), model.moe_layers()[0][1].experts, True) == "grouped"
    assert reads_per_forward(model, policy, grouped=True) == {}


def test_a_loop_forward_reads_the_counts_once_a_layer_whatever_the_policy(model):
    seen = {policy: reads_per_forward(model, policy, grouped=False) for policy in POLICIES}
    assert all(counts == {"tolist": 2} for counts in seen.values()), seen
