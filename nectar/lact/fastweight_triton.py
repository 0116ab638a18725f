"""LaCT Algorithm 1 with its element-wise work fused into matmuls (Triton): forward only, CUDA only.

The torch kernel (`nectar.lact.fastweight`) writes every intermediate of a chunk to memory: the
[L, 2H] gate|up product, then the SwiGLU (backward) element-wise passes read it back. Here two
Triton kernels compute those products tile by tile in registers (bf16/fp16 operands, fp32
accumulators) and apply the element-wise work in their epilogue, so that only what a later matmul
needs is written:

  apply   hidden = silu(x W0ᵀ) ⊙ (x W2ᵀ)        [B, L, H]   (`_swiglu_hidden_kernel`)
          out    = hidden W1ᵀ                     cuBLAS bmm
  update  from g = k W0ᵀ, u = k W2ᵀ, d = v W1 (three fp32 accumulators of one tile):
          dgu    = [lr0·d⊙u⊙silu′(g) | lr2·d⊙silu(g)]  [B, L, 2H]
          hid    = lr1·silu(g)⊙u                        [B, L, H]   (`_swiglu_update_kernel`)
          dW02   = dguᵀ k,  dW1 = vᵀ hid                 cuBLAS bmm (fp32 accumulation)
  step    W ← (W + dW) / (‖W + dW‖_row + eps) · target, one pass per weight (`_add_renorm_kernel`)

The FLOPs are those of the torch kernel (6 matmuls per chunk, 18·B·D·H·L); the memory traffic of
the element-wise passes is gone, and the epilogue computes in fp32 instead of rounding every
element-wise step to bf16. lr1 is folded into hid instead of v (Σ_i lr1_i v_i hid_iᵀ either way).

Tiling (`_HIDDEN_CONFIGS`, `_UPDATE_CONFIGS`, autotuned per shape): at D = 512 a tile's K loop is
8 steps, so its fixed costs (filling the operand pipeline, the sigmoid epilogue) are hidden either
by persistent programs, one per SM, whose tile loop is flattened into the K loop (the next tile's
loads overlap this tile's epilogue), or by two or three smaller programs per SM (one program's
epilogue overlaps another's matmuls); the lists also keep one-program-per-tile configs. A config
that fails to build on some Triton version is skipped, not fatal.

`swiglu_fast_weight(..., backend="triton")` runs the whole stream with these pieces (momentum
and Muon stay in torch: they act on the small [B, rows, cols] deltas). No autograd: inputs that
require grad are refused. `supported(...)` says whether a call can take this path;
`backend="auto"` falls back to torch where not.

Correctness on a CPU: with TRITON_INTERPRET=1 (set before this module is imported) the kernels
run in Triton's interpreter, on CPU tensors; its bf16 `tl.dot` is wrong (it multiplies the raw
bits), so there the operand tiles are upcast to fp32 before `tl.dot` (the `INTERPRETED` switch, off
on a GPU), which is what the tensor cores compute (bf16 products, fp32 sums).
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch

try:  # Triton comes with CUDA builds of torch; a CPU machine usually has none
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None

from nectar.lact.muon import WEIGHT_NORM_EPS, momentum_steps

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
DTYPES = (torch.bfloat16, torch.float16)  # tl.dot operands; fp32 would silently run as tf32


def available(device: torch.device | str | None = None) -> bool:
    """Triton importable and able to run on `device`: CUDA, or a CPU under TRITON_INTERPRET=1."""
    if triton is None:
        return False
    if device is None:
        return torch.cuda.is_available() or INTERPRET
    device = torch.device(device)
    return device.type == "cuda" or (INTERPRET and device.type == "cpu")


def unsupported_reason(*tensors: torch.Tensor) -> str | None:
    """Why these kernel inputs cannot take the Triton path (None: they can)."""
    if triton is None:
        return "Triton is not installed"
    first = tensors[0]
    if not available(first.device):
        return f"Triton cannot run on {first.device} (CUDA, or CPU with TRITON_INTERPRET=1)"
    if first.dtype not in DTYPES:
        return f"the Triton path computes in bf16/fp16, not {first.dtype}"
    for t in tensors:
        if t.device != first.device:
            return "all tensors must be on one device"
        if torch.is_grad_enabled() and t.requires_grad:
            return "the Triton path has no backward (run it under torch.no_grad() or use backend='torch')"
    return None


def supported(*tensors: torch.Tensor) -> bool:
    return unsupported_reason(*tensors) is None


def require(*tensors: torch.Tensor) -> None:
    reason = unsupported_reason(*tensors)
    if reason is not None:
        raise RuntimeError(f"backend='triton' unavailable: {reason}")


if triton is not None:

    def _configs(shapes):
        """Autotune configs: (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, PER_SM[, maxnreg]).
        PER_SM = 0: one program per tile; PER_SM = p > 0: persistent, p programs per SM looping over
        the tiles (the config's registers and shared memory must let p programs share an SM)."""
        return [triton.Config({"BLOCK_M": c[0], "BLOCK_N": c[1], "BLOCK_K": c[2], "PER_SM": c[5]}, num_warps=c[3],
                              num_stages=c[4], maxnreg=c[6] if len(c) > 6 else None) for c in shapes]

    # With D = 512 a tile's K loop is only 8 steps of 64, so a tile's fixed costs weigh: filling the
    # operand pipeline, and the element-wise epilogue (sigmoid: two MUFU ops an element, 16 a clock
    # on an SM; a quarter of the tile's tensor-core time for the hidden kernel's 128x128 tile). Two
    # ways to hide them, both in the lists: one large tile per SM, persistent, the tile loop flattened
    # into the K loop (the next tile's loads overlap this tile's epilogue); or smaller tiles, two or
    # three programs per SM (one program's epilogue overlaps another's matmuls), at less operand
    # reuse per byte loaded. The first four configs of each list are the earlier one-program-per-tile
    # list, kept so that tuning cannot do worse than it did. The notes: registers a thread, shared
    # memory a program (ptxas for sm_90a, bf16, D = 512; an SM has 64 Ki registers and 227 KiB).
    # Two fp32 accumulators [BLOCK_M, BLOCK_N]: 128x128 on 8 warps = 128 registers a thread for them.
    _HIDDEN_CONFIGS = _configs([
        (128, 128, 64, 8, 3, 0),  # 176 registers, 144 KiB
        (128, 128, 64, 8, 4, 0),  # 176, 192 KiB
        (128, 64, 64, 4, 4, 0),  # 255, 128 KiB
        (64, 128, 64, 4, 4, 0),  # 255, 160 KiB
        (128, 128, 64, 8, 3, 1),  # 253, 176 KiB: persistent, one per SM
        (128, 128, 64, 8, 4, 1),  # 252, 224 KiB
        (128, 64, 64, 4, 3, 2),  # 254 x 128 threads, 104 KiB: two per SM
        (128, 64, 32, 4, 4, 3, 168),  # 168 (capped, no spills), 72 KiB: three per SM
    ])
    # Three fp32 accumulators: 128x64 on 8 warps = 96 registers a thread for them; with dk = dv a
    # pipeline stage holds k, v [BM, BK] and W0, W2, W1 [BK, BN] tiles (128x64x64: 56 KiB). A larger
    # tile needs 16 warps (at most 128 registers a thread: it spills a little).
    _UPDATE_CONFIGS = _configs([
        (128, 64, 64, 8, 3, 0),  # 182 registers, 168 KiB
        (128, 64, 32, 8, 4, 0),  # 172, 112 KiB
        (64, 64, 64, 4, 4, 0),  # 168, 160 KiB
        (64, 128, 64, 8, 3, 0),  # 170, 192 KiB
        (128, 64, 64, 8, 3, 1),  # 234, 184 KiB: persistent, one per SM
        (128, 64, 32, 8, 5, 1),  # 175, 156 KiB
        (64, 64, 64, 4, 2, 2),  # 237 x 128 threads, 88 KiB: two per SM
        (64, 64, 32, 4, 3, 3, 168),  # 168 (capped, 4 bytes spilled), 68 KiB: three per SM
        (128, 128, 32, 16, 3, 0),  # 128 (108 bytes spilled), 120 KiB: 1.4x the operand reuse of 128x64
    ])
    # the interpreter: small tiles (tests cross tile edges), a few persistent programs (each loops
    # over several tiles, across heads); tests may set PER_SM = 0 here
    _INTERPRET_META = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "PER_SM": 1}
    _INTERPRET_SMS = 3

    class _SkipFailingConfigs(triton.runtime.autotuner.Autotuner):
        """An autotuner that times a config which fails to build or launch as never fastest (Triton's
        own skips only out-of-resources and ptxas errors; a compiler pass that refuses one of these
        configs on another Triton version must not stop the run)."""

        def _bench(self, *args, config, **meta):
            try:
                return super()._bench(*args, config=config, **meta)
            except Exception as exc:  # noqa: BLE001 - reported, then skipped
                warnings.warn(f"Triton config {config} skipped: {type(exc).__name__}: {exc}", stacklevel=2)
                return [float("inf")] * 3

    # tiles that divide the shapes need no masks (the usual case: L, H, D multiples of 128)
    _EVEN_MN = {
        "EVEN_M": lambda a: a["M"] % a["BLOCK_M"] == 0,
        "EVEN_N": lambda a: a["H"] % a["BLOCK_N"] == 0,
    }
    _EVEN_HIDDEN = {**_EVEN_MN, "EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0}
    _EVEN_UPDATE = {**_EVEN_MN, "EVEN_K": lambda a: a["DK"] % a["BLOCK_K"] == 0 and a["DV"] % a["BLOCK_K"] == 0,
                    "SAME_K": lambda a: a["DK"] == a["DV"]}

    @triton.jit
    def _tile_offsets(tile, M, H, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, EVEN_M: tl.constexpr,
                      EVEN_N: tl.constexpr):
        """Head, row and column offsets of linear tile `tile` (head slowest, then row tiles, column tiles
        fastest: one row tile of x is reused by consecutive tiles). Out-of-range rows/columns wrap
        (loads stay in bounds, stores are masked)."""
        num_n = tl.cdiv(H, BLOCK_N)
        per_head = tl.cdiv(M, BLOCK_M) * num_n
        b = tile // per_head
        rest = tile - b * per_head
        pid_m = rest // num_n
        pid_n = rest - pid_m * num_n
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = offs_m  # unwrapped, for the stores
        cols = offs_n
        if not EVEN_M:
            offs_m = offs_m % M
        if not EVEN_N:
            offs_n = offs_n % H
        return b.to(tl.int64), offs_m, offs_n, rows, cols

    @triton.jit
    def _round_bf16(value):
        """fp32 -> bf16 rounding to nearest even on the bits (finite values). Only for the interpreter,
        whose own conversion truncates (or loses the carry); a GPU's store rounds to nearest even."""
        bits = value.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)

    @triton.jit
    def _store(ptrs, value, rows, cols, M, H, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
               ROUND_BF16: tl.constexpr):
        """Store the fp32 tile `value` (tl.store converts to the pointees' dtype), masked where tiles overhang."""
        if ROUND_BF16:
            value = _round_bf16(value)
        if EVEN_M & EVEN_N:
            tl.store(ptrs, value)
        else:
            tl.store(ptrs, value, mask=(rows[:, None] < M) & (cols[None, :] < H))

    @triton.jit
    def _gate_up(x_ptr, w_ptr, offs_m, offs_n, H, K, sxm, sxk, swr, swc, acc_g, acc_u,
                 BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, INTERPRETED: tl.constexpr):
        """acc_g += x[offs_m] W0[offs_n]ᵀ, acc_u += x[offs_m] W2[offs_n]ᵀ over K (W02 = [W0; W2] rows)."""
        offs_k = tl.arange(0, BLOCK_K)
        x_ptrs = x_ptr + offs_m[:, None] * sxm + offs_k[None, :] * sxk  # [BM, BK]
        w0_ptrs = w_ptr + offs_n[None, :] * swr + offs_k[:, None] * swc  # [BK, BN] = W0ᵀ tile
        w2_ptrs = w0_ptrs + H * swr
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(x_ptrs)
                w0 = tl.load(w0_ptrs)
                w2 = tl.load(w2_ptrs)
            else:
                k_ok = offs_k < K - k0
                x = tl.load(x_ptrs, mask=k_ok[None, :], other=0.0)
                w0 = tl.load(w0_ptrs, mask=k_ok[:, None], other=0.0)
                w2 = tl.load(w2_ptrs, mask=k_ok[:, None], other=0.0)
            if INTERPRETED:
                x = x.to(tl.float32)
                w0 = w0.to(tl.float32)
                w2 = w2.to(tl.float32)
            acc_g = tl.dot(x, w0, acc_g)
            acc_u = tl.dot(x, w2, acc_u)
            x_ptrs += BLOCK_K * sxk
            w0_ptrs += BLOCK_K * swc
            w2_ptrs += BLOCK_K * swc
        return acc_g, acc_u

    @triton.jit
    def _down(v_ptr, w1_ptr, offs_m, offs_n, K, svm, svk, s1r, s1c, acc_d,
              BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, INTERPRETED: tl.constexpr):
        """acc_d += v[offs_m] W1[:, offs_n] over K = dv (W1 [dv, H]: its tile is [BK, BN] as stored)."""
        offs_k = tl.arange(0, BLOCK_K)
        v_ptrs = v_ptr + offs_m[:, None] * svm + offs_k[None, :] * svk
        w1_ptrs = w1_ptr + offs_k[:, None] * s1r + offs_n[None, :] * s1c
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                v = tl.load(v_ptrs)
                w1 = tl.load(w1_ptrs)
            else:
                k_ok = offs_k < K - k0
                v = tl.load(v_ptrs, mask=k_ok[None, :], other=0.0)
                w1 = tl.load(w1_ptrs, mask=k_ok[:, None], other=0.0)
            if INTERPRETED:
                v = v.to(tl.float32)
                w1 = w1.to(tl.float32)
            acc_d = tl.dot(v, w1, acc_d)
            v_ptrs += BLOCK_K * svk
            w1_ptrs += BLOCK_K * s1r
        return acc_d

    @triton.jit
    def _gate_up_down(k_ptr, v_ptr, w_ptr, w1_ptr, offs_m, offs_n, H, K, skm, skk, svm, svk, swr, swc, s1r, s1c,
                      acc_g, acc_u, acc_d, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
                      INTERPRETED: tl.constexpr):
        """`_gate_up` and `_down` in one loop over K = dk = dv."""
        offs_k = tl.arange(0, BLOCK_K)
        k_ptrs = k_ptr + offs_m[:, None] * skm + offs_k[None, :] * skk  # [BM, BK]
        w0_ptrs = w_ptr + offs_n[None, :] * swr + offs_k[:, None] * swc  # [BK, BN] = W0ᵀ tile
        w2_ptrs = w0_ptrs + H * swr
        v_ptrs = v_ptr + offs_m[:, None] * svm + offs_k[None, :] * svk  # [BM, BK]
        w1_ptrs = w1_ptr + offs_k[:, None] * s1r + offs_n[None, :] * s1c  # [BK, BN]
        for k0 in range(0, K, BLOCK_K):
            if EVEN_K:
                x = tl.load(k_ptrs)
                w0 = tl.load(w0_ptrs)
                w2 = tl.load(w2_ptrs)
                v = tl.load(v_ptrs)
                w1 = tl.load(w1_ptrs)
            else:
                k_ok = offs_k < K - k0
                x = tl.load(k_ptrs, mask=k_ok[None, :], other=0.0)
                w0 = tl.load(w0_ptrs, mask=k_ok[:, None], other=0.0)
                w2 = tl.load(w2_ptrs, mask=k_ok[:, None], other=0.0)
                v = tl.load(v_ptrs, mask=k_ok[None, :], other=0.0)
                w1 = tl.load(w1_ptrs, mask=k_ok[:, None], other=0.0)
            if INTERPRETED:
                x = x.to(tl.float32)
                w0 = w0.to(tl.float32)
                w2 = w2.to(tl.float32)
                v = v.to(tl.float32)
                w1 = w1.to(tl.float32)
            acc_g = tl.dot(x, w0, acc_g)
            acc_u = tl.dot(x, w2, acc_u)
            acc_d = tl.dot(v, w1, acc_d)
            k_ptrs += BLOCK_K * skk
            w0_ptrs += BLOCK_K * swc
            w2_ptrs += BLOCK_K * swc
            v_ptrs += BLOCK_K * svk
            w1_ptrs += BLOCK_K * s1r
        return acc_g, acc_u, acc_d

    @triton.jit
    def _hidden_tile(tile, tile_out, step, x_ptr, w_ptr, h_ptr, M, H, K, sxb, sxm, sxk, swb, swr, swc, shb, shm,
                     shn, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_M: tl.constexpr,
                     EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, INTERPRETED: tl.constexpr,
                     ROUND_BF16: tl.constexpr):
        """One tile of `_swiglu_hidden_body`: operands of tile `tile`, stored at tile `tile_out + step`
        (the same tile: the epilogue's own counter, as in Triton's persistent-matmul tutorial, so that
        no value is shared between the prologue and the epilogue of a flattened loop); returns it."""
        b, offs_m, offs_n, _, _ = _tile_offsets(tile, M, H, BLOCK_M, BLOCK_N, EVEN_M, EVEN_N)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_g, acc_u = _gate_up(x_ptr + b * sxb, w_ptr + b * swb, offs_m, offs_n, H, K, sxm, sxk, swr, swc,
                                acc_g, acc_u, BLOCK_K, EVEN_K, INTERPRETED)
        tile_out += step
        b_out, _, _, rows, cols = _tile_offsets(tile_out, M, H, BLOCK_M, BLOCK_N, EVEN_M, EVEN_N)
        hidden = acc_g * tl.sigmoid(acc_g) * acc_u
        h_ptrs = h_ptr + b_out * shb + rows[:, None] * shm + cols[None, :] * shn
        _store(h_ptrs, hidden, rows, cols, M, H, EVEN_M, EVEN_N, ROUND_BF16)
        return tile_out

    @triton.jit
    def _swiglu_hidden_body(x_ptr, w_ptr, h_ptr, B, M, H, K, sxb, sxm, sxk, swb, swr, swc, shb, shm, shn,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            PER_SM: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                            EVEN_K: tl.constexpr, INTERPRETED: tl.constexpr, ROUND_BF16: tl.constexpr):
        """hidden[b] = silu(x[b] W0[b]ᵀ) ⊙ (x[b] W2[b]ᵀ): x [B, M, K], w = W02 [B, 2H, K], h [B, M, H].
        Tiles are numbered head-major (`_tile_offsets`). PER_SM = 0: program i computes tile i.
        PER_SM > 0 (persistent, a few programs per SM): program i computes tiles i, i + programs, …,
        the tile loop flattened with the K loop, so that the next tile's operand loads are issued
        while this tile's epilogue runs."""
        start = tl.program_id(0)
        step = tl.num_programs(0)
        if PER_SM == 0:
            _hidden_tile(start, start - step, step, x_ptr, w_ptr, h_ptr, M, H, K, sxb, sxm, sxk, swb, swr, swc,
                         shb, shm, shn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_M, EVEN_N, EVEN_K, INTERPRETED, ROUND_BF16)
        else:
            num_tiles = B * tl.cdiv(M, BLOCK_M) * tl.cdiv(H, BLOCK_N)
            tile_out = start - step
            for tile in tl.range(start, num_tiles, step, flatten=True):
                tile_out = _hidden_tile(tile, tile_out, step, x_ptr, w_ptr, h_ptr, M, H, K, sxb, sxm, sxk, swb,
                                        swr, swc, shb, shm, shn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_M, EVEN_N,
                                        EVEN_K, INTERPRETED, ROUND_BF16)

    @triton.jit
    def _update_tile(tile, tile_out, step, k_ptr, v_ptr, w02_ptr, w1_ptr, lr0_ptr, lr1_ptr, lr2_ptr, dgu_ptr,
                     hid_ptr, M, H, DK, DV, skb, skm, skk, svb, svm, svk, swb, swr, swc, s1b, s1r, s1c,
                     slb0, slm0, slb1, slm1, slb2, slm2, sdb, sdm, sdn, shb, shm, shn,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_M: tl.constexpr,
                     EVEN_N: tl.constexpr, EVEN_K: tl.constexpr, SAME_K: tl.constexpr, INTERPRETED: tl.constexpr,
                     ROUND_BF16: tl.constexpr):
        """One tile of `_swiglu_update_body` (tile numbering and counters as in `_hidden_tile`)."""
        b, offs_m, offs_n, _, _ = _tile_offsets(tile, M, H, BLOCK_M, BLOCK_N, EVEN_M, EVEN_N)
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_d = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if SAME_K:  # dk == dv: one loop, three products per step (one software pipeline)
            acc_g, acc_u, acc_d = _gate_up_down(k_ptr + b * skb, v_ptr + b * svb, w02_ptr + b * swb,
                                                w1_ptr + b * s1b, offs_m, offs_n, H, DK, skm, skk, svm, svk,
                                                swr, swc, s1r, s1c, acc_g, acc_u, acc_d, BLOCK_K, EVEN_K,
                                                INTERPRETED)
        else:
            acc_g, acc_u = _gate_up(k_ptr + b * skb, w02_ptr + b * swb, offs_m, offs_n, H, DK, skm, skk,
                                    swr, swc, acc_g, acc_u, BLOCK_K, EVEN_K, INTERPRETED)
            acc_d = _down(v_ptr + b * svb, w1_ptr + b * s1b, offs_m, offs_n, DV, svm, svk, s1r, s1c, acc_d,
                          BLOCK_K, EVEN_K, INTERPRETED)
        tile_out += step
        b_out, offs_out, _, rows, cols = _tile_offsets(tile_out, M, H, BLOCK_M, BLOCK_N, EVEN_M, EVEN_N)
        lr0 = tl.load(lr0_ptr + b_out * slb0 + offs_out * slm0).to(tl.float32)[:, None]  # [BM, 1]
        lr1 = tl.load(lr1_ptr + b_out * slb1 + offs_out * slm1).to(tl.float32)[:, None]
        lr2 = tl.load(lr2_ptr + b_out * slb2 + offs_out * slm2).to(tl.float32)[:, None]
        sigma = tl.sigmoid(acc_g)
        gate_act = acc_g * sigma  # silu(g)
        hid = gate_act * acc_u * lr1  # lr1 · silu(g) ⊙ u
        dup = acc_d * gate_act * lr2  # lr2 · d ⊙ silu(g)
        dgate = acc_d * acc_u * (sigma + gate_act * (1.0 - sigma)) * lr0  # lr0 · d ⊙ u ⊙ silu′(g)
        d_ptrs = dgu_ptr + b_out * sdb + rows[:, None] * sdm + cols[None, :] * sdn
        h_ptrs = hid_ptr + b_out * shb + rows[:, None] * shm + cols[None, :] * shn
        _store(h_ptrs, hid, rows, cols, M, H, EVEN_M, EVEN_N, ROUND_BF16)
        _store(d_ptrs + H * sdn, dup, rows, cols, M, H, EVEN_M, EVEN_N, ROUND_BF16)
        _store(d_ptrs, dgate, rows, cols, M, H, EVEN_M, EVEN_N, ROUND_BF16)
        return tile_out

    @triton.jit
    def _swiglu_update_body(k_ptr, v_ptr, w02_ptr, w1_ptr, lr0_ptr, lr1_ptr, lr2_ptr, dgu_ptr, hid_ptr,
                            B, M, H, DK, DV, skb, skm, skk, svb, svm, svk, swb, swr, swc, s1b, s1r, s1c,
                            slb0, slm0, slb1, slm1, slb2, slm2, sdb, sdm, sdn, shb, shm, shn,
                            BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                            PER_SM: tl.constexpr, EVEN_M: tl.constexpr, EVEN_N: tl.constexpr,
                            EVEN_K: tl.constexpr, SAME_K: tl.constexpr, INTERPRETED: tl.constexpr,
                            ROUND_BF16: tl.constexpr):
        """The chunk update's element-wise part, from g = k W0ᵀ, u = k W2ᵀ, d = v W1:
        dgu[:, n] = lr0·d·u·silu′(g), dgu[:, H + n] = lr2·d·silu(g), hid[:, n] = lr1·silu(g)·u.
        Programs and tiles as in `_swiglu_hidden_body`."""
        start = tl.program_id(0)
        step = tl.num_programs(0)
        if PER_SM == 0:
            _update_tile(start, start - step, step, k_ptr, v_ptr, w02_ptr, w1_ptr, lr0_ptr, lr1_ptr, lr2_ptr,
                         dgu_ptr, hid_ptr, M, H, DK, DV, skb, skm, skk, svb, svm, svk, swb, swr, swc, s1b, s1r,
                         s1c, slb0, slm0, slb1, slm1, slb2, slm2, sdb, sdm, sdn, shb, shm, shn, BLOCK_M, BLOCK_N,
                         BLOCK_K, EVEN_M, EVEN_N, EVEN_K, SAME_K, INTERPRETED, ROUND_BF16)
        else:
            num_tiles = B * tl.cdiv(M, BLOCK_M) * tl.cdiv(H, BLOCK_N)
            tile_out = start - step
            for tile in tl.range(start, num_tiles, step, flatten=True):
                tile_out = _update_tile(tile, tile_out, step, k_ptr, v_ptr, w02_ptr, w1_ptr, lr0_ptr, lr1_ptr,
                                        lr2_ptr, dgu_ptr, hid_ptr, M, H, DK, DV, skb, skm, skk, svb, svm, svk,
                                        swb, swr, swc, s1b, s1r, s1c, slb0, slm0, slb1, slm1, slb2, slm2, sdb,
                                        sdm, sdn, shb, shm, shn, BLOCK_M, BLOCK_N, BLOCK_K, EVEN_M, EVEN_N,
                                        EVEN_K, SAME_K, INTERPRETED, ROUND_BF16)

    @triton.jit
    def _add_renorm_kernel(w_ptr, d_ptr, t_ptr, o_ptr, C, sw, sd, so, eps, NORMALISE: tl.constexpr,
                           BLOCK_C: tl.constexpr, ROUND_BF16: tl.constexpr):
        """One row r of the step: o = w + d, then (NORMALISE) o / (‖o‖ + eps) · target[r]; fp32 inside.
        w, d, o are [R, C] views with row strides sw, sd, so (unit column stride); t is [R]."""
        r = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_C)
        ok = cols < C
        w = tl.load(w_ptr + r * sw + cols, mask=ok, other=0.0).to(tl.float32)
        d = tl.load(d_ptr + r * sd + cols, mask=ok, other=0.0).to(tl.float32)
        o = w + d
        if NORMALISE:
            norm = tl.sqrt(tl.sum(o * o, axis=0))
            o = o / (norm + eps) * tl.load(t_ptr + r).to(tl.float32)
        if ROUND_BF16:
            o = _round_bf16(o)
        tl.store(o_ptr + r * so + cols, o, mask=ok)

    _swiglu_hidden_jit = triton.heuristics(_EVEN_HIDDEN)(_swiglu_hidden_body)
    _swiglu_update_jit = triton.heuristics(_EVEN_UPDATE)(_swiglu_update_body)
    def _autotune(configs, key, fn):
        tuned = triton.autotune(configs, key=key)(fn)
        tuned.__class__ = _SkipFailingConfigs  # same state, one method overridden (constructors vary by version)
        return tuned

    _swiglu_hidden_tuned = _autotune(_HIDDEN_CONFIGS, ["B", "M", "H", "K"], _swiglu_hidden_jit)
    _swiglu_update_tuned = _autotune(_UPDATE_CONFIGS, ["B", "M", "H", "DK", "DV"], _swiglu_update_jit)


