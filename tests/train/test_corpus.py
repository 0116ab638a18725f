"""The committed corpus files (manifest, tokenizer, text slice) and the loader's checks; the built
token shards are not needed (tests/train/test_build_corpus.py builds a tiny corpus for those)."""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from nectar.train.corpus import (Corpus, CorpusError, find_built_dir, load_manifest, load_slice, manifest_sha256,
                                 repo_corpus_dir)

CORPUS = repo_corpus_dir()


def test_committed_manifest_describes_a_30M_token_corpus_of_pinned_licensed_sources():
    manifest = load_manifest()
    assert manifest["domains"] == ["prose", "reference", "code"]
    assert manifest["totals"]["all"]["tokens"] >= 30_000_000
    for domain in manifest["domains"]:
        assert manifest["totals"][f"test.{domain}"]["docs"] > 100           # held out by document
        share = manifest["totals"][f"test.{domain}"]["chars"] / manifest["totals"][domain]["chars"]
        assert 0.03 < share < 0.06
    for source in manifest["sources"]:
        assert source["version"] and source["licence"] and len(source["sha256"]) == 64
        assert source["origin"] in ("apt", "pypi")
    assert len(manifest["shards"]) == 6 and all(len(s["tokens_sha256"]) == 64 for s in manifest["shards"])
    assert manifest_sha256() == hashlib.sha256((CORPUS / "MANIFEST.json").read_bytes()).hexdigest()


def test_committed_tokenizer_matches_the_manifest_and_round_trips_text():
    corpus = Corpus()
    tokenizer = Tokenizer.from_str(corpus.tokenizer_json())
    assert tokenizer.get_vocab_size() == 16384 and tokenizer.token_to_id("<|endoftext|>") == 0
    for doc in load_slice()[:12]:
        ids = tokenizer.encode(doc.text, add_special_tokens=False).ids
        assert tokenizer.decode(ids) == doc.text and len(ids) < len(doc.text.encode())


def test_slice_has_held_out_documents_of_every_domain():
    docs = load_slice()
    assert {d.domain for d in docs} == {"prose", "reference", "code"} and all(d.split == "test" for d in docs)
    for domain in ("prose", "reference", "code"):
        chars = sum(len(d.text) for d in load_slice(domain=domain))
        assert 200_000 < chars < 300_000
    assert len({d.doc_id for d in docs}) == len(docs)


def copy_committed(tmp: Path) -> Path:
    shutil.copy(CORPUS / "MANIFEST.json", tmp / "MANIFEST.json")
    shutil.copy(CORPUS / "tokenizer.json", tmp / "tokenizer.json")
    shutil.copytree(CORPUS / "slice", tmp / "slice")
    return tmp


def test_tampered_committed_files_are_refused(tmp_path):
    corpus_dir = copy_committed(tmp_path)
    path = corpus_dir / "slice" / "corpus_slice.jsonl.gz"
    rows = gzip.decompress(path.read_bytes()).decode().replace("the", "teh", 1)
    path.write_bytes(gzip.compress(rows.encode()))
    with pytest.raises(CorpusError, match="does not match the manifest"):
        load_slice(corpus_dir)
    assert load_slice(corpus_dir, verify=False)                          # readable when the check is waived
    (corpus_dir / "tokenizer.json").write_text("{}")
    with pytest.raises(CorpusError, match="tokenizer.json does not match"):
        Corpus(corpus_dir).tokenizer_json()
    (corpus_dir / "MANIFEST.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(CorpusError, match="not a nectar-corpus/1 manifest"):
        Corpus(corpus_dir)


def test_missing_built_corpus_says_how_to_build_it(tmp_path, monkeypatch):
    monkeypatch.setenv("NECTAR_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(CorpusError, match=r"built corpus was not found.*scripts/build_corpus.py") as info:
        Corpus(built_dir=tmp_path / "nowhere").shard("train", "prose")
    assert "\n" not in str(info.value)
    with pytest.raises(CorpusError, match="no shard for split='dev'"):
        Corpus().shard_entry("dev", "prose")


@pytest.mark.parametrize("layout", ["corpus/built", "built", ""])
def test_nectar_data_points_at_the_built_corpus(tmp_path, monkeypatch, layout):
    built = tmp_path / layout if layout else tmp_path
    built.mkdir(parents=True, exist_ok=True)
    (built / "manifest.json").write_text("{}")
    monkeypatch.setenv("NECTAR_DATA", str(tmp_path))
    assert find_built_dir() == built
