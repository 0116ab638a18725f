"""The learning-rate schedule against its closed form, and stage progress by steps and by time."""

from __future__ import annotations

import math

import pytest

from nectar.train.schedule import CosineSchedule, StageClock
from tests.tolerance import approx


def test_cosine_schedule_closed_form():
    s = CosineSchedule(warmup_steps=10, floor=0.1)
    # a warm-up ramp or a cosine: a cos and a few +, ×, ÷ (n = 8 roundings)
    assert s.factor(0, 0.0) == approx(0.1, n=8) and s.factor(9, 0.0) == approx(1.0, n=8)
    for p in (0.0, 0.25, 0.5, 0.9, 1.0):
        assert s.factor(50, p) == approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p)), n=8)
    assert s.factor(50, 1.7) == approx(0.1, n=8)                    # past the end: the floor
    assert CosineSchedule().factor(0, 0.0) == 1.0
    with pytest.raises(ValueError):
        CosineSchedule(floor=1.5)


def test_stage_progress_by_steps_time_or_both():
    steps = StageClock(steps=100, start=0.0)
    assert steps.progress(25, now=1e9) == 0.25 and not steps.time_limited(25, now=1e9)
    timed = StageClock(deadline=10.0, start=0.0)
    assert timed.progress(3, now=4.0) == approx(0.4, n=2) and timed.time_limited(3, now=10.0)  # −, ÷
    both = StageClock(steps=100, deadline=10.0, start=0.0)
    assert both.progress(10, now=5.0) == approx(0.5, n=2)            # the further of the two
    assert both.progress(80, now=5.0) == approx(0.8, n=2)
    assert both.time_limited(10, now=11.0) and not both.time_limited(100, now=11.0)
    with pytest.raises(ValueError, match="step count or a time budget"):
        StageClock()


def test_warmup_share_ends_the_warmup_by_progress_too():
    plain = CosineSchedule(warmup_steps=100, floor=0.1)
    shared = CosineSchedule(warmup_steps=100, floor=0.1, warmup_share=0.1)
    cosine = lambda p: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * p))  # noqa: E731
    # a slow stage: step 9 (10 % of the steps' warm-up) at 30 % of its time
    assert plain.factor(9, 0.3) == pytest.approx(0.1 * cosine(0.3))
    assert shared.factor(9, 0.3) == pytest.approx(cosine(0.3))
    # early in the stage both ramp; the share's ramp takes over where it is further along
    assert shared.factor(0, 0.05) == pytest.approx(0.5 * cosine(0.05))
    assert shared.factor(60, 0.05) == pytest.approx(0.61 * cosine(0.05))
    with pytest.raises(ValueError, match="warmup_share"):
        CosineSchedule(warmup_steps=10, warmup_share=0.0)
