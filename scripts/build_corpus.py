"""Build NECTAR's offline English corpus from CPython's own documentation (no download).

Sources, in this order:
  1. `pydoc_data.topics.topics`: the language-reference topics that `help()` shows (~465K chars);
  2. docstrings (`inspect.getdoc`) of a FIXED sorted list of pure-Python standard-library modules:
     each module, then its classes (with their methods and properties) and functions, in sorted
     order, keeping only objects defined in that module;
  3. the same for a short fixed list of built-in (C) modules (`builtins`, `math`, `itertools`...),
     because the pure-Python docstrings alone come to only ~1.8M characters.
Every document is stripped, control separators are removed, and exact duplicates are dropped;
collection stops once the corpus reaches `--target-chars`.

Output (data to be committed, so every machine reads identical text whatever its Python):
  data/corpus/pydocs.txt.gz   documents joined by DOC_SEPARATOR, gzip with mtime=0 (deterministic)
  data/corpus/MANIFEST.json   source, Python version used, sha256 of the text, sizes, licence note

Usage: python scripts/build_corpus.py [--out data/corpus] [--target-chars 2500000]
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import importlib
import inspect
import json
import platform
import sys
import warnings
from pathlib import Path

DOC_SEPARATOR = "\n\x1e\n"  # ASCII record separator on its own line; removed from documents
CORPUS_FILE = "pydocs.txt.gz"
MANIFEST_FILE = "MANIFEST.json"

# Pure-Python standard-library modules, sorted, fixed (those with >= 500 chars of docstrings on
# CPython 3.11; idlelib is left out because importing it creates ~/.idlerc). A module that does
# not import on the building machine is skipped and the manifest lists the modules actually used.
PURE_PYTHON_MODULES = sorted("""
_compression _pydecimal _pyio _sitebuiltins _strptime _threading_local abc aifc argparse ast
asynchat asyncio.base_events asyncio.base_subprocess asyncio.constants asyncio.events
asyncio.exceptions asyncio.futures asyncio.locks asyncio.proactor_events asyncio.protocols
asyncio.queues asyncio.runners asyncio.selector_events asyncio.sslproto asyncio.staggered
asyncio.streams asyncio.subprocess asyncio.taskgroups asyncio.tasks asyncio.timeouts
asyncio.transports asyncio.unix_events asyncore base64 bdb bz2 cProfile calendar cgi cgitb chunk
cmd code codecs codeop collections collections.abc colorsys compileall configparser contextlib
copy copyreg crypt csv ctypes curses.textpad dataclasses datetime dbm dbm.dumb decimal difflib
dis distutils.archive_util distutils.cmd distutils.core distutils.dir_util distutils.dist
distutils.errors distutils.fancy_getopt distutils.file_util distutils.filelist distutils.spawn
distutils.sysconfig distutils.text_file distutils.util distutils.version
distutils.versionpredicate doctest email email._encoded_words email._header_value_parser
email._parseaddr email._policybase email.base64mime email.charset email.errors email.feedparser
email.generator email.header email.headerregistry email.iterators email.message email.parser
email.policy email.quoprimime email.utils enum filecmp fileinput fnmatch fractions ftplib
functools genericpath getopt getpass gettext glob graphlib gzip hashlib heapq hmac html
html.parser http http.client http.cookiejar http.cookies http.server imaplib imp importlib
importlib._abc importlib.abc importlib.metadata importlib.util inspect io ipaddress json
json.decoder json.encoder linecache locale logging logging.config logging.handlers lzma mailbox
mailcap mimetypes modulefinder multiprocessing.connection multiprocessing.context
multiprocessing.dummy multiprocessing.forkserver multiprocessing.managers multiprocessing.pool
multiprocessing.process multiprocessing.reduction multiprocessing.shared_memory
multiprocessing.synchronize multiprocessing.util nntplib ntpath numbers operator optparse os
pathlib pdb pickle pickletools pipes pkgutil platform plistlib poplib posixpath pprint profile
pstats pty py_compile pyclbr pydoc queue quopri random re re._constants rlcompleter runpy sched
secrets selectors shelve shlex shutil signal site smtpd smtplib sndhdr socket socketserver
sqlite3 ssl statistics string struct subprocess sunau symtable sysconfig tabnanny tarfile
telnetlib tempfile textwrap threading timeit tkinter tkinter.colorchooser tkinter.dnd
tkinter.filedialog tkinter.font tkinter.scrolledtext tkinter.simpledialog tkinter.tix
tkinter.ttk tokenize tomllib._parser trace traceback tracemalloc turtle types typing unittest
unittest._log unittest.async_case unittest.case unittest.loader unittest.mock unittest.result
unittest.runner unittest.suite unittest.util urllib.error urllib.parse urllib.request
urllib.response urllib.robotparser uuid warnings wave weakref webbrowser wsgiref
wsgiref.handlers wsgiref.headers wsgiref.simple_server wsgiref.types wsgiref.util
wsgiref.validate xdrlib xml xml.dom xml.sax xmlrpc.client xmlrpc.server zipapp zipfile zipimport
""".split())

# Built-in (C) modules whose docstrings document the core types and numerics; `builtins` also
# contributes int, str, list, dict... (pure-Python docstrings alone give only ~1.8M chars).
BUILTIN_MODULES = sorted("""
array binascii builtins cmath faulthandler fcntl gc itertools marshal math mmap posix resource
select sys time unicodedata zlib
""".split())


def normalise(text: str | None) -> str:
    """Strip, unify newlines, and remove the characters used as document separators."""
    if not text:
        return ""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = text.replace("\x1e", " ").replace("\f", "\n").replace("\x00", "")
    return text.strip()


def topic_documents() -> list[tuple[str, str]]:
    """(title, text) for every pydoc topic, sorted by topic name."""
    from pydoc_data.topics import topics

    return [(f"Python language reference: {name}", topics[name]) for name in sorted(topics)]


def _defined_here(obj: object, module_name: str) -> bool:
    return getattr(obj, "__module__", None) == module_name


def _class_members(cls: type) -> list[tuple[str, object]]:
    """Routines and properties defined directly on `cls` (not inherited), sorted by name."""
    members = []
    for name, value in sorted(vars(cls).items()):
        target = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
        if inspect.isroutine(target) or isinstance(target, property):
            members.append((name, target))
    return members


def module_documents(module_name: str) -> list[tuple[str, str | None]]:
    """(title, docstring) for a module, its classes (+ their members) and functions, sorted.

    Only objects defined in the module itself are kept (`__module__` matches), so re-exports
    are not counted twice; `builtins` defines everything it holds.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deprecated modules (asyncore, cgi, distutils...) warn on import
        module = importlib.import_module(module_name)
    docs: list[tuple[str, str | None]] = [(f"Module {module_name}", inspect.getdoc(module))]
    for name, obj in sorted(vars(module).items()):
        if not _defined_here(obj, module_name):
            continue
        if inspect.isclass(obj):
            docs.append((f"Class {module_name}.{name}", inspect.getdoc(obj)))
            for member_name, member in _class_members(obj):
                docs.append((f"Member {module_name}.{name}.{member_name}", inspect.getdoc(member)))
        elif inspect.isroutine(obj):
            docs.append((f"Function {module_name}.{name}", inspect.getdoc(obj)))
    return docs


