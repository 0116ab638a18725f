"""Device synchronisation before reading the energy counter, so a window covers the GPU work it names.

CUDA launches are asynchronous: without a synchronise, the counter would be read while kernels of
the window are still queued (or kernels of the previous window still run). The default waits for
torch's current CUDA device when torch and CUDA are present and is a no-op otherwise; callers can
inject any callable (another framework's synchronise, or a recorder in tests).
"""

from __future__ import annotations

from typing import Callable


def _no_sync() -> None:
    """No GPU work to wait for (no torch, or no CUDA)."""


def default_sync() -> Callable[[], None]:
    """`torch.cuda.synchronize` when torch with CUDA is usable, else a no-op."""
    try:
        import torch
    except ImportError:
        return _no_sync
    if not torch.cuda.is_available():
        return _no_sync
    return torch.cuda.synchronize
