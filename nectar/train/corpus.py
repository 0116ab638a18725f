"""The project's offline text corpus: locate it, verify it, split it into train / held-out.

The corpus (`data/corpus/pydocs.txt.gz`, built once by `scripts/build_corpus.py` from CPython's
own documentation and committed) is a list of documents joined by the manifest's separator.
Loading checks the text's sha256 against `MANIFEST.json`, so every machine trains and evaluates
on identical text. The split is by whole documents: every `holdout_every`-th document (counting
from 0, the last of each group) is held out, the rest is training text; the two never overlap.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

CORPUS_FILE = "pydocs.txt.gz"
MANIFEST_FILE = "MANIFEST.json"
DATA_ENV = "NECTAR_DATA"  # a `data` directory (holding corpus/) or the corpus directory itself


class CorpusError(RuntimeError):
    """The corpus is missing or does not match its manifest."""


@dataclass
class CorpusSplit:
    """Documents of the training and held-out parts, plus the manifest they came with."""

    train: list[str]
    heldout: list[str]
    manifest: dict = field(default_factory=dict)

    def chars(self) -> tuple[int, int]:
        return sum(map(len, self.train)), sum(map(len, self.heldout))


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def _candidate_dirs() -> list[Path]:
    """Where to look for the corpus, in order: $NECTAR_DATA, then the repository's data/."""
    candidates = []
    env = os.environ.get(DATA_ENV)
    if env:
        candidates += [Path(env) / "corpus", Path(env)]
    candidates.append(_repo_root() / "data" / "corpus")
    return candidates


def find_corpus_dir(corpus_dir: str | os.PathLike | None = None) -> Path:
    """The directory holding the corpus and its manifest; clear error when none is found."""
    candidates = [Path(corpus_dir)] if corpus_dir is not None else _candidate_dirs()
    for directory in candidates:
        if (directory / CORPUS_FILE).is_file() and (directory / MANIFEST_FILE).is_file():
            return directory
    looked = ", ".join(str(c) for c in candidates)
    raise CorpusError(
        f"corpus not found (looked for {CORPUS_FILE} + {MANIFEST_FILE} in: {looked}). "
        f"Build it with `python scripts/build_corpus.py` or set {DATA_ENV} to the data directory."
    )


def load_manifest(corpus_dir: str | os.PathLike | None = None) -> dict:
    return json.loads((find_corpus_dir(corpus_dir) / MANIFEST_FILE).read_text())


def load_text(corpus_dir: str | os.PathLike | None = None, verify: bool = True) -> tuple[str, dict]:
    """The whole corpus text and its manifest; with `verify` the sha256 must match the manifest."""
    directory = find_corpus_dir(corpus_dir)
    manifest = json.loads((directory / MANIFEST_FILE).read_text())
    raw = gzip.decompress((directory / manifest.get("file", CORPUS_FILE)).read_bytes())
    if verify:
        digest = hashlib.sha256(raw).hexdigest()
        expected = manifest.get("sha256_text")
        if digest != expected:
            raise CorpusError(
                f"corpus sha256 mismatch in {directory}: text has {digest}, manifest says {expected}. "
                "The file was changed or truncated; rebuild it with scripts/build_corpus.py."
            )
    return raw.decode("utf-8"), manifest


def load_documents(corpus_dir: str | os.PathLike | None = None, verify: bool = True) -> tuple[list[str], dict]:
    text, manifest = load_text(corpus_dir, verify=verify)
    documents = text.split(manifest["document_separator"])
    if "documents" in manifest and len(documents) != manifest["documents"]:
        raise CorpusError(f"expected {manifest['documents']} documents, found {len(documents)}")
    return documents, manifest


def split_documents(documents: list[str], holdout_every: int = 20) -> tuple[list[str], list[str]]:
    """Deterministic split by document: index i is held out when i % holdout_every == holdout_every-1."""
    if holdout_every < 2:
        raise ValueError(f"holdout_every must be >= 2 (one document in holdout_every is held out), got {holdout_every}")
    train = [doc for i, doc in enumerate(documents) if i % holdout_every != holdout_every - 1]
    heldout = [doc for i, doc in enumerate(documents) if i % holdout_every == holdout_every - 1]
    return train, heldout


def load_corpus(corpus_dir: str | os.PathLike | None = None, holdout_every: int = 20,
                verify: bool = True) -> CorpusSplit:
    """Load, verify and split the corpus (the one entry point most code needs)."""
    documents, manifest = load_documents(corpus_dir, verify=verify)
    train, heldout = split_documents(documents, holdout_every)
    return CorpusSplit(train=train, heldout=heldout, manifest=manifest)
