"""The project's text corpus: find the built token shards, verify them, load them per split and domain.

`scripts/build_corpus.py` builds the corpus from pinned Debian / PyPI packages (docs/model.md). What
is committed and what is built:

  data/corpus/MANIFEST.json     the build's manifest: sources, licences, per-shard sha256s, totals
  data/corpus/tokenizer.json    the byte-level BPE the shards are tokenized with (16384 ids, eos = 0)
  data/corpus/slice/            ~250 K characters per domain of held-out documents as text (CPU tests)
  data/corpus/built/            (not committed, ~22 MiB) {train,test}.{domain}.tokens.u16.xz + index

The built folder is found at `$NECTAR_DATA` (a data folder holding corpus/built, a corpus folder
holding built/, or the built folder itself) or else at data/corpus/built. Every file read is checked
against the committed manifest's sha256 — the built folder's own manifest.json must be the committed
one — so every machine trains and evaluates on identical tokens. Splits are "train" and "test"
(held out by document); domains are "prose", "reference" and "code".
"""

from __future__ import annotations

import gzip
import hashlib
import json
import lzma
import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np

DATA_ENV = "NECTAR_DATA"
FORMAT = "nectar-corpus/1"
SPLITS = ("train", "test")
MANIFEST_FILE = "MANIFEST.json"        # committed copy of the build's manifest.json
BUILT_MANIFEST = "manifest.json"       # the build's own
TOKENIZER_FILE = "tokenizer.json"
SLICE_DIR = "slice"
SLICE_FILE = "corpus_slice.jsonl.gz"
SLICE_MANIFEST = "slice_manifest.json"
BUILD_HINT = ("build it with `python scripts/build_corpus.py` (needs the package registries) or copy a built "
              f"corpus there / point ${DATA_ENV} at it")


class CorpusError(ValueError):
    """The corpus is missing, incomplete or does not match its manifest (a one-line message)."""


def repo_corpus_dir() -> Path:
    """data/corpus of the repository (the committed manifest, tokenizer and slice)."""
    return Path(__file__).resolve().parents[2] / "data" / "corpus"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def read_checked(path: Path, sha256: str | None) -> bytes:
    """The bytes of `path`; CorpusError when it is missing or its sha256 is not `sha256` (None: no check)."""
    if not path.is_file():
        raise CorpusError(f"corpus file {path} is missing; {BUILD_HINT}")
    data = path.read_bytes()
    if sha256 is not None and sha256_bytes(data) != sha256:
        raise CorpusError(f"corpus file {path} does not match the manifest (sha256 {sha256_bytes(data)[:12]}…, "
                          f"expected {sha256[:12]}…): it was changed or truncated; rebuild or re-copy it")
    return data


def load_manifest(corpus_dir: str | os.PathLike | None = None) -> dict:
    """The committed manifest (data/corpus/MANIFEST.json, or MANIFEST.json in `corpus_dir`)."""
    path = Path(corpus_dir or repo_corpus_dir()) / MANIFEST_FILE
    if not path.is_file():
        raise CorpusError(f"no corpus manifest at {path}")
    try:
        manifest = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CorpusError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise CorpusError(f"{path} is not a {FORMAT} manifest")
    return manifest


def manifest_sha256(corpus_dir: str | os.PathLike | None = None) -> str:
    """sha256 of the committed manifest file: the corpus's identity (recorded with every model)."""
    return sha256_bytes((Path(corpus_dir or repo_corpus_dir()) / MANIFEST_FILE).read_bytes())


def candidate_built_dirs() -> list[Path]:
    """Where the built shards may be, in order: $NECTAR_DATA's forms, then data/corpus/built."""
    env = os.environ.get(DATA_ENV)
    found = [Path(env) / "corpus" / "built", Path(env) / "built", Path(env)] if env else []
    return found + [repo_corpus_dir() / "built"]


def find_built_dir(built_dir: str | os.PathLike | None = None) -> Path:
    """The folder holding the built shards (its manifest.json is the marker); one-line error otherwise."""
    candidates = [Path(built_dir)] if built_dir is not None else candidate_built_dirs()
    for directory in candidates:
        if (directory / BUILT_MANIFEST).is_file():
            return directory
    looked = ", ".join(str(c) for c in candidates)
    raise CorpusError(f"the built corpus was not found (looked for {BUILT_MANIFEST} in {looked}); {BUILD_HINT}")


@dataclass(frozen=True)
class Shard:
    """The tokens of one (split, domain): documents concatenated, with their boundaries."""

    split: str
    domain: str
    tokens: np.ndarray        # [N] uint16, all documents back to back (no separator)
    offsets: np.ndarray       # [n_docs + 1] int64; document i = tokens[offsets[i]:offsets[i + 1]]
    doc_ids: list[str]
    sources: list[str]

    @property
    def n_docs(self) -> int:
        return len(self.doc_ids)

    def doc(self, i: int) -> np.ndarray:
        """[n_i] uint16 token ids of document i (a view)."""
        return self.tokens[self.offsets[i]:self.offsets[i + 1]]

    def docs(self) -> list[np.ndarray]:
        return [self.doc(i) for i in range(self.n_docs)]


