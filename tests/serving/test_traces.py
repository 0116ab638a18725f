"""Load traces against closed forms: mean arrival rate (within 4 standard errors over independent
seeds), burstiness as the inter-arrival coefficient of variation, the ramp's rising rate against its
CDF, length medians and bounds, and determinism per seed."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nectar.serving.traces import (TRACES, LengthDist, RequestSpec, TraceConfig, make_trace, parse_trace)

RATE_RPS = 4.0


def _arrivals(name: str, n: int, seed: int) -> np.ndarray:
    return np.array([r.arrival_s for r in make_trace(TraceConfig(name=name, n_requests=n, rate_rps=RATE_RPS, seed=seed))])


@pytest.mark.parametrize("name", ["steady", "bursty"])
def test_mean_interarrival_is_one_over_rate_within_4_standard_errors(name):
    """Each seed gives one estimate T_n/n of the mean inter-arrival time; over 60 independent seeds
    their mean must lie within 4 standard errors (sample std / sqrt(60)) of 1/rate."""
    estimates = np.array([_arrivals(name, 1000, seed)[-1] / 1000 for seed in range(60)])
    se = estimates.std(ddof=1) / math.sqrt(len(estimates))
    assert abs(estimates.mean() - 1 / RATE_RPS) < 4 * se


def _ramp_cdf(x: float) -> float:
    return 0.2 * x + 0.8 * x * x


def test_ramp_rate_rises_linearly_and_averages_the_rate():
    """Ramp over D = n/rate: the fraction of arrivals before x*D is 0.2x + 0.8x^2 (rate 0.2 → 1.8 x rate);
    each quarter's count must match n * that within 4 binomial standard errors, and the last arrival
    is just under D."""
    n = 4000
    a = _arrivals("ramp", n, seed=3)
    duration_s = n / RATE_RPS
    assert duration_s * 0.99 < a[-1] <= duration_s
    for q in range(4):
        p = _ramp_cdf((q + 1) / 4) - _ramp_cdf(q / 4)
        count = np.sum((a >= q * duration_s / 4) & (a < (q + 1) * duration_s / 4))
        assert abs(count - n * p) < 4 * math.sqrt(n * p * (1 - p))
    first, last = np.sum(a < duration_s / 4), np.sum(a >= 3 * duration_s / 4)
    assert last > 3 * first


def test_bursty_is_overdispersed_and_steady_is_not():
    """Exponential inter-arrivals have CV 1 (SE ≈ 1/sqrt(n) for n = 20000 → ±0.03 is > 4 SE);
    the on/off process has CV well above 1."""
    cv = {name: np.diff(_arrivals(name, 20000, seed=1)).std() / np.diff(_arrivals(name, 20000, seed=1)).mean()
          for name in ("steady", "bursty")}
    assert abs(cv["steady"] - 1) < 0.03
    assert cv["bursty"] > 1.5


@pytest.mark.parametrize("name", TRACES)
def test_traces_are_sorted_with_ids_in_arrival_order_and_lengths_in_bounds(name):
    cfg = TraceConfig(name=name, n_requests=3000, seed=5)
    trace = make_trace(cfg)
    assert [r.request_id for r in trace] == list(range(3000))
    assert all(isinstance(r, RequestSpec) for r in trace)
    assert np.all(np.diff([r.arrival_s for r in trace]) >= 0) and trace[0].arrival_s >= 0
    for dist, values in ((cfg.prompt, [r.prompt_tokens for r in trace]), (cfg.output, [r.output_tokens for r in trace])):
        values = np.array(values)
        assert values.min() >= dist.min_tokens and values.max() <= dist.max_tokens
        # the sample median's fraction below the true median is ~ Binomial(n, 1/2)/n: within 4 SE
        assert abs(np.mean(values < dist.median) - 0.5) < 4 * 0.5 / math.sqrt(len(values))


def test_length_sample_clips_to_bounds_and_is_int64():
    dist = LengthDist(median=100, sigma=3.0, min_tokens=50, max_tokens=150)
    values = dist.sample(np.random.default_rng(0), 10000)
    assert values.dtype == np.int64 and values.min() == 50 and values.max() == 150
    assert np.all(LengthDist(7, 0.0, 1, 10).sample(np.random.default_rng(0), 5) == 7)


def test_defaults():
    cfg = TraceConfig()
    assert (cfg.prompt.median, cfg.prompt.sigma, cfg.prompt.min_tokens, cfg.prompt.max_tokens) == (256, 0.6, 16, 1024)
    assert (cfg.output.median, cfg.output.sigma, cfg.output.min_tokens, cfg.output.max_tokens) == (128, 0.6, 8, 512)


@pytest.mark.parametrize("name", TRACES)
def test_same_seed_same_trace_other_seed_other_trace(name):
    cfg = TraceConfig(name=name, n_requests=50, seed=11)
    assert make_trace(cfg) == make_trace(TraceConfig(name=name, n_requests=50, seed=11))
    assert make_trace(cfg) != make_trace(TraceConfig(name=name, n_requests=50, seed=12))


def test_parse_trace_names_and_errors():
    assert [parse_trace(n) for n in TRACES] == list(TRACES)
    with pytest.raises(ValueError, match="unknown trace 'poisson'"):
        parse_trace("poisson")


@pytest.mark.parametrize("bad", [dict(name="x"), dict(n_requests=0), dict(rate_rps=0.0), dict(rate_rps=float("nan")),
                                 dict(prompt=LengthDist(10, 0.5, 20, 30)), dict(output=LengthDist(10, -1.0, 1, 30)),
                                 dict(output=LengthDist(10, 0.5, 0, 30))])
def test_bad_options_raise_one_line_errors(bad):
    with pytest.raises(ValueError) as err:
        make_trace(TraceConfig(**bad))
    assert "\n" not in str(err.value)