_SMS: dict = {}


def _programs(tiles: int, per_sm: int, device: torch.device) -> int:
    """Grid size: one program per tile (per_sm = 0), else per_sm programs per SM (at most one a tile)."""
    if per_sm == 0:
        return tiles
    if device.type != "cuda":
        sms = _INTERPRET_SMS
    else:
        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in _SMS:
            _SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
        sms = _SMS[index]
    return max(1, min(tiles, per_sm * sms))


def tuned_configs() -> dict[str, dict[str, str]]:
    """The configs the autotuner chose so far: {"hidden"|"update": {tuning key: config}} (for reports)."""
    if triton is None or INTERPRET:
        return {}
    return {name: {str(key): str(config) for key, config in getattr(tuned, "cache", {}).items()}
            for name, tuned in (("hidden", _swiglu_hidden_tuned), ("update", _swiglu_update_tuned))}


def _launch(tuned, plain, grid, *args, dtype, config=None):
    """Autotuned launch on a GPU (or the given `config`, for tests); a fixed small tiling in the
    interpreter (it cannot time configs). grid(meta) -> the grid for that config's meta-parameters."""
    if INTERPRET:
        meta = dict(_INTERPRET_META)
        plain[grid(meta)](*args, **meta, INTERPRETED=True, ROUND_BF16=dtype == torch.bfloat16)
    elif config is not None:
        plain[grid(config.kwargs)](*args, **config.all_kwargs(), INTERPRETED=False, ROUND_BF16=False)
    else:
        tuned[grid](*args, INTERPRETED=False, ROUND_BF16=False)


