"""Dropless token dispatch: run each routed (token, slot) pair through its expert and combine.

Pipeline (torchtitan-style):
1. give every (token, slot) pair of a RoutingDecision a sort key: its expert, or E when the slot
   is unused or dropped; stable-sort the N·K pairs by key and count them per expert (bincount),
2. read the per-expert counts once (the one host sync), gather the active pairs' tokens in
   sorted order and run each expert on its contiguous slice; runs of consecutive identical-shape
   GELU/SwiGLU experts may go through `torch._grouped_mm` when it is available, enabled for the
   device type and a one-off probe shows that it works for the device and dtype (else the loop),
3. un-permute with a gather by the inverse permutation (no atomics), weight by the gates and sum
   the K slots of each token in fixed order: deterministic on every device.

`reference_dispatch` is the same computation as a per-token Python loop, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from nectar.moe.experts import Expert, GELUExpert, SwiGLUExpert
from nectar.moe.router import RoutingDecision


@dataclass
class TokenPermutation:
    """All P = N·K (token, slot) pairs sorted by expert; inactive pairs (unused, dropped) last.

    order          [P] long  flat pair index token·K + slot at each sorted position
    tokens         [P] long  token of each sorted pair
    sorted_experts [P] long  expert of each sorted pair (E for inactive pairs)
    counts         [E] long  active pairs per expert; expert e owns the next counts[e] sorted rows
    invalid        [] long   active pairs whose expert index is outside [0, E) (sorted last)
    """

    order: torch.Tensor
    tokens: torch.Tensor
    sorted_experts: torch.Tensor
    counts: torch.Tensor
    invalid: torch.Tensor


def check_inputs(x: torch.Tensor, decision: RoutingDecision, experts: Sequence[nn.Module]) -> None:
    """Raise ValueError when x, the decision and the expert list disagree in shape."""
    if x.dim() != 2:
        raise ValueError(f"dispatch expects x of shape [N, D], got {list(x.shape)}")
    if len(experts) != decision.num_experts:
        raise ValueError(f"decision routes over {decision.num_experts} experts but {len(experts)} were given")
    n, k = decision.experts.shape
    if n != x.shape[0]:
        raise ValueError(f"decision covers {n} tokens but x has {x.shape[0]}")
    for name in ("gates", "mask", "dropped"):
        if getattr(decision, name).shape != (n, k):
            raise ValueError(f"decision.{name} has shape {list(getattr(decision, name).shape)}, expected [{n}, {k}]")
    if decision.experts.dtype not in (torch.int64, torch.int32) or decision.mask.dtype != torch.bool \
            or decision.dropped.dtype != torch.bool:
        raise ValueError("decision.experts must be an integer tensor, decision.mask and decision.dropped bool")


def permute_by_expert(decision: RoutingDecision) -> TokenPermutation:
    """Stable-sort all (token, slot) pairs by expert, inactive pairs after every expert."""
    num_experts, num_slots = decision.num_experts, decision.experts.shape[1]
    active_NK = decision.active
    out_of_range_P = (active_NK & ((decision.experts < 0) | (decision.experts >= num_experts))).reshape(-1)
    key_P = torch.where(active_NK, decision.experts.long(), num_experts).reshape(-1)  # [N*K]
    key_P = key_P.masked_fill(out_of_range_P, num_experts)       # sorted last; reported after the sync
    order_P = torch.argsort(key_P.to(torch.int32), stable=True)  # 32-bit keys: fewer radix passes
    return TokenPermutation(
        order=order_P,
        tokens=order_P // num_slots,
        sorted_experts=key_P[order_P],
        counts=count_per_expert(key_P, num_experts + 1)[:num_experts],
        invalid=out_of_range_P.sum(),
    )


def count_per_expert(index: torch.Tensor, num_bins: int) -> torch.Tensor:
    """[num_bins] long histogram of an index tensor; unlike torch.bincount on CUDA it does not
    read the maximum back to the host (integer atomics, so still deterministic)."""
    flat = index.reshape(-1)
    return torch.zeros(num_bins, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def dispatch(x: torch.Tensor, decision: RoutingDecision, experts: Sequence[nn.Module], grouped: bool = True) -> torch.Tensor:
    """y[t] = Σ_{active slots s of t} gates[t, s] · experts[e(t, s)](x[t]);  x [N, D] -> y [N, D]."""
    check_inputs(x, decision, experts)
    n, num_slots = decision.experts.shape
    perm = permute_by_expert(decision)
    y_PD = run_experts(x, perm, experts, grouped)                              # [N*K, D] sorted, 0 if inactive
    inverse_P = torch.empty_like(perm.order)
    inverse_P[perm.order] = torch.arange(perm.order.numel(), device=x.device)  # sorted position of each pair
    y_NKD = y_PD[inverse_P].view(n, num_slots, x.shape[1])                     # [N, K, D] token-major
    gates_NK1 = (decision.gates * decision.active).to(y_NKD.dtype).unsqueeze(-1)  # [N, K, 1]
    return (y_NKD * gates_NK1).sum(dim=1)                                      # [N, D], fixed order


def run_experts(x: torch.Tensor, perm: TokenPermutation, experts: Sequence[nn.Module], grouped: bool) -> torch.Tensor:
    """[N*K, D]: expert outputs in sorted pair order, zero rows for inactive pairs."""
    counts_host = torch.cat([perm.counts, perm.invalid.view(1)]).tolist()  # the one host sync
    if counts_host.pop():
        raise ValueError(f"decision.experts has active entries outside [0, {len(experts)})")
    runs = expert_runs(experts, grouped, x, counts_host)
    active = sum(counts_host)
    x_MD = x[perm.tokens[:active]]                                             # [M, D]
    outputs, start = [], 0
    for first, last in runs:
        rows = sum(counts_host[first:last])
        if rows == 0:
            continue
        chunk_RD = x_MD[start : start + rows]
        if last - first > 1:
            row_group_R = perm.sorted_experts[start : start + rows] - first
            outputs.append(grouped_forward(chunk_RD, perm.counts[first:last], row_group_R, experts[first:last]))
        else:
            outputs.append(experts[first](chunk_RD))
        start += rows
    outputs.append(x.new_zeros(perm.order.numel() - active, x.shape[1]))  # inactive pairs
    return torch.cat(outputs, dim=0)


def expert_runs(experts: Sequence[nn.Module], grouped: bool, x: torch.Tensor, counts: list[int]) -> list[tuple[int, int]]:
    """[first, last) index ranges: maximal groupable runs (when grouped mm is usable and the run's
    experts get at most GROUPED_MM_MAX_MEAN_ROWS rows on average), else single experts."""
    runs, first = [], 0
    for e in range(1, len(experts) + 1):
        if e < len(experts) and grouped and same_group(experts[first], experts[e], x):
            continue
        if e - first > 1 and sum(counts[first:e]) > GROUPED_MM_MAX_MEAN_ROWS * (e - first):
            runs.extend((i, i + 1) for i in range(first, e))
        else:
            runs.append((first, e))
        first = e
    if any(last - first > 1 for first, last in runs) and not grouped_mm_usable(x):
        return [(e, e + 1) for e in range(len(experts))]
    return runs


def same_group(a: nn.Module, b: nn.Module, x: torch.Tensor) -> bool:
    """True when a and b can share one grouped matmul (same class, shapes, activation, dtype)."""
    if type(a) is not type(b) or not isinstance(a, (GELUExpert, SwiGLUExpert)):
        return False
    if a.hidden != b.hidden or a.d_model != b.d_model or getattr(a, "activation", None) != getattr(b, "activation", None):
        return False
    aligned = all(dim * x.element_size() % 16 == 0 for dim in (a.d_model, a.hidden))
    params = [*a.parameters(), *b.parameters()]
    return aligned and all(p.dtype == x.dtype and p.device == x.device for p in params)


# ---------------------------------------------------------------------------------------------
# Grouped matmul path (torch._grouped_mm), probed once per (device type, dtype).

_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}
# Device types where the grouped path is tried. CPU is left out: torch 2.13's CPU _grouped_mm is
# correct but was 2-3x slower than the per-expert loop in the first runs of benchmarks/moe_layer.py
# on the 2-core dev box and merely on par in later (noisy) ones.
GROUPED_MM_DEVICE_TYPES: set[str] = {"cuda"}
# Above this many rows per expert (mean over a run) one cuBLAS GEMM per expert is faster. On an
# H100 (bf16, torch 2.11, D=768) grouped mm won at 1024 and 4096 rows/expert, lost at 8192.
GROUPED_MM_MAX_MEAN_ROWS: float = 6144


def grouped_mm_usable(x: torch.Tensor) -> bool:
    """Whether torch._grouped_mm exists, is enabled for x's device type and computes forward and
    backward correctly for x's device and dtype (probed once, cached)."""
    if not hasattr(torch, "_grouped_mm") or x.device.type not in GROUPED_MM_DEVICE_TYPES:
        return False
    key = (x.device.type, x.dtype)
    if key not in _GROUPED_MM_WORKS:
        _GROUPED_MM_WORKS[key] = _probe_grouped_mm(x.device, x.dtype)
    return _GROUPED_MM_WORKS[key]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x_MD = torch.randn(24, 16, generator=generator).to(device, dtype).requires_grad_()
            w_GDH = torch.randn(3, 16, 32, generator=generator).to(device, dtype).requires_grad_()
            offsets = torch.tensor([5, 5, 24], device=device, dtype=torch.int32)  # includes an empty group
            y_MH = torch._grouped_mm(x_MD, w_GDH, offs=offsets)
            reference = torch.cat([x_MD[:5] @ w_GDH[0], x_MD[5:] @ w_GDH[2]])
            grad_MH = torch.randn(24, 32, generator=generator).to(device, dtype)
            (grad_x, grad_w) = torch.autograd.grad(y_MH, (x_MD, w_GDH), grad_MH)
            (ref_x, ref_w) = torch.autograd.grad(reference, (x_MD, w_GDH), grad_MH)
        tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
        return all(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * 16)
                   for a, b in ((y_MH, reference), (grad_x, ref_x), (grad_w, ref_w)))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


