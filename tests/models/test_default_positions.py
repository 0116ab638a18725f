"""The MoE-DistilGPT2 forward without transformers' packed-sequence host read: when the caller gives
no position ids the check is answered without reading, and nothing else changes — the logits are
bit-for-bit those of the checked forward, for every way the model is called."""

import threading
from collections import Counter

import pytest
import torch
from transformers import masking_utils

from nectar.experiment.host_reads import count_host_reads
from nectar.models.default_positions import INSTALLED, default_positions
from tests.conftest import tiny_moe


@pytest.fixture(scope="module")
def model():
    return tiny_moe()


def ids_of(batch=3, length=20, seed=1):
    return torch.randint(0, 100, (batch, length), generator=torch.Generator().manual_seed(seed))


def logits_and_reads(model, **inputs):
    with torch.no_grad(), count_host_reads() as reads:
        logits = model(**inputs).logits
    return logits, dict(reads)


@pytest.fixture
def unpatched(monkeypatch):
    """Run transformers' own check again, for the forward as it was before (the old call)."""
    def restore():
        monkeypatch.setattr(masking_utils, "find_packed_sequence_indices",
                            masking_utils.find_packed_sequence_indices.__wrapped__)
    return restore


def test_the_check_is_patched_in_this_transformers():
    assert INSTALLED and masking_utils.find_packed_sequence_indices.__nectar_default_positions__


def test_no_position_ids_no_host_read_and_the_same_logits(model, unpatched):
    ids = ids_of()
    positions = torch.arange(ids.shape[1]).unsqueeze(0)
    new, new_reads = logits_and_reads(model, input_ids=ids, use_cache=False)
    explicit, explicit_reads = logits_and_reads(model, input_ids=ids, position_ids=positions, use_cache=False)
    unpatched()
    old, old_reads = logits_and_reads(model, input_ids=ids, use_cache=False)
    assert old_reads == explicit_reads                                  # (the CPU's loop dispatch reads too)
    assert Counter(old_reads) - Counter(new_reads) == {"__bool__": 1}  # the check's `.all()`, and only it
    assert torch.equal(new, old) and torch.equal(new, explicit)


INPUTS = {"padding mask": lambda ids: {"input_ids": ids, "attention_mask": (torch.arange(ids.shape[1]) >= 3).long()
                                       .expand_as(ids)},
          "cache": lambda ids: {"input_ids": ids, "use_cache": True},
          "embeddings": lambda ids: {"inputs_embeds": None},
          "tuple output": lambda ids: {"input_ids": ids, "return_dict": False}}


@pytest.mark.parametrize("how", sorted(INPUTS))
def test_every_way_of_calling_gives_the_old_logits(model, unpatched, how):
    ids = ids_of(batch=2, length=12)
    inputs = INPUTS[how](ids)
    if "inputs_embeds" in inputs:
        inputs["inputs_embeds"] = model.transformer.wte(ids).detach()
    with torch.no_grad():
        new = model(**inputs)[0]
        unpatched()
        old = model(**inputs)[0]
    assert torch.equal(new, old)


def test_packed_positions_are_still_checked_and_used(model):
    ids = ids_of(batch=2, length=12)
    packed = torch.tensor([[0, 1, 2, 3, 4, 5, 0, 1, 2, 3, 4, 5]] * 2)  # two sequences per row
    logits, reads = logits_and_reads(model, input_ids=ids, position_ids=packed, use_cache=False)
    second, _ = logits_and_reads(model, input_ids=ids[:, 6:], use_cache=False)
    assert reads.get("__bool__") == 1
    assert torch.allclose(logits[:, 6:], second, atol=1e-5)           # the second sequence sees only itself


def test_the_answer_is_given_only_inside_the_context_and_only_in_its_thread():
    positions = torch.tensor([[0, 1, 2, 0, 1, 2]])
    assert masking_utils.find_packed_sequence_indices(positions) is not None
    seen = []
    with default_positions():
        assert masking_utils.find_packed_sequence_indices(positions) is None
        thread = threading.Thread(target=lambda: seen.append(masking_utils.find_packed_sequence_indices(positions)))
        thread.start()
        thread.join()
        with default_positions(False):
            assert masking_utils.find_packed_sequence_indices(positions) is not None
    assert seen[0] is not None
    assert masking_utils.find_packed_sequence_indices(positions) is not None


def test_generate_is_unchanged(model, unpatched):
    ids = ids_of(batch=1, length=5)
    with torch.no_grad():
        new = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        unpatched()
        old = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert torch.equal(new, old)
