"""The Triton path of the LaCT fast-weight kernel (nectar/lact/fastweight_triton.py) against fp64.

On a GPU (CUDA and Triton) every test here runs; on a CPU they run in Triton's interpreter when
the suite is started with TRITON_INTERPRET=1 and Triton is installed (small shapes: the interpreter
is slow), and skip otherwise. The backend switch and its fallback are tested everywhere. The
tolerances and their derivation: tests/lact/fastweight_checks.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from nectar.lact import fastweight_triton as ft
from nectar.lact.fastweight import swiglu_fast_weight
from tests.lact.fastweight_checks import check_pieces, check_stream, compare, hidden_bounds, update_bounds

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not ft.available(DEVICE),
                                  reason="needs CUDA and Triton, or Triton with TRITON_INTERPRET=1")
ON_GPU = DEVICE == "cuda"

# (batch, length, dk, dv, hidden, chunk): tile-aligned (no masks) and ragged (every mask, wrapped tiles)
SHAPES = ([(2, 512, 128, 128, 256, 256), (3, 300, 96, 80, 160, 128), (2, 1024, 512, 512, 1024, 512)]
          if ON_GPU else [(1, 32, 32, 32, 32, 16), (2, 40, 24, 20, 36, 24)])


def make_inputs(batch, length, dk, dv, hidden, dtype, seed=0, momentum=False):
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    tensors = dict(q=F.normalize(rand(batch, length, dk), dim=-1), k=F.normalize(rand(batch, length, dk), dim=-1),
                   v=rand(batch, length, dv), w0=rand(batch, hidden, dk) / dk**0.5,
                   w1=rand(batch, dv, hidden) / hidden**0.5, w2=rand(batch, hidden, dk) / dk**0.5,
                   lr0=F.softplus(rand(batch, length, 1)) * 0.01, lr1=F.softplus(rand(batch, length, 1)) * 0.01,
                   lr2=F.softplus(rand(batch, length, 1)) * 0.01)
    tensors = {n: t.to(DEVICE, dtype) for n, t in tensors.items()}
    gate = torch.sigmoid(rand(batch, length, 1)).to(DEVICE, dtype) if momentum else None
    return tensors, gate


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", SHAPES)
def test_pieces_match_fp64(shape, dtype):
    batch, length, dk, dv, hidden, chunk = shape
    inputs, _ = make_inputs(batch, length, dk, dv, hidden, dtype, seed=sum(shape))
    ratios = check_pieces(inputs, chunk)
    assert all(r <= 1 for r in ratios.values())


@needs_triton
@pytest.mark.skipif(ON_GPU, reason="the interpreter's tiling; a GPU tests every autotune config instead")
def test_pieces_one_program_per_tile(monkeypatch):
    """The interpreter runs persistent programs (each loops over tiles, across heads); here one per tile."""
    monkeypatch.setitem(ft._INTERPRET_META, "PER_SM", 0)
    batch, length, dk, dv, hidden, chunk = SHAPES[1]
    inputs, _ = make_inputs(batch, length, dk, dv, hidden, torch.bfloat16, seed=5)
    ratios = check_pieces(inputs, chunk)
    assert all(r <= 1 for r in ratios.values())


def _configs():
    if not (ON_GPU and ft.available(DEVICE)):
        return []
    return ([pytest.param("hidden", c, id=f"hidden-{c}") for c in ft._HIDDEN_CONFIGS]
            + [pytest.param("update", c, id=f"update-{c}") for c in ft._UPDATE_CONFIGS])


@pytest.mark.skipif(not (ON_GPU and ft.available(DEVICE)), reason="autotune configs run on a GPU only")
@pytest.mark.parametrize("kernel, config", _configs())
def test_every_config_matches_fp64(kernel, config):
    """Every config the autotuner may pick, forced, elementwise against fp64 (aligned and ragged shapes;
    the aligned one has more tiles than a persistent grid has programs)."""
    for shape in (SHAPES[1], SHAPES[2]):
        batch, length, dk, dv, hidden, _ = shape
        inputs, _ = make_inputs(batch, length, dk, dv, hidden, torch.bfloat16, seed=len(shape) + length)
        w02 = torch.cat([inputs["w0"], inputs["w2"]], dim=1)
        with torch.no_grad():
            if kernel == "hidden":
                got = {"hidden": ft.swiglu_hidden(inputs["q"], w02, config=config)}
                want = {"hidden": hidden_bounds(inputs["q"], w02)}
            else:
                lrs = tuple(inputs[n] for n in ("lr0", "lr1", "lr2"))
                dgu, hid = ft.swiglu_update_operands(inputs["k"], inputs["v"], w02, inputs["w1"], *lrs, config=config)
                got = {"dgate": dgu[..., :hidden], "dup": dgu[..., hidden:], "hid": hid}
                want = update_bounds(inputs["k"], inputs["v"], w02, inputs["w1"], *lrs)
        for name, value in got.items():
            expected, scale = want[name]
            compare(value, expected, dtype=torch.bfloat16, scale=scale, what=f"{kernel} {config} {name}")


@needs_triton
@pytest.mark.parametrize("options", [dict(), dict(momentum=True), dict(use_muon=True), dict(causal=False),
                                     dict(weight_norm=False)])
def test_stream_matches_fp64(options):
    batch, length, dk, dv, hidden, chunk = SHAPES[1]
    options = dict(options)
    inputs, gate = make_inputs(batch, length, dk, dv, hidden, torch.bfloat16, seed=7,
                               momentum=options.pop("momentum", False))
    check_stream(inputs, chunk, momentum=gate, **options)


@needs_triton
def test_triton_and_auto_backends_agree_and_refuse_grad():
    inputs, _ = make_inputs(*SHAPES[0][:5], torch.bfloat16, seed=3)
    chunk = SHAPES[0][5]
    with torch.no_grad():
        out, weights = swiglu_fast_weight(**inputs, chunk_size=chunk, backend="triton")
        out_auto, weights_auto = swiglu_fast_weight(**inputs, chunk_size=chunk, backend="auto")
    assert torch.equal(out, out_auto) and all(torch.equal(a, b) for a, b in zip(weights, weights_auto))
    with_grad = dict(inputs, w1=inputs["w1"].clone().requires_grad_(True))
    with pytest.raises(RuntimeError, match="no backward"):
        swiglu_fast_weight(**with_grad, chunk_size=chunk, backend="triton")
    out_torch, _ = swiglu_fast_weight(**with_grad, chunk_size=chunk, backend="auto")  # falls back, differentiable
    assert out_torch.requires_grad


def test_backend_switch_and_fallback():
    inputs, momentum = make_inputs(2, 10, 4, 3, 6, torch.float64, seed=1, momentum=True)
    inputs = {n: t.cpu() for n, t in inputs.items()}
    momentum = momentum.cpu()
    base = swiglu_fast_weight(**inputs, chunk_size=4, momentum=momentum, use_muon=True)
    auto = swiglu_fast_weight(**inputs, chunk_size=4, momentum=momentum, use_muon=True, backend="auto")
    assert torch.equal(base[0], auto[0]) and all(torch.equal(a, b) for a, b in zip(base[1], auto[1]))
    with pytest.raises(RuntimeError, match="backend='triton' unavailable"):  # fp64, or no Triton here
        swiglu_fast_weight(**inputs, chunk_size=4, backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        swiglu_fast_weight(**inputs, chunk_size=4, backend="cuda")
