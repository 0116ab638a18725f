"""The tolerance rule of tests/tolerance.py: tol = safety · n · eps(dtype) · scale, and
`assert_close` / `within` / `approx` built on it: a perturbation just above the bound fails,
just below passes; n, scale, safety and dtype act as documented."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tests.tolerance import approx, assert_close, eps, tol, within

BELOW, ABOVE = 0.99, 1.01  # fractions of the bound: a perturbation just inside / just outside it


def test_eps_is_the_dtypes_machine_epsilon() -> None:
    assert eps(torch.float64) == 2.0**-52 == eps(np.float64) == eps("float64") == eps(float)
    assert eps(torch.float32) == 2.0**-23 == eps(np.float32) == eps("float32")
    assert eps(torch.bfloat16) == 2.0**-7 and eps(torch.float16) == 2.0**-10 == eps(np.float16)
    with pytest.raises(TypeError):
        eps(torch.int64)


def test_tol_is_the_product_of_its_factors() -> None:
    assert tol(torch.float32) == 2.0**-23  # one rounding of a quantity of magnitude 1
    assert tol(torch.float32, n=8, scale=3.0, safety=2.0) == 2.0 * 8 * 2.0**-23 * 3.0
    assert tol("float64", n=100, scale=0.5) == 100 * 2.0**-52 * 0.5  # linear in n, not √n
    with pytest.raises(ValueError):
        tol(torch.float64, n=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("n, safety", [(1, 1.0), (64, 1.0), (16, 4.0)])
def test_just_below_passes_just_above_fails(dtype: torch.dtype, n: int, safety: float) -> None:
    # float64 tensors carry the perturbation (small elements: their ulp is far below the bound);
    # dtype= names the precision being judged
    expected = torch.tensor([2.0**-20, -3.0, -(2.0**-21)], dtype=torch.float64)  # max|expected| = 3
    bound = tol(dtype, n, 3.0, safety)
    for fraction, passes in ((BELOW, True), (ABOVE, False)):
        actual = expected.clone()
        actual[0] += fraction * bound  # on the element with the smallest magnitude: normwise scale
        assert within(actual, expected, dtype=dtype, n=n, safety=safety)[0] is passes
    actual = expected.clone()
    actual[2] -= ABOVE * bound
    with pytest.raises(AssertionError, match=r"the case: .* at index \(2,\).*safety .* · n .* · eps\(float"):
        assert_close(actual, expected, dtype=dtype, n=n, safety=safety, what="the case")


def test_dtype_is_read_off_the_arguments() -> None:
    expected32 = torch.tensor([1.0, 2.0])
    bound32 = tol(torch.float32, 1, 2.0)
    assert_close(expected32 + torch.tensor([0.0, 2.0**-22]), expected32)  # one float32 ulp at 2
    assert not within(expected32.double() + 2 * bound32, expected32)[0]  # the coarser dtype counts
    assert not within(1.0 + 2 * tol(float), 1.0)[0]  # Python floats are float64
    assert within(np.float32(1.0) + np.float32(2.0**-23), np.float32(1.0))[0]


def test_scale_defaults_to_max_abs_expected_and_can_be_given() -> None:
    expected = np.array([1e-3, 10.0])
    small_error = np.array([1e-3 + 5 * eps(float), 10.0])  # 5 eps absolute: ≤ 1 eps · 10
    assert within(small_error, expected)[0]  # normwise: the small element inherits the scale 10
    assert not within(small_error, expected, scale=np.abs(expected))[0]  # elementwise scales
    assert within(small_error, expected, scale=np.abs(expected), n=5000)[0]  # 5000·eps·1e-3 > 5 eps
    assert not within(1.0 + 1e-12, 1.0, scale=1.0, n=10)[0]
    assert within(1.0 + 1e-12, 1.0, scale=1e4, n=10)[0]  # Σ|terms| = 1e4: 10 · eps · 1e4 ≈ 2.2e-11


def test_n_scales_the_bound_linearly() -> None:
    error = 10 * eps(float)
    assert not within(1.0 + error, 1.0, n=9)[0]
    assert within(1.0 + error, 1.0, n=11)[0]


def test_a_real_reassociated_sum_stays_inside_the_bound() -> None:
    g = torch.Generator().manual_seed(0)
    terms = torch.randn(4096, generator=g)  # float32
    forward, backward = terms.sum(), terms.flip(0).cumsum(0)[-1]  # two orders
    exact = terms.double().sum()
    scale = terms.abs().sum().item()  # Σ|x_i|
    assert_close(forward, exact, n=terms.numel(), scale=scale, what="pairwise float32 sum vs float64")
    assert_close(backward, forward, n=terms.numel(), scale=scale, what="sequential vs pairwise")


def test_exact_and_special_values() -> None:
    assert within(torch.tensor([math.inf, -math.inf]), torch.tensor([math.inf, -math.inf]))[0]
    assert not within(torch.tensor([math.nan]), torch.tensor([math.nan]))[0]
    assert within(torch.tensor([math.nan]), torch.tensor([math.nan]), equal_nan=True)[0]
    assert not within(torch.tensor([math.nan]), torch.tensor([1.0]), equal_nan=True)[0]
    assert within(torch.zeros(3), torch.zeros(3))[0]  # scale 0: only exact equality passes
    assert not within(torch.full((3,), 1e-30), torch.zeros(3))[0]
    assert within(torch.empty(0), torch.empty(0))[0]
    ok, why = within(torch.zeros(2), torch.zeros(3))
    assert not ok and "shapes differ" in why
    assert within(torch.full((2, 2), 2.0), 2.0)[0]  # a 0-d side broadcasts


def test_approx_carries_the_rule_into_pytest_approx() -> None:
    bound = tol(float, 4, 2.0)
    assert {"a": 1.0 + 0.9 * bound, "b": 2.0} == approx({"a": 1.0, "b": 2.0}, n=4)
    assert [1.0 + 1.1 * bound, 2.0] != approx([1.0, 2.0], n=4)
    assert 1.0 + 1e-9 == approx(1.0, scale=1e7)  # eps · 1e7 ≈ 2.2e-9
    assert np.float32(1.0) + np.float32(2.0**-23) == approx(np.float32(1.0))
