"""Dropless token dispatch over an ExpertPool: run each routed (token, slot) pair through its expert
and combine, y[t] = Σ_{active slots s of t} gates[t, s] · expert_{e(t, s)}(x[t]).

Both paths start from one permutation (`permute_by_expert`): every (token, slot) pair gets a sort
key (its expert, or E when the slot is unused, dropped or out of range), the P = N·K pairs are
stable-sorted by key (argsort) and counted per expert (an integer histogram), all on the device.

- grouped path (`grouped_dispatch`; CUDA, where `torch._grouped_mm` passes a one-off probe): no
  host sync. Each GEMM group (stacked GELU / SwiGLU experts) gathers its rows into a buffer of
  static size N·min(K, G) (the most rows it can get), runs `torch._grouped_mm` with device offsets
  (rows past the group's real count are not computed and never read), and the combine gathers each
  pair's output row by its sorted position. GELU biases go inside the matmuls: x gets `pad` ones
  columns and c_fc a bias row (`GELUGroup.augmented_fc`); the c_proj bias enters the combine as
  one small matmul, gates [N, G] @ bias [G, D]. Copy experts add gate·x, zero experts nothing,
  constant experts a 2-way mixer over all tokens: none of them runs a GEMM.
- loop path (`loop_dispatch`; CPU, fp64, pools with module experts such as LaCT, or `grouped=False`):
  reads the per-expert counts and the active pairs per slot once (the one host sync), runs every
  expert on its exact contiguous slice and combines slot by slot (`combine_by_slot`): a slot that
  no token uses (a second slot every token dropped) costs nothing, a slot that few tokens use costs
  only their rows, so a dropped slot is nearly as cheap as one the decision never had.

Both combine the K slots of a token in fixed order (gathers, and adds whose row indices never
repeat): deterministic.
`reference_dispatch` is the same computation as a per-token Python loop, for tests.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from nectar.moe.expert_pool import (ConstantGroup, CopyGroup, ExpertGroup, ExpertPool, GELUGroup, ModuleGroup,
                                    SwiGLUGroup, ZeroGroup)
from nectar.moe.router import RoutingDecision


@dataclass
class TokenPermutation:
    """All P = N·K (token, slot) pairs sorted by expert; inactive pairs (unused, dropped) last.

    key       [P] long  sort key of each pair: its expert, E when inactive or out of range
    order     [P] long  flat pair index token·K + slot at each sorted position
    position  [P] long  sorted position of each pair (the inverse of order)
    counts    [E] long  active pairs per expert; expert e owns the next counts[e] sorted rows
    active    [N, K] bool  slots the router computes (chosen, not dropped)
    """

    key: torch.Tensor
    order: torch.Tensor
    position: torch.Tensor
    counts: torch.Tensor
    active: torch.Tensor

    @property
    def tokens(self) -> torch.Tensor:
        """[P] long: the token of each sorted pair."""
        return self.order // self.active.shape[1]

    def invalid(self) -> torch.Tensor:
        """[] long: active pairs whose expert index is outside [0, E) (sorted last, not computed)."""
        return self.active.sum() - self.counts.sum()


def check_inputs(x: torch.Tensor, decision: RoutingDecision, experts: Sequence[nn.Module]) -> None:
    """Raise ValueError when x, the decision and the experts disagree in shape."""
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
    """Stable-sort all (token, slot) pairs by expert, inactive pairs after every expert (no host sync)."""
    num_experts = decision.num_experts
    experts_NK = decision.experts.long()
    active_NK = decision.active
    computed_NK = active_NK & (experts_NK >= 0) & (experts_NK < num_experts)
    key_P = torch.where(computed_NK, experts_NK, num_experts).reshape(-1)  # [N*K]
    order_P = torch.argsort(key_P.to(torch.int32), stable=True)  # 32-bit keys: fewer radix passes
    position_P = torch.empty_like(order_P)
    position_P[order_P] = torch.arange(order_P.numel(), device=order_P.device)
    counts_E = count_per_expert(key_P, num_experts + 1)[:num_experts]
    return TokenPermutation(key=key_P, order=order_P, position=position_P, counts=counts_E, active=active_NK)


def count_per_expert(index: torch.Tensor, num_bins: int) -> torch.Tensor:
    """[num_bins] long histogram of an index tensor; unlike torch.bincount on CUDA it does not
    read the maximum back to the host (integer atomics, so still deterministic)."""
    flat = index.reshape(-1)
    return torch.zeros(num_bins, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))


def dispatch(x: torch.Tensor, decision: RoutingDecision, experts: ExpertPool, grouped: bool = True) -> torch.Tensor:
    """y [N, D] = Σ_{active slots s of t} gates[t, s] · experts[e(t, s)](x[t]) for x [N, D]."""
    return dispatch_with_counts(x, decision, experts, grouped)[0]


def dispatch_with_counts(x: torch.Tensor, decision: RoutingDecision, experts: ExpertPool,
                         grouped: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(y [N, D], counts [E] long on the device: the (token, slot) pairs each expert computed)."""
    if not isinstance(experts, ExpertPool):
        raise ValueError(f"dispatch needs an ExpertPool (nectar.moe.expert_pool), got {type(experts).__name__}")
    check_inputs(x, decision, experts)
    perm = permute_by_expert(decision)
    if x.shape[0] == 0:
        return x.new_zeros(x.shape), perm.counts
    if dispatch_path(x, experts, grouped) == "grouped":
        if x.device.type == "cpu" and not torch.compiler.is_compiling():
            check_expert_range(perm, len(experts))
        return grouped_dispatch(x, decision, experts, perm), perm.counts
    return loop_dispatch(x, decision, experts, perm), perm.counts


