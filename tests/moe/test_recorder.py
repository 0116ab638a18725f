"""RoutingRecorder: counts, drops and agreement against a per-token loop; counts handed over by the
dispatch equal the recorder's own; the counting reads nothing back to the host."""

from __future__ import annotations

import torch

from nectar.moe.experts import ExpertSpec, build_experts
from nectar.moe.layer import MoELayer
from nectar.moe.recorder import RoutingRecorder, active_counts, static_choice
from nectar.moe.static_routers import CapacityRouter
from tests.tolerance import approx

D, E = 8, 5


def make_layer() -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(D, build_experts([ExpertSpec("gelu", 16, 3), ExpertSpec("zero"), ExpertSpec("copy")], D),
                     CapacityRouter(E, 2, capacity_factor=0.6))
    with torch.no_grad():
        layer.gate.weight.mul_(5)
    return layer


def loop_counts(decision) -> list[int]:
    counts = [0] * E
    for t in range(decision.experts.shape[0]):
        for s in range(decision.experts.shape[1]):
            if decision.mask[t, s] and not decision.dropped[t, s]:
                counts[int(decision.experts[t, s])] += 1
    return counts


def test_recorder_sums_counts_drops_and_agreement_over_micro_batches():
    layer = make_layer()
    recorder = RoutingRecorder([layer], sample_stride=3, max_sample_tokens=5)
    layer.recorder = recorder
    expected_counts, expected_dropped, hits = [0] * E, 0, 0
    with torch.no_grad():
        for n in (7, 12):
            x = torch.randn(n, D)
            layer(x)
            d = layer.last_decision
            expected_counts = [a + b for a, b in zip(expected_counts, loop_counts(d))]
            expected_dropped += int(d.dropped.sum())
            top2 = d.logits.topk(2, dim=-1).indices
            for t in range(n):
                for s in range(2):
                    if d.mask[t, s] and not d.dropped[t, s] and int(d.experts[t, s]) in top2[t].tolist():
                        hits += 1
    (summary,) = recorder.summary()
    assert summary.tokens_per_expert == expected_counts and summary.dropped_tokens == expected_dropped > 0
    assert summary.agreement == approx(hits / (2 * 19))  # integer counts, one division
    assert summary.logits.shape == (5, E) and summary.inputs.shape == (5, D)  # tokens 0, 3, ..., 12 (cap 5)


def test_active_counts_equal_the_loop_and_trace_without_host_reads():
    layer = make_layer()
    with torch.no_grad():
        layer(torch.randn(30, D))
    decision = layer.last_decision
    assert active_counts(decision).tolist() == loop_counts(decision) == layer.last_metrics.tokens_per_expert
    traced = torch.compile(active_counts, backend="eager", fullgraph=True)  # fails on any host read
    assert traced(decision).tolist() == loop_counts(decision)


def test_static_choice_is_topk_and_takes_the_lower_expert_among_equals():
    """The agreement's static top-k: topk's experts where the logits have no ties (any k), and among
    equal logits the lower index (as the fused router breaks ties), in bf16 too."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        logits = torch.stack([torch.randperm(10, generator=gen) for _ in range(64)]).to(dtype)   # distinct per row
        for k in (1, 2, 3):
            assert torch.equal(static_choice(logits, k), logits.topk(k, dim=-1).indices)
        tied = torch.tensor([[0.0, 2.0, 1.0, 2.0], [3.0, 3.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0]], dtype=dtype)
        assert static_choice(tied, 2).tolist() == [[1, 3], [0, 1], [0, 1]]
        assert static_choice(tied, 1).tolist() == [[1], [0], [0]]
