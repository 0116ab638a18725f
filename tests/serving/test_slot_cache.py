"""The slot KV cache against the reference: a full forward of each sequence without any cache.

Requests are prefilled in chunks into their slots, then decoded together in one batch whose rows
have different lengths, with a slot move in between (a request leaving); every logit must equal
the uncached forward's at the same position (MoE-DistilGPT2 and transformers MoE families)."""

import pytest
import torch

from nectar.experiment.forward import install
from nectar.hf.attach import attach
from nectar.serving.engine import ServingEngine
from nectar.serving.frontier import routers_for
from nectar.serving.slot_cache import CacheShape, SlotCache
from tests.hf.models import tiny
from tests.serving.models import tiny_gpt2_moe
from tests.tolerance import assert_close


def _reference_nll(model, seq: torch.Tensor, position: int, target: int) -> torch.Tensor:
    with torch.no_grad():
        logits = model(input_ids=seq[None, : position + 1]).logits[0, position]
    return -torch.log_softmax(logits.float(), -1)[target]


def _check_engine(model, policy: str):
    install(model, routers_for(model, policy))
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(1)
    seqs = [torch.randint(0, vocab, (n,), generator=gen) for n in (40, 25, 33)]
    engine = ServingEngine(model, slots=4, max_tokens=64, policy=policy)
    lengths = [21, 9, 14]                                 # prompt lengths
    for slot, (seq, n) in enumerate(zip(seqs, lengths)):  # chunks of 8 (the last one shorter)
        for start in range(0, n, 8):
            part = seq[start:min(n, start + 8)].tolist()
            result = engine.prefill(slot, part, start, int(seq[start + len(part)]))
        assert_close(result.nll_R[0], _reference_nll(model, seq, n - 1, int(seq[n])), n=64, dtype=torch.float32, scale=10)
    for step in range(4):
        if step == 2:                                     # request 0 leaves; the last row moves into slot 0
            engine.move(2, 0)
            seqs, lengths = [seqs[2], seqs[1]], [lengths[2], lengths[1]]
        feed = [int(s[n]) for s, n in zip(seqs, lengths)]
        targets = [int(s[n + 1]) for s, n in zip(seqs, lengths)]
        result = engine.decode(feed, lengths, targets)
        want = torch.stack([_reference_nll(model, s, n, t) for s, n, t in zip(seqs, lengths, targets)])
        assert_close(result.nll_R, want, n=64, dtype=torch.float32, scale=10)
        assert result.workload.phase == "decode" and result.workload.kv_read_tokens == sum(lengths)
        lengths = [n + 1 for n in lengths]


def test_prefill_chunks_and_decode_batches_equal_the_uncached_forward_gpt2_moe():
    _check_engine(tiny_gpt2_moe(), "static-top2")


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe"])
def test_prefill_chunks_and_decode_batches_equal_the_uncached_forward_transformers(family):
    model = attach(tiny(family))
    _check_engine(model, f"static-top{model.top_k}")


def test_a_shadow_forward_writes_nothing():
    model = tiny_gpt2_moe()
    install(model, routers_for(model, "static-top2"))
    engine = ServingEngine(model, slots=2, max_tokens=32)
    engine.prefill(0, [5, 6, 7, 8], 0, 9)
    engine.prefill(1, [1, 2], 0, 3)
    before = [k.clone() for k in engine.cache.keys]
    engine.cache.read_only = True
    shadow = engine.decode([9, 3], [4, 2], [10, 4])
    engine.cache.read_only = False
    assert all(torch.equal(a, b) for a, b in zip(before, engine.cache.keys))
    real = engine.decode([9, 3], [4, 2], [10, 4])
    assert torch.equal(shadow.nll_R, real.nll_R)


def test_out_of_range_slots_and_positions_are_refused():
    cache = SlotCache(CacheShape(1, 1, 4), slots=2, max_tokens=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="slot 2"):
        cache.for_prefill(2, 0, 1)
    with pytest.raises(ValueError, match="beyond the cache"):
        cache.for_prefill(0, 6, 3)
    with pytest.raises(ValueError, match="do not fit"):
        cache.for_decode(torch.zeros(3, dtype=torch.long), 1)
    with pytest.raises(RuntimeError, match="outside a forward"):
        cache.update(torch.zeros(1, 1, 1, 4), torch.zeros(1, 1, 1, 4), 0)
