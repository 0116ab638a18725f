"""One-kernel routing on the GPU: gate logits [N, E] -> experts, gates, mask and probs in one launch.

The torch routers build a decision from a dozen to three dozen small kernels over the [N, E] logits
(softmax, topk, scatter, gather, renormalise; the energy-aware router's candidates and drop rule).
On a GPU each is a launch and a pass over memory, and together they cost the energy-aware router
a few percent of a whole forward (docs/results.md). This module computes the same decision row by
row in registers, one Triton program per block of tokens:

- `topk_decision`: static top-k (k <= 4) of scores = logits + selection bias;
- `energy_decision`: the energy-aware router's "static-or-cheap" rule with one extra slot — the
  static top-1 first, then the better by (logits + bias) of the static second choice and the best
  cheap expert (not the top-1) by the logits, and with `drop` the rule −log(1 − w) < d[e] that
  drops slot 2 (w its share of the two static gates, fp32);
- `cheap_decision`: the static top-1 and the best cheap expert (`CheapStaticRouter`, one extra slot);
- `top_p_decision`: top-p with at most k <= 4 experts (`TopPRouter`).

Each returns the RoutingDecision (nothing dropped), or None when the kernel could not run.

Both write the static softmax probs (fp32 softmax, stored in the logits' dtype) and the gates
(probs gathered at the chosen experts, times the slot mask, renormalised — each step rounded to
the logits' dtype as torch does). Ties between equal scores go to the lower expert index (the
torch path's topk leaves their order to the backend). Arithmetic in low precision follows torch's:
scores are rounded to the logits' dtype after every operation torch performs in it.

The fused path applies only where it can be exact: temperature 1, no gradient wanted through the
logits (inference), not under torch.compile, on CUDA (or a CPU under TRITON_INTERPRET=1, for tests),
and with Triton installed; `NECTAR_FUSED_ROUTER=0` turns it off. Callers fall back to their torch
path when `fusable` says no, or when a decision function returns None: a kernel variant that fails
to compile or run the first time stays on the torch path for the process, with one warning (the
other variants stay fused; `status()` lists the failures, and a run's summary.json records it).
tests/moe/test_fused_router.py compares both paths.
"""

from __future__ import annotations

import os
import struct
import warnings

import torch

from nectar.moe.router import RoutingDecision

try:  # Triton ships with CUDA builds of torch; a CPU install may lack it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
MAX_EXPERTS = 256       # a row's logits live in registers
MAX_K = 4
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def enabled() -> bool:
    """The switch: `NECTAR_FUSED_ROUTER=0` keeps every router on its torch path."""
    return os.environ.get("NECTAR_FUSED_ROUTER", "1") != "0"


def runs_on(device: torch.device | str) -> bool:
    """Whether routers on `device` take the fused kernel (where `fusable` allows): Triton installed,
    the switch on, and CUDA (or a CPU under TRITON_INTERPRET=1)."""
    device = torch.device(device)
    return (triton is not None and enabled()
            and (device.type == "cuda" or (INTERPRET and device.type == "cpu")))


def status() -> dict:
    """What a run records of the fused path: Triton present, the switch, and the kernel variants that
    failed their first launch in this process, with why (those decisions took the torch path)."""
    return {"triton": triton is not None, "switch_on": enabled(),
            "failed": [f"{variant}: {why}" for variant, why in _FAILED.items()]}


def fusable(logits: torch.Tensor, temperature: float) -> bool:
    """Whether the fused kernel may compute this decision (see the module docstring)."""
    if temperature != 1.0 or logits.dtype not in DTYPES or not runs_on(logits.device):
        return False
    if logits.dim() != 2 or logits.shape[1] > MAX_EXPERTS or logits.shape[0] == 0:
        return False
    if torch.is_grad_enabled() and logits.requires_grad:
        return False
    return not torch.compiler.is_compiling()


