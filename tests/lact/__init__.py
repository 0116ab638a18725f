"""Tests of the LaCT fast-weight code (nectar/lact).

NS5_GAIN is the amplification factor of Muon's Newton–Schulz quintic that the tolerances of these
tests use as their safety factor (tests/tolerance.py): p(σ) = aσ + bσ³ + cσ⁵ has slope a = 3.4445
at σ = 0, so NS5_STEPS = 5 steps multiply rounding noise in a matrix's small singular directions by
up to a⁵ ≈ 485, forward and (same Jacobian) backward. Updates from few tokens are rank-deficient,
so such directions occur in every Muon test here.
"""

from nectar.lact.fastweight import NS5_COEFFICIENTS, NS5_STEPS

NS5_GAIN = NS5_COEFFICIENTS[0] ** NS5_STEPS  # ≈ 485
