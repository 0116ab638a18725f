"""Serving load traces: when requests arrive and how many prompt and output tokens each has.

Lengths. Prompt and output lengths are drawn from clipped lognormals. Chat-serving length
distributions (ShareGPT conversations, as used by the vLLM and ML.ENERGY serving benchmarks, and the
Azure LLM inference traces described in the Splitwise paper) are long-tailed and roughly lognormal:
most requests are a few hundred tokens, a few are several times longer. A lognormal with median m and
shape sigma has density of ln(L) ~ Normal(ln m, sigma); we round to integers and clip to
[min_tokens, max_tokens] so that a KV cache of fixed size holds every request. Defaults: prompts
median 256 (sigma 0.6, 16..1024 tokens), outputs median 128 (sigma 0.6, 8..512 tokens). Clipping
leaves the median unchanged as long as min_tokens <= median <= max_tokens.

Arrivals (`TRACES`), all with mean rate `rate_rps` requests per second:
- "steady": a Poisson process (exponential inter-arrival times, coefficient of variation 1).
- "bursty": an on/off Markov-modulated Poisson process. Phases alternate with exponentially
  distributed lengths, mean BURST_ON_S = 2 s on and BURST_OFF_S = 8 s off; arrivals come at
  BURST_FACTOR = 4x rate_rps during a burst and at QUIET_FACTOR = 0.25x during a quiet phase, so the
  long-run mean is (2*4 + 8*0.25)/(2+8) = 1x rate_rps. The first phase is on with its stationary
  probability 2/10. Inter-arrival times have a coefficient of variation > 1.
- "ramp": a time-inhomogeneous Poisson process over D = n_requests / rate_rps seconds whose rate
  rises linearly from 0.2x to 1.8x rate_rps (mean 1x). The trace has exactly n_requests arrivals:
  conditioned on N(D) = n, the arrival times of a Poisson process are n i.i.d. draws from the
  density rate(t)/integral(rate), sorted; we draw them by inverting that CDF.

`make_trace(cfg)` is deterministic per `cfg.seed` (numpy's default_rng); request ids are 0..n-1 in
arrival order.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

TRACES = ("steady", "bursty", "ramp")
BURST_ON_S = 2.0            # mean length of a burst (exponential), s
BURST_OFF_S = 8.0           # mean length of a quiet phase (exponential), s
BURST_FACTOR = 4.0          # arrival rate in a burst, x rate_rps
QUIET_FACTOR = (BURST_ON_S + BURST_OFF_S - BURST_FACTOR * BURST_ON_S) / BURST_OFF_S   # 0.25: keeps the mean
RAMP_START, RAMP_END = 0.2, 1.8                                                        # rate at t=0 and t=D, x rate_rps


@dataclass(frozen=True)
class LengthDist:
    """A lognormal token-length distribution (median, shape sigma), rounded and clipped to [min, max]."""

    median: int
    sigma: float
    min_tokens: int
    max_tokens: int

    def validate(self) -> None:
        if self.min_tokens < 1 or self.max_tokens < self.min_tokens:
            raise ValueError(f"length bounds must satisfy 1 <= min_tokens <= max_tokens, got {self.min_tokens}..{self.max_tokens}")
        if not self.min_tokens <= self.median <= self.max_tokens:
            raise ValueError(f"length median {self.median} must lie in [{self.min_tokens}, {self.max_tokens}]")
        if not (math.isfinite(self.sigma) and self.sigma >= 0):
            raise ValueError(f"length sigma must be finite and >= 0, got {self.sigma}")

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """n lengths (int64)."""
        self.validate()
        if n < 0:
            raise ValueError(f"number of lengths must be >= 0, got {n}")
        raw = np.exp(rng.normal(math.log(self.median), self.sigma, size=n))
        return np.clip(np.rint(raw), self.min_tokens, self.max_tokens).astype(np.int64)


def default_prompt() -> LengthDist:
    return LengthDist(median=256, sigma=0.6, min_tokens=16, max_tokens=1024)


def default_output() -> LengthDist:
    return LengthDist(median=128, sigma=0.6, min_tokens=8, max_tokens=512)


@dataclass(frozen=True)
class TraceConfig:
    """A named load trace: n_requests arrivals at mean rate rate_rps, seeded lengths."""

    name: str = "steady"
    n_requests: int = 200
    rate_rps: float = 4.0
    seed: int = 0
    prompt: LengthDist = field(default_factory=default_prompt)
    output: LengthDist = field(default_factory=default_output)

    def validate(self) -> None:
        parse_trace(self.name)
        if self.n_requests < 1:
            raise ValueError(f"n_requests must be >= 1, got {self.n_requests}")
        if not (math.isfinite(self.rate_rps) and self.rate_rps > 0):
            raise ValueError(f"rate_rps must be a finite positive number, got {self.rate_rps}")
        self.prompt.validate()
        self.output.validate()


@dataclass(frozen=True)
class RequestSpec:
    """One request of a trace: when it arrives (s on the backend's clock) and its lengths (tokens)."""

    request_id: int
    arrival_s: float
    prompt_tokens: int
    output_tokens: int


def parse_trace(spec: str) -> str:
    """The trace name `spec` if it is one of TRACES (usable as an argparse type)."""
    name = spec.strip().lower()
    if name not in TRACES:
        raise ValueError(f"unknown trace {spec!r}; choose one of {', '.join(TRACES)}")
    return name


def steady_arrivals(rng: np.random.Generator, n: int, rate_rps: float) -> np.ndarray:
    """n arrival times of a Poisson process at rate_rps."""
    return np.cumsum(rng.exponential(1.0 / rate_rps, size=n))


def bursty_arrivals(rng: np.random.Generator, n: int, rate_rps: float) -> np.ndarray:
    """n arrival times of the on/off modulated Poisson process described in the module docstring."""
    times: list[float] = []
    t_s, on = 0.0, bool(rng.random() < BURST_ON_S / (BURST_ON_S + BURST_OFF_S))
    while len(times) < n:
        length_s = rng.exponential(BURST_ON_S if on else BURST_OFF_S)
        rate = rate_rps * (BURST_FACTOR if on else QUIET_FACTOR)
        arrival_s = t_s + rng.exponential(1.0 / rate)
        while arrival_s < t_s + length_s and len(times) < n:
            times.append(arrival_s)
            arrival_s += rng.exponential(1.0 / rate)
        t_s, on = t_s + length_s, not on
    return np.asarray(times)


def ramp_arrivals(rng: np.random.Generator, n: int, rate_rps: float) -> np.ndarray:
    """n arrival times over D = n/rate_rps s with rate rising linearly RAMP_START → RAMP_END x rate_rps."""
    a, b = RAMP_START, (RAMP_END - RAMP_START) / 2       # CDF of x = t/D: F(x) = a*x + b*x^2, F(1) = 1
    u = rng.random(n)
    x = (-a + np.sqrt(a * a + 4 * b * u)) / (2 * b)
    return np.sort(x) * (n / rate_rps)


ARRIVALS = {"steady": steady_arrivals, "bursty": bursty_arrivals, "ramp": ramp_arrivals}


def make_trace(cfg: TraceConfig) -> list[RequestSpec]:
    """The trace's requests, sorted by arrival, ids 0..n-1 in that order; deterministic per seed."""
    cfg.validate()
    rng = np.random.default_rng(cfg.seed)
    arrivals = ARRIVALS[parse_trace(cfg.name)](rng, cfg.n_requests, cfg.rate_rps)
    prompts = cfg.prompt.sample(rng, cfg.n_requests)
    outputs = cfg.output.sample(rng, cfg.n_requests)
    return [RequestSpec(i, float(t), int(p), int(o)) for i, (t, p, o) in enumerate(zip(arrivals, prompts, outputs))]
