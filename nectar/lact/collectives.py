"""Differentiable torch.distributed collectives for the parallel LaCT kernels (Algorithms 3–4).

Two collectives take part in autograd:
  * `all_reduce_sum(x)`: y = Σ_ranks x. Every rank's loss may depend on y, so the gradient of
    Σ_r loss_r w.r.t. each rank's x is Σ_ranks ∂loss_r/∂y: the backward is again a SUM all-reduce.
  * `all_to_all(x, out_splits, in_splits)`: `all_to_all_single` on 1-D buffers with split sizes;
    the backward sends each gradient block back where its value came from (splits swapped).
torch.distributed.nn.functional offers the same but is deprecated, hence these two small
Functions.

`CommStats` accumulates the wall time, call count and payload bytes of the forward collectives
(CUDA is synchronised around each one, so the time is the collective's, not queued work's).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class CommStats:
    """Accumulated cost of the forward collectives issued by one rank."""

    seconds: float = 0.0
    calls: int = 0
    payload_bytes: int = 0  # bytes of the buffers this rank hands to the collectives

    def reset(self) -> None:
        self.seconds, self.calls, self.payload_bytes = 0.0, 0, 0


@contextmanager
def _timed(stats: CommStats | None, payload: torch.Tensor) -> Iterator[None]:
    """Time one collective into `stats` (no-op without stats)."""
    if stats is None:
        yield
        return
    if payload.is_cuda:
        torch.cuda.synchronize(payload.device)
    start = time.perf_counter()
    yield
    if payload.is_cuda:
        torch.cuda.synchronize(payload.device)
    stats.seconds += time.perf_counter() - start
    stats.calls += 1
    stats.payload_bytes += payload.numel() * payload.element_size()


class _AllReduceSum(torch.autograd.Function):
    """y = Σ_ranks x; backward: the SUM all-reduce of the output gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        y = x.contiguous().clone()
        dist.all_reduce(y, op=dist.ReduceOp.SUM, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.group)
        return grad, None


class _AllToAll(torch.autograd.Function):
    """all_to_all_single on 1-D buffers; backward: the reverse exchange (splits swapped)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.group, ctx.in_numel, ctx.out_splits, ctx.in_splits = group, x.numel(), out_splits, in_splits
        y = x.new_empty(sum(out_splits))
        dist.all_to_all_single(y, x.contiguous(), out_splits, in_splits, group=group)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        back = grad.new_empty(ctx.in_numel)
        dist.all_to_all_single(back, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return back, None, None, None


def all_reduce_sum(x: torch.Tensor, group=None, stats: CommStats | None = None) -> torch.Tensor:
    """Σ over the ranks of `group` of x (a new tensor; x is untouched), differentiable."""
    with _timed(stats, x):
        return _AllReduceSum.apply(x, group)


def all_to_all(
    x: torch.Tensor, out_splits: Sequence[int], in_splits: Sequence[int], group=None, stats: CommStats | None = None
) -> torch.Tensor:
    """Exchange blocks of the 1-D buffer x: block j (in_splits[j] elements) goes to rank j, and the
    result [sum(out_splits)] holds the block from rank i at position i. Differentiable."""
    if x.ndim != 1 or x.numel() != sum(in_splits):
        raise ValueError(f"all_to_all takes a 1-D buffer of sum(in_splits)={sum(in_splits)} elements, got {tuple(x.shape)}")
    with _timed(stats, x):
        return _AllToAll.apply(x, list(out_splits), list(in_splits), group)
