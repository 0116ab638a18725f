"""Token streams from the corpus: slice split, seeded subsets, mixed and per-domain streams,
re-tokenization (checked by decoding back to the same text)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from nectar.train.corpus import Corpus, load_slice
from nectar.train.data import (DocumentSet, decode_texts, domain_streams, join, mixed_stream, retokenize,
                               slice_documents, subset)
from nectar.train.tokenizer import train_tokenizer


@pytest.fixture(scope="module")
def corpus():
    return Corpus()


@pytest.fixture(scope="module")
def slice_split(corpus):
    return slice_documents(corpus)


def toy(domains=("a", "b", "c"), docs=5) -> DocumentSet:
    return DocumentSet({d: [np.arange(1 + k, 4 + k + i) for i in range(docs)] for k, d in enumerate(domains)},
                       {d: [f"{d}{i}" for i in range(docs)] for d in domains})


def test_slice_split_is_by_document_deterministic_and_keeps_every_domain(corpus, slice_split):
    train, held = slice_split
    assert train.domains and set(train.domains) == set(held.domains) == {"prose", "reference", "code"}
    names = lambda s: {n for ids in s.doc_ids.values() for n in ids}  # noqa: E731
    assert not names(train) & names(held) and len(names(train) | names(held)) == len(load_slice())
    again_train, again_held = slice_documents(corpus)
    assert names(again_held) == names(held)
    assert 0.1 < held.tokens() / (held.tokens() + train.tokens()) < 0.35


def test_join_and_mixed_stream_hold_every_document_once_with_eos():
    docs = toy()
    stream = mixed_stream(docs, eos_id=0, seed=1)
    pieces = [tuple(p) for p in np.split(stream.numpy(), np.flatnonzero(stream.numpy() == 0) + 1)[:-1]]
    expected = sorted(tuple(d.tolist()) + (0,) for ds in docs.docs.values() for d in ds)
    assert sorted(pieces) == expected                                  # each document once, eos after each
    assert torch.equal(stream, mixed_stream(docs, 0, seed=1))
    assert not torch.equal(stream, mixed_stream(docs, 0, seed=2))
    first_domains = {int(p[0]) for p in pieces[:6]}                   # documents of several domains early on
    assert len(first_domains) > 1
    assert join([np.array([5, 6])], 9).tolist() == [5, 6, 9]


def test_domain_streams_and_subset():
    docs = toy(docs=8)
    streams = domain_streams(docs, eos_id=0, max_tokens=10)
    assert set(streams) == {"a", "b", "c"} and all(s.numel() == 10 for s in streams.values())
    assert streams["a"].tolist()[:4] == [1, 2, 3, 0]
    part = subset(docs, max_tokens_per_domain=12, seed=0)
    assert all(0 < part.tokens(d) <= 12 for d in part.domains)
    assert subset(docs, 12, seed=0).doc_ids == part.doc_ids and subset(docs, 12, seed=5).doc_ids != part.doc_ids
    assert subset(docs, 1, seed=0).tokens("a") > 1                    # at least one document per domain
    assert subset(docs, None) is docs


def test_retokenize_is_lossless(corpus, slice_split):
    train, held = slice_split
    source = Tokenizer.from_str(corpus.tokenizer_json())
    texts = decode_texts(held, source)
    target = train_tokenizer(texts, vocab_size=500)
    moved = retokenize(held, source, target)
    assert moved.doc_ids == held.doc_ids
    for domain in held.domains:
        for old, new in zip(held.docs[domain], moved.docs[domain]):
            assert target.decode(new.tolist()) == source.decode(old.tolist())
    assert moved.tokens() > held.tokens()                              # a smaller vocabulary needs more ids
