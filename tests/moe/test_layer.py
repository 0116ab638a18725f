"""MoELayer and dispatch: outputs and all gradients against the per-token reference loop, dense
equivalences (HF's GPT-2 MLP), metrics/workload, router swapping, grouped path, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

import nectar.moe.dispatch as dispatch_module
from nectar.moe.balancing import routing_entropy
from nectar.moe.dispatch import dispatch, grouped_mm_usable, reference_dispatch
from nectar.moe.experts import ExpertSpec, GELUExpert, SwiGLUExpert, build_experts
from nectar.moe.layer import MoELayer
from nectar.moe.static_routers import CapacityRouter, TopKRouter, TopPRouter

D = 16
HETERO = [ExpertSpec("gelu", 32, 3), ExpertSpec("gelu", 16, 2), ExpertSpec("swiglu", 24, 2), ExpertSpec("zero"),
          ExpertSpec("copy"), ExpertSpec("constant")]
E_HETERO = 10

ROUTERS = {
    "top1": lambda e: TopKRouter(e, 1),
    "top2": lambda e: TopKRouter(e, 2),
    "top3-no-renorm": lambda e: TopKRouter(e, 3, renormalize=False, temperature=2.0),
    "capacity-drops": lambda e: CapacityRouter(e, 2, capacity_factor=0.5),
    "topp": lambda e: TopPRouter(e, p=0.6, max_k=4),
}


def make_layer(router_name: str, dtype: torch.dtype, seed: int = 0) -> MoELayer:
    torch.manual_seed(seed)
    layer = MoELayer(D, build_experts(HETERO, D), ROUTERS[router_name](E_HETERO)).to(dtype)
    with torch.no_grad():  # spread logits so that all experts are used
        layer.gate.weight.mul_(4.0)
        for expert in layer.experts:  # nonzero biases so that they matter for the comparison
            for name, param in expert.named_parameters():
                if name.endswith("bias"):
                    param.normal_(0, 0.1)
    return layer


def reference_forward(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Gate and router again, then the per-token loop (an independent graph)."""
    x_ND = x.reshape(-1, D)
    decision = layer.router(layer.gate(x_ND))
    return reference_dispatch(x_ND, decision, layer.experts).reshape(x.shape)


def outputs_and_grads(layer: MoELayer, x: torch.Tensor, forward) -> tuple[torch.Tensor, list[torch.Tensor]]:
    x = x.detach().clone().requires_grad_()
    y = forward(layer, x)
    weights = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
    params = [p for p in layer.parameters()]
    grads = torch.autograd.grad((y * weights).sum(), [x, *params], allow_unused=True)
    return y.detach(), [torch.zeros_like(t) if g is None else g for g, t in zip(grads, [x, *params])]


def assert_matches_reference(layer: MoELayer, x: torch.Tensor, rtol: float, atol: float) -> None:
    y, grads = outputs_and_grads(layer, x, lambda l, v: l(v))
    y_ref, grads_ref = outputs_and_grads(layer, x, reference_forward)
    torch.testing.assert_close(y, y_ref, rtol=rtol, atol=atol)
    names = ["x", *(n for n, _ in layer.named_parameters())]
    for name, g, g_ref in zip(names, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=rtol, atol=atol, msg=lambda m: f"grad of {name}: {m}")


@pytest.mark.parametrize("router_name", sorted(ROUTERS))
def test_layer_matches_reference_loop_fp64(router_name):
    layer = make_layer(router_name, torch.float64)
    x = torch.randn(3, 8, D, dtype=torch.float64)
    assert_matches_reference(layer, x, rtol=1e-10, atol=1e-12)
    counts = layer.last_metrics.tokens_per_expert
    assert sum(c > 0 for c in counts) >= 6, counts  # the comparison covered most expert kinds


@pytest.fixture
def grouped_on_cpu(monkeypatch):
    """Enable the grouped-mm path on CPU (off by default there because it is slower)."""
    monkeypatch.setattr(dispatch_module, "GROUPED_MM_DEVICE_TYPES", {"cpu", "cuda"})


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("router_name", ["top2", "capacity-drops", "topp"])
def test_layer_matches_reference_loop_fp32(router_name, grouped, grouped_on_cpu):
    layer = make_layer(router_name, torch.float32)
    layer.grouped = grouped
    x = torch.randn(2, 12, D)
    assert_matches_reference(layer, x, rtol=1e-4, atol=1e-5)


def test_capacity_layer_drops_are_counted_and_excluded():
    layer = make_layer("capacity-drops", torch.float64)
    x = torch.randn(24, D, dtype=torch.float64)
    layer(x)
    decision, metrics = layer.last_decision, layer.last_metrics
    capacity = layer.router.capacity(24)
    chosen = torch.bincount(decision.experts.reshape(-1), minlength=E_HETERO)
    assert metrics.dropped_tokens == int((chosen - capacity).clamp_min(0).sum()) > 0
    assert metrics.tokens_per_expert == chosen.clamp_max(capacity).tolist()
    assert metrics.workload.dropped_tokens == metrics.dropped_tokens


