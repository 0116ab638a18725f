"""Loading NECTAR checkpoints through transformers: deterministic logits, strict weights, the trained
selection bias, Auto registration by `import nectar` alone, and the trust_remote_code entry point.

The reference for "the right logits" is independent of from_pretrained: a model built with the
config's own constructor (ordinary eager init, every buffer real) with the checkpoint's state dict
loaded by torch's `load_state_dict(strict=True)`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from nectar.models.gpt2_moe import AUTO_MAP, REMOTE_CODE_FILE, MoEGPT2Config, MoEGPT2LMHeadModel
from tests.tolerance import tol

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "data" / "models" / "cpu-demo"
IDS = torch.arange(3, 3 + 2 * 64).remainder(4000).view(2, 64)   # [B, T] tokens of the demo vocabulary


def _logits(model, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.float().eval()(ids).logits


def _reference(directory: Path) -> MoEGPT2LMHeadModel:
    """The checkpoint loaded without from_pretrained: constructor + strict load_state_dict."""
    config = MoEGPT2Config.from_pretrained(directory)
    model = MoEGPT2LMHeadModel(config)
    state = load_file(str(directory / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}  # tied to wte
    model.tie_weights()
    return model


def _poison_allocator() -> None:
    """Leave freed memory full of large values, so an uninitialised buffer would show it."""
    for _ in range(4):
        junk = [torch.full((n,), 1e4) for n in (7, 64, 1024, 1 << 16)]
        del junk


def test_auto_loading_is_deterministic_and_matches_the_reference():
    reference = _logits(_reference(DEMO))
    _poison_allocator()
    first = AutoModelForCausalLM.from_pretrained(DEMO)
    _poison_allocator()
    second = AutoModelForCausalLM.from_pretrained(DEMO)
    assert isinstance(first, MoEGPT2LMHeadModel)
    for model in (first, second):
        for _, layer in model.moe_layers():
            assert torch.equal(layer.router.selection_bias, torch.zeros(layer.num_experts))
    assert torch.equal(_logits(first), _logits(second))
    # the same float16 weights (upcast exactly to float32 by both), the same code: the same bits
    assert torch.equal(_logits(first), reference)


def test_save_then_reload_gives_identical_logits(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32)
    model.save_pretrained(tmp_path / "copy")
    _poison_allocator()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "copy", dtype=torch.float32)
    assert torch.equal(_logits(model), _logits(again))
    saved = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert saved["auto_map"] == AUTO_MAP and (tmp_path / "copy" / REMOTE_CODE_FILE).is_file()


def test_a_trained_selection_bias_survives_save_and_reload(tmp_path):
    model = AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32)
    for i, (_, layer) in enumerate(model.moe_layers()):
        layer.router.selection_bias.copy_(torch.linspace(-2.0, 2.0, layer.num_experts) * (i + 1))
    biased = _logits(model)
    plain = _logits(AutoModelForCausalLM.from_pretrained(DEMO, dtype=torch.float32))
    # the bias reroutes tokens: a change beyond what rounding on the path of a logit could make
    # (tests/tolerance.py; 6 blocks of width 128, hidden 512, 64 tokens, as tests/models/test_gpt2_moe.py counts)
    assert (biased - plain).abs().max() > tol(torch.float32, n=6 * (9 * 128 + 2 * 64 + 512 + 2) + 3 * 128,
                                              scale=plain.abs().max())
    model.save_pretrained(tmp_path / "biased")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "biased", dtype=torch.float32)
    assert torch.equal(_logits(again), biased)
    assert again.config.router_selection_bias == model.trained_selection_bias()


def _edit_config(directory: Path, **changes) -> None:
    config = json.loads((directory / "config.json").read_text())
    config.update(changes)
    (directory / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize("changes, message", [
    (dict(n_layer=7), "missing from the checkpoint"),       # a layer the weights do not have
    (dict(n_layer=5), "not used by the config"),            # weights of a layer the config drops
    (dict(n_embd=256, n_inner=1024), "size mismatch|wrong shape|mismatch"),
])
def test_weights_that_do_not_cover_the_config_are_refused(tmp_path, changes, message):
    directory = tmp_path / "model"
    shutil.copytree(DEMO, directory)
    _edit_config(directory, **changes)
    with pytest.raises((ValueError, RuntimeError), match=message):
        AutoModelForCausalLM.from_pretrained(directory)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="n_embd"):
        MoEGPT2Config(n_embd=130, n_head=4)
    with pytest.raises(ValueError, match="router_selection_bias"):
        MoEGPT2Config(n_layer=2, n_experts=4, router_selection_bias=[[0.0] * 4])


def _python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(REPO), **env})


def test_import_nectar_registers_the_auto_classes_without_importing_torch():
    out = _python("import sys, nectar; print('torch' in sys.modules, 'transformers' in sys.modules)")
    assert out.stdout.split() == ["False", "False"], out.stderr
    for order in ("import nectar\nfrom transformers import AutoModelForCausalLM",
                  "from transformers import AutoModelForCausalLM\nimport nectar",
                  "import nectar.moe.experts\nfrom transformers import AutoModelForCausalLM"):
        code = f"{order}\nm = AutoModelForCausalLM.from_pretrained({str(DEMO)!r})\nprint(type(m).__module__)"
        out = _python(code)
        assert out.returncode == 0 and out.stdout.strip().endswith("nectar.models.gpt2_moe"), \
            (order, out.stderr[-2000:])


def test_trust_remote_code_loads_without_import_nectar(tmp_path):
    code = ("import sys\nfrom transformers import AutoModelForCausalLM\n"
            f"m = AutoModelForCausalLM.from_pretrained({str(DEMO)!r}, trust_remote_code=True)\n"
            "print(type(m).__module__, 'nectar' in sys.modules)")
    out = _python(code, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1")
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["nectar.models.gpt2_moe", "True"]