def check_expert_range(perm: TokenPermutation, num_experts: int) -> None:
    """ValueError when an active slot names no expert; for CPU tensors (the grouped path checks on
    the CPU only: on a GPU such slots are sorted last and not computed). `torch._assert_async` is a
    plain assert on a CPU tensor and never a host sync on a GPU, so it reads nothing a GPU forward
    would wait for (nectar.experiment.host_reads does not count it)."""
    try:
        torch._assert_async(perm.invalid() == 0)
    except RuntimeError:
        raise ValueError(f"decision.experts has active entries outside [0, {num_experts})") from None


def dispatch_path(x: torch.Tensor, pool: ExpertPool, grouped: bool = True) -> str:
    """"grouped" when the sync-free grouped path can run this pool on x's device and dtype, else "loop"."""
    if not grouped or any(isinstance(g, ModuleGroup) for g in pool.groups):
        return "loop"
    gemm_groups = [g for g in pool.groups if g.runs_gemm]
    if gemm_groups and not (grouped_mm_usable(x) and all(grouped_mm_aligned(g, x) for g in gemm_groups)):
        return "loop"
    return "grouped"


# ---------------------------------------------------------------------------------------------
# loop path: exact slices, one host sync


def loop_dispatch(x: torch.Tensor, decision: RoutingDecision, pool: ExpertPool,
                  perm: TokenPermutation | None = None) -> torch.Tensor:
    """Every expert on its exact slice of the sorted pairs; then `combine_by_slot`."""
    perm = permute_by_expert(decision) if perm is None else perm
    n, num_slots = decision.experts.shape
    computed_NK = perm.key.view(n, num_slots) < len(pool)                       # [N, K] slots an expert computes
    host = torch.cat([perm.counts, perm.invalid().view(1), computed_NK.sum(0)]).tolist()  # the one host sync
    counts_host, invalid, per_slot = host[:len(pool)], host[len(pool)], host[len(pool) + 1:]
    if invalid:
        raise ValueError(f"decision.experts has active entries outside [0, {len(pool)})")
    active = sum(counts_host)
    x_MD = x[perm.tokens[:active]]                                              # [M, D]
    outputs, start = [], 0
    for group, first, _ in pool.spans():
        for j in range(group.count):
            rows = counts_host[first + j]
            if rows:
                outputs.append(group.forward_expert(j, x_MD[start : start + rows]))
                start += rows
    outputs.append(x.new_zeros(1, x.shape[1]))                                  # row M: what inactive slots read
    y_MD = torch.cat(outputs, dim=0)                                            # [M + 1, D] sorted
    return combine_by_slot(y_MD, perm.position.view(n, num_slots).clamp(max=active), computed_NK,
                           decision.gates, per_slot)


