"""The one-kernel router (nectar/moe/fused_router.py) against the routers' own torch paths.

On a GPU with Triton every test runs; on a CPU the kernel runs in Triton's interpreter when the
suite is started with TRITON_INTERPRET=1 and Triton is installed, and the kernel tests skip
otherwise. The rules for when the fused path applies are tested everywhere.
"""

from __future__ import annotations

import pytest
import torch

from nectar.control.energy_router import EnergyAwareRouter
from nectar.moe import fused_router
from nectar.moe.static_routers import CheapStaticRouter, TopKRouter, TopPRouter

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RUNS = fused_router.triton is not None and (DEVICE == "cuda" or fused_router.INTERPRET)
needs_kernel = pytest.mark.skipif(not RUNS, reason="needs Triton on CUDA, or Triton with TRITON_INTERPRET=1")
ULP = {torch.float32: 1e-6, torch.bfloat16: 2 ** -7, torch.float16: 2 ** -10}


def distinct_logits(n: int, e: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """[n, e] logits whose values in a row are distinct and exact in every dtype (no ties)."""
    gen = torch.Generator().manual_seed(seed)
    rows = torch.stack([torch.randperm(4 * e, generator=gen)[:e] for _ in range(n)]).float()
    return ((rows - 2 * e) / 8).to(DEVICE, dtype)


def both_paths(monkeypatch, router, logits):
    """(fused decision, torch decision) of one router on the same logits; the first must launch
    the kernel once, the second not at all."""
    launches = []
    launch = fused_router._launch
    monkeypatch.setattr(fused_router, "_launch", lambda *a, **kw: launches.append(1) or launch(*a, **kw))
    with torch.no_grad():
        fused = router(logits)
        assert len(launches) == 1
        monkeypatch.setenv("NECTAR_FUSED_ROUTER", "0")
        reference = router(logits)
        monkeypatch.delenv("NECTAR_FUSED_ROUTER")
    assert len(launches) == 1
    return fused, reference


def assert_same_decision(fused, reference, dtype, mask_ok=None):
    assert torch.equal(fused.experts, reference.experts)
    keep = torch.ones_like(fused.mask) if mask_ok is None else mask_ok
    assert torch.equal(fused.mask[keep], reference.mask[keep])
    assert fused.gates.dtype == reference.gates.dtype and fused.probs.dtype == reference.probs.dtype
    tol = 2 * ULP[dtype]
    rows = keep.all(-1)
    torch.testing.assert_close(fused.gates[rows].float(), reference.gates[rows].float(), atol=tol, rtol=tol)
    torch.testing.assert_close(fused.probs.float(), reference.probs.float(), atol=tol, rtol=tol)
    assert not fused.dropped.any()


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_topk_matches_the_torch_router(monkeypatch, dtype, k):
    router = TopKRouter(8, k).to(DEVICE)
    router.selection_bias = torch.linspace(-0.2, 0.3, 8, device=DEVICE)   # selection bias: order only
    logits = distinct_logits(77, 8, dtype)                                  # 77: a ragged last block
    fused, reference = both_paths(monkeypatch, router, logits)
    assert_same_decision(fused, reference, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("drop", [False, True])
def test_energy_router_matches_its_torch_path(monkeypatch, dtype, drop):
    router = EnergyAwareRouter(9, cheap_experts=[6, 7, 8], drop=drop).to(DEVICE)
    gen = torch.Generator().manual_seed(3)
    router.adapt(bias=torch.randn(9, generator=gen) * 0.5)
    if drop:
        router.adapt(drop_scale=torch.rand(9, generator=gen) * 0.8)
    logits = distinct_logits(301, 9, dtype, seed=1)
    fused, reference = both_paths(monkeypatch, router, logits)
    # the drop rule compares an fp32 log with the scale: rows within 1e-5 of it may go either way
    probs = torch.softmax(logits.float(), -1).gather(-1, reference.experts)
    share = probs[:, 1] / probs.sum(-1)
    cost = -torch.log1p(-share.clamp(max=1 - 1e-7))
    near = (cost - router.drop_scale[reference.experts[:, 1]]).abs() < 1e-5 if drop else torch.zeros_like(cost, dtype=torch.bool)
    assert_same_decision(fused, reference, dtype, mask_ok=~near[:, None].expand_as(fused.mask))
    if drop:
        assert 0 < int((~reference.mask[:, 1]).sum()) < logits.shape[0]   # the rule both keeps and drops


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cheap_router_matches_its_torch_path(monkeypatch, dtype):
    router = CheapStaticRouter(9, cheap_experts=[2, 7, 8]).to(DEVICE)
    fused, reference = both_paths(monkeypatch, router, distinct_logits(130, 9, dtype, seed=5))
    assert_same_decision(fused, reference, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("p, max_k", [(0.5, 2), (0.8, 2), (0.9, 4)])
def test_top_p_matches_its_torch_path(monkeypatch, dtype, p, max_k):
    router = TopPRouter(8, p=p, max_k=max_k).to(DEVICE)
    router.selection_bias = torch.linspace(0.3, -0.2, 8, device=DEVICE)
    logits = distinct_logits(211, 8, dtype, seed=6) * 3                 # sharper: some rows stop at one expert
    fused, reference = both_paths(monkeypatch, router, logits)
    assert_same_decision(fused, reference, dtype)
    assert 0 < int(reference.mask[:, 1].sum()) < logits.shape[0]   # p both stops and goes on


@needs_kernel
def test_energy_router_fallback_is_static_top_k(monkeypatch):
    router = EnergyAwareRouter(8, cheap_experts=[7], drop=True, fallback_k=2).to(DEVICE)
    router.adapt(bias=torch.full((8,), -3.0), fallback=True)
    logits = distinct_logits(40, 8, torch.float32, seed=2)
    fused, reference = both_paths(monkeypatch, router, logits)
    assert_same_decision(fused, reference, torch.float32)


@needs_kernel
def test_never_dropping_energy_router_routes_as_static_top2():
    """Zero bias and a zero drop scale: the identical-routing pair of the speed benchmark."""
    logits = distinct_logits(200, 8, torch.bfloat16, seed=4)
    with torch.no_grad():
        top2 = TopKRouter(8, 2).to(DEVICE)(logits)
        energy = EnergyAwareRouter(8, cheap_experts=[5, 6, 7], drop=True).to(DEVICE)(logits)
    assert torch.equal(top2.experts, energy.experts) and energy.mask.all()
    assert torch.equal(top2.gates, energy.gates)


@needs_kernel
def test_ties_go_to_the_lower_expert():
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0], [2.0, 2.0, 2.0, 2.0]], device=DEVICE)
    experts = fused_router.topk_decision(logits, 3, torch.zeros(4, device=DEVICE), renormalize=True).experts
    assert experts.tolist() == [[1, 2, 0], [0, 1, 2]]


