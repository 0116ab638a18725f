"""Corpus (sha256 check, deterministic disjoint split, builder determinism) and tokenizer
(deterministic training, lossless round trip, save/load, encoding and batching) tests."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch

from nectar.train.corpus import (CORPUS_FILE, MANIFEST_FILE, CorpusError, find_corpus_dir, load_corpus, load_documents,
                           split_documents)
from nectar.train.tokenizer import (EOS_TOKEN, cut_batches, cut_sequences, encode_documents, iter_batches, load_tokenizer,
                              save_tokenizer, train_tokenizer)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def split():
    return load_corpus()


@pytest.fixture(scope="module")
def small_tokenizer(split):
    return train_tokenizer(split.train[:300], vocab_size=600)


def _load_builder():
    spec = importlib.util.spec_from_file_location("build_corpus", REPO / "scripts" / "build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----- corpus ---------------------------------------------------------------------------------
def test_committed_corpus_matches_its_manifest():
    directory = find_corpus_dir()
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    raw = gzip.decompress((directory / CORPUS_FILE).read_bytes())
    assert hashlib.sha256(raw).hexdigest() == manifest["sha256_text"]
    text = raw.decode("utf-8")
    assert len(text) == manifest["chars"] and 2_000_000 <= len(text) <= 3_000_000
    documents, _ = load_documents()
    assert len(documents) == manifest["documents"] and all(doc.strip() for doc in documents)
    assert "PSF" in manifest["license"] or "Python Software Foundation" in manifest["license"]


def test_tampered_corpus_is_rejected(tmp_path):
    directory = find_corpus_dir()
    shutil.copy(directory / MANIFEST_FILE, tmp_path / MANIFEST_FILE)
    text = gzip.decompress((directory / CORPUS_FILE).read_bytes()).decode("utf-8")
    (tmp_path / CORPUS_FILE).write_bytes(gzip.compress(text.replace("the", "teh", 1).encode("utf-8")))
    with pytest.raises(CorpusError, match="sha256 mismatch"):
        load_corpus(tmp_path)
    assert load_corpus(tmp_path, verify=False).train  # readable when the check is waived


def test_missing_corpus_gives_clear_error(tmp_path, monkeypatch):
    with pytest.raises(CorpusError, match="build_corpus.py"):
        load_corpus(tmp_path / "nowhere")
    monkeypatch.setenv("NECTAR_DATA", str(tmp_path))
    (tmp_path / "corpus").mkdir()
    for name in (CORPUS_FILE, MANIFEST_FILE):
        shutil.copy(REPO / "data" / "corpus" / name, tmp_path / "corpus" / name)
    assert find_corpus_dir() == tmp_path / "corpus"  # NECTAR_DATA wins over the repository copy


def test_split_is_deterministic_disjoint_and_complete(split):
    again = load_corpus()
    assert again.train == split.train and again.heldout == split.heldout
    documents, _ = load_documents()
    assert len(split.train) + len(split.heldout) == len(documents)
    assert not set(split.train) & set(split.heldout)
    assert split.heldout == documents[19::20] and split.train == [d for i, d in enumerate(documents) if i % 20 != 19]
    train_chars, heldout_chars = split.chars()
    assert 0.02 < heldout_chars / (train_chars + heldout_chars) < 0.10


@pytest.mark.parametrize("every", [0, 1, -3])
def test_split_rejects_bad_holdout_every(every):
    with pytest.raises(ValueError, match="holdout_every"):
        split_documents(["a", "b", "c"], every)


def test_builder_is_deterministic_and_loadable(tmp_path):
    builder = _load_builder()
    outputs = []
    for name in ("a", "b"):
        documents, used, skipped = builder.collect_documents(target_chars=60_000)
        builder.write_corpus(tmp_path / name, documents, used, skipped, 60_000)
        outputs.append((tmp_path / name / CORPUS_FILE).read_bytes())
    assert outputs[0] == outputs[1]
    documents, manifest = load_documents(tmp_path / "a")
    assert documents[0].startswith("Python language reference:")
    assert len(set(documents)) == len(documents) and manifest["chars"] >= 60_000


# ----- tokenizer ------------------------------------------------------------------------------
def test_tokenizer_training_is_deterministic(split, small_tokenizer):
    again = train_tokenizer(split.train[:300], vocab_size=600)
    assert again.backend_tokenizer.to_str() == small_tokenizer.backend_tokenizer.to_str()
    assert len(small_tokenizer) == 600
    assert small_tokenizer.eos_token == EOS_TOKEN
    assert small_tokenizer.convert_tokens_to_ids(EOS_TOKEN) == small_tokenizer.eos_token_id


def test_tokenizer_round_trips_text(split, small_tokenizer):
    samples = split.heldout[:20] + ["  leading spaces\tand tabs\n\nünïcödé — “quotes” 🐍 \x00 end  "]
    for text in samples:
        ids = small_tokenizer.encode(text, add_special_tokens=False)
        assert small_tokenizer.decode(ids) == text
    long_text = split.heldout[0]
    assert len(small_tokenizer.encode(long_text)) < len(long_text.encode("utf-8"))  # BPE merges something


def test_tokenizer_save_load(tmp_path, split, small_tokenizer):
    save_tokenizer(small_tokenizer, tmp_path / "tok")
    loaded = load_tokenizer(tmp_path / "tok")
    text = split.heldout[1]
    assert loaded.encode(text) == small_tokenizer.encode(text)
    assert loaded.eos_token_id == small_tokenizer.eos_token_id
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(tmp_path / "missing")


def test_tokenizer_rejects_bad_arguments():
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer(["some text"], vocab_size=100)
    with pytest.raises(ValueError, match="non-empty"):
        train_tokenizer([], vocab_size=300)


def test_encode_documents_matches_per_document_loop(split, small_tokenizer):
    docs = split.heldout[:7]
    ids = encode_documents(small_tokenizer, docs)
    reference = []
    for doc in docs:
        reference += small_tokenizer.encode(doc, add_special_tokens=False) + [small_tokenizer.eos_token_id]
    assert ids.dtype == torch.long and ids.tolist() == reference
    assert encode_documents(small_tokenizer, docs, append_eos=False).numel() == len(reference) - len(docs)


def test_cut_batches_and_iter_batches():
    ids = torch.arange(1000)
    rows = cut_sequences(ids, 16)
    assert rows.shape == (62, 16) and torch.equal(rows.reshape(-1), ids[:992])
    batches = cut_batches(ids, 4, 16)
    assert batches.shape == (15, 4, 16) and torch.equal(batches.reshape(-1), ids[:960])
    first = list(iter_batches(ids, 4, 16, seed=3, epochs=2))
    second = list(iter_batches(ids, 4, 16, seed=3, epochs=2))
    assert len(first) == 2 * 15 and all(torch.equal(a, b) for a, b in zip(first, second))
    epoch_rows = torch.cat(first[:15]).tolist()
    all_rows = {tuple(x) for x in rows.tolist()}
    assert len({tuple(r) for r in epoch_rows}) == 60 and all(tuple(r) in all_rows for r in epoch_rows)
    ordered = next(iter_batches(ids, 4, 16, seed=None))
    assert torch.equal(ordered, rows[:4])
    other = list(iter_batches(ids, 4, 16, seed=4, epochs=1))
    assert any(not torch.equal(a, b) for a, b in zip(first, other))


@pytest.mark.parametrize("call", [
    lambda: cut_sequences(torch.arange(10).view(2, 5), 2),
    lambda: cut_sequences(torch.arange(10), 1),
    lambda: cut_sequences(torch.arange(10), 11),
    lambda: cut_batches(torch.arange(100), 0, 10),
    lambda: cut_batches(torch.arange(100), 11, 10),
    lambda: next(iter_batches(torch.arange(100), 11, 10)),
])
def test_batching_rejects_bad_input(call):
    with pytest.raises(ValueError):
        call()