def collect_documents(target_chars: int, min_doc_chars: int = 40) -> tuple[list[str], list[str], list[str]]:
    """Documents (title line + body) until `target_chars` or the sources run out.

    Returns (documents, modules used, modules skipped because they do not import here).
    """
    seen_bodies: set[str] = set()
    documents: list[str] = []
    used_modules: list[str] = []
    skipped_modules: list[str] = []
    total = 0

    def add(title: str, body: str | None) -> None:
        nonlocal total
        body = normalise(body)
        if len(body) < min_doc_chars or body in seen_bodies:
            return
        seen_bodies.add(body)
        document = f"{title}\n\n{body}"
        documents.append(document)
        total += len(document) + len(DOC_SEPARATOR)

    for title, body in topic_documents():
        add(title, body)
    for module_name in PURE_PYTHON_MODULES + BUILTIN_MODULES:
        if total >= target_chars:
            break
        try:
            module_docs = module_documents(module_name)
        except Exception:  # e.g. tkinter missing on this machine: skip, the manifest says so
            skipped_modules.append(module_name)
            continue
        used_modules.append(module_name)
        for title, body in module_docs:
            add(title, body)
    return documents, used_modules, skipped_modules


def write_corpus(out_dir: Path, documents: list[str], used_modules: list[str], skipped_modules: list[str],
                 target_chars: int) -> dict:
    """Write the gzip (mtime=0) and the manifest; return the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text = DOC_SEPARATOR.join(documents)
    raw = text.encode("utf-8")
    gz_path = out_dir / CORPUS_FILE
    with open(gz_path, "wb") as handle:
        with gzip.GzipFile(filename="", mode="wb", fileobj=handle, mtime=0, compresslevel=9) as gz:
            gz.write(raw)
    manifest = {
        "file": CORPUS_FILE,
        "source": "CPython standard-library documentation: pydoc_data.topics.topics plus "
                  "inspect.getdoc docstrings of the listed modules (scripts/build_corpus.py)",
        "python_version": platform.python_version(),
        "python_implementation": platform.python_implementation(),
        "sha256_text": hashlib.sha256(raw).hexdigest(),
        "sha256_gzip": hashlib.sha256(gz_path.read_bytes()).hexdigest(),
        "chars": len(text),
        "utf8_bytes": len(raw),
        "documents": len(documents),
        "document_separator": DOC_SEPARATOR,
        "target_chars": target_chars,
        "modules": used_modules,
        "modules_skipped": skipped_modules,
        "license": "Text derived from the Python documentation and standard-library docstrings, "
                   "Copyright Python Software Foundation, under the PSF License Agreement "
                   "(https://docs.python.org/3/license.html).",
    }
    (out_dir / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, ensure_ascii=True) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    repo_root = Path(__file__).resolve().parent.parent
    parser.add_argument("--out", type=Path, default=repo_root / "data" / "corpus")
    parser.add_argument("--target-chars", type=int, default=2_500_000)
    args = parser.parse_args(argv)
    if args.target_chars <= 0:
        parser.error("--target-chars must be positive")
    documents, used_modules, skipped_modules = collect_documents(args.target_chars)
    manifest = write_corpus(args.out, documents, used_modules, skipped_modules, args.target_chars)
    print(f"wrote {args.out / CORPUS_FILE}: {manifest['documents']} documents, {manifest['chars']:,} chars, "
          f"{len(used_modules)} modules, Python {manifest['python_version']}, sha256 {manifest['sha256_text'][:16]}…")
    return 0


if __name__ == "__main__":
    sys.exit(main())