def grouped_forward(x_RD: torch.Tensor, counts_G: torch.Tensor, row_group_R: torch.Tensor,
                    experts: Sequence[nn.Module]) -> torch.Tensor:
    """Run G identical-shape experts over their contiguous row slices (R = Σ counts_G rows;
    row_group_R [R] says which expert owns each row) in grouped matmuls."""
    offsets_G = counts_G.cumsum(0).to(torch.int32)  # [G] cumulative row ends
    if isinstance(experts[0], GELUExpert):
        return _grouped_gelu(x_RD, offsets_G, row_group_R, experts)
    return _grouped_swiglu(x_RD, offsets_G, experts)


def _bias_rows(biases: list[torch.Tensor], row_group_R: torch.Tensor) -> torch.Tensor:
    """[R, F]: each row's expert bias."""
    return torch.stack(biases)[row_group_R]  # [G, F] -> [R, F]


def _grouped_gelu(x_RD, offsets_G, row_group_R, experts) -> torch.Tensor:
    w_fc_GDH = torch.stack([e.c_fc.weight for e in experts])      # [G, D, H] (Conv1D is [in, out])
    w_proj_GHD = torch.stack([e.c_proj.weight for e in experts])  # [G, H, D]
    b_fc_RH = _bias_rows([e.c_fc.bias for e in experts], row_group_R)
    b_proj_RD = _bias_rows([e.c_proj.bias for e in experts], row_group_R)
    hidden_RH = experts[0].act(torch._grouped_mm(x_RD, w_fc_GDH, offs=offsets_G) + b_fc_RH)
    return torch._grouped_mm(hidden_RH, w_proj_GHD, offs=offsets_G) + b_proj_RD  # [R, D]


