"""Serving metrics against closed forms on a hand-built run, np.percentile on hand lists, and a
per-token brute-force energy attribution on a scheduler-driven random run."""

from __future__ import annotations

import math

import numpy as np
import pytest

from nectar.serving.metrics import NO_STEADY, StepRecord, attribute_energy, summarize
from nectar.serving.scheduler import RequestRecord, Scheduler
from nectar.serving.traces import LengthDist, TraceConfig, make_trace


def hand_run():
    """batch_max 2. A (id 0): arrives 0, prompt 4, 3 tokens at 1, 2, 4. B (id 1): arrives 0.5, prompt 2,
    2 tokens at 3, 4. Then 2 s idle."""
    steps = [StepRecord("prefill", 0.0, 1.0, 4.0, 0, 4, 1, [0]),
             StepRecord("decode", 1.0, 2.0, 2.0, 1, 1, 1, [0]),
             StepRecord("prefill", 2.0, 3.0, 3.0, 0, 2, 1, [1]),
             StepRecord("decode", 3.0, 4.0, 6.0, 2, 2, 2, [0, 1]),
             StepRecord("idle", 4.0, 6.0, 1.0)]
    requests = [RequestRecord(0, 0.0, 4, 3, t_admit_s=0.0, t_first_token_s=1.0, t_done_s=4.0, token_times_s=[1.0, 2.0, 4.0]),
                RequestRecord(1, 0.5, 2, 2, t_admit_s=2.0, t_first_token_s=3.0, t_done_s=4.0, token_times_s=[3.0, 4.0])]
    return steps, requests


def test_hand_run_closed_forms():
    steps, requests = hand_run()
    m = summarize(steps, requests, batch_max=2)
    assert (m.prefill_J, m.decode_J, m.idle_J) == (7.0, 8.0, 1.0)
    assert m.generated_tokens == 5 and m.J_per_token == pytest.approx(15 / 5)
    assert m.steady_steps == 1 and m.steady_J_per_token == pytest.approx(6 / 2) and m.flags == []
    assert attribute_energy(steps) == pytest.approx({0: 4 + 2 + 3, 1: 3 + 3})
    assert m.J_per_request == pytest.approx((9 + 6) / 2)
    assert (m.ttft_p50_s, m.ttft_p99_s) == pytest.approx((np.percentile([1, 2.5], 50), np.percentile([1, 2.5], 99)))
    assert (m.tpot_p50_s, m.tpot_p99_s) == pytest.approx((np.percentile([1.5, 1], 50), np.percentile([1.5, 1], 99)))
    assert m.tokens_per_s == pytest.approx(5 / 6) and m.mean_batch == 1.5
    assert m.to_dict()["steady_J_per_token"] == m.steady_J_per_token and m.to_dict()["flags"] == []


def test_steady_state_counts_only_full_steps():
    steps, requests = hand_run()
    half = summarize(steps, requests, batch_max=2, full_fraction=0.5)
    assert half.steady_steps == 2 and half.steady_J_per_token == pytest.approx((2 + 6) / 3)
    none = summarize(steps, requests, batch_max=4)
    assert math.isnan(none.steady_J_per_token) and none.flags == [NO_STEADY] and none.steady_steps == 0
    assert none.J_per_token == pytest.approx(3.0)                  # everything else does not depend on batch_max


def test_percentiles_follow_numpy_and_skip_what_does_not_count():
    rng = np.random.default_rng(4)
    requests, ttft, tpot = [], [], []
    for i in range(41):
        arrival, first, out = rng.uniform(0, 10), rng.uniform(0.1, 2), int(rng.integers(1, 6))
        done = first + rng.uniform(0.5, 3) * (out > 1)
        if i % 10 == 9:                                             # never served: no TTFT, no TPOT
            requests.append(RequestRecord(i, arrival, 5, out))
            continue
        requests.append(RequestRecord(i, arrival, 5, out, t_admit_s=arrival, t_first_token_s=arrival + first,
                                      t_done_s=arrival + done))
        ttft.append(first)
        if out > 1:
            tpot.append((done - first) / (out - 1))
    m = summarize([StepRecord("idle", 0.0, 1.0, 0.0)], requests, batch_max=4)
    assert m.ttft_p50_s == pytest.approx(np.percentile(ttft, 50)) and m.ttft_p99_s == pytest.approx(np.percentile(ttft, 99))
    assert m.tpot_p50_s == pytest.approx(np.percentile(tpot, 50)) and m.tpot_p99_s == pytest.approx(np.percentile(tpot, 99))
    assert math.isnan(m.J_per_token) and math.isnan(m.mean_batch) and m.J_per_request == 0.0