def _check_matrices(x: torch.Tensor, w02: torch.Tensor) -> tuple[int, int, int, int]:
    if x.ndim != 3 or w02.ndim != 3 or w02.shape[0] != x.shape[0] or w02.shape[2] != x.shape[2] or w02.shape[1] % 2:
        raise ValueError(f"expected x [B, L, dk] and w02 [B, 2H, dk]; got {tuple(x.shape)}, {tuple(w02.shape)}")
    batch, length, dk = x.shape
    return batch, length, dk, w02.shape[1] // 2


def swiglu_hidden(x: torch.Tensor, w02: torch.Tensor, *, config=None) -> torch.Tensor:
    """silu(x W0ᵀ) ⊙ (x W2ᵀ) with W02 = [W0; W2]: x [B, L, dk], w02 [B, 2H, dk] -> [B, L, H].
    config: one of `_HIDDEN_CONFIGS` instead of the autotuned one (tests; ignored by the interpreter)."""
    require(x, w02)
    batch, length, dk, hidden = _check_matrices(x, w02)
    out = torch.empty(batch, length, hidden, device=x.device, dtype=x.dtype)
    if out.numel() == 0:
        return out

    def grid(meta):
        tiles = batch * triton.cdiv(length, meta["BLOCK_M"]) * triton.cdiv(hidden, meta["BLOCK_N"])
        return (_programs(tiles, meta["PER_SM"], x.device),)

    with torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
        _launch(_swiglu_hidden_tuned, _swiglu_hidden_jit, grid, x, w02, out, batch, length, hidden, dk,
                *x.stride(), *w02.stride(), *out.stride(), dtype=x.dtype, config=config)
    return out