@dataclass(frozen=True)
class SliceDoc:
    """One document of the committed text slice."""

    doc_id: str
    source: str
    domain: str
    split: str
    text: str


class Corpus:
    """The verified corpus: manifest, tokenizer and (lazily, when built) the token shards."""

    def __init__(self, corpus_dir: str | os.PathLike | None = None, built_dir: str | os.PathLike | None = None,
                 verify: bool = True):
        self.corpus_dir = Path(corpus_dir or repo_corpus_dir())
        self.manifest = load_manifest(self.corpus_dir)
        self.sha256 = manifest_sha256(self.corpus_dir)
        self.verify = verify
        self._built_dir = built_dir
        self._shards: dict[tuple[str, str], Shard] = {}

    @property
    def domains(self) -> list[str]:
        return list(self.manifest["domains"])

    @property
    def tokens(self) -> int:
        return int(self.manifest["totals"]["all"]["tokens"])

    @cached_property
    def built_dir(self) -> Path:
        """The built folder, checked to belong to this manifest."""
        directory = find_built_dir(self._built_dir)
        if self.verify and sha256_bytes((directory / BUILT_MANIFEST).read_bytes()) != self.sha256:
            raise CorpusError(f"the built corpus in {directory} was made from other sources or settings than "
                              f"{self.corpus_dir / MANIFEST_FILE}; rebuild it with scripts/build_corpus.py")
        return directory

    def shard_entry(self, split: str, domain: str) -> dict:
        for entry in self.manifest["shards"]:
            if entry["split"] == split and entry["domain"] == domain:
                return entry
        raise CorpusError(f"the corpus has no shard for split={split!r}, domain={domain!r} "
                          f"(splits {list(SPLITS)}, domains {self.domains})")

    def shard(self, split: str, domain: str) -> Shard:
        """One (split, domain) shard, decompressed and verified (cached)."""
        key = (split, domain)
        if key not in self._shards:
            self._shards[key] = self._load_shard(self.shard_entry(split, domain))
        return self._shards[key]

    def split(self, split: str) -> dict[str, Shard]:
        """{domain: Shard} of one split."""
        return {domain: self.shard(split, domain) for domain in self.domains}

    def _load_shard(self, entry: dict) -> Shard:
        check = self.verify
        blob = read_checked(self.built_dir / entry["tokens_file"], entry["tokens_sha256"] if check else None)
        raw = lzma.decompress(blob)
        if check and sha256_bytes(raw) != entry["tokens_raw_sha256"]:
            raise CorpusError(f"{entry['tokens_file']} decompresses to other tokens than the manifest records")
        index = json.loads(lzma.decompress(read_checked(self.built_dir / entry["index_file"],
                                                        entry["index_sha256"] if check else None)))
        tokens = np.frombuffer(raw, dtype="<u2")
        offsets = np.asarray(index["offsets"], dtype=np.int64)
        if len(offsets) != len(index["doc_ids"]) + 1 or offsets[-1] != len(tokens) or len(tokens) != entry["n_tokens"]:
            raise CorpusError(f"{entry['index_file']} does not match {entry['tokens_file']}")
        return Shard(entry["split"], entry["domain"], tokens, offsets, index["doc_ids"], index["sources"])

    def tokenizer_json(self) -> str:
        """The corpus tokenizer (tokenizers JSON), checked against the manifest."""
        info = self.manifest["tokenizer"]
        return read_checked(self.corpus_dir / info["file"], info["sha256"] if self.verify else None).decode()


def load_slice(corpus_dir: str | os.PathLike | None = None, domain: str | None = None,
               verify: bool = True) -> list[SliceDoc]:
    """The committed text slice (held-out documents of every domain), optionally one domain only."""
    directory = Path(corpus_dir or repo_corpus_dir()) / SLICE_DIR
    manifest_path = directory / SLICE_MANIFEST
    if not manifest_path.is_file():
        raise CorpusError(f"no slice manifest at {manifest_path}")
    info = json.loads(manifest_path.read_text())
    data = gzip.decompress(read_checked(directory / info["file"], info["sha256"] if verify else None))
    rows = [json.loads(line) for line in data.decode("utf-8").splitlines() if line]
    docs = [SliceDoc(r["doc_id"], r["source"], r["domain"], r["split"], r["text"]) for r in rows]
    if verify and len(docs) != info["n_docs"]:
        raise CorpusError(f"the slice holds {len(docs)} documents, its manifest says {info['n_docs']}")
    return [d for d in docs if domain is None or d.domain == domain]