def combine_by_slot(y_MD: torch.Tensor, position_NK: torch.Tensor, computed_NK: torch.Tensor,
                    gates_NK: torch.Tensor, per_slot: list[int]) -> torch.Tensor:
    """y [N, D] = Σ_k gates[t, k] · y_MD[position[t, k]], slot by slot in order k = 0, 1, …: slot 0
    (or the first slot any token uses) as a dense gather; a later slot that no token computes is
    skipped; one that fewer than half the tokens compute adds only its rows (`index_add_` over
    distinct tokens: no repeated index, deterministic); else a dense gather. `per_slot` [K]: the
    tokens computing each slot (host ints); inactive positions point at y_MD's zero row."""
    n = position_NK.shape[0]
    weights_NK = (gates_NK * computed_NK).to(y_MD.dtype)                        # [N, K], 0 on inactive slots
    y_ND = None
    for k, used in enumerate(per_slot):
        if y_ND is not None and used == 0:
            continue
        if y_ND is None or 2 * used >= n:
            part_ND = y_MD[position_NK[:, k]] * weights_NK[:, k:k + 1]
            y_ND = part_ND if y_ND is None else y_ND + part_ND
            continue
        tokens_U = _first_true(computed_NK[:, k], used)                         # [U] tokens computing slot k
        y_ND.index_add_(0, tokens_U, y_MD[position_NK[tokens_U, k]] * weights_NK[tokens_U, k:k + 1])
    return y_ND if y_ND is not None else y_MD.new_zeros(n, y_MD.shape[1])


def _first_true(flag_N: torch.Tensor, count: int) -> torch.Tensor:
    """[count] long: the indices where flag_N is True, in order, when it is True at exactly `count`
    places (known on the host): a cumulative sum and a scatter, no host read."""
    n = flag_N.shape[0]
    slot_N = torch.where(flag_N, flag_N.long().cumsum(0) - 1, count)            # i-th True → i; False → spare slot
    out = torch.empty(count + 1, dtype=torch.long, device=flag_N.device)
    out.scatter_(0, slot_N, torch.arange(n, device=flag_N.device))             # the spare slot is overwritten freely
    return out[:count]


# ---------------------------------------------------------------------------------------------
# grouped path: static shapes, device offsets, no host sync


def grouped_dispatch(x: torch.Tensor, decision: RoutingDecision, pool: ExpertPool,
                     perm: TokenPermutation | None = None) -> torch.Tensor:
    """The sync-free path (see the module docstring); needs `torch._grouped_mm` for GEMM groups."""
    perm = permute_by_expert(decision) if perm is None else perm
    context = make_context(x, decision, pool, perm)
    y_ND = None
    for group, first, last in pool.spans():
        part = _group_contribution(context, group, first, last)
        if part is not None:
            y_ND = part if y_ND is None else y_ND + part
    return x.new_zeros(x.shape) if y_ND is None else y_ND