def test_fused_path_applies_only_where_it_is_exact(monkeypatch):
    logits = torch.randn(4, 8, device=DEVICE)
    if not RUNS:
        assert not fused_router.fusable(logits, 1.0)
        return
    assert fused_router.fusable(logits, 1.0)
    assert not fused_router.fusable(logits, 0.7)                        # torch divides by a reciprocal
    assert not fused_router.fusable(logits.requires_grad_(), 1.0)       # training needs the gates' graph
    with torch.no_grad():
        assert fused_router.fusable(logits, 1.0)
    assert not fused_router.fusable(logits.detach().long().float().to(torch.float64), 1.0)
    monkeypatch.setenv("NECTAR_FUSED_ROUTER", "0")
    assert not fused_router.fusable(logits.detach(), 1.0)


def test_topk_decision_rejects_k_out_of_range():
    if not RUNS:
        pytest.skip("the kernel does not run here")
    with pytest.raises(ValueError, match="1 <= k <= 4"):
        fused_router.topk_decision(torch.randn(3, 8, device=DEVICE), 5, None, renormalize=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("value", [0.5, 0.8, 0.9, 1 / 3, 0.662109375, 1.0])
def test_rounded_scalar_is_torchs_rounding(dtype, value):
    assert fused_router.rounded_scalar(value, dtype) == torch.tensor(value, dtype=dtype).item()


@needs_kernel
def test_a_kernel_that_fails_to_build_stays_on_the_torch_path_and_loses_nothing(monkeypatch):
    """The first launch of a variant fails (a Triton that cannot compile it): one warning, the
    router's torch path answers, that variant is not tried again, and other variants stay fused."""
    launch = fused_router._route_kernel

    class BrokenTopK:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                if kwargs["MODE"] == 0 and kwargs["K"] == 2:
                    raise RuntimeError("cannot compile\nmore")
                return launch[grid](*args, **kwargs)
            return run

    monkeypatch.setattr(fused_router, "_route_kernel", BrokenTopK())
    monkeypatch.setattr(fused_router, "_PROVEN", set())
    monkeypatch.setattr(fused_router, "_FAILED", {})
    router = TopKRouter(8, 2).to(DEVICE)
    logits = distinct_logits(33, 8, torch.float32)
    with torch.no_grad(), pytest.warns(RuntimeWarning, match="fused router variant .* off .*cannot compile"):
        decision = router(logits)
    monkeypatch.setenv("NECTAR_FUSED_ROUTER", "0")
    with torch.no_grad():
        reference = router(logits)
    assert torch.equal(decision.experts, reference.experts) and torch.equal(decision.gates, reference.gates)
    monkeypatch.delenv("NECTAR_FUSED_ROUTER")
    [failure] = fused_router.status()["failed"]
    assert failure.endswith("RuntimeError: cannot compile")
    with torch.no_grad():
        assert fused_router.topk_decision(logits, 2, None, renormalize=True) is None   # not tried again
        assert fused_router.topk_decision(logits, 1, None, renormalize=True) is not None  # another variant runs


def test_status_says_why_the_fused_path_is_off(monkeypatch):
    """A run's summary records `status()`: the switch, Triton, and every reason the path turned off."""
    monkeypatch.setattr(fused_router, "_FAILED", {})
    monkeypatch.setenv("NECTAR_FUSED_ROUTER", "0")
    assert fused_router.status() == {"triton": fused_router.triton is not None, "switch_on": False, "failed": []}
    monkeypatch.setattr(fused_router, "_FAILED", {("cuda", 8): "RuntimeError: x"})
    assert fused_router.status()["failed"] == ["('cuda', 8): RuntimeError: x"]


HOPPER_VARIANTS = [(0, k, False) for k in (1, 2, 3, 4)] + [(1, 2, False), (1, 2, True), (2, 2, False), (3, 2, False),
                                                         (3, 4, False)]


@pytest.mark.skipif(fused_router.triton is None or fused_router.INTERPRET,
                    reason="needs Triton's compiler (its CUDA backend compiles without a GPU), not its interpreter")
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_every_kernel_variant_compiles_for_hopper_without_a_gpu(dtype):
    """Every (mode, k, drop) variant a router launches compiles ahead of time for sm_90 (an H100 or
    H200) with this Triton and keeps its rows in registers (no local memory): a variant that fails
    its first GPU launch falls back to torch, so this is what to run before a GPU call.
    `PYTHONPATH=<triton> pytest tests/moe/test_fused_router.py -k hopper` on a CPU machine."""
    pytest.importorskip("triton.backends.nvidia.compiler")
    import os
    import subprocess
    import tempfile

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {"logits_ptr": f"*{dtype}", "bias_ptr": "*fp32", "cheap_ptr": "*fp32", "drop_ptr": "*fp32",
                 "experts_ptr": "*i64", "gates_ptr": f"*{dtype}", "mask_ptr": "*u8", "probs_ptr": f"*{dtype}",
                 "N": "i32", "P": "fp32"}
    cuobjdump = os.path.join(os.path.dirname(fused_router.triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    for mode, k, drop in HOPPER_VARIANTS:
        constants = dict(E=10, BLOCK_E=16, BLOCK_N=128, K=k, MODE=mode, DROP=drop, RENORMALIZE=True,
                         ROUND=1 if dtype == "bf16" else 0)
        source = ASTSource(fn=fused_router._route_kernel, signature={**signature, **dict.fromkeys(constants, "constexpr")},
                           constexprs=constants)
        compiled = fused_router.triton.compile(source, target=GPUTarget("cuda", 90, 32))
        assert compiled.asm.get("cubin"), (mode, k, drop)
        if os.path.exists(cuobjdump):
            with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
                cubin.write(compiled.asm["cubin"])
                cubin.flush()
                usage = subprocess.run([cuobjdump, "--dump-resource-usage", cubin.name], capture_output=True,
                                       text=True, check=True).stdout
            assert "LOCAL:0" in usage, (mode, k, drop, usage)