def topk_decision(logits: torch.Tensor, k: int, selection_bias: torch.Tensor, renormalize: bool):
    """Static top-k's decision (experts [N, k], gates, mask, probs [N, E]), or None."""
    if not 1 <= k <= min(MAX_K, logits.shape[1]):
        raise ValueError(f"the fused router takes 1 <= k <= {MAX_K}, got {k}")
    return _launch(logits, k, mode=0, bias=selection_bias, renormalize=renormalize)


def energy_decision(logits: torch.Tensor, bias: torch.Tensor, cheap_mask: torch.Tensor,
                    drop_scale: torch.Tensor | None):
    """The energy-aware router's static-or-cheap decision (K = 2), or None; `cheap_mask` [E] 0 on cheap experts, -inf elsewhere; `drop_scale` [E]
    or None (never drop)."""
    return _launch(logits, 2, mode=1, bias=bias, cheap=cheap_mask, drop=drop_scale, renormalize=True)


def cheap_decision(logits: torch.Tensor, cheap_mask: torch.Tensor):
    """`CheapStaticRouter`'s decision with one extra slot, or None: the static top-1, then the best cheap expert (not the top-1) by the logits."""
    return _launch(logits, 2, mode=2, bias=None, cheap=cheap_mask, drop=None, renormalize=True)


def top_p_decision(logits: torch.Tensor, p: float, k: int, selection_bias: torch.Tensor, renormalize: bool):
    """`TopPRouter`'s decision with max_k = k <= 4, or None:
    experts in descending softmax(logits + selection bias), a slot used while the mass before it
    (the rounded cumulative sum, as torch's) is below p (p rounded to the logits' dtype, as torch
    compares a tensor with a Python number); slot 0 always."""
    if not 1 <= k <= min(MAX_K, logits.shape[1]):
        raise ValueError(f"the fused router takes 1 <= k <= {MAX_K}, got {k}")
    return _launch(logits, k, mode=3, bias=selection_bias, renormalize=renormalize, p=rounded_scalar(p, logits.dtype))


def rounded_scalar(value: float, dtype: torch.dtype) -> float:
    """`value` rounded to `dtype` (nearest, ties to even), in Python: no tensor, nothing read back."""
    if dtype == torch.float16:
        return struct.unpack("e", struct.pack("e", value))[0]
    single = struct.unpack("I", struct.pack("f", value))[0]
    if dtype == torch.bfloat16:
        single = (single + 0x7FFF + ((single >> 16) & 1)) & 0xFFFF0000
    return struct.unpack("f", struct.pack("I", single))[0]


