"""The static hull against an independent reference: scipy's linear-programming solver."""

import math
import random

import pytest
from scipy.optimize import linprog

from nectar.experiment.hull import HullPoint, StaticHull
from tests.tolerance import approx, tol


def lp_saved_at(points, d):
    """max Σ w s  s.t. Σ w dppl ≤ d, Σ w = 1, w ≥ 0 (scipy, HiGHS)."""
    res = linprog(c=[-p.saved for p in points], A_ub=[[p.dppl for p in points]], b_ub=[d],
                  A_eq=[[1.0] * len(points)], b_eq=[1.0], bounds=[(0, None)] * len(points), method="highs")
    return -res.fun if res.status == 0 else -math.inf


@pytest.mark.parametrize("seed", range(20))
def test_saved_at_equals_the_linear_program(seed):
    rng = random.Random(seed)
    points = [HullPoint(f"p{i}", rng.uniform(-0.005, 0.03), rng.uniform(-0.1, 0.5)) for i in range(rng.randint(1, 9))]
    points.append(HullPoint("static-top2", 0.0, 0.0))
    hull = StaticHull(points)
    for d in [-0.01, -0.002, 0.0, 0.001, 0.005, 0.0123, 0.02, 0.05]:
        # not rounding: the reference is HiGHS's answer, feasible and optimal to its own tolerances
        # (1e-7 by default, relative to the data of size ≤ 0.5): 1e-9 is what it reaches here
        assert hull.saved_at(d) == pytest.approx(lp_saved_at(points, d), abs=1e-9)
        mix = hull.mixture_at(d)
        if math.isfinite(hull.saved_at(d)):
            by_name = {p.name: p for p in points}
            n = 2 * len(mix) + 4  # a mixture of ≤ 2 points: its weights from one ÷, then Σ w·x
            assert sum(w for _, w in mix) == approx(1.0, n=n)
            saved_scale = max(abs(p.saved) for p in points)
            assert sum(w * by_name[n].saved for n, w in mix) == approx(hull.saved_at(d), n=n, scale=saved_scale)
            dppl_scale = max(abs(p.dppl) for p in points) + abs(d)
            assert sum(w * by_name[n].dppl for n, w in mix) <= d + tol(float, n=n, scale=dppl_scale)


def test_time_sharing_example_and_monotone_envelope():
    hull = StaticHull([HullPoint("top2", 0.0, 0.0), HullPoint("cheap", 0.0072, 0.141), HullPoint("top1", 0.0252, 0.215)])
    # mixing top2 and cheap in time reaches cheap's slope at NECTAR's +0.63 %
    assert hull.saved_at(0.0063) == approx(0.141 * 0.0063 / 0.0072, n=6)  # an interpolation: −, ÷, ×, +
    assert hull.saved_at(1.0) == approx(0.215, n=6)        # beyond the last point: flat
    assert hull.saved_at(-0.001) == -math.inf                 # no policy is better than top-2 in quality
    values = [v for _, v in hull.envelope()]
    assert all(b >= a - tol(float, n=6, scale=max(map(abs, values))) for a, b in zip(values, values[1:]))
