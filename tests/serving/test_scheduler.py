"""The continuous-batching scheduler against a brute-force reference written here: a per-request
event loop with the same policy (FCFS, one prefill chunk then one decode step per iteration, slot
limit) but no slots, on random traces. The scheduler-driven loop also replays every SlotMove on a
list of slots (with each slot's cache length) and checks the slot invariant after every step."""

from __future__ import annotations

import numpy as np
import pytest

from nectar.serving.scheduler import PrefillChunk, Scheduler, SlotMove
from nectar.serving.traces import LengthDist, RequestSpec, TraceConfig, make_trace


def prefill_time_s(n_tokens: int) -> float:
    return 0.01 + 0.001 * n_tokens


def decode_time_s(batch: int) -> float:
    return 0.02 + 0.001 * batch


def reference(specs, batch_max, chunk, max_context):
    """Per-request event loop: {id: (t_admit, token times)} and the admission order."""
    state = {s.request_id: dict(arrival=s.arrival_s, prompt=min(s.prompt_tokens, max_context - s.output_tokens),
                                out=s.output_tokens, done_prefill=0, times=[], admit=None) for s in specs}
    queue = sorted(state, key=lambda r: (state[r]["arrival"], r))
    decoding, prefilling, now, order = [], None, 0.0, []
    while queue or decoding or prefilling is not None:
        if not decoding and prefilling is None and state[queue[0]]["arrival"] > now:
            now = state[queue[0]]["arrival"]
        if prefilling is None and queue and len(decoding) < batch_max and state[queue[0]]["arrival"] <= now:
            prefilling = queue.pop(0)
            state[prefilling]["admit"] = now
            order.append(prefilling)
        if prefilling is not None:
            req = state[prefilling]
            n = min(chunk, req["prompt"] - req["done_prefill"])
            now += prefill_time_s(n)
            req["done_prefill"] += n
            if req["done_prefill"] == req["prompt"]:
                req["times"].append(now)
                if req["out"] > 1:
                    decoding.append(prefilling)
                prefilling = None
        if decoding:
            now += decode_time_s(len(decoding))
            for rid in decoding:
                state[rid]["times"].append(now)
            decoding = [r for r in decoding if len(state[r]["times"]) < state[r]["out"]]
    return state, order


def drive(sched: Scheduler, batch_max: int):
    """The loop of the module docstring, replaying moves on a slot list and checking invariants."""
    slots, cache_len, now, order, max_busy = [None] * batch_max, [0] * batch_max, 0.0, [], 0
    while not sched.done():
        now = max(now, sched.next_event_s(now))
        chunk = sched.plan_prefill(now)
        if chunk:
            assert sched.plan_prefill(now) == chunk                    # planning twice changes nothing
            assert chunk.slot == len(sched.decode_rows()) and chunk.n_tokens >= 1
            if chunk.start == 0:
                assert slots[chunk.slot] is None
                order.append(chunk.request_id)
            else:
                assert slots[chunk.slot] == chunk.request_id and cache_len[chunk.slot] == chunk.start
            slots[chunk.slot], cache_len[chunk.slot] = chunk.request_id, chunk.start + chunk.n_tokens
            now += prefill_time_s(chunk.n_tokens)
            _apply(sched.finish_prefill(chunk, now), slots, cache_len)
            if chunk.last and chunk.request_id not in sched.decode_rows():
                slots[chunk.slot] = None                                # one-token request left at once
        rows = sched.decode_rows()
        max_busy = max(max_busy, len(rows) + (sched.prefilling() is not None))
        if rows:
            assert sched.context_lengths() == cache_len[:len(rows)]     # a moved request kept its cache
            for i in range(len(rows)):
                cache_len[i] += 1
            now += decode_time_s(len(rows))
            moves = sched.finish_decode(now)
            _apply(moves, slots, cache_len)
            for i in range(len(sched.decode_rows()), batch_max):
                if slots[i] not in (None, sched.prefilling()):
                    slots[i] = None                                     # finished at the tail, no move
        b = len(sched.decode_rows())
        assert slots[:b] == sched.decode_rows()
        if sched.prefilling() is not None:
            assert slots[b] == sched.prefilling()
        max_busy = max(max_busy, b + (sched.prefilling() is not None))
    assert sched.next_event_s(now) is None
    return order, max_busy


def _apply(moves: list[SlotMove], slots: list, cache_len: list) -> None:
    for m in moves:
        assert slots[m.src] is not None and m.src != m.dst
        slots[m.dst], cache_len[m.dst], slots[m.src] = slots[m.src], cache_len[m.src], None


def _random_specs(seed: int, n: int) -> list[RequestSpec]:
    cfg = TraceConfig(name=("steady", "bursty", "ramp")[seed % 3], n_requests=n, rate_rps=30.0, seed=seed,
                      prompt=LengthDist(20, 0.8, 1, 90), output=LengthDist(6, 0.9, 1, 40))
    return make_trace(cfg)


