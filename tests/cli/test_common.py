"""The shared CLI plumbing: strict JSON, the one-line error wrapper, argument types."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import numpy as np
import pytest

from nectar.cli.common import cli_errors, fraction, positive_int, strict_json, to_strict
from nectar.experiment.outputs import OutputInterrupted


def test_strict_json_has_no_bare_nan_and_parses_strictly():
    value = {"a": math.nan, "b": [math.inf, -math.inf, 1.5], "c": np.float32(2.5), "d": np.arange(3),
             "e": (np.int64(4), Path("x/y")), 5: None}
    text = strict_json(value, sort_keys=True)
    parsed = json.loads(text, parse_constant=lambda name: pytest.fail(f"bare {name} in {text}"))
    assert parsed == {"a": None, "b": [None, None, 1.5], "c": 2.5, "d": [0, 1, 2], "e": [4, "x/y"], "5": None}
    with pytest.raises(ValueError, match="not JSON-serialisable"):
        to_strict(object())


def test_cli_errors_turns_expected_errors_into_one_line_and_status_2(capsys):
    @cli_errors("demo")
    def main(kind):
        if kind == "value":
            raise ValueError("bad --thing 3\nsecond line")
        if kind == "os":
            raise FileNotFoundError(2, "No such file", "x.csv")
        if kind == "interrupt":
            raise OutputInterrupted(Path("runs/x"))
        if kind == "plain-interrupt":
            raise KeyboardInterrupt
        if kind == "bug":
            raise TypeError("a bug keeps its traceback")
        return 0

    assert main("value") == 2
    assert capsys.readouterr().err == "nectar demo: error: bad --thing 3\n"
    assert main("os") == 2 and "No such file" in capsys.readouterr().err
    assert main("interrupt") == 130 and "interrupted; nothing written to runs/x" in capsys.readouterr().err
    assert main("plain-interrupt") == 130 and "nectar demo: interrupted" in capsys.readouterr().err
    with pytest.raises(TypeError):
        main("bug")
    assert main("ok") == 0


def test_argument_types_explain_themselves():
    for parse, good, bad in ((positive_int, "3", ["0", "-1", "x", "2.5"]), (fraction, "0.5", ["0", "1", "nan", "inf"])):
        parse(good)
        for text in bad:
            with pytest.raises(argparse.ArgumentTypeError, match="must be"):
                parse(text)