@dataclass
class _Context:
    x: torch.Tensor           # [N, D]
    perm: TokenPermutation
    key_NK: torch.Tensor      # [N, K] expert of each slot, E when inactive
    computed_NK: torch.Tensor  # [N, K] bool: slots some expert computes (key < E)
    gates_NK: torch.Tensor    # [N, K] combine weights, 0 on inactive slots
    num_experts: int
    clean_tails: bool         # zero the rows past a group's real count (autograd needs finite values)
    x_padded: torch.Tensor | None = None  # [N, D + pad] x with ones columns (GELU bias folding)
    starts: torch.Tensor | None = None    # [E] first sorted row per expert (computed when needed)

    def start(self, first: int) -> torch.Tensor | int:
        """Sorted position of expert `first`'s first row: 0 for expert 0, else a device scalar."""
        if first == 0:
            return 0
        if self.starts is None:
            self.starts = self.perm.counts.cumsum(0) - self.perm.counts
        return self.starts[first]

    def slots_of(self, first: int, last: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([N, K] bool slots routed into experts [first, last), [N, K] their gates, 0 elsewhere)."""
        if first == 0 and last == self.num_experts:
            return self.computed_NK, self.gates_NK
        in_NK = (self.key_NK >= first) & (self.key_NK < last)
        return in_NK, torch.where(in_NK, self.gates_NK, 0.0)


def make_context(x: torch.Tensor, decision: RoutingDecision, pool: ExpertPool, perm: TokenPermutation) -> _Context:
    n, num_slots = decision.experts.shape
    key_NK = perm.key.view(n, num_slots)
    computed_NK = key_NK < pool.num_experts
    gates_NK = decision.gates * computed_NK                     # 0 on unused, dropped, out-of-range slots
    return _Context(x, perm, key_NK, computed_NK, gates_NK, pool.num_experts, _needs_clean_tails(x, pool))


def _needs_clean_tails(x: torch.Tensor, pool: ExpertPool) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in pool.parameters()))


def _group_contribution(ctx: _Context, group: ExpertGroup, first: int, last: int) -> torch.Tensor | None:
    """This group's part of y [N, D] (None for zero experts)."""
    if isinstance(group, ZeroGroup):
        return None
    in_NK, weights_NK = ctx.slots_of(first, last)               # [N, K] slots routed into the group
    if isinstance(group, CopyGroup):
        return weights_NK.sum(1, keepdim=True).to(ctx.x.dtype) * ctx.x
    if isinstance(group, ConstantGroup):
        return _constant_contribution(ctx, group, first, in_NK, weights_NK)
    return _gemm_contribution(ctx, group, first, last, in_NK, weights_NK)


@dataclass
class GroupRows:
    """Where a GEMM group's rows are: R = N·min(K, G) static rows, the first counts.sum() real.

    start     [] long   sorted position of the group's first row (a device scalar; the int 0 for expert 0)
    tokens_R  [R] long  token of each row (rows past the real count: some token, never read)
    offsets_G [G] int32 cumulative row ends per expert of the group
    valid_R1  [R, 1] bool real rows, or None when the unset rows need not be zeroed
    """

    start: torch.Tensor | int
    tokens_R: torch.Tensor
    offsets_G: torch.Tensor
    valid_R1: torch.Tensor | None


def group_rows(ctx: _Context, group: ExpertGroup, first: int, last: int) -> GroupRows:
    n, num_slots = ctx.key_NK.shape
    rows = n * min(num_slots, group.count)                      # the most pairs this group can get
    start = ctx.start(first)                                    # 0 for the first expert, else a device scalar
    if first == 0:                                              # rows <= N·K: all sorted positions exist
        order_R = ctx.perm.order[:rows]
    else:
        sorted_rows_R = (torch.arange(rows, device=ctx.x.device) + start).clamp_(max=max(n * num_slots - 1, 0))
        order_R = ctx.perm.order[sorted_rows_R]
    tokens_R = order_R // num_slots                             # [R]
    offsets_G = ctx.perm.counts[first:last].cumsum(0).to(torch.int32)  # [G] cumulative row ends
    valid_R1 = (torch.arange(rows, device=ctx.x.device) < offsets_G[-1]).unsqueeze(1) if ctx.clean_tails else None
    return GroupRows(start, tokens_R, offsets_G, valid_R1)


def combine_group(ctx: _Context, group: ExpertGroup, first: int, rows: GroupRows, y_RD: torch.Tensor,
                  in_NK: torch.Tensor, weights_NK: torch.Tensor) -> torch.Tensor:
    """Σ_s gate_s · y[row of (t, s)] over the slots routed into the group (+ GELU output biases): [N, D]."""
    n, num_slots = ctx.key_NK.shape
    local_P = ctx.perm.position - rows.start if isinstance(rows.start, torch.Tensor) else ctx.perm.position
    if y_RD.shape[0] < n * num_slots or isinstance(rows.start, torch.Tensor):  # positions past the buffer
        local_P = local_P.clamp(0, y_RD.shape[0] - 1)
    y_NKD = y_RD.index_select(0, local_P).view(n, num_slots, -1)  # [N, K, D]
    y_NKD = torch.where(in_NK.unsqueeze(-1), y_NKD, 0.0)        # slots of other groups read unset rows
    y_ND = (y_NKD * weights_NK.to(y_NKD.dtype).unsqueeze(-1)).sum(dim=1)
    if isinstance(group, GELUGroup):                            # Σ_s gate_s · c_proj_bias[e_s]
        weights_NG = _weights_per_expert(weights_NK, ctx.key_NK - first, in_NK, group.count)
        y_ND = torch.addmm(y_ND, weights_NG.to(y_ND.dtype), group.c_proj_bias)
    return y_ND


def _gemm_contribution(ctx: _Context, group: ExpertGroup, first: int, last: int, in_NK: torch.Tensor,
                       weights_NK: torch.Tensor) -> torch.Tensor:
    rows = group_rows(ctx, group, first, last)
    y_RD = grouped_gemm(ctx, group, rows.tokens_R, rows.offsets_G, rows.valid_R1)  # [R, D]; tail unset
    return combine_group(ctx, group, first, rows, y_RD, in_NK, weights_NK)


def _weights_per_expert(weights_NK: torch.Tensor, local_NK: torch.Tensor, in_NK: torch.Tensor,
                        count: int) -> torch.Tensor:
    """[N, G]: each token's summed gate per expert of a group (local expert index local_NK)."""
    index_NK = torch.where(in_NK, local_NK, 0)
    return weights_NK.new_zeros(weights_NK.shape[0], count).scatter_add(1, index_NK, weights_NK)


def _constant_contribution(ctx: _Context, group: ConstantGroup, first: int, in_NK: torch.Tensor,
                           weights_NK: torch.Tensor) -> torch.Tensor:
    """Σ_s gate_s (α_a x + α_b v) over the slots routed to constant experts, for all tokens at once."""
    x = ctx.x
    logits_NC2 = F.linear(x, group.mixer.reshape(-1, x.shape[1])).view(x.shape[0], group.count, 2)
    alpha_NC2 = torch.softmax(logits_NC2, dim=-1)
    weights_NC = _weights_per_expert(weights_NK, ctx.key_NK - first, in_NK, group.count).to(x.dtype)
    keep_N1 = (weights_NC * alpha_NC2[..., 0]).sum(1, keepdim=True)                  # [N, 1]
    return keep_N1 * x + (weights_NC * alpha_NC2[..., 1]) @ group.constant             # [N, D]


def grouped_gemm(ctx: _Context, group: ExpertGroup, tokens_R: torch.Tensor, offsets_G: torch.Tensor,
                 valid_R1: torch.Tensor | None) -> torch.Tensor:
    """One GEMM group over its gathered rows: [R, D]; rows past offsets_G[-1] are unset unless
    valid_R1 is given (then every intermediate is zeroed there, so gradients stay finite)."""
    clean = (lambda t: torch.where(valid_R1, t, 0.0)) if valid_R1 is not None else (lambda t: t)  # noqa: E731
    if isinstance(group, SwiGLUGroup):
        x_RD = clean(ctx.x.index_select(0, tokens_R))
        gate_up_R2H = clean(torch._grouped_mm(x_RD, group.gate_up, offs=offsets_G))   # [R, 2H]
        hidden_RH = F.silu(gate_up_R2H[:, : group.hidden]) * gate_up_R2H[:, group.hidden :]
        return clean(torch._grouped_mm(hidden_RH, group.down, offs=offsets_G))         # [R, D]
    if isinstance(group, GELUGroup):
        pre_RH = clean(_gelu_fc(ctx, group, tokens_R, offsets_G, clean))               # [R, H] with bias
        return clean(torch._grouped_mm(group.act(pre_RH), group.c_proj, offs=offsets_G))  # [R, D], no bias
    raise ValueError(f"no grouped kernel for expert group {type(group).__name__}")


def _gelu_fc(ctx: _Context, group: GELUGroup, tokens_R, offsets_G, clean) -> torch.Tensor:
    """x @ c_fc + c_fc_bias on the gathered rows. Eager: the bias rides in the matmul (x padded with
    ones, c_fc with the bias row). Under torch.compile: a per-row bias gather the compiler fuses."""
    if torch.compiler.is_compiling():
        x_RD = clean(ctx.x.index_select(0, tokens_R))
        rows = torch.arange(tokens_R.numel(), device=tokens_R.device)
        group_R = torch.searchsorted(offsets_G, rows.to(torch.int32), right=True).clamp_(max=group.count - 1)
        return torch._grouped_mm(x_RD, group.c_fc, offs=offsets_G) + group.c_fc_bias[group_R]
    pad = bias_pad_columns(ctx.x)
    if ctx.x_padded is None:
        ctx.x_padded = F.pad(ctx.x, (0, pad), value=1.0)                                # [N, D + pad]
    x_RD = clean(ctx.x_padded.index_select(0, tokens_R))
    return torch._grouped_mm(x_RD, group.augmented_fc(pad), offs=offsets_G)


def bias_pad_columns(x: torch.Tensor) -> int:
    """Ones columns appended to x for GELU bias folding: at least one, and D + pad a multiple of
    16 bytes (the grouped kernel's alignment)."""
    per_16_bytes = max(16 // x.element_size(), 1)
    pad = -x.shape[1] % per_16_bytes
    return pad if pad else per_16_bytes


# ---------------------------------------------------------------------------------------------
# torch._grouped_mm: where it is tried, probed once per (device type, dtype)

_GROUPED_MM_WORKS: dict[tuple[str, torch.dtype], bool] = {}
# Device type -> dtypes for which the grouped path is tried. On CUDA only bf16 runs torch's CUTLASS
# grouped kernel (sm90+); other dtypes go through a per-group fallback that reads the offsets back
# to the host, which the loop path does once instead of three times. CPU is left out: there is no
# host sync to avoid and torch's CPU _grouped_mm was slower than the loop on the 2-core dev box;
# tests enable it to check the grouped path's logic.
GROUPED_MM_DEVICE_TYPES: dict[str, set[torch.dtype]] = {"cuda": {torch.bfloat16}}


def grouped_mm_usable(x: torch.Tensor) -> bool:
    """Whether torch._grouped_mm exists, is enabled for x's device type and dtype and computes
    forward and backward correctly for them (probed once, cached)."""
    if not hasattr(torch, "_grouped_mm") or x.dtype not in GROUPED_MM_DEVICE_TYPES.get(x.device.type, ()):
        return False
    key = (x.device.type, x.dtype)
    if key not in _GROUPED_MM_WORKS:
        _GROUPED_MM_WORKS[key] = _probe_grouped_mm(x.device, x.dtype)
    return _GROUPED_MM_WORKS[key]


def grouped_mm_aligned(group: ExpertGroup, x: torch.Tensor) -> bool:
    """Row strides of every grouped-matmul operand are multiples of 16 bytes, dtypes match x."""
    widths = [group.hidden, 2 * group.hidden if isinstance(group, SwiGLUGroup) else group.hidden, x.shape[1]]
    if isinstance(group, GELUGroup):
        widths.append(x.shape[1] + bias_pad_columns(x))
    aligned = all(w * x.element_size() % 16 == 0 for w in widths)
    return aligned and all(p.dtype == x.dtype and p.device == x.device for p in group.parameters())


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> bool:
    generator = torch.Generator().manual_seed(0)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            x_MD = torch.randn(24, 16, generator=generator).to(device, dtype).requires_grad_()
            w_GDH = torch.randn(3, 16, 32, generator=generator).to(device, dtype).requires_grad_()
            offsets = torch.tensor([5, 5, 20], device=device, dtype=torch.int32)  # an empty group, 4 tail rows
            y_MH = torch._grouped_mm(x_MD, w_GDH, offs=offsets)[:20]
            reference = torch.cat([x_MD[:5] @ w_GDH[0], x_MD[5:20] @ w_GDH[2]])
            grad_MH = torch.randn(20, 32, generator=generator).to(device, dtype)
            (grad_x, grad_w) = torch.autograd.grad(y_MH, (x_MD, w_GDH), grad_MH)
            (ref_x, ref_w) = torch.autograd.grad(reference, (x_MD, w_GDH), grad_MH)
        tol = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-4
        return all(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * 16)
                   for a, b in ((y_MH, reference), (grad_x[:20], ref_x[:20]), (grad_w, ref_w)))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------


def reference_dispatch(x: torch.Tensor, decision: RoutingDecision, experts: Sequence[nn.Module]) -> torch.Tensor:
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