def swiglu_apply_fused(x: torch.Tensor, w02: torch.Tensor, w1: torch.Tensor) -> torch.Tensor:
    """`nectar.lact.fastweight.swiglu_apply_fused` on this path: x [B, L, dk] -> [B, L, dv]."""
    return torch.bmm(swiglu_hidden(x, w02), w1.transpose(1, 2))


def swiglu_update_operands(k, v, w02, w1, lr0, lr1, lr2, *, config=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The fused update kernel alone: (dgu [B, l, 2H], hid [B, l, H]) with dW02 = dguᵀ k, dW1 = vᵀ hid.
    config: one of `_UPDATE_CONFIGS` instead of the autotuned one (tests; ignored by the interpreter)."""
    require(k, v, w02, w1, lr0, lr1, lr2)
    batch, length, dk, hidden = _check_matrices(k, w02)
    dv = v.shape[2]
    if v.shape[:2] != k.shape[:2] or tuple(w1.shape) != (batch, dv, hidden):
        raise ValueError(f"expected v [B, l, dv] and w1 [B, dv, H]; got {tuple(v.shape)}, {tuple(w1.shape)}")
    for lr in (lr0, lr1, lr2):
        if tuple(lr.shape) != (batch, length, 1):
            raise ValueError(f"learning rates must be [B, l, 1] = {(batch, length, 1)}, got {tuple(lr.shape)}")
    dgu = torch.empty(batch, length, 2 * hidden, device=k.device, dtype=k.dtype)
    hid = torch.empty(batch, length, hidden, device=k.device, dtype=k.dtype)
    if length == 0:
        return dgu, hid

    def grid(meta):
        tiles = batch * triton.cdiv(length, meta["BLOCK_M"]) * triton.cdiv(hidden, meta["BLOCK_N"])
        return (_programs(tiles, meta["PER_SM"], k.device),)

    with torch.cuda.device(k.device) if k.is_cuda else contextlib.nullcontext():
        _launch(_swiglu_update_tuned, _swiglu_update_jit, grid, k, v, w02, w1, lr0, lr1, lr2, dgu, hid,
                batch, length, hidden, dk, dv, *k.stride(), *v.stride(), *w02.stride(), *w1.stride(),
                lr0.stride(0), lr0.stride(1), lr1.stride(0), lr1.stride(1), lr2.stride(0), lr2.stride(1),
                *dgu.stride(), *hid.stride(), dtype=k.dtype, config=config)
    return dgu, hid


def swiglu_chunk_update_fused(k, v, w02, w1, lr0, lr1, lr2) -> tuple[torch.Tensor, torch.Tensor]:
    """`nectar.lact.fastweight.swiglu_chunk_update_fused` on this path: (dW02 [B, 2H, dk], dW1 [B, dv, H])."""
    dgu, hid = swiglu_update_operands(k, v, w02, w1, lr0, lr1, lr2)
    return torch.bmm(dgu.transpose(1, 2), k), torch.bmm(v.transpose(1, 2), hid)


def add_renormalize_rows(w: torch.Tensor, delta: torch.Tensor, target_norms: torch.Tensor | None,
                         eps: float = WEIGHT_NORM_EPS) -> torch.Tensor:
    """`renormalize_rows(w + delta, target_norms)` (or w + delta when target_norms is None) in one pass:
    w, delta [..., r, c]; target_norms [..., r, 1]."""
    require(w, delta)
    if w.shape != delta.shape or w.ndim < 2:
        raise ValueError(f"w and delta must be matrices of one shape, got {tuple(w.shape)}, {tuple(delta.shape)}")
    cols = w.shape[-1]
    w2d, d2d = w.reshape(-1, cols), delta.reshape(-1, cols)  # views for the contiguous layouts used here
    if w2d.stride(1) != 1 or d2d.stride(1) != 1:
        w2d, d2d = w2d.contiguous(), d2d.contiguous()
    out = torch.empty(w.shape, device=w.device, dtype=w.dtype)
    o2d = out.view(-1, cols)
    rows = o2d.shape[0]
    if rows == 0 or cols == 0:
        return out
    if target_norms is None:
        targets = o2d  # unread (NORMALISE off)
    else:
        targets = target_norms.reshape(rows).contiguous()
    block = triton.next_power_of_2(cols)
    with torch.cuda.device(w.device) if w.is_cuda else contextlib.nullcontext():
        _add_renorm_kernel[(rows,)](w2d, d2d, targets, o2d, cols, w2d.stride(0), d2d.stride(0), o2d.stride(0),
                                    eps, NORMALISE=target_norms is not None, BLOCK_C=block,
                                    ROUND_BF16=INTERPRET and w.dtype == torch.bfloat16,
                                    num_warps=4 if block <= 2048 else 8)
    return out


def fast_weight_step(weights, deltas, previous_deltas=None, momentum_gate=None, use_muon=False, target_norms=None,
                     scale=1.0, row_blocks=None):
    """`nectar.lact.fastweight.fast_weight_step` with W + scale·step and weight norm in one pass per
    weight (`add_renormalize_rows`, fp32 inside); momentum and Muon as there (torch)."""
    if len(weights) != len(deltas):
        raise ValueError(f"got {len(weights)} weights but {len(deltas)} deltas")
    steps, accumulated = momentum_steps(deltas, previous_deltas, momentum_gate, use_muon, scale, row_blocks)
    new_weights = [add_renormalize_rows(w, step, None if target_norms is None else target_norms[index])
                   for index, (w, step) in enumerate(zip(weights, steps))]
    return tuple(new_weights), accumulated
