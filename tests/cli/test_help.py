"""`--help` everywhere: no torch imported, every option explained with its default, and the defaults
the command line spells out (so that --help stays torch-free) agree with the code they stand for."""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from nectar.cli import CORE, HELP, build_parser as top_parser
from nectar.plugins import COMMANDS

REPO = Path(__file__).resolve().parents[2]
ALL = sorted({*CORE, *COMMANDS})


def _parser(command: str) -> argparse.ArgumentParser:
    """A command's parser: `build_parser` of nectar/cli/<command>.py, or of the plugin's module."""
    from nectar.plugins import load_object

    module = COMMANDS[command].split(":")[0] if command in COMMANDS else f"nectar.cli.{command.replace('-', '_')}"
    return load_object(f"{module}:build_parser")()


def test_help_imports_neither_torch_nor_transformers():
    code = ("import sys, contextlib, io\nfrom nectar.cli import main\nout = {}\n"
            f"for argv in [['--help'], *[[c, '--help'] for c in {ALL!r}]]:\n"
            "    buf = io.StringIO()\n"
            "    with contextlib.redirect_stdout(buf):\n"
            "        try:\n            main(argv)\n        except SystemExit as e:\n            assert e.code == 0, (argv, e.code)\n"
            "    assert 'usage:' in buf.getvalue(), argv\n"
            "print(sorted(m for m in ('torch', 'transformers', 'cvxpy', 'matplotlib') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"


def test_top_level_help_says_what_nectar_is_and_lists_every_command():
    text = top_parser().format_help()
    assert "Mixture-of-Experts" in text and "adapts at test time" in text and "simulator" in text
    for command in ALL:
        assert command in text and command in HELP


@pytest.mark.parametrize("command", ALL)
def test_every_option_has_help_and_shows_its_default(command):
    parser = _parser(command)
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or not action.option_strings:
            continue
        assert action.help, f"{command} {action.option_strings} has no help"
        shown = parser.formatter_class(prog="x")._get_help_string(action) % {"default": action.default}
        if action.default not in (None, False):
            default = ",".join(action.default) if isinstance(action.default, list) else str(action.default)
            assert default in shown, f"{command} {action.option_strings}: default {default!r} not in help"
    assert "(default:" in text


def test_spelled_out_defaults_agree_with_the_code():
    from nectar.cli import experiment_args, frontier, hw_run, run, train
    from nectar.cli.common import RECIPE_NAMES
    from nectar.control.controller import ControllerConfig
    from nectar.control.quality_guard import GuardConfig
    from nectar.experiment import policies, policy_lists, workloads
    from nectar.models.gpt2_moe import PRESETS
    from nectar.train import loop, recipes

    assert run.DEFAULT_POLICIES == policies.DEFAULT_POLICIES
    assert experiment_args.MAX_PPL_INCREASE == GuardConfig.max_ppl_increase
    assert experiment_args.BUDGET_USE == GuardConfig.budget_use
    assert GuardConfig.price_init is None        # --price's default: the router family's start price
    assert experiment_args.SHADOW_SHARE == ControllerConfig.shadow_share
    assert experiment_args.SHADOW_AGREE == ControllerConfig.shadow_agree
    assert frontier.WORKLOADS == workloads.WORKLOADS
    assert set(hw_run.GPU_WORKLOADS) <= set(workloads.WORKLOADS)
    for name in policy_lists.STATIC_FRONTIER:
        assert not policies.parse_policy(name).adaptive, name
    for name in policy_lists.ADAPTIVE + hw_run.GPU_POLICIES:
        policies.parse_policy(name)
    assert set(train.PRESETS) == set(PRESETS)
    assert set(RECIPE_NAMES) == set(recipes.RECIPES)          # what train and hw-run offer
    assert set(train.DTYPES) == set(loop.DTYPES) and set(train.BALANCE_LOSSES) == set(loop.BALANCE_LOSSES)
