"""Training and evaluation data from the corpus: documents per split and domain → token streams.

- `DocumentSet`: the token documents of one split, per domain (from the built shards, or from the
  committed text slice for tests and quick demos);
- `subset`: a deterministic (seeded) choice of documents up to a token count per domain;
- `mixed_stream`: documents interleaved across domains in a seeded order, eos after each one — the
  training stream and the mixed held-out stream;
- `domain_streams`: one stream per domain (the domain-shift workload of the frontier);
- `retokenize`: documents decoded to text with the corpus tokenizer (byte-level BPE decodes
  losslessly) and encoded with another tokenizer (a smaller BPE, or a real GPT-2's);
- `load_training_data`: a recipe's `TrainingData` (the corpus → tokenizer, training stream, mixed
  and per-domain held-out streams; step 1 of `nectar.train.recipes`).
Streams are 1-D LongTensors; `nectar.train.tokenizer.iter_batches` cuts them into [B, T] batches.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from nectar.train.corpus import Corpus, load_slice
from nectar.train.tokenizer import train_tokenizer, wrap_tokenizer

SLICE_HOLDOUT_EVERY = 5   # slice mode: every document whose hash rank is 0 mod 5 is held out


@dataclass
class DocumentSet:
    """Token documents per domain (each a 1-D int array), in a fixed order."""

    docs: dict[str, list[np.ndarray]]
    doc_ids: dict[str, list[str]] = field(default_factory=dict)

    @property
    def domains(self) -> list[str]:
        return list(self.docs)

    def tokens(self, domain: str | None = None) -> int:
        domains = [domain] if domain is not None else self.domains
        return sum(int(len(d)) for name in domains for d in self.docs[name])


def hash_rank(key: str, seed: int) -> int:
    """A deterministic pseudo-random rank of a string for a seed (platform-independent)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{key}".encode()).digest()[:8], "big")


def built_documents(corpus: Corpus, split: str) -> DocumentSet:
    """Every document of a split of the built corpus, per domain, in shard order."""
    shards = corpus.split(split)
    return DocumentSet({d: s.docs() for d, s in shards.items()}, {d: list(s.doc_ids) for d, s in shards.items()})


def slice_documents(corpus: Corpus) -> tuple[DocumentSet, DocumentSet]:
    """(train, held-out) from the committed text slice, tokenized with the corpus tokenizer; the
    slice's documents are split by hash (1 in SLICE_HOLDOUT_EVERY held out). For tests and demos
    only: the slice itself comes from the corpus's held-out split."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(corpus.tokenizer_json())
    parts: tuple[dict, dict] = ({}, {})
    names: tuple[dict, dict] = ({}, {})
    for doc in load_slice(corpus.corpus_dir):
        held = hash_rank(doc.doc_id, 0) % SLICE_HOLDOUT_EVERY == 0
        ids = np.asarray(tokenizer.encode(doc.text, add_special_tokens=False).ids, dtype=np.int64)
        parts[held].setdefault(doc.domain, []).append(ids)
        names[held].setdefault(doc.domain, []).append(doc.doc_id)
    return DocumentSet(parts[0], names[0]), DocumentSet(parts[1], names[1])


def subset(documents: DocumentSet, max_tokens_per_domain: int | None, seed: int = 0) -> DocumentSet:
    """Documents of each domain in a seeded hash order, taken until the next one would take the
    domain's total past `max_tokens_per_domain` (at least one document per domain), then put back
    in their original order; None keeps everything as is."""
    if max_tokens_per_domain is None:
        return documents
    docs, ids = {}, {}
    for domain, items in documents.docs.items():
        names = documents.doc_ids.get(domain) or [str(i) for i in range(len(items))]
        order = sorted(range(len(items)), key=lambda i: hash_rank(names[i], seed))
        chosen, total = [], 0
        for i in order:
            if chosen and total + len(items[i]) > max_tokens_per_domain:
                break
            chosen.append(i)
            total += len(items[i])
        chosen.sort()
        docs[domain] = [items[i] for i in chosen]
        ids[domain] = [names[i] for i in chosen]
    return DocumentSet(docs, ids)


def join(docs: list[np.ndarray], eos_id: int) -> torch.Tensor:
    """[N] LongTensor: the documents back to back, eos after each."""
    if not docs:
        raise ValueError("no documents to join")
    eos = np.array([eos_id], dtype=np.int64)
    return torch.from_numpy(np.concatenate([part for d in docs for part in (np.asarray(d, dtype=np.int64), eos)]))


def mixed_stream(documents: DocumentSet, eos_id: int, seed: int = 0) -> torch.Tensor:
    """[N] the documents of every domain interleaved in a seeded order (eos after each)."""
    keys = [(domain, i) for domain in documents.domains for i in range(len(documents.docs[domain]))]
    names = {(d, i): (documents.doc_ids.get(d) or [f"{d}:{j}" for j in range(len(documents.docs[d]))])[i]
             for d, i in keys}
    order = sorted(keys, key=lambda k: hash_rank(f"{k[0]}/{names[k]}", seed))
    return join([documents.docs[d][i] for d, i in order], eos_id)


def domain_streams(documents: DocumentSet, eos_id: int, max_tokens: int | None = None) -> dict[str, torch.Tensor]:
    """{domain: [N_d] stream of its documents in order (eos after each), cut to `max_tokens`}."""
    streams = {d: join(docs, eos_id) for d, docs in documents.docs.items() if docs}
    return {d: s[:max_tokens] if max_tokens is not None else s for d, s in streams.items()}


def retokenize(documents: DocumentSet, source_tokenizer, target_tokenizer) -> DocumentSet:
    """The same documents in `target_tokenizer`'s ids: decoded with `source_tokenizer` (a
    `tokenizers.Tokenizer`; byte-level BPE decodes losslessly), encoded without special tokens."""
    source = getattr(source_tokenizer, "backend_tokenizer", source_tokenizer)
    target = getattr(target_tokenizer, "backend_tokenizer", target_tokenizer)
    out = {}
    for domain, docs in documents.docs.items():
        texts = source.decode_batch([np.asarray(d).tolist() for d in docs], skip_special_tokens=False)
        encodings = target.encode_batch(texts, add_special_tokens=False)
        out[domain] = [np.asarray(e.ids, dtype=np.int64) for e in encodings]
    return DocumentSet(out, dict(documents.doc_ids))


def decode_texts(documents: DocumentSet, tokenizer) -> list[str]:
    """All documents as text (every domain, in order): what a new tokenizer is trained on."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    return [t for docs in documents.docs.values()
            for t in backend.decode_batch([np.asarray(d).tolist() for d in docs], skip_special_tokens=False)]


