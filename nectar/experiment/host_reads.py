"""Counting the host reads of tensor values a forward makes: each one would wait for the GPU.

`count_host_reads()` is a context manager that counts, while it is open, every call that turns a
tensor's value into a Python object — `.item()`, `.tolist()`, `bool()`, `int()`, `float()` of a
tensor — and every `nonzero()` (a data-dependent shape). On a GPU each of these waits for the
queued work; on the CPU they cost nothing, which is why the count (not the time) is what a CPU
test can check. On CUDA, `torch.cuda.set_sync_debug_mode` sees syncs the count misses (a copy to
the host inside a library call); the GPU benchmark uses both.
"""

from __future__ import annotations

from collections import Counter
from contextlib import contextmanager
from typing import Iterator

import torch

_COUNTED = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "nonzero")


@contextmanager
def count_host_reads() -> Iterator[Counter]:
    """Yield a Counter {method name: calls} filled while the context is open (one thread)."""
    counts: Counter = Counter()
    originals = {name: getattr(torch.Tensor, name) for name in _COUNTED}

    def counted(name, original):
        def wrapper(self, *args, **kwargs):
            counts[name] += 1
            return original(self, *args, **kwargs)
        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(name, original))
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)