def _grouped_swiglu(x_RD, offsets_G, experts) -> torch.Tensor:
    w_gate_GDH = torch.stack([e.gate_proj.weight for e in experts]).transpose(-2, -1)  # [G, D, H]
    w_up_GDH = torch.stack([e.up_proj.weight for e in experts]).transpose(-2, -1)      # [G, D, H]
    w_down_GHD = torch.stack([e.down_proj.weight for e in experts]).transpose(-2, -1)  # [G, H, D]
    gate_RH = torch._grouped_mm(x_RD, w_gate_GDH, offs=offsets_G)
    up_RH = torch._grouped_mm(x_RD, w_up_GDH, offs=offsets_G)
    hidden_RH = nn.functional.silu(gate_RH) * up_RH
    return torch._grouped_mm(hidden_RH, w_down_GHD, offs=offsets_G)  # [R, D]


# ---------------------------------------------------------------------------------------------


def reference_dispatch(x: torch.Tensor, decision: RoutingDecision, experts: Sequence[Expert]) -> torch.Tensor:
    """The same combine as `dispatch`, one token and one slot at a time (slow; for tests)."""
    check_inputs(x, decision, experts)
    rows = []
    for t in range(x.shape[0]):
        y_D = torch.zeros_like(x[t])
        for s in range(decision.experts.shape[1]):
            if decision.mask[t, s] and not decision.dropped[t, s]:
                expert = experts[int(decision.experts[t, s])]
                y_D = y_D + decision.gates[t, s].to(x.dtype) * expert(x[t : t + 1])[0]
        rows.append(y_D)
    return torch.stack(rows) if rows else x.new_zeros(x.shape)