@dataclass
class TrainingData:
    tokenizer: object
    train_ids: torch.Tensor                     # [N_train] mixed training stream
    heldout_ids: torch.Tensor                   # [N_heldout] mixed held-out stream
    heldout_domains: dict[str, torch.Tensor]    # {domain: [N_d]}
    info: dict                                  # corpus identity and sizes


def corpus_tokenizer(corpus: Corpus):
    from tokenizers import Tokenizer

    return wrap_tokenizer(Tokenizer.from_str(corpus.tokenizer_json()))


def load_training_data(recipe, seed: int = 0, tokenizer=None, corpus_dir=None, built_dir=None) -> TrainingData:
    """The streams of `recipe` (a `nectar.train.recipes.ModelRecipe`: its corpus, per-domain token
    counts and vocab_size; see that module's docstring); `tokenizer` re-tokenizes into its ids."""
    start = time.monotonic()
    corpus = Corpus(corpus_dir, built_dir)
    if recipe.corpus == "built":
        train, held = built_documents(corpus, "train"), built_documents(corpus, "test")
    else:
        train, held = slice_documents(corpus)
    train = subset(train, recipe.train_tokens_per_domain, seed)
    held = subset(held, recipe.heldout_tokens_per_domain, 0)        # the same held-out text for every seed
    source = corpus_tokenizer(corpus)
    kind = "corpus"
    if tokenizer is None and recipe.vocab_size is not None:
        tokenizer, kind = train_tokenizer(decode_texts(train, source), vocab_size=recipe.vocab_size), "trained"
    elif tokenizer is not None:
        kind = "given"
    if tokenizer is not None:
        train, held = retokenize(train, source, tokenizer), retokenize(held, source, tokenizer)
    else:
        tokenizer = source
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    data = TrainingData(tokenizer, mixed_stream(train, eos, seed), mixed_stream(held, eos, 0),
                        domain_streams(held, eos), {})
    data.info = {"sha256": corpus.sha256, "corpus_tokens": corpus.tokens, "source": recipe.corpus,
                 "tokenizer": kind, "vocab_size": len(tokenizer), "train_tokens": int(data.train_ids.numel()),
                 "heldout_tokens": {d: int(s.numel()) for d, s in data.heldout_domains.items()},
                 "train_tokens_per_domain": {d: train.tokens(d) for d in train.domains},
                 "seconds": time.monotonic() - start}
    return data