def gpt2_mlp(hidden: int = 40) -> GPT2MLP:
    mlp = GPT2MLP(hidden, GPT2Config(n_embd=D, n_layer=1, n_head=2, resid_pdrop=0.0)).double().eval()
    for param in mlp.parameters():
        torch.nn.init.normal_(param, std=0.3)
    return mlp


def test_single_expert_top1_equals_dense_gpt2_mlp():
    mlp = gpt2_mlp()
    expert = GELUExpert(D, 40).double()
    expert.load_state_dict(mlp.state_dict())
    layer = MoELayer(D, [expert], TopKRouter(1, 1)).double()
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    torch.testing.assert_close(y, mlp(x))
    (grad_moe,) = torch.autograd.grad(y.square().sum(), x)
    (grad_dense,) = torch.autograd.grad(mlp(x).square().sum(), x)
    torch.testing.assert_close(grad_moe, grad_dense)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("router", [TopKRouter(6, 1), TopKRouter(6, 3), CapacityRouter(6, 2, capacity_factor=3.0),
                                    TopPRouter(6, p=0.9)], ids=["top1", "top3", "capacity", "topp"])
def test_identical_experts_with_renormalised_gates_equal_dense(router, dtype, tol):
    mlp = gpt2_mlp()
    experts = [GELUExpert(D, 40).double() for _ in range(6)]
    for expert in experts:
        expert.load_state_dict(mlp.state_dict())
    layer = MoELayer(D, experts, copy.deepcopy(router)).to(dtype)
    x = torch.randn(20, D, dtype=dtype)
    torch.testing.assert_close(layer(x), mlp.to(dtype)(x), rtol=tol, atol=tol)
    assert layer.last_metrics.dropped_tokens == 0


def test_metrics_and_workload_match_independent_counts():
    layer = make_layer("topp", torch.float32)
    x = torch.randn(4, 6, D)
    layer(x)
    decision, metrics = layer.last_decision, layer.last_metrics
    counts = [0] * E_HETERO
    for t in range(24):
        for s in range(decision.experts.shape[1]):
            if decision.mask[t, s]:
                counts[int(decision.experts[t, s])] += 1
    assert metrics.tokens_per_expert == counts == metrics.workload.tokens_per_expert
    assert metrics.num_tokens == 24
    assert metrics.workload.router_flops_per_token == 2 * D * E_HETERO
    assert metrics.workload.expert_costs == [e.cost_per_token(4) for e in layer.experts]
    entropy = routing_entropy(decision.probs.detach())
    assert metrics.routing_entropy == pytest.approx(entropy.token.item(), rel=1e-5)
    assert metrics.marginal_entropy == pytest.approx(entropy.marginal.item(), rel=1e-5)
    flops = sum(n * e.cost_per_token().flops for n, e in zip(counts, layer.experts)) / 24 + 2 * D * E_HETERO
    assert layer.dense_equivalent_flops() == pytest.approx(flops)


def test_dense_equivalent_flops_of_identical_topk_pool():
    layer = MoELayer(D, build_experts([ExpertSpec("swiglu", 32, 8)], D), TopKRouter(8, 2))
    layer(torch.randn(10, D))
    assert layer.dense_equivalent_flops() == pytest.approx(2 * (2 * 3 * D * 32) + 2 * D * 8)


def test_router_swap_by_assignment():
    layer = make_layer("top1", torch.float64)
    x = torch.randn(16, D, dtype=torch.float64)
    layer(x)
    assert layer.last_decision.experts.shape == (16, 1)
    layer.router = TopKRouter(E_HETERO, 3)
    y = layer(x)
    assert layer.last_decision.experts.shape == (16, 3)
    torch.testing.assert_close(y, reference_forward(layer, x))
    layer.router = TopKRouter(E_HETERO + 1, 2)
    with pytest.raises(ValueError, match="router is built for 11 experts"):
        layer(x)


def test_forward_is_deterministic():
    layer = make_layer("capacity-drops", torch.float32)
    x = torch.randn(40, D)
    assert torch.equal(layer(x), layer(x))


@pytest.mark.parametrize("kind", ["gelu", "swiglu"])
@pytest.mark.parametrize("extra", [[], [ExpertSpec("copy")]], ids=["one-run", "two-runs"])
@pytest.mark.parametrize("router", [TopKRouter(5, 2), TopPRouter(5, p=0.5), CapacityRouter(5, 2, capacity_factor=0.5)],
                         ids=["topk", "topp", "capacity"])
