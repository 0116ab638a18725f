"""The static hull against an independent reference: scipy's linear-programming solver."""

import math
import random

import pytest
from scipy.optimize import linprog

from nectar.experiment.hull import HullPoint, StaticHull


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
        assert hull.saved_at(d) == pytest.approx(lp_saved_at(points, d), abs=1e-9)
        mix = hull.mixture_at(d)
        if math.isfinite(hull.saved_at(d)):
            by_name = {p.name: p for p in points}
            assert sum(w for _, w in mix) == pytest.approx(1.0)
            assert sum(w * by_name[n].saved for n, w in mix) == pytest.approx(hull.saved_at(d), abs=1e-9)
            assert sum(w * by_name[n].dppl for n, w in mix) <= d + 1e-12


def test_time_sharing_example_and_monotone_envelope():
    hull = StaticHull([HullPoint("top2", 0.0, 0.0), HullPoint("cheap", 0.0072, 0.141), HullPoint("top1", 0.0252, 0.215)])
    # mixing top2 and cheap in time reaches cheap's slope at NECTAR's +0.63 %
    assert hull.saved_at(0.0063) == pytest.approx(0.141 * 0.0063 / 0.0072)
    assert hull.saved_at(1.0) == pytest.approx(0.215)        # beyond the last point: flat
    assert hull.saved_at(-0.001) == -math.inf                 # no policy is better than top-2 in quality
    values = [v for _, v in hull.envelope()]
    assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))
