"""Next-token negative log-likelihood of a chunk's logits per sequence, computed in fp32.

`nll_rows(logits [B, T, V], ids [B, T])` [B] = Σ_{t < T-1} −log softmax(logits[b, t])[ids[b, t+1]];
`nll_sum` is its total.

- fp32 / fp64 logits (the CPU model): `F.cross_entropy` on the shifted logits, as always.
- bf16 / fp16 logits on CUDA: a fused Triton kernel reads each row of logits once, keeps the
  running max and the sum of exponentials in fp32 and writes one number per row, instead of
  materialising fp32 logits and fp32 log-probabilities (at 64K tokens × 8K vocabulary that is
  ~10 GB of memory traffic, ~10 % of a DistilGPT2-MoE forward). It is checked once against the
  eager computation on a small input; if Triton is missing, fails or disagrees, the eager path
  (fp32 upcast, then `F.cross_entropy`) is used.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_FUSED_WORKS: dict[tuple[int | None, torch.dtype], bool] = {}


def nll_rows(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[B] fp32 tensor on the logits' device (not read back): each sequence's summed next-token NLL."""
    if logits.dim() != 3 or ids.shape != logits.shape[:2]:
        raise ValueError(f"nll_rows needs logits [B, T, V] and ids [B, T], got {list(logits.shape)}, {list(ids.shape)}")
    if logits.dtype in (torch.float16, torch.bfloat16) and fused_usable(logits):
        return _fused_nll_rows(logits, ids)
    return eager_nll_rows(logits, ids)


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """[] the chunk's summed next-token NLL (fp32, on the logits' device)."""
    return nll_rows(logits, ids).sum()


def eager_nll_rows(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    batch, vocab = logits.shape[0], logits.shape[-1]
    token_nll = F.cross_entropy(logits[:, :-1].reshape(-1, vocab).float(), ids[:, 1:].reshape(-1), reduction="none")
    return token_nll.view(batch, -1).sum(-1)                                   # [B]


def eager_nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    return eager_nll_rows(logits, ids).sum()


def fused_usable(logits: torch.Tensor) -> bool:
    """Whether the Triton kernel runs and agrees with the eager computation here (probed once)."""
    if logits.device.type != "cuda":
        return False
    key = (logits.device.index, logits.dtype)
    if key not in _FUSED_WORKS:
        _FUSED_WORKS[key] = _probe(logits.device, logits.dtype)
    return _FUSED_WORKS[key]


def _probe(device: torch.device, dtype: torch.dtype) -> bool:
    try:
        generator = torch.Generator(device=device).manual_seed(0)
        logits = (torch.randn(3, 17, 5003, device=device, generator=generator) * 4).to(dtype)
        ids = torch.randint(0, 5003, (3, 17), device=device, generator=generator)
        got, want = _fused_nll_rows(logits, ids), eager_nll_rows(logits, ids)
        return bool(torch.allclose(got, want, rtol=1e-5, atol=1e-3))
    except Exception:  # noqa: BLE001 - no Triton, no compiler, unsupported GPU: use the eager path
        return False


def _fused_nll_rows(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    batch, seq, vocab = logits.shape
    rows_RV = logits.reshape(batch * seq, vocab)
    if rows_RV.stride(-1) != 1:
        rows_RV = rows_RV.contiguous()
    targets_R = torch.zeros(batch, seq, dtype=torch.int64, device=logits.device)
    targets_R[:, :-1] = ids[:, 1:]                                  # the last position's row is dropped below
    nll_R = torch.empty(batch * seq, dtype=torch.float32, device=logits.device)
    _launch(rows_RV, targets_R.reshape(-1), nll_R)
    return nll_R.view(batch, seq)[:, :-1].sum(-1)                             # [B]


def _launch(rows_RV: torch.Tensor, targets_R: torch.Tensor, nll_R: torch.Tensor) -> None:
    kernel = _kernel()
    block = min(4096, 1 << (rows_RV.shape[1] - 1).bit_length())
    kernel[(rows_RV.shape[0],)](rows_RV, rows_RV.stride(0), targets_R, nll_R, rows_RV.shape[1],
                                BLOCK=block, num_warps=8 if block >= 2048 else 4)


_KERNEL = None


def _kernel():
    """The Triton kernel, compiled on first use (imports Triton lazily)."""
    global _KERNEL
    if _KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def row_nll(logits_ptr, row_stride, targets_ptr, out_ptr, vocab, BLOCK: tl.constexpr):
            row = tl.program_id(0).to(tl.int64)
            base = logits_ptr + row * row_stride
            running_max = float("-inf")
            running_sum = 0.0
            for start in range(0, vocab, BLOCK):
                cols = start + tl.arange(0, BLOCK)
                x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
                new_max = tl.maximum(running_max, tl.max(x, axis=0))
                running_sum = running_sum * tl.exp(running_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
                running_max = new_max
            target = tl.load(targets_ptr + row)
            picked = tl.load(base + target).to(tl.float32)
            tl.store(out_ptr + row, running_max + tl.log(running_sum) - picked)

        _KERNEL = row_nll
    return _KERNEL
