"""Counting the host reads of tensor values a forward makes: each one would wait for the GPU.

`count_host_reads()` is a context manager that counts, while it is open, every call that on a GPU
would wait for the queued work, in two kinds:

- a tensor's value turned into a Python object or host memory: `.item()`, `.tolist()`, `bool()`,
  `int()`, `float()`, `operator.index()` of a tensor, `.numpy()`, `.cpu()`, `torch.equal`,
  `torch.allclose`;
- an output whose shape depends on the values (the host must learn the size before it can go on):
  `nonzero` / `argwhere` / one-argument `torch.where`, `masked_select`, `unique`,
  `unique_consecutive`, `bincount` (CUDA reads the maximum back), `repeat_interleave` with tensor
  repeats and no `output_size`, and indexing with a boolean mask (`x[mask]`, `x[mask] = v`,
  `index_put(_)` with a boolean index), counted as "mask_index".

Each is counted where Python calls it (`Tensor` methods and `torch.` functions), once per outermost
call (a counted call made inside another, such as `Tensor.unique` calling `torch.unique`, is not
counted again). On the CPU these reads cost nothing, which is why the count (not the time) is what
a CPU test can check. What it cannot see: reads inside C++ or a library's compiled code, a
`.to("cpu")`, and `torch._assert_async`, which is no sync on a GPU (a plain assert on a CPU tensor).
On CUDA, `torch.cuda.set_sync_debug_mode` sees every sync; the GPU benchmark and test use both.
"""

from __future__ import annotations

import threading
from collections import Counter
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

# Tensor methods and torch functions counted on every call.
_METHODS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "numpy", "cpu",
            "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount")
_FUNCTIONS = ("nonzero", "argwhere", "masked_select", "unique", "unique_consecutive", "bincount", "equal", "allclose")
_MASKS = (torch.bool, torch.uint8)


def _is_mask(index) -> bool:
    """Whether an index (a tensor, or a tuple/list of index parts) holds a boolean or byte mask tensor."""
    parts = index if isinstance(index, (tuple, list)) else (index,)
    return any(isinstance(p, torch.Tensor) and p.dtype in _MASKS for p in parts)


def _mask_in_index(_self, index=None, *args, **kwargs) -> str | None:        # __getitem__, __setitem__
    return "mask_index" if _is_mask(index) else None


def _mask_in_indices(_self, indices=(), *args, **kwargs) -> str | None:      # index_put(_)
    return "mask_index" if _is_mask(kwargs.get("indices", indices)) else None


def _one_argument_where(*args, **kwargs) -> str | None:                     # torch.where(cond) = nonzero
    return "where" if len(args) + len(kwargs) == 1 else None


def _unsized_repeat(_input=None, repeats=None, *args, **kwargs) -> str | None:
    """repeat_interleave(input, repeats [, dim], output_size=...): the output size is data-dependent
    when repeats is a tensor (or absent: torch.repeat_interleave(repeats)) and no output_size is given."""
    repeats = kwargs.get("repeats", repeats)
    unsized = repeats is None or isinstance(repeats, torch.Tensor)
    return "repeat_interleave" if unsized and kwargs.get("output_size") is None else None


# (owner, name, counted key or None) for calls counted only in some forms.
_CONDITIONAL: tuple[tuple[object, str, Callable[..., str | None]], ...] = (
    (torch.Tensor, "__getitem__", _mask_in_index),
    (torch.Tensor, "__setitem__", _mask_in_index),
    (torch.Tensor, "index_put", _mask_in_indices),
    (torch.Tensor, "index_put_", _mask_in_indices),
    (torch, "index_put", _mask_in_indices),
    (torch, "where", _one_argument_where),
    (torch.Tensor, "repeat_interleave", _unsized_repeat),
    (torch, "repeat_interleave", _unsized_repeat),
)


@contextmanager
def count_host_reads() -> Iterator[Counter]:
    """Yield a Counter {kind of read: calls} filled while the context is open (one thread)."""
    counts: Counter = Counter()
    depth = threading.local()
    patched: list[tuple[object, str, object]] = []

    def counted(original, key_of):
        def wrapper(*args, **kwargs):
            outer = not getattr(depth, "n", 0)
            key = key_of(*args, **kwargs) if outer else None
            if key is not None:
                counts[key] += 1
            depth.n = getattr(depth, "n", 0) + 1
            try:
                return original(*args, **kwargs)
            finally:
                depth.n -= 1
        return wrapper

    targets = [(torch.Tensor, name, lambda *a, _n=name, **k: _n) for name in _METHODS]
    targets += [(torch, name, lambda *a, _n=name, **k: _n) for name in _FUNCTIONS]
    targets += list(_CONDITIONAL)
    try:
        for owner, name, key_of in targets:
            own = vars(owner).get(name)                 # None: inherited (torch._C.TensorBase), deleted again after
            patched.append((owner, name, own))
            setattr(owner, name, counted(getattr(owner, name), key_of))
        yield counts
    finally:
        for owner, name, own in reversed(patched):
            if own is None:
                delattr(owner, name)
            else:
                setattr(owner, name, own)