@pytest.mark.parametrize("seed,batch_max,chunk", [(0, 4, 16), (1, 8, 7), (2, 1, 32), (3, 3, 1), (4, 16, 64), (5, 2, 5)])
def test_scheduler_matches_the_brute_force_reference(seed, batch_max, chunk):
    specs = _random_specs(seed, 60)
    max_context = 100
    sched = Scheduler(batch_max, chunk, max_context)
    sched.add(specs[::-1])                                             # any order in, FCFS out
    order, max_busy = drive(sched, batch_max)
    expected, expected_order = reference(specs, batch_max, chunk, max_context)
    assert order == expected_order == sorted(order, key=lambda r: (specs[r].arrival_s, r))
    assert max_busy <= batch_max
    for rec in sched.requests():
        exp = expected[rec.request_id]
        assert rec.generated == rec.output_tokens == exp["out"]
        assert rec.token_times_s == pytest.approx(exp["times"], abs=1e-9)
        assert np.all(np.diff(rec.token_times_s) > 0)
        assert rec.t_admit_s == pytest.approx(exp["admit"]) and rec.t_admit_s >= rec.arrival_s
        assert rec.t_first_token_s == rec.token_times_s[0] and rec.t_done_s == rec.token_times_s[-1]
        assert rec.prompt_tokens + rec.output_tokens <= max_context
        assert rec.prompt_tokens + rec.prompt_cut_tokens == specs[rec.request_id].prompt_tokens


def test_batch_max_one_serves_one_request_at_a_time():
    specs = [RequestSpec(0, 0.0, 5, 3), RequestSpec(1, 0.0, 3, 1), RequestSpec(2, 0.5, 4, 2)]
    sched = Scheduler(1, 2, 64)
    sched.add(specs)
    chunks = []
    now = 0.0
    while not sched.done():
        now = max(now, sched.next_event_s(now))
        chunk = sched.plan_prefill(now)
        if chunk:
            chunks.append(chunk)
            now += 0.1
            assert sched.finish_prefill(chunk, now) == []
        if sched.decode_rows():
            assert sched.decode_rows() == [chunks[-1].request_id] and sched.plan_prefill(now) is None
            now += 0.1
            assert sched.finish_decode(now) == []
    assert [(c.request_id, c.start, c.n_tokens, c.last, c.slot) for c in chunks] == [
        (0, 0, 2, False, 0), (0, 2, 2, False, 0), (0, 4, 1, True, 0), (1, 0, 2, False, 0), (1, 2, 1, True, 0),
        (2, 0, 2, False, 0), (2, 2, 2, True, 0)]
    recs = sched.requests()
    assert [len(r.token_times_s) for r in recs] == [3, 1, 2]
    assert recs[2].t_admit_s == pytest.approx(0.7)      # request 0: 3 chunks + 2 decodes; request 1: 2 chunks
    assert recs[1].t_done_s == recs[1].t_first_token_s


def test_moves_fill_finished_slots_from_the_tail_and_move_the_prefill_down():
    """Rows 0..3 with outputs finishing rows 0 and 2 together; request 4 prefilling at slot 4."""
    sched = Scheduler(8, 100, 1000)
    sched.add([RequestSpec(i, 0.0, 10, out) for i, out in enumerate([2, 5, 2, 5, 5])])
    t = 0.0
    for _ in range(4):
        t += 1.0
        chunk = sched.plan_prefill(t)
        sched.finish_prefill(chunk, t)
    assert sched.decode_rows() == [0, 1, 2, 3]
    chunk = sched.plan_prefill(t)
    assert chunk == PrefillChunk(4, 4, 0, 10, True)
    # rows 0 and 2 have 1 token; this step gives them their 2nd: they finish
    moves = sched.finish_decode(t + 1.0)
    assert moves == [SlotMove(3, 0), SlotMove(4, 2)]
    assert sched.decode_rows() == [3, 1] and sched.prefilling() == 4
    assert sched.context_lengths() == [11, 11]
    assert sched.finish_prefill(sched.plan_prefill(t + 1.0), t + 2.0) == []
    assert sched.decode_rows() == [3, 1, 4]


def test_idle_until_the_next_arrival_and_none_when_done():
    sched = Scheduler(2, 8, 64)
    assert sched.done() and sched.next_event_s(0.0) is None
    sched.add([RequestSpec(7, 2.5, 4, 1)])
    assert sched.next_event_s(0.0) == 2.5 and sched.plan_prefill(1.0) is None
    chunk = sched.plan_prefill(2.5)
    assert chunk == PrefillChunk(7, 0, 0, 4, True) and sched.next_event_s(2.5) == 2.5
    sched.finish_prefill(chunk, 3.0)
    assert sched.done() and sched.requests()[0].t_done_s == 3.0


def test_too_long_prompts_are_cut_from_the_left_and_impossible_outputs_rejected():
    sched = Scheduler(2, 8, 50)
    sched.add([RequestSpec(0, 0.0, 60, 20)])
    rec = sched.requests()[0]
    assert (rec.prompt_tokens, rec.prompt_cut_tokens) == (30, 30)
    with pytest.raises(ValueError, match="no prompt room"):
        sched.add([RequestSpec(1, 0.0, 5, 50)])
    with pytest.raises(ValueError, match="already added"):
        sched.add([RequestSpec(0, 0.0, 5, 5)])


@pytest.mark.parametrize("args", [(0, 8, 64), (2, 0, 64), (2, 8, 0), (2.5, 8, 64)])
def test_bad_options(args):
    with pytest.raises(ValueError, match="positive integer"):
        Scheduler(*args)


def test_a_stale_chunk_or_a_step_back_in_time_is_refused():
    sched = Scheduler(2, 4, 64)
    sched.add([RequestSpec(0, 0.0, 8, 3)])
    chunk = sched.plan_prefill(0.0)
    sched.finish_prefill(chunk, 1.0)
    with pytest.raises(ValueError, match="not the one planned"):
        sched.finish_prefill(chunk, 2.0)
    sched.finish_prefill(sched.plan_prefill(2.0), 2.0)
    with pytest.raises(ValueError, match="does not come after"):
        sched.finish_decode(2.0)
