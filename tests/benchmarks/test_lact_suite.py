"""The LaCT GPU suite's pieces on a CPU: benchmarks/lact_energy.py measures tiny saved models (a LaCT
model with hybrid attention and a LaCT expert among them) through the simulator and through the
NVML backend over a fake NVML device, in fp32 and in the bf16 the GPU runs; scripts/lact_summary.py
merges its JSON into one row per recipe; benchmarks/run_lact_suite.sh parses."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import time
from pathlib import Path

import pytest
import torch

from benchmarks import lact_energy
from hw.backend import NvmlBackend
from nectar.models.gpt2_moe import MoEGPT2LMHeadModel, preset_config
from nectar.train import recipes
from nectar.train.recipes import DemoModel, save_demo_model
from nectar.train.tokenizer import train_tokenizer
from tests.hw.fake_nvml import FakeClock, FakeNvml
from tests.tolerance import approx

REPO = Path(__file__).resolve().parents[2]
LACT_SPECS = [{"kind": "gelu", "hidden": 64, "count": 2}, {"kind": "lact", "hidden": 64}, {"kind": "zero"}]
QUICK = ["--seq-len", "32", "--chunk-rows", "4", "--micro-batch", "2", "--seconds", "0.2", "--rounds", "2",
         "--warmup-s", "0.02"]


def lact_summary():
    spec = importlib.util.spec_from_file_location("lact_summary", REPO / "scripts" / "lact_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def save_tiny(path: Path, preset: str, **config) -> Path:
    """A tiny saved MoE-GPT2 whose nectar_model.json names `preset` as its recipe."""
    torch.manual_seed(0)
    texts = [f"the expert {i} routes token {i * 7 % 13} to layer {i % 5}." for i in range(300)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    fields = dict(n_layer=2, n_embd=32, n_head=2, n_inner=64, n_positions=64, expert_specs=LACT_SPECS, n_experts=0)
    model = MoEGPT2LMHeadModel(preset_config("tiny-moe", vocab_size=len(tokenizer), **{**fields, **config})).eval()
    ids = torch.cat([torch.tensor(tokenizer(t)["input_ids"]) for t in texts])
    save_demo_model(DemoModel(model, tokenizer, ids, {"recipe": {"preset": preset}}), path)
    return path


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory):
    """Two saved models: GELU + LaCT experts with GPT-2 attention, and the same with hybrid LaCT attention."""
    root = tmp_path_factory.mktemp("lact-models")
    return [save_tiny(root / "expert", "tiny-lact-expert"),
            save_tiny(root / "attn", "tiny-lact-attn", attention_type="hybrid_lact", lact_window=8,
                      lact_chunk_size=16)]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_energy_on_the_simulator(tiny_dirs, tmp_path, dtype, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "energy.json"
    args = [*map(str, tiny_dirs), "--backend", "sim", "--dtype", dtype, *QUICK, "--json-out", str(out)]
    assert lact_energy.main(args) == 0
    result = json.loads(out.read_text())                                   # strict JSON: no NaN
    assert result["backend"] == "sim" and result["dtype"] == dtype and result["gpu"]
    assert [m["name"] for m in result["models"]] == ["tiny-lact-expert", "tiny-lact-attn"]
    for row in result["models"]:
        assert len(row["windows"]) == 2 and row["tokens"] == sum(w["tokens"] for w in row["windows"]) > 0
        assert row["tokens"] % (4 * 32) == 0                               # whole chunks of 4 × 32 tokens
        assert row["tokens_per_s"] > 0 and row["J_per_token"] > 0 and math.isfinite(row["measured_ppl"])
        assert row["J_per_token"] * row["tokens_per_s"] == approx(row["mean_power_W"], n=64)
    assert "tiny-lact-attn" in capsys.readouterr().out


class WallClock(FakeClock):
    """The fake NVML's clock on the host's time, so that its energy is its power × elapsed seconds."""

    def __call__(self) -> float:
        return time.perf_counter()

    def advance(self, dt: float) -> None:
        """Reading the fake counter costs nothing here."""


def test_energy_through_the_nvml_backend_over_a_fake_device(tiny_dirs):
    """The real NvmlBackend (energy meter, windows, the one energy rule) over a 300 W fake GPU: every
    model's J/token × tokens/s is the device's 300 W. A short warm-up takes each model's first-call
    costs (a fresh clone's CI once saw a first 0.2 s window last over 0.5 s without one)."""
    cfg = lact_energy.MeasureConfig(seq_len=32, chunk_rows=4, micro_batch=2, seconds=0.1, rounds=2, warmup_s=0.05)
    models = [lact_energy.load_model(d, cfg, "cpu", torch.float32) for d in tiny_dirs]
    backend = NvmlBackend(sample_period_s=None, sync=lambda: None, nvml=FakeNvml(WallClock(), 300.0))
    try:
        rows = lact_energy.measure(models, backend, cfg, say=lambda _: None)
    finally:
        backend.close()
    for row in rows:
        assert all(w["duration_s"] < 0.5 for w in row["windows"])         # short windows: integrated power
        assert row["J_per_token"] * row["tokens_per_s"] == approx(300.0, n=64)   # a few sums and ratios
        assert row["max_gpu_temp_C"] == 40.0


def test_a_warm_up_window_each_then_rounds_in_rotating_order(tiny_dirs, monkeypatch):
    cfg = lact_energy.MeasureConfig(seq_len=32, chunk_rows=4, micro_batch=4, seconds=0.3, rounds=3, warmup_s=0.1)
    models = [lact_energy.load_model(d, cfg, "cpu", torch.float32) for d in tiny_dirs]
    calls = []

    def fake_window(backend, entry, cfg_, seconds):
        calls.append((entry.name, seconds))
        return lact_energy.WindowRecord(128, 0.1, 1.0, 10.0, 12.0, float("nan"), None, 1.0, 127, [])

    monkeypatch.setattr(lact_energy, "measure_window", fake_window)
    rows = lact_energy.measure(models, None, cfg, say=lambda _: None)
    a, b = "tiny-lact-expert", "tiny-lact-attn"
    assert [name for name, _ in calls] == [a, b, a, b, b, a, a, b]
    assert [s for _, s in calls] == [0.1, 0.1] + [approx(0.1)] * 6
    assert [len(r["windows"]) for r in rows] == [3, 3] and rows[0]["max_gpu_temp_C"] is None


@pytest.mark.parametrize("args, message", [
    (["--backend", "nvml", "--device", "cpu"], "--backend nvml measures a GPU"),
    (["--backend", "sim", "--seconds", "0"], "--seconds must be > 0"),
    (["--backend", "sim", "--seq-len", "65"], "exceeds"),
])
def test_bad_input_is_one_line_and_status_2(tiny_dirs, args, message, capsys):
    assert lact_energy.main([str(tiny_dirs[0]), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lact_energy: error: ") and message in err and err.count("\n") == 1


def test_a_missing_model_or_gpu_is_one_line(tmp_path, capsys):
    assert lact_energy.main([str(tmp_path / "none"), "--backend", "sim"]) == 2
    assert "does not exist" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert lact_energy.main([str(tmp_path / "none")]) == 2          # nvml on cuda by default
        assert "torch sees no CUDA GPU" in capsys.readouterr().err
        with pytest.raises(lact_energy.UsageError, match="the nvml backend cannot run here"):
            lact_energy.make_backend("nvml")


def test_a_model_without_usable_energy_gives_status_1(tiny_dirs, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(lact_energy, "measure", lambda models, backend, cfg: [
        {"name": m.name, "tokens_per_s": 1.0, "J_per_token": None, "mean_power_W": None, "measured_ppl": 2.0}
        for m in models])
    out = tmp_path / "energy.json"
    assert lact_energy.main([str(tiny_dirs[0]), "--backend", "sim", "--seq-len", "32", "--json-out", str(out)]) == 1
    assert json.loads(out.read_text())["models"][0]["J_per_token"] is None
    assert "no usable energy reading for tiny-lact-expert" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:Mismatch dtype between input and weight")   # CPU rms_norm: unfused
@pytest.mark.parametrize("variant", ["lact-attn", "lact-expert"])
def test_the_gpu_lact_recipes_train_under_bf16_autocast(variant):
    """`nectar train --device cuda` trains in bf16 autocast: the LaCT recipes' paths (fast weights
    in fp32 parameters, bf16 matmuls) run under it, here on the CPU's autocast at a tiny size."""
    from tests.train.test_recipes import TINY, tiny_gpu_recipe

    torch.set_num_threads(1)
    lact = recipes.RECIPES[f"distilgpt2-{variant}"]
    dense = {**TINY, **{k: v for k, v in lact.dense.items() if k.startswith(("attention_type", "lact_"))}}
    if "lact_window" in dense:
        dense.update(lact_window=8, lact_chunk_size=16)
    demo = recipes.train_demo_model(tiny_gpu_recipe(dense=dense, lact_experts=lact.lact_experts), seed=0,
                                    progress=False, dtype="bfloat16")
    assert demo.info["moe_steps"] == 4 and all(math.isfinite(v) for v in demo.info["moe"]["heldout_ppl"].values())
    assert all(math.isfinite(v) for v in demo.info["moe"]["heldout_ppl_by_position"].values())


# ----- scripts/lact_summary.py -----------------------------------------------------------------------
CPU_LACT = REPO / "docs" / "results" / "cpu-demo" / "lact"


def energy_json(path: Path, names: list[str]) -> Path:
    models = [{"name": n, "tokens_per_s": 1000.0 * (i + 1), "J_per_token": 1e-3 / (i + 1), "mean_power_W": 1.0,
               "measured_ppl": 20.0} for i, n in enumerate(names)]
    path.write_text(json.dumps({"gpu": "Fake H100", "backend": "nvml", "models": models}))
    return path


def test_summary_merges_the_measured_energy_by_recipe_name(tmp_path, capsys):
    module = lact_summary()
    sources = sorted(CPU_LACT.glob("nectar_model.*.json"))
    energy = energy_json(tmp_path / "energy.json", ["cpu-demo", "cpu-demo-lact-attn", "elsewhere"])
    out = tmp_path / "summary.json"
    assert module.main([*map(str, sources), "--energy", str(energy), "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert set(rows) == {"cpu-demo", "cpu-demo-lact-attn", "cpu-demo-lact-expert"}
    assert rows["cpu-demo-lact-attn"]["tokens_per_s"] == 2000.0 and rows["cpu-demo-lact-attn"]["J_per_token"] == 5e-4
    assert rows["cpu-demo"]["gpu"] == "Fake H100" and rows["cpu-demo"]["forward_ppl"] == 20.0
    assert rows["cpu-demo-lact-expert"]["tokens_per_s"] is None and rows["cpu-demo-lact-expert"]["J_per_token"] is None
    for row in rows.values():                        # the training throughput stays, under its own name
        assert row["train_tokens_per_s"] > 0 and {"heldout_ppl", "train_seconds"} <= set(row)
        assert {"heldout_ppl_positions_1_128", "heldout_ppl_positions_128_256"} <= set(row)
    err = capsys.readouterr().err
    assert "no energy measurement for cpu-demo-lact-expert" in err and "elsewhere" in err


def test_summary_reads_model_folders_and_refuses_bad_input(tmp_path):
    module = lact_summary()
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "nectar_model.json").write_text((CPU_LACT / "nectar_model.cpu-demo.json").read_text())
    name, row = module.summary_of(folder)
    assert name == "cpu-demo" and row["tokens_per_s"] is None and row["source"] == str(folder)
    with pytest.raises(SystemExit, match="lact_summary: error: two inputs are recipe 'cpu-demo'"):
        module.build([folder, CPU_LACT / "nectar_model.cpu-demo.json"], None)
    (tmp_path / "bad.json").write_text("[]")
    with pytest.raises(SystemExit, match="not a JSON object"):
        module.build([tmp_path / "bad.json"], None)


def test_at_1024_tokens_the_second_half_is_positions_512_1024(monkeypatch, tmp_path):
    """The spans the GPU recipes' evaluation writes (nectar.train.recipes.position_perplexities at the
    distilgpt2 recipes' seq_len 1024) become the issue's heldout_ppl_positions_512_1024."""
    monkeypatch.setattr(recipes.loop, "evaluate_perplexity", lambda *a, positions, **k: float(positions[0]))
    for name in ("distilgpt2", "distilgpt2-lact-attn", "distilgpt2-lact-expert"):
        spans = recipes.position_perplexities(None, torch.zeros(2048), recipes.RECIPES[name], "bfloat16")
        assert spans == {"1-512": 1.0, "512-1024": 512.0}
    info = json.loads((CPU_LACT / "nectar_model.cpu-demo.json").read_text())
    info["moe"]["heldout_ppl_by_position"] = spans
    (tmp_path / "nectar_model.json").write_text(json.dumps(info))
    _, row = lact_summary().summary_of(tmp_path / "nectar_model.json")
    assert row["heldout_ppl_positions_512_1024"] == 512.0 and row["heldout_ppl_positions_1_512"] == 1.0


def test_the_suite_script_parses():
    subprocess.run(["bash", "-n", str(REPO / "benchmarks" / "run_lact_suite.sh")], check=True)
