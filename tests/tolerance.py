"""Floating-point tolerances derived from the arithmetic: the one rule every inexact float
comparison in the suite uses.

The rule
--------
Two floating-point computations of the same quantity agree elementwise to

    |actual − expected| ≤ tol = safety · n · eps(dtype) · scale

* ``eps(dtype)`` is the dtype's machine epsilon, ``torch.finfo(dtype).eps`` (2⁻⁵² for float64,
  2⁻²³ for float32, 2⁻¹⁰ for float16, 2⁻⁷ for bfloat16); the unit roundoff is u = eps/2.
  The dtype is the precision the compared quantity was computed in (the coarser of the two sides
  when they differ); by default it is read off the arguments (a Python float counts as float64).

* ``n`` is the length of the longest reduction that feeds the compared quantity and that the two
  sides may evaluate differently (in another order, blocked differently, split over ranks), or
  more generally the number of rounded operations on the longest dependency path. We use the
  classical deterministic bound, linear in n: a sum of n terms evaluated in any order satisfies
  |fl(Σ xᵢ) − Σ xᵢ| ≤ γₙ₋₁ Σ|xᵢ| with γₙ = n·u/(1 − n·u) ≈ n·u (Higham, *Accuracy and Stability
  of Numerical Algorithms*, 2nd ed., §4.2); two evaluations in different orders each satisfy it,
  so they differ by at most 2·γₙ·Σ|xᵢ| ≈ n·eps·Σ|xᵢ|. Dot products, matrix products and chained
  sums obey the same form (§3.5). The probabilistic bound (≈ √n·u with high probability, Higham
  and Mary 2019) is tighter but assumes independent rounding errors, which fails for structured
  data (constant terms, sorted terms) exactly where tests like to probe; for the short
  reductions of this suite (n up to a few thousand) the linear bound costs at most a factor √n
  and holds for every input. So n, not √n. n = 1 is a single rounding (one side is the correctly
  rounded value of the other, or both differ by one rounding).

* ``scale`` is the magnitude the rounding errors are relative to: Σ|xᵢ| of the terms of the
  reduction when the test knows them, otherwise the magnitude of the compared quantity. By
  default ``assert_close`` takes max|expected| over the whole tensor (a normwise criterion: an
  element that nearly cancels keeps the absolute error of its larger neighbours, as the
  backward error analysis says it should). A scalar or an array broadcasting against
  ``expected`` (elementwise scales) may be passed instead.

* ``safety`` covers what the sum model does not: error amplification by the computation after
  the reduction (its condition number: a division by a small number, Newton–Schulz's gain,
  an iterative solver's stopping rule), and elementwise library functions (exp, log, sigmoid:
  within a few ulp). Default 1; every call with safety > 1 states its reason next to it.

A tolerance that does not come from rounding (a solver's stated accuracy, a Monte-Carlo
standard error, a counter's resolution) is not this rule's business: such comparisons keep
their own constant with an inline comment saying where the constant comes from. Comparisons
that are exact by construction (integer arithmetic, copies, the same operations in the same
order) stay ``==`` / ``torch.equal``.

Measuring margins: with the environment variable ``TOLERANCE_REPORT`` set to a file path, every
check appends one JSON line (the calling test's file and line, n, safety, dtype and the worst
|actual − expected| / tol), e.g. ``TOLERANCE_REPORT=/tmp/tol.jsonl pytest tests``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

import numpy as np
import torch

__all__ = ["eps", "tol", "assert_close", "within", "approx"]

_NAMES = {"float64": torch.float64, "double": torch.float64, "float32": torch.float32, "float": torch.float32,
          "float16": torch.float16, "half": torch.float16, "bfloat16": torch.bfloat16}


def _torch_dtype(dtype: Any) -> torch.dtype:
    """A torch floating dtype from a torch dtype, a numpy dtype, a name or the type `float`."""
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise TypeError(f"{dtype} is not a floating-point dtype")
        return dtype
    if dtype is float:
        return torch.float64
    if isinstance(dtype, str) and dtype.removeprefix("torch.") in _NAMES:
        return _NAMES[dtype.removeprefix("torch.")]
    np_dtype = np.dtype(dtype)
    if np_dtype.kind != "f":
        raise TypeError(f"{dtype!r} is not a floating-point dtype")
    return _NAMES[np_dtype.name]


def eps(dtype: Any) -> float:
    """Machine epsilon of a floating dtype (torch dtype, numpy dtype, name, or `float`)."""
    return float(torch.finfo(_torch_dtype(dtype)).eps)


def tol(dtype: Any, n: int = 1, scale: float = 1.0, safety: float = 1.0) -> float:
    """safety · n · eps(dtype) · scale: the largest difference rounding allows (module docstring).

    n: length of the longest reduction (or rounded-operation chain) feeding the quantity that the
    two sides evaluate differently; scale: the magnitude the errors are relative to (Σ|terms| or
    the quantity's magnitude); safety: amplification after the reduction, with a stated reason.
    """
    if n < 1 or safety <= 0 or scale < 0:
        raise ValueError(f"need n >= 1, safety > 0 and scale >= 0; got n={n}, safety={safety}, scale={scale}")
    return safety * n * eps(dtype) * scale


def _dtype_of(x: Any) -> torch.dtype | None:
    if isinstance(x, torch.Tensor):
        return x.dtype if x.dtype.is_floating_point else None
    if isinstance(x, np.ndarray | np.floating):
        return _torch_dtype(x.dtype) if x.dtype.kind == "f" else None
    if isinstance(x, float):
        return torch.float64
    return None


def _coarser(a: torch.dtype | None, b: torch.dtype | None) -> torch.dtype:
    candidates = [d for d in (a, b) if d is not None]
    if not candidates:
        return torch.float64  # ints compared with ints: a float64 computation at least
    return max(candidates, key=lambda d: torch.finfo(d).eps)


def _array(x: Any) -> np.ndarray:
    """float64 numpy copy of a tensor (any device, any float dtype), an array, or a number/list."""
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def within(actual: Any, expected: Any, *, dtype: Any = None, n: int = 1, scale: Any = None,
           safety: float = 1.0, equal_nan: bool = False) -> tuple[bool, str]:
    """(passes, explanation) for the rule; `assert_close` raises with the explanation."""
    dtype = _torch_dtype(dtype) if dtype is not None else _coarser(_dtype_of(actual), _dtype_of(expected))
    a, e = _array(actual), _array(expected)
    if a.shape != e.shape and a.ndim and e.ndim:
        return False, f"shapes differ: actual {a.shape}, expected {e.shape}"
    a, e = np.broadcast_arrays(a, e)
    if scale is None:
        finite = e[np.isfinite(e)]
        scale_arr = np.asarray(np.abs(finite).max() if finite.size else 0.0)
        how_scale = "max|expected|"
    else:
        scale_arr = _array(scale)
        how_scale = "given"
    if (scale_arr < 0).any():
        raise ValueError("scale must be non-negative")
    bound = tol(dtype, n, 1.0, safety) * scale_arr  # broadcasts when scale is elementwise
    with np.errstate(invalid="ignore"):
        err = np.abs(a - e)
    exact = (a == e) | (equal_nan & np.isnan(a) & np.isnan(e))  # covers ±inf on both sides
    bad = ~exact & ~(err <= bound)  # a NaN error is bad
    if os.environ.get("TOLERANCE_REPORT"):
        _report(err, bound, dtype, n, safety)
    if not bad.any():
        return True, ""
    excess = np.where(bad, np.nan_to_num(err / np.where(np.broadcast_to(bound, err.shape) > 0, bound, np.nan),
                                         nan=np.inf, posinf=np.inf), -np.inf)
    where = np.unravel_index(int(np.argmax(excess)), err.shape) if err.ndim else ()
    worst_bound = float(np.broadcast_to(bound, err.shape)[where])
    worst_scale = float(np.broadcast_to(scale_arr, err.shape)[where])
    message = (
        f"|actual − expected| = {float(err[where]):.3e} at index {tuple(int(i) for i in where)} "
        f"(actual {float(a[where])!r}, expected {float(e[where])!r}) > tol = {worst_bound:.3e} "
        f"= safety {safety:g} · n {n} · eps({str(dtype).removeprefix('torch.')}) {eps(dtype):.3e} "
        f"· scale {worst_scale:.3e} ({how_scale}); {int(bad.sum())} of {bad.size} elements fail"
    )
    return False, message


def _report(err: np.ndarray, bound: Any, dtype: torch.dtype, n: int, safety: float) -> None:
    """One JSON line per check for TOLERANCE_REPORT: the worst err/tol and who asked."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code.co_filename == __file__:
        frame = frame.f_back
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(err == 0, 0.0, err / np.broadcast_to(bound, err.shape))
    worst = float(np.nan_to_num(ratio, nan=np.inf).max()) if ratio.size else 0.0
    where = f"{os.path.relpath(frame.f_code.co_filename)}:{frame.f_lineno}" if frame else "?"
    line = {"where": where, "ratio": worst, "n": n, "safety": safety, "dtype": str(dtype).removeprefix("torch.")}
    with open(os.environ["TOLERANCE_REPORT"], "a") as out:
        out.write(json.dumps(line) + "\n")


def assert_close(actual: Any, expected: Any, *, dtype: Any = None, n: int = 1, scale: Any = None,
                 safety: float = 1.0, what: str = "", equal_nan: bool = False) -> None:
    """Assert |actual − expected| ≤ safety · n · eps(dtype) · scale elementwise (module docstring).

    actual, expected: torch tensors (any float dtype or device), numpy arrays, Python numbers
    or nested lists; same shape (a 0-d side broadcasts). dtype: the precision the quantity was
    computed in (default: the coarser float dtype of the two; Python floats are float64).
    n: longest reduction / rounded-operation chain. scale: Σ|terms| or the magnitude compared,
    scalar or broadcasting against expected (default max|expected|, finite entries).
    safety: stated amplification, default 1. Elements equal on both sides (±inf included) pass;
    NaN fails unless equal_nan and NaN on both sides.
    """
    ok, message = within(actual, expected, dtype=dtype, n=n, scale=scale, safety=safety, equal_nan=equal_nan)
    if not ok:
        raise AssertionError(f"{what + ': ' if what else ''}{message}")



def _magnitude(expected: Any) -> float:
    """max|x| over the finite numbers of a number, array, tensor, or flat list/tuple/dict of them."""
    values = expected.values() if isinstance(expected, dict) else expected
    if isinstance(values, list | tuple) or type(values).__name__ == "dict_values":
        return max((_magnitude(v) for v in values), default=0.0)
    arr = _array(values)
    finite = np.abs(arr[np.isfinite(arr)])
    return float(finite.max()) if finite.size else 0.0


def approx(expected: Any, *, dtype: Any = None, n: int = 1, scale: float | None = None, safety: float = 1.0):
    """`pytest.approx(expected, rel=0, abs=tol(...))` with the tolerance of the rule, for
    `assert actual == approx(expected, ...)` on numbers, arrays and flat lists/dicts of numbers.

    scale defaults to max|expected| over all its numbers (normwise, as `assert_close`);
    dtype to expected's when it is a tensor or array, else float64.
    """
    import pytest

    dtype = _torch_dtype(dtype) if dtype is not None else (_dtype_of(expected) or torch.float64)
    scale = _magnitude(expected) if scale is None else scale
    if isinstance(expected, torch.Tensor):
        expected = _array(expected)
    bound = tol(dtype, n, scale, safety)
    check = pytest.approx(expected, rel=0.0, abs=bound)
    if os.environ.get("TOLERANCE_REPORT"):  # the same check, reporting its margin when compared
        base = type(check)

        def __eq__(self, actual, _expected=expected):  # noqa: N807
            try:
                a, e = _flat(actual, _expected), _flat(_expected, _expected)
                if a.shape == e.shape:
                    _report(np.abs(a - e), bound, dtype, n, safety)
            except (TypeError, ValueError, KeyError):
                pass
            return base.__eq__(self, actual)

        check.__class__ = type(base.__name__, (base,), {"__eq__": __eq__, "__hash__": None})
    return check


def _flat(x: Any, like: Any) -> np.ndarray:
    """The numbers of x in the layout of `like` (a dict's keys, a sequence, an array) as float64."""
    if isinstance(like, dict):
        return np.array([float(x[k]) for k in like], dtype=np.float64)
    if isinstance(like, list | tuple):
        return np.array([float(v) for v in x], dtype=np.float64)
    return _array(x).reshape(-1) if np.ndim(like) else np.array([float(x)])