def _launch(logits, k, mode, bias, cheap=None, drop=None, renormalize=True, p=0.0):
    logits = logits.contiguous()
    n, e = logits.shape
    device = logits.device
    block_e = triton.next_power_of_2(e)
    block_n = max(1, min(128, 4096 // block_e))
    constants = dict(E=e, BLOCK_E=block_e, BLOCK_N=block_n, K=k, MODE=mode, DROP=drop is not None,
                     RENORMALIZE=renormalize, ROUND=_round_code(logits.dtype))
    variant = (device.type, *constants.values())
    if variant in _FAILED:                      # its first launch failed: the caller's torch path answers
        return None
    experts = torch.empty(n, k, dtype=torch.long, device=device)
    gates = torch.empty(n, k, dtype=logits.dtype, device=device)
    mask = torch.empty(n, k, dtype=torch.bool, device=device)
    probs = torch.empty(n, e, dtype=logits.dtype, device=device)
    zeros = _zeros(e, device)                   # for a vector the caller has not got (or the kernel does not read)
    vector = lambda v: zeros if v is None else v.to(device=device, dtype=torch.float32).contiguous()  # noqa: E731

    def launch():
        _route_kernel[(triton.cdiv(n, block_n),)](
            logits, vector(bias), vector(cheap), vector(drop),
            experts, gates, mask.view(torch.uint8), probs, n, float(p), **constants)

    if variant in _PROVEN:
        launch()
    elif not _first_launch(launch, variant):
        return None
    return RoutingDecision(experts, gates, mask, torch.zeros_like(mask), probs, logits)


_ZEROS: dict[tuple, torch.Tensor] = {}


def _zeros(e: int, device: torch.device) -> torch.Tensor:
    """[e] fp32 zeros on `device`, made once (no fill kernel a forward)."""
    key = (e, str(device))
    if key not in _ZEROS:
        _ZEROS[key] = torch.zeros(e, device=device)
    return _ZEROS[key]


_PROVEN: set[tuple] = set()      # kernel variants that compiled and ran once
_FAILED: dict[tuple, str] = {}   # variants whose first launch failed, and why (torch path from then on)


def _first_launch(launch, variant: tuple) -> bool:
    """Compile and run a variant for the first time; if that fails (a Triton that cannot build it),
    warn once and keep that variant on its routers' torch paths for this process (the other variants
    stay fused), so that nothing is lost. Once a variant has run, its errors propagate as any kernel's."""
    try:
        launch()
    except Exception as exc:  # noqa: BLE001  Triton's compile and launch errors have no common type
        _FAILED[variant] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
        warnings.warn(f"fused router variant {variant} off (its routers take their torch paths): {_FAILED[variant]}",
                      RuntimeWarning, stacklevel=4)
        return False
    _PROVEN.add(variant)
    return True


def _round_code(dtype: torch.dtype) -> int:
    return {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}[dtype]


if triton is not None:

    @triton.jit
    def _rounded(x, ROUND: tl.constexpr):
        """x (fp32) rounded to the logits' dtype and back: what torch's low-precision op stores.
        bf16: round to nearest even on the bits (the same on a GPU and in Triton's interpreter,
        whose own conversion truncates)."""
        if ROUND == 1:
            bits = x.to(tl.uint32, bitcast=True)
            bits = (bits + (0x7FFF + ((bits >> 16) & 1))) & 0xFFFF0000
            return tl.where(x == x, bits.to(tl.float32, bitcast=True), x)     # NaN stays NaN
        if ROUND == 2:
            return x.to(tl.float16).to(tl.float32)
        return x

    @triton.jit
    def _argmax_low(values, cols, BLOCK_E: tl.constexpr):
        """[BN] the column of each row's maximum, the lowest one among equals."""
        best = tl.max(values, axis=1)
        return tl.min(tl.where(values == best[:, None], cols[None, :], BLOCK_E), axis=1)

    @triton.jit
    def _pick(values, cols, index):
        """[BN] values[row, index[row]]."""
        return tl.sum(tl.where(cols[None, :] == index[:, None], values, 0.0), axis=1)

    @triton.jit
    def _route_kernel(logits_ptr, bias_ptr, cheap_ptr, drop_ptr, experts_ptr, gates_ptr, mask_ptr, probs_ptr, N, P,
                      E: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_N: tl.constexpr, K: tl.constexpr,
                      MODE: tl.constexpr, DROP: tl.constexpr, RENORMALIZE: tl.constexpr, ROUND: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)                 # [BN]
        cols = tl.arange(0, BLOCK_E)                                               # [BE]
        row_ok = rows < N
        col_ok = cols < E
        inside = row_ok[:, None] & col_ok[None, :]                                 # [BN, BE]
        x = tl.load(logits_ptr + rows[:, None] * E + cols[None, :], mask=inside, other=0.0).to(tl.float32)
        x = tl.where(col_ok[None, :], x, float("-inf"))                            # logits, fp32 [BN, BE]
        bias = _rounded(tl.load(bias_ptr + cols, mask=col_ok, other=0.0), ROUND)   # [BE] in the logits' dtype
        scores = tl.where(col_ok[None, :], _rounded(x + bias[None, :], ROUND), float("-inf"))
        # the static softmax, fp32; stored in the logits' dtype
        top = tl.max(x, axis=1)
        ex = tl.exp(x - top[:, None])
        p = ex / tl.sum(ex, axis=1)[:, None]                                       # [BN, BE] fp32
        tl.store(probs_ptr + rows[:, None] * E + cols[None, :], p.to(probs_ptr.dtype.element_ty), mask=inside)
        p_low = _rounded(p, ROUND)
        if MODE == 0:
            _topk_slots(scores, p_low, cols, rows, row_ok, experts_ptr, gates_ptr, mask_ptr,
                        BLOCK_N, BLOCK_E, K, RENORMALIZE, ROUND)
        elif MODE == 3:
            _top_p_slots(scores, p_low, cols, col_ok, rows, row_ok, experts_ptr, gates_ptr, mask_ptr, P,
                         BLOCK_N, BLOCK_E, K, RENORMALIZE, ROUND)
        else:
            _two_slots(x, scores, p, cols, col_ok, rows, row_ok, cheap_ptr, drop_ptr, experts_ptr, gates_ptr, mask_ptr,
                       BLOCK_N, BLOCK_E, MODE, DROP, ROUND)

    @triton.jit
    def _topk_slots(scores, p_low, cols, rows, row_ok, experts_ptr, gates_ptr, mask_ptr, BLOCK_N: tl.constexpr,
                    BLOCK_E: tl.constexpr, K: tl.constexpr, RENORMALIZE: tl.constexpr, ROUND: tl.constexpr):
        """Static top-k of the (biased) scores, in order; gates renormalised over the k slots."""
        left = scores
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        for slot in tl.static_range(K):
            pick = _argmax_low(left, cols, BLOCK_E)
            left = tl.where(cols[None, :] == pick[:, None], float("-inf"), left)
            gate = _pick(p_low, cols, pick)
            total += gate
            tl.store(experts_ptr + rows * K + slot, pick.to(tl.int64), mask=row_ok)
            tl.store(gates_ptr + rows * K + slot, gate.to(gates_ptr.dtype.element_ty), mask=row_ok)
            tl.store(mask_ptr + rows * K + slot, tl.full([BLOCK_N], 1, tl.uint8), mask=row_ok)
        if RENORMALIZE:
            _renormalize(gates_ptr, rows, row_ok, total, K, ROUND)

    @triton.jit
    def _top_p_slots(scores, p_low, cols, col_ok, rows, row_ok, experts_ptr, gates_ptr, mask_ptr, P,
                     BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, K: tl.constexpr, RENORMALIZE: tl.constexpr,
                     ROUND: tl.constexpr):
        """Top-p over softmax(scores), rounded as torch stores it: a slot is used while the mass
        before it (the rounded running sum minus the slot's own value) is below P; slot 0 always."""
        sel_e = tl.exp(scores - tl.max(scores, axis=1)[:, None])
        sel = tl.where(col_ok[None, :], _rounded(sel_e / tl.sum(sel_e, axis=1)[:, None], ROUND), -1.0)
        left = sel
        running = tl.zeros([BLOCK_N], dtype=tl.float32)
        total = tl.zeros([BLOCK_N], dtype=tl.float32)
        for slot in tl.static_range(K):
            pick = _argmax_low(left, cols, BLOCK_E)
            value = _pick(sel, cols, pick)
            left = tl.where(cols[None, :] == pick[:, None], -2.0, left)
            running += value
            before = _rounded(_rounded(running, ROUND) - value, ROUND)
            used = (before < P) | (slot == 0)
            gate = tl.where(used, _pick(p_low, cols, pick), 0.0)
            total += gate
            tl.store(experts_ptr + rows * K + slot, pick.to(tl.int64), mask=row_ok)
            tl.store(gates_ptr + rows * K + slot, gate.to(gates_ptr.dtype.element_ty), mask=row_ok)
            tl.store(mask_ptr + rows * K + slot, used.to(tl.uint8), mask=row_ok)
        if RENORMALIZE:
            _renormalize(gates_ptr, rows, row_ok, total, K, ROUND)

    @triton.jit
    def _renormalize(gates_ptr, rows, row_ok, total, K: tl.constexpr, ROUND: tl.constexpr):
        """Stored gates divided by their (rounded) sum `total` [BN], as torch's renormalisation."""
        total = tl.maximum(_rounded(total, ROUND), 1.1754943508222875e-38)
        for slot in tl.static_range(K):
            gate = tl.load(gates_ptr + rows * K + slot, mask=row_ok, other=0.0).to(tl.float32)
            tl.store(gates_ptr + rows * K + slot, _rounded(gate / total, ROUND).to(gates_ptr.dtype.element_ty),
                     mask=row_ok)

    @triton.jit
    def _two_slots(x, scores, p, cols, col_ok, rows, row_ok, cheap_ptr, drop_ptr, experts_ptr, gates_ptr, mask_ptr,
                   BLOCK_N: tl.constexpr, BLOCK_E: tl.constexpr, MODE: tl.constexpr, DROP: tl.constexpr,
                   ROUND: tl.constexpr):
        """The static top-1, then (MODE 1, the energy-aware router) the better by the adapted scores of
        the static second choice and the best cheap expert, or (MODE 2, static-cheap) the best cheap
        expert; with DROP the rule −log(1 − w) < d[e] drops slot 2."""
        first = _argmax_low(x, cols, BLOCK_E)
        not_first = cols[None, :] != first[:, None]
        second = _argmax_low(tl.where(not_first, x, float("-inf")), cols, BLOCK_E)
        cheap = tl.load(cheap_ptr + cols, mask=col_ok, other=float("-inf"))
        best_cheap = _argmax_low(tl.where(not_first, x + cheap[None, :], float("-inf")), cols, BLOCK_E)
        s_second = _pick(scores, cols, second)
        s_cheap = _pick(scores, cols, best_cheap)
        tie = tl.minimum(second, best_cheap)
        rest = tl.where(s_cheap > s_second, best_cheap, tl.where(s_cheap == s_second, tie, second))
        if MODE == 2:
            rest = best_cheap
        q0 = _pick(p, cols, first)
        q1 = _pick(p, cols, rest)
        keep = tl.full([BLOCK_N], 1, tl.int1)
        if DROP:
            share = tl.minimum(q1 / tl.maximum(q0 + q1, 1e-30), 1.0 - 1e-7)
            # −log1p(−w): the series below 1e-4 (fp32-exact there), the log above
            cost = tl.where(share < 1e-4, share + 0.5 * share * share + share * share * share / 3.0,
                            -tl.log(1.0 - share))
            keep = cost >= tl.load(drop_ptr + rest, mask=row_ok, other=0.0)
        g0 = _rounded(q0, ROUND)
        g1 = tl.where(keep, _rounded(q1, ROUND), 0.0)
        total = tl.maximum(_rounded(g0 + g1, ROUND), 1.1754943508222875e-38)
        tl.store(experts_ptr + rows * 2, first.to(tl.int64), mask=row_ok)
        tl.store(experts_ptr + rows * 2 + 1, rest.to(tl.int64), mask=row_ok)
        tl.store(gates_ptr + rows * 2, _rounded(g0 / total, ROUND).to(gates_ptr.dtype.element_ty), mask=row_ok)
        tl.store(gates_ptr + rows * 2 + 1, _rounded(g1 / total, ROUND).to(gates_ptr.dtype.element_ty), mask=row_ok)
        tl.store(mask_ptr + rows * 2, tl.full([BLOCK_N], 1, tl.uint8), mask=row_ok)
        tl.store(mask_ptr + rows * 2 + 1, keep.to(tl.uint8), mask=row_ok)
