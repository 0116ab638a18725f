"""Shared command-line plumbing: one-line errors, strict JSON, help that shows every default, argument types.

- `cli_errors("run")` wraps a command's `main(argv)`: an expected error (ValueError, OSError,
  EOFError, RuntimeError: bad input, a missing or unreadable file, no GPU) becomes one line
  `nectar run: error: <message>` on stderr and exit status 2; Ctrl-C (or SIGTERM) becomes
  `nectar run: interrupted; nothing written to OUT` (OUT when an `OutputDir` was open:
  nectar.experiment.outputs) and exit status 130. Anything else is a bug and keeps its traceback. `NECTAR_TRACEBACK=1` re-raises.
- `strict_json` writes JSON that every parser accepts: NaN and ±inf become null, numpy scalars and
  arrays become numbers and lists, paths become strings; `allow_nan=False` guards the rest.
- `HelpFormatter` appends "(default: …)" to every option's help that has a meaningful default.
- `positive_int`, `non_negative_int`, `positive_float`, … are argparse `type=` callables with
  clear messages.
- `wrap_note` wraps a printed note at 100 columns (tables and one-line errors stay one line each).

This module imports nothing heavy: `nectar --help` and `nectar <command> --help` must not import torch.

A command module follows one pattern (nectar/cli/run.py is the full example):

    def build_parser():                      # torch-free; `parser(prog, __doc__)` shows every default
        p = parser("nectar frontier", __doc__)
        p.add_argument("--out", type=Path, default=Path("runs/frontier"), help="output folder")
        p.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")
        return p

    @cli_errors("frontier")
    def main(argv=None):
        args = build_parser().parse_args(argv)
        check_args(args)                       # every ValueError before any compute
        from nectar.experiment.outputs import prepare_out
        out = prepare_out(args.out, args.overwrite)   # --out checked now
        with out as tmp:                       # written into a temporary sibling, renamed on success
            ...                                # heavy imports and compute here
            (tmp / "summary.json").write_text(strict_json(summary, indent=2))
        return 0

and registers in nectar/cli/__init__.py (CORE, HELP); tests/cli/test_help.py and the fuzz table in
tests/cli/test_fuzz.py then cover it.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import sys
from pathlib import Path
from typing import Any, Callable

EXPECTED_ERRORS = (ValueError, OSError, EOFError, RuntimeError)
EXIT_ERROR = 2
EXIT_INTERRUPTED = 130

# the trained-model recipes (nectar.train.recipes.RECIPES; named here so that --help imports no torch)
RECIPE_NAMES = ("cpu-demo", "distilgpt2", "cpu-demo-lact-attn", "cpu-demo-lact-expert", "distilgpt2-lact-attn",
                "distilgpt2-lact-expert")


class CLIError(ValueError):
    """A bad input or state the user can fix; printed as one line."""


NOTE_WIDTH = 100


def wrap_note(text: str, width: int = NOTE_WIDTH, indent: str = "  ") -> str:
    """A printed note (not a table row) wrapped at `width` columns; continuation lines indented."""
    import textwrap

    return textwrap.fill(text, width=width, subsequent_indent=indent, break_on_hyphens=False, break_long_words=False)


def one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (its type name when it has none)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def report_error(command: str, message: str) -> int:
    print(f"nectar {command}: error: {message}", file=sys.stderr)
    return EXIT_ERROR


def cli_errors(command: str) -> Callable[[Callable[..., int]], Callable[..., int]]:
    """Decorator for a command's `main(argv) -> int` (see the module docstring)."""
    def decorate(main: Callable[..., int]) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapper(*args: Any, **kwargs: Any) -> int:
            try:
                return int(main(*args, **kwargs) or 0)
            except KeyboardInterrupt as exc:
                out = getattr(exc, "out", None)
                where = f"; nothing written to {out}" if out is not None else ""
                print(f"\nnectar {command}: interrupted{where}", file=sys.stderr)
                return EXIT_INTERRUPTED
            except EXPECTED_ERRORS as exc:
                if os.environ.get("NECTAR_TRACEBACK"):
                    raise
                return report_error(command, one_line(exc))
        return wrapper
    return decorate


# ---------------------------------------------------------------------------- strict JSON
def to_strict(value: Any) -> Any:
    """`value` with NaN/inf → None, numpy scalars/arrays → Python numbers/lists, paths → str, tuples → lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, dict):
        return {str(k): to_strict(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_strict(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist") and hasattr(value, "dtype"):  # numpy / torch scalars and arrays
        return to_strict(value.tolist())
    raise ValueError(f"not JSON-serialisable: {type(value).__name__} {value!r}")


def strict_json(value: Any, **kwargs: Any) -> str:
    """json.dumps of `to_strict(value)` with allow_nan=False (so no bare NaN/Infinity ever appears)."""
    return json.dumps(to_strict(value), allow_nan=False, **kwargs)


# ---------------------------------------------------------------------------- argparse helpers
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the description's line breaks and appends "(default: X)" to options with a real default."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default:" in text or not action.option_strings:
            return text
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def parser(prog: str, doc: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An ArgumentParser for `nectar <command>` whose description is the module docstring's first paragraph."""
    description = doc.strip().split("\n\n")[0]
    return argparse.ArgumentParser(prog=prog, description=description, epilog=epilog, formatter_class=HelpFormatter)


def _number(text: str, kind: type, test: Callable[[Any], bool], what: str):
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
    if isinstance(value, float) and not math.isfinite(value) or not test(value):
        raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, lambda v: v > 0, "a positive integer")


def non_negative_int(text: str) -> int:
    return _number(text, int, lambda v: v >= 0, "an integer >= 0")


def positive_float(text: str) -> float:
    return _number(text, float, lambda v: v > 0, "a positive number")


def non_negative_float(text: str) -> float:
    return _number(text, float, lambda v: v >= 0, "a number >= 0")


def finite_float(text: str) -> float:
    return _number(text, float, lambda v: True, "a finite number")


def fraction(text: str) -> float:
    return _number(text, float, lambda v: 0 < v < 1, "a number strictly between 0 and 1")


def comma_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError(f"must be a comma-separated list, got {text!r}")
    return names
