"""MoELayer and dispatch: outputs and all gradients against the per-token reference loop (both
dispatch paths, fp64 / fp32 / bf16), dense equivalences (HF's GPT-2 MLP), the grouped path's
properties (no host sync, no GEMM for zero-compute experts, unset rows never read),
metrics/workload, router swapping, torch.compile, errors."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import GPT2Config
from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

import nectar.moe.dispatch as dispatch_module
from nectar.moe.balancing import routing_entropy
from nectar.moe.dispatch import dispatch, dispatch_path, grouped_mm_usable, reference_dispatch
from nectar.moe.expert_pool import ExpertPool
from nectar.moe.experts import ExpertSpec, GELUExpert, build_experts
from nectar.moe.layer import MoELayer
from nectar.moe.static_routers import CapacityRouter, TopKRouter, TopPRouter
from tests.tolerance import approx, assert_close

D = 16
HETERO = [ExpertSpec("gelu", 32, 3), ExpertSpec("gelu", 16, 2), ExpertSpec("swiglu", 24, 2), ExpertSpec("zero"),
          ExpertSpec("copy"), ExpertSpec("constant")]
E_HETERO = 10
WIDEST = 32  # the widest hidden layer in HETERO
# Tolerances (tests/tolerance.py). A layer output's path: the gate (a sum over D), the softmax
# (max and sum over the experts), the expert (sums over D and its hidden width), the gate-weighted
# mix over the k ≤ 4 chosen experts; parameter gradients also sum over the tokens.
LAYER_N = 2 * D + WIDEST + 2 * E_HETERO + 4
# bf16 paths accumulate their matmuls in fp32 (whose n·eps is far below one bf16 ulp): what counts
# is the number of bf16 roundings on the path: x, the weights, each matmul output, the bias adds,
# the activation, the gate and the mix.
BF16_ROUNDINGS = 8

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
        for name, param in layer.experts.named_parameters():  # nonzero biases so that they matter
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


def assert_matches_reference(layer: MoELayer, x: torch.Tensor) -> None:
    """Outputs and every gradient vs the per-token loop, to the rounding of the layer's path
    (LAYER_N) plus the sum over the tokens of parameter gradients."""
    y, grads = outputs_and_grads(layer, x, lambda l, v: l(v))
    y_ref, grads_ref = outputs_and_grads(layer, x, reference_forward)
    n = LAYER_N + x.numel() // D
    assert_close(y, y_ref, n=n, what="outputs")
    # The gate's gradient sums terms ⟨w_t, y_t⟩ · (softmax Jacobian ≤ 1) · x_t over the tokens,
    # which cancel (exactly so for top-1 renormalised gates, where it is zero): its scale is the
    # sum of their magnitudes, not its own size.
    w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(-1, D)
    gate_terms = ((w * y.reshape(-1, D)).abs().sum(-1) * x.reshape(-1, D).abs().amax(-1)).sum().item()
    names = ["x", *(n for n, _ in layer.named_parameters())]
    for name, g, g_ref in zip(names, grads, grads_ref):
        scale = max(gate_terms, g_ref.abs().max().item()) if name.startswith("gate.") else None
        assert_close(g, g_ref, n=n, scale=scale, what=f"grad of {name}")


@pytest.mark.parametrize("router_name", sorted(ROUTERS))
def test_layer_matches_reference_loop_fp64(router_name):
    layer = make_layer(router_name, torch.float64)
    x = torch.randn(3, 8, D, dtype=torch.float64)
    assert_matches_reference(layer, x)
    counts = layer.last_metrics.tokens_per_expert
    assert sum(c > 0 for c in counts) >= 6, counts  # the comparison covered most expert kinds


@pytest.fixture
def grouped_on_cpu(monkeypatch):
    """Enable the grouped-mm path on CPU (off by default there because it is slower)."""
    monkeypatch.setattr(dispatch_module, "GROUPED_MM_DEVICE_TYPES",
                        {"cpu": {torch.float32, torch.bfloat16}, "cuda": {torch.bfloat16}})
    if not grouped_mm_usable(torch.randn(4, D)):
        pytest.skip("torch._grouped_mm is not usable on this CPU build")


@pytest.fixture
def unset_rows_are_nan(monkeypatch):
    """torch._grouped_mm leaves rows past the last offset unset (whatever memory held); fill them
    with NaN so that any read of them shows."""
    original = torch._grouped_mm
    calls = []

    def grouped_mm(a, b, offs=None, **kwargs):
        out = original(a, b, offs=offs, **kwargs)
        calls.append(b.shape)
        rows = torch.arange(out.shape[0]).unsqueeze(1)
        return torch.where(rows < offs[-1], out, float("nan"))

    monkeypatch.setattr(torch, "_grouped_mm", grouped_mm)
    return calls


@pytest.mark.parametrize("grouped", [True, False])
@pytest.mark.parametrize("router_name", ["top2", "capacity-drops", "topp", "top1"])
def test_layer_matches_reference_loop_fp32(router_name, grouped, grouped_on_cpu, unset_rows_are_nan):
    layer = make_layer(router_name, torch.float32)
    layer.grouped = grouped
    x = torch.randn(2, 12, D)
    assert dispatch_path(x.reshape(-1, D), layer.experts, grouped) == ("grouped" if grouped else "loop")
    assert_matches_reference(layer, x)
    gemm_groups = sum(g.runs_gemm for g in layer.experts.groups)
    assert len(unset_rows_are_nan) == (2 * gemm_groups if grouped else 0)  # two matmuls per GEMM group


@pytest.mark.parametrize("router_name", ["top2", "capacity-drops"])
def test_grouped_path_in_inference_mode_never_reads_unset_rows(router_name, grouped_on_cpu, unset_rows_are_nan):
    layer = make_layer(router_name, torch.float32)
    x = torch.randn(40, D)
    with torch.inference_mode():
        y = layer(x)
    assert_close(y, reference_forward(layer, x).detach(), n=LAYER_N)


def test_grouped_path_bf16_close_to_fp64_reference(grouped_on_cpu):
    layer = make_layer("top2", torch.float64)
    x = torch.randn(64, D, dtype=torch.float64)
    with torch.no_grad():
        reference = layer(x)
    low = copy.deepcopy(layer).to(torch.bfloat16)
    assert dispatch_path(x.to(torch.bfloat16), low.experts) == "grouped"
    with torch.no_grad():
        y = low(x.to(torch.bfloat16))
    same = (low.last_decision.experts == layer.last_decision.experts).all(-1)  # bf16 logits may reorder
    assert same.float().mean() > 0.8
    assert_close(y.double()[same], reference[same], dtype=torch.bfloat16, n=BF16_ROUNDINGS)


def test_grouped_path_reads_nothing_back_to_the_host(grouped_on_cpu):
    """fullgraph tracing fails on any .item() / .tolist() / data-dependent shape (a host sync on GPU).
    (bf16: torch's shape function for _grouped_mm accepts no other dtype.)"""
    layer = make_layer("capacity-drops", torch.float32).to(torch.bfloat16)
    x = torch.randn(30, D, dtype=torch.bfloat16)
    decision = layer.router(layer.gate(x))
    traced = torch.compile(lambda x_: dispatch(x_, decision, layer.experts), backend="eager", fullgraph=True)
    with torch.no_grad():
        assert_close(traced(x), dispatch(x, decision, layer.experts, grouped=False), n=BF16_ROUNDINGS)


def test_zero_compute_experts_run_no_matmul(grouped_on_cpu, unset_rows_are_nan):
    experts = build_experts([ExpertSpec("zero"), ExpertSpec("copy", count=2), ExpertSpec("constant", count=2)], D)
    layer = MoELayer(D, experts, TopKRouter(5, 2))
    x = torch.randn(25, D)
    assert dispatch_path(x, layer.experts) == "grouped"
    assert_close(layer(x), reference_forward(layer, x), n=LAYER_N)
    assert unset_rows_are_nan == []


def test_compiled_dispatch_matches_eager(grouped_on_cpu):
    layer = make_layer("top2", torch.float32).to(torch.bfloat16)
    x = torch.randn(3, 10, D, dtype=torch.bfloat16)
    with torch.no_grad():
        eager = layer(x)
        layer.compile_dispatch(backend="aot_eager", fullgraph=True)
        compiled = layer(x)
        counts = layer.last_metrics.tokens_per_expert
    assert_close(compiled, eager, n=BF16_ROUNDINGS)
    assert sum(counts) == 2 * 30


@pytest.mark.parametrize("router_name", ["top2", "topp", "energy-drop"])
def test_compiled_router_matches_eager_and_follows_a_new_price(router_name):
    """gate → router under torch.compile (aot_eager: the captured graph, no codegen) routes as the
    eager router, also after the router's bias and drop scale change (buffers, not constants)."""
    from nectar.control.energy_router import EnergyAwareRouter
    if router_name == "energy-drop":
        torch.manual_seed(0)
        layer = MoELayer(D, build_experts(HETERO, D), EnergyAwareRouter(E_HETERO, [6, 7], drop=True)).double()
    else:
        layer = make_layer(router_name, torch.float64)
    x = torch.randn(40, D, dtype=torch.float64)
    compiled = copy.deepcopy(layer).compile_router(backend="aot_eager", fullgraph=True)
    for step in range(2):
        with torch.no_grad():
            eager_y, compiled_y = layer(x), compiled(x)
        for name in ("experts", "gates", "mask"):
            assert torch.equal(getattr(compiled.last_decision, name), getattr(layer.last_decision, name)), name
        assert torch.equal(compiled_y, eager_y)
        if router_name == "energy-drop" and step == 0:   # a new price: cheap experts favoured, slots dropped
            bias, scale = torch.zeros(E_HETERO), torch.full((E_HETERO,), 0.7)
            bias[6:8] = 3.0
            for target in (layer, compiled):
                target.router.adapt(bias=bias, drop_scale=scale)
    if router_name == "energy-drop":
        assert not bool(layer.last_decision.mask.all())   # the new drop scale did drop slots


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


@pytest.mark.parametrize("grouped", [False, True])
def test_single_expert_top1_equals_dense_gpt2_mlp(grouped, grouped_on_cpu):
    mlp = gpt2_mlp()
    expert = GELUExpert(D, 40).double()
    expert.load_state_dict(mlp.state_dict())
    dtype = torch.float32 if grouped else torch.float64  # torch._grouped_mm has no fp64
    layer = MoELayer(D, [expert], TopKRouter(1, 1)).to(dtype)
    mlp = mlp.to(dtype)
    x = torch.randn(2, 5, D, dtype=dtype, requires_grad=True)
    assert dispatch_path(x.reshape(-1, D), layer.experts) == ("grouped" if grouped else "loop")
    y = layer(x)
    n = 2 * (D + 40) + 2  # forward and backward through both layers (D, hidden 40), a gate of 1
    assert_close(y, mlp(x), n=n)
    (grad_moe,) = torch.autograd.grad(y.square().sum(), x)
    (grad_dense,) = torch.autograd.grad(mlp(x).square().sum(), x)
    assert_close(grad_moe, grad_dense, n=n)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("grouped", [False, True])
@pytest.mark.parametrize("router", [TopKRouter(6, 1), TopKRouter(6, 3), CapacityRouter(6, 2, capacity_factor=3.0),
                                    TopPRouter(6, p=0.9)], ids=["top1", "top3", "capacity", "topp"])
def test_identical_experts_with_renormalised_gates_equal_dense(router, dtype, grouped, grouped_on_cpu):
    mlp = gpt2_mlp()
    experts = [GELUExpert(D, 40).double() for _ in range(6)]
    for expert in experts:
        expert.load_state_dict(mlp.state_dict())
    layer = MoELayer(D, experts, copy.deepcopy(router)).to(dtype)
    layer.grouped = grouped
    x = torch.randn(20, D, dtype=dtype)
    # the expert (D, hidden 40), the gates' softmax and renormalisation over 6 experts, the mix
    assert_close(layer(x), mlp.to(dtype)(x), n=D + 40 + 3 * 6 + 6)
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
    # fp32 probabilities: −Σ p log p over the experts and a mean over the 24 tokens (or the reverse)
    fp32_entropy = dict(dtype=torch.float32, n=E_HETERO + 24 + 2)
    assert metrics.routing_entropy == approx(entropy.token.item(), **fp32_entropy)
    assert metrics.marginal_entropy == approx(entropy.marginal.item(), **fp32_entropy)
    flops = sum(n * e.cost_per_token().flops for n, e in zip(counts, layer.experts)) / 24 + 2 * D * E_HETERO
    assert layer.dense_equivalent_flops() == approx(flops, n=E_HETERO + 3)  # a sum over the experts, ÷, +


def test_dense_equivalent_flops_of_identical_topk_pool():
    layer = MoELayer(D, build_experts([ExpertSpec("swiglu", 32, 8)], D), TopKRouter(8, 2))
    layer(torch.randn(10, D))
    assert layer.dense_equivalent_flops() == approx(2 * (2 * 3 * D * 32) + 2 * D * 8, n=8 + 3)  # as above


def test_router_swap_by_assignment():
    layer = make_layer("top1", torch.float64)
    x = torch.randn(16, D, dtype=torch.float64)
    layer(x)
    assert layer.last_decision.experts.shape == (16, 1)
    layer.router = TopKRouter(E_HETERO, 3)
    y = layer(x)
    assert layer.last_decision.experts.shape == (16, 3)
    assert_close(y, reference_forward(layer, x), n=LAYER_N)
    layer.router = TopKRouter(E_HETERO + 1, 2)
    with pytest.raises(ValueError, match="router is built for 11 experts"):
        layer(x)


def test_forward_is_deterministic():
    layer = make_layer("capacity-drops", torch.float32)
    x = torch.randn(40, D)
    assert torch.equal(layer(x), layer(x))


def test_grouped_path_off_on_cpu_by_default():
    assert not grouped_mm_usable(torch.randn(4, D))
    assert dispatch_path(torch.randn(4, D), make_layer("top2", torch.float32).experts) == "loop"


def test_module_experts_take_the_loop_path(grouped_on_cpu):
    class Doubler(GELUExpert):  # a subclass is not stacked: it stays a module expert
        def forward(self, x):
            return 2 * super().forward(x)

    experts = [GELUExpert(D, 16), Doubler(D, 16), GELUExpert(D, 16)]
    layer = MoELayer(D, experts, TopKRouter(3, 2))
    assert [type(g).__name__ for g in layer.experts.groups] == ["GELUGroup", "ModuleGroup", "GELUGroup"]
    x = torch.randn(12, D)
    assert dispatch_path(x, layer.experts) == "loop"
    assert_close(layer(x), reference_forward(layer, x), n=LAYER_N)


@pytest.mark.parametrize("grouped", [False, True])
def test_empty_batch(grouped, grouped_on_cpu):
    layer = make_layer("top2", torch.float32)
    layer.grouped = grouped
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


@pytest.mark.parametrize("grouped", [False, True])
def test_bad_decision_raises(grouped, grouped_on_cpu):
    experts = ExpertPool.from_experts(build_experts([ExpertSpec("gelu", 8, 3)], D))
    x = torch.randn(5, D)
    decision = TopKRouter(3, 2)(torch.randn(5, 3))
    decision.experts[2, 1] = 3  # no expert 3
    with pytest.raises(ValueError, match=r"outside \[0, 3\)"):
        dispatch(x, decision, experts, grouped=grouped)
    with pytest.raises(ValueError, match="covers 5 tokens but x has 4"):
        dispatch(x[:4], decision, experts)
    with pytest.raises(ValueError, match="routes over 3 experts but 2 were given"):
        dispatch(x, decision, ExpertPool.from_experts(build_experts([ExpertSpec("gelu", 8, 2)], D)))
    with pytest.raises(ValueError, match="needs an ExpertPool"):
        dispatch(x, decision, build_experts([ExpertSpec("gelu", 8, 3)], D))


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
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_cuda_layer_matches_fp64_cpu_reference(dtype):
    torch.manual_seed(0)
    specs = [ExpertSpec("swiglu", 64, 4), ExpertSpec("gelu", 64, 3), ExpertSpec("copy")]
    layer = MoELayer(D, build_experts(specs, D), TopKRouter(8, 2))
    with torch.no_grad():
        for name, param in layer.experts.named_parameters():
            if name.endswith("bias"):
                param.normal_(0, 0.1)
    x = torch.randn(256, D)
    reference = copy.deepcopy(layer).double()
    y_ref = reference(x.double())
    gpu_layer = layer.to("cuda", dtype)
    y = gpu_layer(x.to("cuda", dtype))
    same_choice = (gpu_layer.last_decision.experts.cpu() == reference.last_decision.experts).all(-1)
    # bf16: its roundings (fp32 accumulation); fp32: the path's reductions (D, hidden 64, 8 experts)
    n = BF16_ROUNDINGS if dtype == torch.bfloat16 else 2 * D + 64 + 2 * 8 + 2
    assert_close(y.cpu()[same_choice], y_ref[same_choice], dtype=dtype, n=n)
    assert same_choice.float().mean() > 0.9
