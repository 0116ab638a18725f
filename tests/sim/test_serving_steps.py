"""Serving steps (a prefill chunk after a KV cache, one decode step of a batch) are priced from
their own attention pairs, KV reads and logit rows; teacher-forced chunks price as before."""

from dataclasses import replace

import pytest

from nectar.telemetry.workload import ChunkWorkload, merge_workloads
from sim.kernels import chunk_kernels
from sim.presets import load_preset
from sim.price_as import rescale
from sim.pricing import ChunkPricer, memory_footprint_B
from sim.synthetic_workload import distilgpt2_moe_workload
from tests.tolerance import approx

PRESET = load_preset("h100_sxm")
D, V, DT, L, E, HIDDEN = 768, 50257, 2, 6, 8, 3072


def decode_step(contexts: list[int], counts: list[list[int]] | None = None) -> ChunkWorkload:
    """One decode step of len(contexts) requests with those cached context lengths."""
    b = len(contexts)
    base = distilgpt2_moe_workload(2, batch=b, seq_len=1, counts=counts)
    return replace(base, attention_pairs=float(sum(c + 1 for c in contexts)), kv_read_tokens=sum(contexts),
                   logit_tokens=b, phase="decode")


def prefill_chunk(q: int, p0: int) -> ChunkWorkload:
    """q prompt tokens of one request whose first p0 tokens are already cached."""
    base = distilgpt2_moe_workload(2, batch=1, seq_len=q)
    return replace(base, attention_pairs=q * p0 + q * (q + 1) / 2, kv_read_tokens=p0, logit_tokens=1, phase="prefill")


