"""The documents say only what the repository holds: every repository path written in backticks in
README.md and docs/ exists, every dotted `nectar.…` / `sim.…` / `hw.…` / `analysis.…` name resolves
to a module (and its first attribute to a top-level name there), the README's command synopsis
lists exactly each command's options, and every `nectar <command> …` written anywhere uses only
options that command has. Nothing is imported but the torch-free parsers."""

from __future__ import annotations

import argparse
import ast
import re
from functools import cache
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
GENERATED = ("data/corpus/built", "runs/")                # built or written at run time, never committed
PLACEHOLDER = re.compile(r"[<>*{}\[\]…]|\.\.\.")
COMMANDS = ("run", "frontier", "serve", "train", "hw-run", "verify-convexity", "reconcile", "report")
GROUPS = ("CONTROL", "SIM")                                # the synopsis's shared option groups


def _name(doc: Path) -> str:
    return str(doc.relative_to(REPO))


def _line(text: str, index: int) -> int:
    return text.count("\n", 0, index) + 1


def backticked_paths(doc: Path) -> list[tuple[int, str]]:
    """(line, path) of every backticked token that names a path under a repository folder."""
    text, out = doc.read_text(), []
    for match in re.finditer(r"`([^`\n]+)`", text):
        for token in match.group(1).split():
            token = token.strip("(),.;:'\"")
            if "/" not in token or PLACEHOLDER.search(token) or token.startswith(("http", "/", "$")):
                continue
            head = token.split("/")[0]
            if (REPO / head).is_dir() or (doc.parent / head).is_dir():
                out.append((_line(text, match.start()), token))
    return out


def exists(doc: Path, path: str) -> bool:
    """The path, relative to the repository or to the document; `file.py::test_name` also needs
    the test (or class) there."""
    path, *names = path.split("::")
    found = next((base / path for base in (REPO, doc.parent) if (base / path).exists()), None)
    if found is None or path.startswith(GENERATED):
        return found is not None or path.startswith(GENERATED)
    return all(re.search(rf"^\s*(?:def|class) {re.escape(name)}\b", found.read_text(), re.M) for name in names)


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_every_backticked_repository_path_exists(doc):
    missing = [f"{_name(doc)}:{line}: {path}" for line, path in backticked_paths(doc) if not exists(doc, path)]
    assert missing == []


@cache
def _top_level_names(path: Path) -> frozenset[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names |= {t.id for t in targets if isinstance(t, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    return frozenset(names)


def unresolved_names(text: str) -> list[str]:
    """Dotted names under the repository's packages whose module or first attribute does not exist."""
    bad = []
    for match in re.finditer(r"(?<![\w/.-])((?:nectar|sim|hw|analysis)(?:\.[A-Za-z_]\w*)+)", text):
        parts = match.group(1).split(".")
        depth, module = 1, REPO / parts[0] / "__init__.py"
        while depth < len(parts):
            package = REPO.joinpath(*parts[: depth + 1])
            if (package / "__init__.py").is_file():
                module = package / "__init__.py"
            elif package.with_suffix(".py").is_file():
                module = package.with_suffix(".py")
            else:
                break
            depth += 1
        if depth < len(parts) and parts[depth] not in _top_level_names(module):
            bad.append(f"{_line(text, match.start())}: {match.group(1)}")
    return bad


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_every_dotted_module_name_resolves(doc):
    assert unresolved_names(doc.read_text()) == []


def test_the_checks_catch_what_they_are_for(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("see `nectar/bias_optimizer.py`, `nectar/control/bias_optimizer.py` and `DIR/file.npz`")
    assert [p for _, p in backticked_paths(doc)] == ["nectar/bias_optimizer.py", "nectar/control/bias_optimizer.py"]
    assert [exists(doc, p) for _, p in backticked_paths(doc)] == [False, True]
    assert exists(doc, "tests/test_docs.py::test_the_checks_catch_what_they_are_for")
    assert not exists(doc, "tests/test_docs.py::test_that_is_not_there")
    assert unresolved_names("nectar.bias_optimizer.BiasOptimizer, sim.SimBackend, sim.backend.SimBackend") == [
        "1: nectar.bias_optimizer.BiasOptimizer", "1: sim.SimBackend"]


@cache
def real_options(command: str) -> frozenset[str]:
    """Every option string of a command's parser (torch-free: what `--help` builds)."""
    from nectar.plugins import COMMANDS as PLUGINS, load_object

    module = PLUGINS[command].split(":")[0] if command in PLUGINS else f"nectar.cli.{command.replace('-', '_')}"
    parser = load_object(f"{module}:build_parser")()
    return frozenset(o for a in parser._actions if not isinstance(a, argparse._HelpAction) for o in a.option_strings)


def _options(text: str) -> set[str]:
    return set(re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", text))


def readme_synopsis() -> dict[str, set[str]]:
    """{command: options} of the README's Commands block; a command's lines run until the next
    `nectar` line, and CONTROL / SIM stand for the group lines that define them."""
    text = (REPO / "README.md").read_text()
    block = re.search(r"## Commands\n\n```\n(.*?)```", text, re.S).group(1)
    entries: dict[str, list[str]] = {}
    current = None
    for line in block.splitlines():
        head = re.match(r"\s*(CONTROL|SIM) =", line) or re.match(r"nectar ([a-z-]+)", line)
        if head:
            current = head.group(1)
            entries.setdefault(current, [])
        if current is not None:
            entries[current].append(line)
    groups = {g: _options(" ".join(entries.pop(g))) for g in GROUPS}
    out = {}
    for command, lines in entries.items():
        words = " ".join(lines)
        out[command] = _options(words).union(*(groups[g] for g in GROUPS if re.search(rf"\b{g}\b", words)))
    return out


def test_the_readme_synopsis_lists_exactly_each_commands_options():
    synopsis = readme_synopsis()
    assert sorted(synopsis) == sorted(COMMANDS)
    for command, listed in synopsis.items():
        real = real_options(command)
        assert listed - real == set(), f"nectar {command}: the README lists options it does not have"
        assert {o for o in real if o.startswith("--")} - listed - {"--save-preset"} == set(), \
            f"nectar {command}: the README leaves out options it has"


@pytest.mark.parametrize("doc", DOCS, ids=_name)
def test_every_written_command_uses_real_options(doc):
    text, bad = doc.read_text(), []
    for match in re.finditer(r"nectar (" + "|".join(COMMANDS) + r")\b([^`\n#]*)", text):
        wrong = _options(match.group(2)) - real_options(match.group(1)) - {"--help"}
        bad += [f"{_name(doc)}:{_line(text, match.start())}: nectar {match.group(1)} {o}" for o in sorted(wrong)]
    assert bad == []