def test_grouped_path_is_taken_and_matches_reference(monkeypatch, grouped_on_cpu, kind, extra, router):
    x = torch.randn(48, D)
    if not grouped_mm_usable(x):
        pytest.skip("torch._grouped_mm is not usable on this device/dtype")
    calls = []
    original = dispatch_module.grouped_forward
    monkeypatch.setattr(dispatch_module, "grouped_forward", lambda *a: calls.append(len(a[3])) or original(*a))
    torch.manual_seed(1)
    specs = [ExpertSpec(kind, 32, 5 - len(extra)), *extra]
    experts = build_experts(specs, D)
    for expert in experts:
        for name, param in expert.named_parameters():
            if name.endswith("bias"):
                torch.nn.init.normal_(param, std=0.2)
    x_grouped, x_reference = x.clone().requires_grad_(), x.clone().requires_grad_()
    decision = router(torch.randn(48, 5) * 2)
    y = dispatch(x_grouped, decision, experts, grouped=True)
    y_reference = reference_dispatch(x_reference, decision, experts)
    torch.testing.assert_close(y, y_reference, rtol=1e-5, atol=1e-5)
    weights = torch.randn(48, D)
    params = list(experts.parameters())
    grads = torch.autograd.grad((y * weights).sum(), [x_grouped, *params], allow_unused=True)
    grads_reference = torch.autograd.grad((y_reference * weights).sum(), [x_reference, *params], allow_unused=True)
    for g, g_ref in zip(grads, grads_reference):
        if g_ref is None:  # an expert no token reached
            assert g is None or not g.any()
        else:
            torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5)
    assert calls == [5 - len(extra)]


def test_large_runs_fall_back_to_per_expert_loop(monkeypatch, grouped_on_cpu):
    calls = []
    original = dispatch_module.grouped_forward
    monkeypatch.setattr(dispatch_module, "grouped_forward", lambda *a: calls.append(len(a[3])) or original(*a))
    monkeypatch.setattr(dispatch_module, "GROUPED_MM_MAX_MEAN_ROWS", 4)  # 4 experts × 4 rows at most
    experts = build_experts([ExpertSpec("gelu", 32, 4)], D)
    x = torch.randn(12, D)
    if not grouped_mm_usable(x):
        pytest.skip("torch._grouped_mm is not usable on this device/dtype")
    decision = TopKRouter(4, 1)(torch.randn(12, 4))  # 12 rows over 4 experts: grouped
    torch.testing.assert_close(dispatch(x, decision, experts), reference_dispatch(x, decision, experts))
    decision = TopKRouter(4, 2)(torch.randn(12, 4))  # 24 rows: mean 6 > 4, loop
    torch.testing.assert_close(dispatch(x, decision, experts), reference_dispatch(x, decision, experts))
    assert calls == [4]


def test_grouped_path_off_on_cpu_by_default():
    assert not grouped_mm_usable(torch.randn(4, D))


def test_empty_batch():
    layer = make_layer("top2", torch.float32)
    assert layer(torch.randn(0, D)).shape == (0, D)
    assert layer.last_metrics.tokens_per_expert == [0] * E_HETERO


@pytest.mark.parametrize("x,match", [
    (torch.randn(4, D + 1), r"shape \[B, T, 16\] or \[N, 16\]"),
    (torch.randn(2, 2, 2, D), r"shape \[B, T, 16\] or \[N, 16\]"),
    (torch.ones(4, D, dtype=torch.long), "floating-point"),
])
def test_bad_input_raises(x, match):
    with pytest.raises(ValueError, match=match):
        make_layer("top2", torch.float32)(x)


def test_bad_decision_raises():
    experts = build_experts([ExpertSpec("gelu", 8, 3)], D)
    x = torch.randn(5, D)
    decision = TopKRouter(3, 2)(torch.randn(5, 3))
    decision.experts[2, 1] = 3  # no expert 3
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        dispatch(x, decision, experts)
    with pytest.raises(ValueError, match="covers 5 tokens but x has 4"):
        dispatch(x[:4], decision, experts)
    with pytest.raises(ValueError, match="routes over 3 experts but 2 were given"):
        dispatch(x, decision, experts[:2])


def test_bad_construction_raises():
    with pytest.raises(ValueError, match="at least one expert"):
        MoELayer(D, [], TopKRouter(1, 1))
    with pytest.raises(ValueError, match="d_model=8"):
        MoELayer(D, [GELUExpert(8, 8)], TopKRouter(1, 1))
    with pytest.raises(ValueError, match="not a nectar.moe.experts.Expert"):
        MoELayer(D, [torch.nn.Linear(D, D)], TopKRouter(1, 1))
    with pytest.raises(ValueError, match="router must be"):
        MoELayer(D, [GELUExpert(D, 8)], torch.nn.Identity())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 3e-2), (torch.float32, 1e-4)])
def test_cuda_layer_matches_fp64_cpu_reference(dtype, tol):
    torch.manual_seed(0)
    specs = [ExpertSpec("swiglu", 64, 4), ExpertSpec("gelu", 64, 3), ExpertSpec("copy")]
    layer = MoELayer(D, build_experts(specs, D), TopKRouter(8, 2))
    x = torch.randn(256, D)
    reference = copy.deepcopy(layer).double()
    y_ref = reference(x.double())
    gpu_layer = layer.to("cuda", dtype)
    y = gpu_layer(x.to("cuda", dtype))
    same_choice = (gpu_layer.last_decision.experts.cpu() == reference.last_decision.experts).all(-1)
    torch.testing.assert_close(y.float().cpu()[same_choice], y_ref.float()[same_choice], rtol=tol, atol=tol)
    assert same_choice.float().mean() > 0.9