def concentrated_counts(tokens: int, distinct: int) -> list[list[int]]:
    """top-2 slots of `tokens` tokens spread over the first `distinct` experts, every layer."""
    slots = 2 * tokens
    row = [slots // distinct + (1 if e < slots % distinct else 0) for e in range(distinct)] + [0] * (E - distinct)
    return [row] * L


# ------------------------------------------------------------------ the record
def test_serving_fields_round_trip_and_old_dicts_load():
    step = decode_step([5, 17, 300])
    assert ChunkWorkload.from_dict(step.to_dict()) == step
    old = distilgpt2_moe_workload(2, batch=2, seq_len=8).to_dict()
    for name in ("attention_pairs", "kv_read_tokens", "logit_tokens", "phase"):
        old.pop(name)
    loaded = ChunkWorkload.from_dict(old)
    assert (loaded.attention_pairs, loaded.kv_read_tokens, loaded.logit_tokens, loaded.phase) == (None, 0, None, "")
    assert loaded.query_key_pairs() == 2 * 8 * 9 / 2


def test_merged_decode_steps_add_their_serving_fields():
    a, b = decode_step([3, 4]), decode_step([10, 20, 30])
    merged = merge_workloads([a, b])
    assert merged.attention_pairs == 4 + 5 + 11 + 21 + 31
    assert (merged.kv_read_tokens, merged.logit_tokens, merged.phase) == (67, 5, "decode")
    with pytest.raises(ValueError, match="phases"):
        merge_workloads([a, prefill_chunk(4, 0)])


@pytest.mark.parametrize("change, field", [
    ({"logit_tokens": 3}, "logit_tokens"), ({"logit_tokens": 0}, "logit_tokens"),
    ({"kv_read_tokens": -1}, "kv_read_tokens"), ({"attention_pairs": float("nan")}, "attention_pairs"),
    ({"phase": "generate"}, "phase")])
def test_bad_serving_fields_are_refused_by_name(change, field):
    with pytest.raises(ValueError, match=field):
        ChunkPricer(PRESET).price(replace(decode_step([1, 2]), **change))


# ------------------------------------------------------------------ teacher-forced: unchanged
def test_teacher_forced_chunks_price_exactly_as_before():
    """Values priced by the simulator before serving steps existed (commit 78264b7)."""
    small = ChunkPricer(PRESET).price(distilgpt2_moe_workload(2, batch=4, seq_len=256, n_layers=2))
    assert (small.flops, small.bytes) == (147526778880.0, 1207637504.0)
    assert small.durations_s(1.0).tolist() == [0.00017818234349889524, 0.004508092921379358,
                                               0.004508092921379358, 0.0006281095071139113]
    assert small.durations_s(0.6).tolist() == [0.00017818234349889524, 0.0045214868634453195,
                                               0.0045214868634453195, 0.0007102222715689589]
    big_workload = distilgpt2_moe_workload(1, batch=32, seq_len=1024)
    big = ChunkPricer(PRESET).price(big_workload)
    assert (big.flops, big.bytes) == (6552324931584.0, 36766213632.0)
    assert big.durations_s(1.0)[-1] == 0.012976480854406135
    assert memory_footprint_B(big_workload, PRESET) == 8313366016


def test_teacher_forced_attention_and_head_follow_the_old_formulas():
    w = distilgpt2_moe_workload(2, batch=3, seq_len=40, n_layers=1)
    block, head = chunk_kernels(w, PRESET)[1], chunk_kernels(w, PRESET)[-1]
    attention = next(k for k in block if k.name == "attention")
    n = 120
    assert (attention.flops, attention.bytes) == (4.0 * 3 * 40 * 41 / 2 * D, 4 * n * D * DT)
    assert [k.name for k in head] == ["ln_f", "lm_head", "loss"]
    assert head[2].bytes == n * V * (DT + 8)


# ------------------------------------------------------------------ decode and prefill
def _expert_bytes(counts: list[list[int]]) -> float:
    """Experts' activations per token plus their weights once if they have tokens (SwiGLU)."""
    per_token, weights = (2 * D + 6 * HIDDEN) * DT, 3 * D * HIDDEN * DT
    return sum(c * per_token + (weights if c > 0 else 0) for row in counts for c in row)


def decode_bytes_closed_form(contexts: list[int], counts: list[list[int]]) -> float:
    """Bytes of a decode step, grouped by what they are (independent of sim.kernels' layout)."""
    b, kv = len(contexts), sum(contexts)
    dense_weights = L * 4 * D * D * DT + V * D * DT           # qkv + out projections; tied LM head
    kv_cache = L * 2 * (kv + b) * D * DT                      # cached K/V read, the new K/V written
    # ln_1 2, qkv in/out 1+3, attention q,k,v,out 4, out_proj in/out 2, residuals 3+3, ln_2 2; router reads + logits
    per_block = 20 * b * D * DT + b * D * DT + 2 * b * E * 4
    dispatch = 5 * sum(sum(row) for row in counts) * D * DT
    embed, head = 7 * b * D * DT, (2 * b * D + b * D + b * V + b * V) * DT  # ln_f, lm_head in/out, argmax
    return dense_weights + _expert_bytes(counts) + kv_cache + L * per_block + dispatch + embed + head


@pytest.mark.parametrize("contexts", [[0], [7, 900, 4000, 12], list(range(100, 3300, 100))])
def test_decode_step_bytes_equal_the_closed_form(contexts):
    counts = concentrated_counts(len(contexts), min(E, 2 * len(contexts)))
    priced = ChunkPricer(PRESET).price(decode_step(contexts, counts))
    assert priced.bytes == approx(decode_bytes_closed_form(contexts, counts), n=4 * L * (E + 12))


def test_decode_attention_reads_the_cache_and_heads_skip_the_loss():
    w = decode_step([10, 20])
    block, head = chunk_kernels(w, PRESET)[1], chunk_kernels(w, PRESET)[-1]
    attention = next(k for k in block if k.name == "attention")
    assert attention.flops == 4.0 * (11 + 21) * D
    assert attention.bytes == (4 * 2 + 2 * 30 + 2 * 2) * D * DT
    assert [k.name for k in head] == ["ln_f", "lm_head", "argmax"]
    assert head[1].flops == 2.0 * 2 * D * V and head[2].bytes == 2 * V * DT


def test_prefill_attention_counts_the_cached_prefix():
    q, p0 = 64, 1000
    w = prefill_chunk(q, p0)
    attention = next(k for k in chunk_kernels(w, PRESET)[1] if k.name == "attention")
    assert attention.flops == 4.0 * (q * p0 + q * (q + 1) / 2) * D
    assert attention.bytes == (4 * q + 2 * p0 + 2 * q) * D * DT
    head = chunk_kernels(w, PRESET)[-1]
    assert head[1].flops == 2.0 * D * V  # one row of logits
    longer = ChunkPricer(PRESET).price(prefill_chunk(q, 4 * p0))
    assert longer.durations_s(1.0).sum() > ChunkPricer(PRESET).price(w).durations_s(1.0).sum()


def test_decode_time_grows_with_the_distinct_experts_touched():
    """Same 16 tokens, same 32 slots per layer: every extra expert with tokens reads its weights."""
    pricer, contexts = ChunkPricer(PRESET), [512] * 16
    times = [pricer.price(decode_step(contexts, concentrated_counts(16, k))).durations_s(1.0).sum()
             for k in range(2, E + 1)]
    assert all(later > earlier for earlier, later in zip(times, times[1:]))
    per_expert_s = 3 * D * HIDDEN * DT / (PRESET.mem_bandwidth_GBps * 1e9 * PRESET.decode_bandwidth_efficiency)
    # the 6 extra experts' weight reads alone (no launches in a captured step); two sums of the kernels' times
    assert times[-1] - times[0] == approx(6 * L * per_expert_s, n=4 * L * (E + 12), scale=times[-1])


# ------------------------------------------------------------------ the captured decode step
def test_a_captured_decode_step_launches_nothing_and_pays_a_latency_per_block():
    """decode_* fields set: bytes at the decode bandwidth, no launch overhead, each block its fixed
    latency plus one per row; without them the step is priced like any chunk."""
    assert PRESET.captured_decode
    step = decode_step([100, 200, 300], concentrated_counts(3, 4))
    eager = PRESET.replace(decode_bandwidth_efficiency=None, decode_block_latency_s=None, decode_row_latency_s=None)
    flat = PRESET.replace(bandwidth_efficiency=0.5, decode_bandwidth_efficiency=0.5, launch_overhead_s=1e-5,
                          decode_block_latency_s=0.0, decode_row_latency_s=0.0)
    kernels = [k for phase in chunk_kernels(step, eager) for k in phase]
    launches_s = sum(k.launches for k in kernels) * 1e-5
    as_chunk = ChunkPricer(flat.replace(decode_block_latency_s=None, decode_row_latency_s=None,
                                        decode_bandwidth_efficiency=None)).price(step).durations_s(1.0).sum()
    captured = ChunkPricer(flat).price(step).durations_s(1.0)
    n = 4 * len(kernels)  # sums over the kernels, each kernel's roofline
    assert captured.sum() == approx(as_chunk - launches_s, n=n, scale=as_chunk)
    latency = flat.replace(decode_block_latency_s=2e-4, decode_row_latency_s=3e-6)
    with_latency = ChunkPricer(latency).price(step).durations_s(1.0)
    assert (with_latency - captured).tolist() == approx([0.0] + [2e-4 + 3 * 3e-6] * L + [0.0], n=n,
                                                        scale=with_latency.max())
    # the eager pricing (57 µs a launch, 8 launches an expert) is several times the captured step
    assert ChunkPricer(eager).price(step).durations_s(1.0).sum() > 5 * ChunkPricer(PRESET).price(step).durations_s(1.0).sum()


def test_a_captured_preset_prices_prefill_and_teacher_forced_chunks_as_before():
    eager = PRESET.replace(decode_bandwidth_efficiency=None, decode_block_latency_s=None, decode_row_latency_s=None)
    for w in (prefill_chunk(64, 100), distilgpt2_moe_workload(2, batch=4, seq_len=256, n_layers=2)):
        assert ChunkPricer(PRESET).price(w).durations_s(1.0).tolist() == ChunkPricer(eager).price(w).durations_s(1.0).tolist()


@pytest.mark.parametrize("change, field", [
    ({"decode_row_latency_s": None}, "decode_"), ({"decode_bandwidth_efficiency": 1.5}, "decode_bandwidth_efficiency"),
    ({"decode_block_latency_s": -1e-6}, "decode_block_latency_s")])
def test_captured_decode_fields_come_together_and_in_range(change, field):
    with pytest.raises(ValueError, match=field):
        PRESET.replace(**change)


def test_pricer_cache_tells_serving_steps_apart():
    """The shape-only table is cached per Shape: a longer cache must not reuse a shorter one's price."""
    pricer = ChunkPricer(PRESET)
    short, long = pricer.price(decode_step([10] * 4)), pricer.price(decode_step([3000] * 4))
    assert long.bytes - short.bytes == L * 2 * 4 * 2990 * D * DT
    assert pricer.price(decode_step([10] * 4)).bytes == short.bytes


def test_memory_footprint_counts_kv_positions():
    step = decode_step([100, 200])
    no_cache = replace(step, kv_read_tokens=0)
    assert memory_footprint_B(step, PRESET) - memory_footprint_B(no_cache, PRESET) == L * 2 * 300 * D * DT
    teacher = distilgpt2_moe_workload(2, batch=2, seq_len=1)
    # the serving step stores its own K/V and keeps 2 logit rows without the loss: same activations
    assert memory_footprint_B(no_cache, PRESET) - memory_footprint_B(teacher, PRESET) == L * 2 * 2 * D * DT


def test_price_as_keeps_a_serving_steps_shape():
    step = replace(decode_step([40, 50, 60]), d_model=128, dtype_bytes=4)
    big = rescale(step, "distilgpt2")
    assert (big.tokens, big.batch, big.seq_len, big.d_model) == (3, 3, 1, 768)
    assert (big.attention_pairs, big.kv_read_tokens, big.logit_tokens, big.phase) == (153.0, 150, 3, "decode")
    assert big.expert_counts() == step.expert_counts()


# ------------------------------------------------------------------ a ride-along check in the step's window
def test_a_check_before_a_step_is_priced_as_its_own_forward():
    """A window whose workload carries `before` (a serving step's shadow check) costs what the two
    forwards cost run one after the other in two windows: the check reads its weights again; it
    is not a bigger batch of one forward (which would read the union of experts once)."""
    from sim.backend import SimBackend

    check = decode_step([40, 41, 42, 43], concentrated_counts(4, 8))
    step = decode_step([40, 41, 42, 43], concentrated_counts(4, 2))

    def truths(*workloads):
        """The simulator's true energy and time of each window (a decode step is below the counter's mJ)."""
        backend = SimBackend(seed=0, preset="h100_sxm")
        out = []
        for w in workloads:
            window = backend.run_chunk(lambda: w)
            out.append((backend.last_truth.energy_J, window.duration_s, window))
        return out

    (both_J, both_s, both), = truths(replace(step, before=check))
    (check_J, check_s, _), (step_J, step_s, _) = truths(check, step)
    (alone_J, _, _), = truths(step)
    # integrated over the same segments on both sides (a running total each): a dozen roundings
    assert both_s == approx(check_s + step_s, n=4 * (L + 2))
    assert both_J == approx(check_J + step_J, n=4 * (L + 2), scale=both_J)
    assert both_J > 1.8 * alone_J                                    # the check is not free
    assert both.workload.forwards() == [check, step]
    merged = ChunkPricer(PRESET).price(merge_workloads([check, step]))
    assert sum(ChunkPricer(PRESET).price(w).durations_s(1.0).sum() for w in (check, step)) > \
        merged.durations_s(1.0).sum()                                # one batch of 8 rows would be cheaper


def test_a_chain_of_forwards_round_trips_and_merges_every_forward():
    check, step = decode_step([7, 9]), decode_step([7, 9], concentrated_counts(2, 3))
    chained = replace(step, before=check)
    assert ChunkWorkload.from_dict(chained.to_dict()) == chained
    assert chained.forwards() == [check, step] and chained.forwards()[1].before is None
    assert merge_workloads([chained]) == merge_workloads([check, step])
