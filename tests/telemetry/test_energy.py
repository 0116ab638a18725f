"""nectar.telemetry.energy: counter arithmetic, power integration and the one window-energy rule.

References: closed forms (linear power integrates exactly by trapezoids), NVML's 64-bit counter
arithmetic, and hand-built windows for each branch of `window_energy_J`.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from nectar.telemetry.energy import counter_delta, integrate_power_J, is_stale, window_energy_J
from nectar.telemetry.window import TelemetryWindow
from tests.tolerance import approx


def test_integrate_power_is_exact_for_linear_power():
    rng = np.random.default_rng(0)
    a, b = 120.0, 35.0  # P(t) = a + b t
    t0, t1 = 0.2, 3.1
    times = np.sort(rng.uniform(0.5, 2.9, size=40))
    power = a + b * times
    inner = a * (times[-1] - times[0]) + b * (times[-1] ** 2 - times[0] ** 2) / 2
    edges = power[0] * (times[0] - t0) + power[-1] * (t1 - times[-1])  # held flat to the edges
    # the trapezoid over 40 samples (exact for a linear P up to rounding) vs the closed form
    assert integrate_power_J(times, power, t0, t1) == approx(inner + edges, n=len(times) + 8)
    with pytest.raises(ValueError, match="at least one sample"):
        integrate_power_J([], [], 0.0, 1.0)


def test_counter_delta_cases():
    assert counter_delta(1000.0, 251_000.0, 1.0).energy_mJ == 250_000.0
    assert counter_delta(None, 5.0, 1.0).flags == ("counter_unsupported",)
    wrapped = counter_delta(2**64 - 10, 90, 1.0)  # NVML's raw ints: exact near 2^64
    assert wrapped.energy_mJ == 100 and wrapped.flags == ("counter_wrap",)  # integer arithmetic: exact
    # Going back by 1 J in a 64-bit counter cannot be a wrap: it is a reset.
    assert counter_delta(5_000.0, 4_000.0, 1.0).flags == ("counter_reset",)
    with pytest.raises(ValueError, match="duration_s"):
        counter_delta(0.0, 1.0, -1.0)
    assert is_stale(0.0, 1.0, 100.0) and not is_stale(0.0, 0.2, 100.0) and not is_stale(5.0, 1.0, 100.0)
    assert counter_delta(10.0, 5.0, 1.0, modulus_mJ=1000.0).energy_mJ == 995.0  # a small simulated counter
    assert counter_delta(math.nan, 5.0, 1.0).flags == ("nan",)
    assert counter_delta(-1.0, 5.0, 1.0).flags == ("negative",)


def window(duration_s, energy_J, power_J, samples=10, flags=(), mean_W=100.0):
    return TelemetryWindow(0.0, duration_s, energy_J, mean_W, mean_W, 50.0, samples=samples,
                           flags=list(flags), energy_power_J=power_J)


def test_window_energy_rule():
    # auto: integrated power for short windows, the counter for long ones
    assert window_energy_J(window(0.3, 30.0, 31.0)) == 31.0
    assert window_energy_J(window(2.0, 200.0, 210.0)) == 200.0
    assert window_energy_J(window(2.0, 200.0, 210.0, flags=["short_window"])) == 210.0
    # power: integrated power whenever two samples back it; counter: the reader's energy
    assert window_energy_J(window(2.0, 200.0, 210.0), "power") == 210.0
    assert window_energy_J(window(2.0, 200.0, 210.0, samples=1), "power") == 200.0
    assert window_energy_J(window(0.3, 30.0, 31.0), "counter") == 30.0
    # fallbacks: unusable values give way to mean power × duration, then NaN
    assert window_energy_J(window(0.3, 30.0, math.nan)) == 30.0
    assert window_energy_J(window(2.0, math.nan, None)) == approx(200.0, n=2)  # power × duration
    assert math.isnan(window_energy_J(window(2.0, math.nan, None, mean_W=math.nan)))
    with pytest.raises(ValueError, match="preference"):
        window_energy_J(window(1.0, 1.0, 1.0), "best")