def scheduled_run(seed: int, batch_max: int):
    """Drive the scheduler over a random trace with made-up step energies; steps and requests."""
    cfg = TraceConfig(name="bursty", n_requests=40, rate_rps=20.0, seed=seed,
                      prompt=LengthDist(12, 0.7, 1, 40), output=LengthDist(5, 0.8, 1, 20))
    sched, steps, now, rng = Scheduler(batch_max, 8, 64), [], 0.0, np.random.default_rng(seed)
    sched.add(make_trace(cfg))
    while not sched.done():
        t = sched.next_event_s(now)
        if t > now:
            steps.append(StepRecord("idle", now, t, 0.1 * (t - now)))
            now = t
        chunk = sched.plan_prefill(now)
        if chunk:
            steps.append(StepRecord("prefill", now, now + 0.01, rng.uniform(0.5, 2), 0, chunk.n_tokens, int(chunk.last), [chunk.request_id]))
            now += 0.01
            sched.finish_prefill(chunk, now)
        rows = sched.decode_rows()
        if rows:
            steps.append(StepRecord("decode", now, now + 0.02, rng.uniform(0.5, 2), len(rows), len(rows), len(rows), rows))
            now += 0.02
            sched.finish_decode(now)
    return steps, sched.requests()


def brute_force_shares(steps):
    """Per computed token: energy / tokens of its step, to the request that owns the token."""
    out = {}
    for s in steps:
        owners = s.request_ids * s.tokens if s.phase == "prefill" else s.request_ids
        for rid in owners:
            out[rid] = out.get(rid, 0.0) + s.energy_J / s.tokens
    return out


@pytest.mark.parametrize("seed,batch_max", [(0, 4), (1, 1), (2, 8)])
def test_attribution_sums_to_busy_energy_and_matches_a_per_token_split(seed, batch_max):
    steps, requests = scheduled_run(seed, batch_max)
    m = summarize(steps, requests, batch_max)
    shares = attribute_energy(steps)
    assert shares == pytest.approx(brute_force_shares(steps))
    assert sum(shares.values()) == pytest.approx(m.prefill_J + m.decode_J)
    assert m.J_per_request * len(requests) == pytest.approx(m.prefill_J + m.decode_J)
    assert m.generated_tokens == sum(r.output_tokens for r in requests)
    assert m.tokens_per_s == pytest.approx(m.generated_tokens / (steps[-1].t_end_s - steps[0].t_start_s))
    full = [s for s in steps if s.phase == "decode" and s.batch >= 0.9 * batch_max]
    assert m.steady_steps == len(full)
    if full:
        assert m.steady_J_per_token == pytest.approx(sum(s.energy_J for s in full) / sum(s.batch for s in full))


@pytest.mark.parametrize("step", [StepRecord("warmup", 0, 1, 1.0), StepRecord("idle", 1, 0, 1.0),
                                  StepRecord("idle", 0, 1, -1.0), StepRecord("decode", 0, 1, 1.0, 2, 2, 2, [0]),
                                  StepRecord("prefill", 0, 1, 1.0, 0, 4, 1, [0, 1]), StepRecord("idle", 0, 1, 0.0, 0, 1, 0, [])])
def test_bad_steps_raise_one_line_errors(step):
    with pytest.raises(ValueError) as err:
        summarize([step], [], batch_max=2)
    assert "\n" not in str(err.value)


def test_bad_options():
    with pytest.raises(ValueError, match="full_fraction"):
        summarize([], [], batch_max=2, full_fraction=0.0)
