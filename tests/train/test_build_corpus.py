"""scripts/build_corpus.py on a tiny fake source (no network): the pipeline is deterministic, splits
each domain by document, hashes everything it writes, and `nectar.train.corpus` loads and verifies
what it built; plus the text helpers (chunking, HTML, roff, junk filters) on hand-made input."""

from __future__ import annotations

import gzip
import hashlib
import importlib.util
import io
import json
import sys
import tarfile
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from nectar.train.corpus import Corpus, CorpusError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bc():
    spec = importlib.util.spec_from_file_location("build_corpus", REPO / "scripts" / "build_corpus.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["build_corpus"] = module   # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


WORDS = ("alpha beta gamma delta epsilon zeta theta kappa lambda sigma omega river stone light "
         "garden window paper market signal engine").split()


def fake_text(i: int, kind: str) -> str:
    words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(120 + 5 * i)]
    if kind == "code":
        return "\n".join(f"def f{i}_{j}(x):\n    return x + {j}  # {' '.join(words[j:j + 4])}" for j in range(12))
    return f"Document {i} about {words[0]}.\n\n" + " ".join(words) + "."


def fake_source(bc, cache: Path):
    """A pinned .tar.gz in the cache: 12 prose, 12 reference and 12 code files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", format=tarfile.USTAR_FORMAT) as tar:
        for kind, folder, ext in (("prose", "docs", "txt"), ("reference", "ref", "txt"), ("code", "src", "py")):
            for i in range(12):
                data = fake_text(i + 20 * len(kind), kind).encode()
                info = tarfile.TarInfo(f"fake-1.0/{folder}/{kind}{i:02d}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    blob = buf.getvalue()
    (cache / "pypi").mkdir(parents=True, exist_ok=True)
    (cache / "pypi" / "fake-1.0.tar.gz").write_bytes(blob)
    rules = [(r"/docs/.*\.txt$", "prose"), (r"/ref/.*\.txt$", "reference"), (r"/src/.*\.py$", "code", "code")]
    return bc._pypi("fake", "1.0", "fake-1.0.tar.gz", hashlib.sha256(blob).hexdigest(), "CC0 (test data)", rules)


def test_build_is_deterministic_split_by_document_and_loadable(bc, tmp_path):
    source = fake_source(bc, tmp_path / "cache")
    options = bc.BuildOptions(vocab_size=400, heldout_frac=0.2, slice_chars=2000, compare_vocab=())
    manifests = [bc.build(tmp_path / name, tmp_path / "cache", options, sources=(source,)) for name in ("a", "b")]
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert {str(f) for f in files} >= {"manifest.json", "tokenizer.json", "train.code.tokens.u16.xz",
                                       "test.prose.index.json.xz", "slice/corpus_slice.jsonl.gz"}
    for f in files:
        if f.name != "build_report.json":
            assert (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes(), f
    manifest = manifests[0]
    assert manifest["sources"][0]["licence"] == "CC0 (test data)" and manifest["sources"][0]["sha256"] == source.sha256
    for domain in bc.DOMAINS:                                       # every domain split by document
        counts = {s: manifest["totals"][f"{s}.{domain}"]["docs"] for s in ("train", "test")}
        assert counts["train"] >= 6 and counts["test"] >= 1

    bc.publish(tmp_path / "a", tmp_path / "corpus")
    corpus = Corpus(tmp_path / "corpus", tmp_path / "a")
    tokenizer = Tokenizer.from_str(corpus.tokenizer_json())
    seen = {}
    for split in ("train", "test"):
        for domain, shard in corpus.split(split).items():
            for i, doc_id in enumerate(shard.doc_ids):
                seen[doc_id] = (split, domain, tokenizer.decode(shard.doc(i).tolist()))
    assert len(seen) == 36                                          # each file once, in one split only
    for doc_id, (split, domain, text) in seen.items():
        name = doc_id.split("/")[-1]
        i = int(name[len(domain):len(domain) + 2])
        assert text == fake_text(i + 20 * len(domain), domain)     # lossless through the shards
        assert name.startswith(domain)
    assert corpus.sha256 == hashlib.sha256((tmp_path / "a" / "manifest.json").read_bytes()).hexdigest()


def test_tampered_or_foreign_shards_are_refused(bc, tmp_path):
    source = fake_source(bc, tmp_path / "cache")
    options = bc.BuildOptions(vocab_size=300, heldout_frac=0.2, slice_chars=1000, compare_vocab=())
    bc.build(tmp_path / "built", tmp_path / "cache", options, sources=(source,))
    bc.publish(tmp_path / "built", tmp_path / "corpus")
    shard = tmp_path / "built" / "train.code.tokens.u16.xz"
    shard.write_bytes(shard.read_bytes()[:-2] + b"\0\0")
    with pytest.raises(CorpusError, match="does not match the manifest"):
        Corpus(tmp_path / "corpus", tmp_path / "built").shard("train", "code")
    (tmp_path / "built" / "manifest.json").write_text("{}")
    with pytest.raises(CorpusError, match="made from other sources"):
        Corpus(tmp_path / "corpus", tmp_path / "built").shard("train", "prose")


def test_a_changed_download_stops_the_build(bc, tmp_path):
    source = fake_source(bc, tmp_path / "cache")
    (tmp_path / "cache" / "pypi" / "fake-1.0.tar.gz").write_bytes(b"not the pinned file")
    with pytest.raises(bc.BuildError, match="sha256 mismatch"):
        bc.build(tmp_path / "out", tmp_path / "cache", bc.BuildOptions(compare_vocab=()), sources=(source,))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out.tmp-*"))


def test_chunk_text_respects_the_limit_and_keeps_the_text(bc):
    text = "\n\n".join(f"para {i} " + "x" * 900 for i in range(100))
    parts = bc.chunk_text(text, limit=5000)
    assert all(len(p) <= 5000 for p in parts)
    assert "".join(parts).replace("\n", "") == text.replace("\n", "")


def test_html_to_text_skips_chrome_and_keeps_pre(bc):
    html = ("<html><head><title>t</title><script>x()</script></head><body><nav>menu</nav><main><h1>Title</h1>"
            "<p>Hello &amp; <b>world</b></p><pre>  indented\n    more</pre><ul><li><p>item</p></li></ul></main></body></html>")
    text = bc.html_to_text(html)
    assert "menu" not in text and "x()" not in text and "Hello & world" in text
    assert "  indented\n    more" in text and "- item" in text


def test_roff_to_text_basic_macros(bc):
    src = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list\n.SH DESCRIPTION\n.B ls\nlists \\fIfiles\\fR.\n.de XX\nbody\n..\n'
    text = bc.roff_to_text(src)
    assert "LS(1)" in text and "ls - list" in text and "ls lists files." in text and "body" not in text


def test_code_junk_filters(bc):
    assert bc.code_junk_reason("// Code generated by x. DO NOT EDIT.\n" + "var a = 1\n" * 50) == "generated"
    assert bc.code_junk_reason("x" * 1000) == "long-lines"
    assert bc.code_junk_reason("0x00, 0x01, 0x02,\n" * 100) == "data-like"
    assert bc.code_junk_reason("def f(x):\n    return x + 1\n" * 20) is None


def test_assign_splits_is_stratified_and_deterministic(bc):
    docs = [bc.Doc(f"s:{d}{i}", "s", d, f"g{d}{i}", "word " * 100) for d in bc.DOMAINS for i in range(200)]
    bc.assign_splits(docs, 0.05)
    first = [d.split for d in docs]
    bc.assign_splits(docs, 0.05)
    assert first == [d.split for d in docs]
    for dom in bc.DOMAINS:
        assert sum(d.split == "test" for d in docs if d.domain == dom) == 10


def test_the_slice_is_gzip_jsonl_of_held_out_documents(bc, tmp_path):
    source = fake_source(bc, tmp_path / "cache")
    bc.build(tmp_path / "built", tmp_path / "cache", bc.BuildOptions(vocab_size=300, heldout_frac=0.3, slice_chars=800,
                                                                      compare_vocab=()), sources=(source,))
    rows = [json.loads(line) for line in gzip.decompress((tmp_path / "built" / "slice" / "corpus_slice.jsonl.gz")
                                                          .read_bytes()).decode().splitlines()]
    assert rows and all(set(r) == {"doc_id", "source", "domain", "split", "text"} and r["split"] == "test" for r in rows)
    assert {r["domain"] for r in rows} == set(bc.DOMAINS)
