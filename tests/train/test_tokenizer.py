"""Tokenizer (deterministic training, lossless round trip, save/load, encoding) and batching tests,
on the committed text slice."""

from __future__ import annotations

import pytest
import torch

from nectar.train.corpus import load_slice
from nectar.train.tokenizer import (EOS_TOKEN, cut_batches, cut_sequences, encode_documents, iter_batches,
                                    load_tokenizer, save_tokenizer, train_tokenizer)


@pytest.fixture(scope="module")
def texts():
    return [d.text for d in load_slice()]


@pytest.fixture(scope="module")
def small_tokenizer(texts):
    return train_tokenizer(texts[:40], vocab_size=600)


def test_tokenizer_training_is_deterministic(texts, small_tokenizer):
    again = train_tokenizer(texts[:40], vocab_size=600)
    assert again.backend_tokenizer.to_str() == small_tokenizer.backend_tokenizer.to_str()
    assert len(small_tokenizer) == 600 and small_tokenizer.eos_token == EOS_TOKEN
    assert small_tokenizer.convert_tokens_to_ids(EOS_TOKEN) == small_tokenizer.eos_token_id


def test_tokenizer_round_trips_text(texts, small_tokenizer):
    for text in texts[60:80] + ["  leading spaces\tand tabs\n\nünïcödé — “quotes” 🐍 \x00 end  "]:
        ids = small_tokenizer.encode(text, add_special_tokens=False)
        assert small_tokenizer.decode(ids) == text
    assert len(small_tokenizer.encode(texts[0])) < len(texts[0].encode("utf-8"))  # BPE merges something


def test_tokenizer_save_load(tmp_path, texts, small_tokenizer):
    save_tokenizer(small_tokenizer, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    assert loaded.encode(texts[1]) == small_tokenizer.encode(texts[1])
    assert loaded.eos_token_id == small_tokenizer.eos_token_id
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "missing")


def test_tokenizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["some text"], vocab_size=100)
    with pytest.raises(ValueError, match="non-empty"):
        train_tokenizer([], vocab_size=300)


def test_encode_documents_matches_per_document_loop(texts, small_tokenizer):
    docs = texts[:7]
    ids = encode_documents(small_tokenizer, docs)
    reference = []
    for doc in docs:
        reference += small_tokenizer.encode(doc, add_special_tokens=False) + [small_tokenizer.eos_token_id]
    assert ids.dtype == torch.long and ids.tolist() == reference


def test_cut_batches_and_iter_batches():
    ids = torch.arange(1000)
    rows = cut_sequences(ids, 16)
    assert rows.shape == (62, 16) and torch.equal(rows.reshape(-1), ids[:992])
    batches = cut_batches(ids, 4, 16)
    assert batches.shape == (15, 4, 16) and torch.equal(batches.reshape(-1), ids[:960])
    first = list(iter_batches(ids, 4, 16, seed=3, epochs=2))
    assert len(first) == 2 * 15 and all(torch.equal(a, b) for a, b in zip(first, iter_batches(ids, 4, 16, seed=3, epochs=2)))
    epoch_rows = torch.cat(first[:15]).tolist()
    all_rows = {tuple(x) for x in rows.tolist()}
    assert len({tuple(r) for r in epoch_rows}) == 60 and all(tuple(r) in all_rows for r in epoch_rows)
    assert torch.equal(next(iter_batches(ids, 4, 16, seed=None)), rows[:4])
    assert any(not torch.equal(a, b) for a, b in zip(first, iter_batches(ids, 4, 16, seed=4, epochs=1)))
    skipped = list(iter_batches(ids, 4, 16, seed=3, epochs=2, skip=17))   # skipping crosses an epoch
    assert len(skipped) == 13 and all(torch.equal(a, b) for a, b in zip(skipped, first[17:]))


@pytest.mark.parametrize("call", [
    lambda: cut_sequences(torch.arange(10).view(2, 5), 2),
    lambda: cut_sequences(torch.arange(10), 1),
    lambda: cut_sequences(torch.arange(10), 11),
    lambda: cut_batches(torch.arange(100), 0, 10),
    lambda: cut_batches(torch.arange(100), 11, 10),
    lambda: next(iter_batches(torch.arange(100), 11, 10)),
    lambda: next(iter_batches(torch.arange(100), 2, 10, skip=-1)),
])
def test_batching_rejects_bad_input(call):
    with pytest.raises(ValueError):
        call()
