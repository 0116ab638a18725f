"""Bad input, table-driven, through `nectar <command>` exactly as a user types it.

Every case asserts the exit status (2 for bad input, 1 for a failed check or incomplete results,
130 for Ctrl-C), a clear one-line message on stderr, no traceback, and that nothing was lost or
half-written: the case's folder is byte-for-byte as it was (unless the case names what it may
write), no temporary `.partial-`/`.old-` entry is left anywhere, and the repository's presets and
committed model are untouched. Cases run in-process (`nectar.cli.main(argv)`), so they are cheap;
tests/cli/test_interrupt.py sends a real SIGINT to a real process.

FRONTIER: `nectar frontier` cases go in FRONTIER_CASES below (the command is being written
separately; its cases are added when it is merged).
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import pytest

from nectar.cli import main as nectar_main

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "data" / "models" / "cpu-demo"
WATCHED = [REPO / "sim" / "presets", DEMO]          # never written by any command below
FAST_RUN = ["--tokens", "1024", "--chunk-tokens", "1024", "--price-batch", "4", "--no-progress"]


@dataclass
class Case:
    id: str
    argv: list[str]                                  # "{tmp}" is the case's folder, "{demo}" the committed model
    code: int
    message: str                                     # regex searched in stderr
    setup: Callable[[Path], None] | None = None
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    writes: tuple[str, ...] = ()                     # entries (relative to {tmp}) the case may create
    stdout: str | None = None                        # regex searched in stdout
    check: Callable[[Path], None] | None = None      # extra assertions on {tmp} afterwards
    marks: tuple = field(default_factory=tuple)


# ---------------------------------------------------------------------------- set-ups
def model_copy(mutate: Callable[[Path], None] | None = None) -> Callable[[Path], None]:
    def setup(tmp: Path) -> None:
        shutil.copytree(DEMO, tmp / "model")
        if mutate is not None:
            mutate(tmp / "model")
    return setup


def edit_config(**changes):
    def mutate(model: Path) -> None:
        config = json.loads((model / "config.json").read_text())
        config.update(changes)
        (model / "config.json").write_text(json.dumps(config))
    return mutate


def truncate(name: str, keep: float = 0.5):
    def mutate(model: Path) -> None:
        data = (model / name).read_bytes()
        (model / name).write_bytes(data[: int(len(data) * keep)])
    return mutate


def write(name: str, text: str | bytes):
    def setup(tmp: Path) -> None:
        path = tmp / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return setup


def both(*setups):
    def setup(tmp: Path) -> None:
        for s in setups:
            s(tmp)
    return setup


def synthetic_trace(name: str = "trace", mutate: Callable[[list], list] | None = None, gpu: str | None = None):
    def setup(tmp: Path) -> None:
        from analysis.reconcile.synthetic_trace import Schedule, perturbed_preset, synthetic_measured_rows
        from nectar.telemetry.trace import write_meta, write_trace
        from sim.presets import load_preset

        rows = synthetic_measured_rows(perturbed_preset(load_preset("h100_sxm")), Schedule(chunks=8, burst_every=4,
                                                                                             burst_len=2), seed=1)
        rows = mutate(rows) if mutate else rows
        write_trace(tmp / name / "trace.csv.gz", rows)
        write_meta(tmp / name, backend="nvml", gpu_name=gpu or "NVIDIA H100 80GB HBM3")
    return setup


def counter_backwards(rows: list) -> list:
    import dataclasses

    i = next(k for k, r in enumerate(rows) if r.workload is not None)
    w = rows[i].window
    rows[i] = dataclasses.replace(rows[i], window=dataclasses.replace(w, energy_mJ_start=w.energy_mJ_end + 5000))
    return rows


def run_dir(mutate: Callable[[Path], None] | None = None):
    def setup(tmp: Path) -> None:
        from tests.analysis.test_report import make_run_dir

        make_run_dir(tmp / "run")
        if mutate is not None:
            mutate(tmp / "run")
    return setup


def edit_summary(fn):
    def mutate(run: Path) -> None:
        summary = json.loads((run / "summary.json").read_text())
        fn(summary)
        (run / "summary.json").write_text(json.dumps(summary))
    return mutate


def edit_chunks(fn):
    def mutate(run: Path) -> None:
        lines = (run / "chunks.csv").read_text().splitlines()
        (run / "chunks.csv").write_text("\n".join(fn(lines)) + "\n")
    return mutate


def convexity_instance(truncated: bool = False):
    def setup(tmp: Path) -> None:
        (tmp / "run").mkdir()
        path = tmp / "run" / "convexity_instance.npz"
        rng = np.random.default_rng(0)
        q = rng.dirichlet(np.ones(4), size=64)
        np.savez_compressed(path, q=q, c=np.array([1.0, 2.0, 0.5, 0.1]), lam=0.5)
        if truncated:
            path.write_bytes(path.read_bytes()[:100])
    return setup


def interrupt(target: str):
    """Patch `module:attr` to raise KeyboardInterrupt, as a Ctrl-C at that point would."""
    module, attr = target.split(":")

    def raise_interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    return lambda mp: mp.setattr(f"{module}.{attr}", raise_interrupt)


def interrupt_while_writing(mp: pytest.MonkeyPatch) -> None:
    """Ctrl-C after half of the run directory is written."""
    import nectar.experiment.outputs as outputs

    real = outputs.write_chunks_csv

    def half(path, rows):
        real(path, rows)
        raise KeyboardInterrupt

    mp.setattr(outputs, "write_chunks_csv", half)


def replaced_old_run(tmp: Path) -> None:
    assert sorted(p.name for p in (tmp / "out").iterdir()) != ["stale.png"]
    assert not (tmp / "out" / "stale.png").exists()            # the old run's plot is gone, not mixed in
    summary = (tmp / "out" / "summary.json").read_text()
    json.loads(summary, parse_constant=lambda c: pytest.fail(f"bare {c} in summary.json"))


def strict_nan_summary(tmp: Path) -> None:
    summary = json.loads((tmp / "nan" / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert summary["policies"]["static-top2"]["J_per_token"] is None


MODEL = ["--model", "{tmp}/model"]
SEGMENTS = both(synthetic_trace("gpu/main"), synthetic_trace("gpu/power"))

# ---------------------------------------------------------------------------- the table
RUN_CASES = [
    Case("run-model-truncated-weights", ["run", *MODEL], 2, r"cannot load the model .*(deserializ|header|incomplete)",
         model_copy(truncate("model.safetensors"))),
    Case("run-model-empty-weights", ["run", *MODEL], 2, r"model.safetensors is empty",
         model_copy(lambda m: (m / "model.safetensors").write_bytes(b""))),
    Case("run-model-missing-weights", ["run", *MODEL], 2, r"no weights \(model.safetensors",
         model_copy(lambda m: (m / "model.safetensors").unlink())),
    Case("run-model-invalid-config-json", ["run", *MODEL], 2, r"config.json is not valid JSON",
         model_copy(lambda m: (m / "config.json").write_text("{not json"))),
    Case("run-model-config-more-layers", ["run", *MODEL], 2, r"missing from the checkpoint", model_copy(edit_config(n_layer=7))),
    Case("run-model-config-fewer-layers", ["run", *MODEL], 2, r"not used by the config", model_copy(edit_config(n_layer=5))),
    Case("run-model-config-bad-top-k", ["run", *MODEL], 2, r"moe_top_k must be in \[1, 7\]", model_copy(edit_config(moe_top_k=99))),
    Case("run-model-dense-config", ["run", *MODEL], 2, r"describes a 'gpt2' model", model_copy(edit_config(model_type="gpt2"))),
    Case("run-model-truncated-heldout", ["run", *MODEL], 2, r"cannot read .*heldout_ids.pt", model_copy(truncate("heldout_ids.pt"))),
    Case("run-model-corrupt-tokenizer", ["run", *MODEL], 2, r"cannot load the tokenizer",
         model_copy(lambda m: (m / "tokenizer.json").write_text("{"))),
    Case("run-model-missing-dir", ["run", "--model", "{tmp}/nowhere"], 2, r"does not exist"),
    Case("run-model-is-a-file", ["run", "--model", "{tmp}/f"], 2, r"is a file", write("f", "x")),
    Case("run-seq-len-beyond-positions", ["run", "--seq-len", "512", "--chunk-tokens", "4096"], 2,
         r"--seq-len 512 exceeds the model's 256 positions"),
    Case("run-tokens-not-a-multiple", ["run", "--tokens", "5000"], 2, r"--tokens 5000 is not a multiple .* use 4096 or 8192"),
    Case("run-chunk-not-multiple-of-seq", ["run", "--chunk-tokens", "1000"], 2, r"--chunk-tokens 1000 is not a multiple of --seq-len 256"),
    Case("run-shadow-share-zero", ["run", "--shadow-share", "0"], 2, r"--shadow-share: must be a positive number"),
    Case("run-shadow-agree-nan", ["run", "--shadow-agree", "nan"], 2, r"--shadow-agree: must be a positive number"),
    Case("run-budget-use-above-one", ["run", "--budget-use", "1.5"], 2, r"--budget-use must lie in \(0, 1\]"),
    Case("run-unknown-policy", ["run", "--policies", "static-top2,bogus"], 2, r"--policies: unknown policy 'bogus'"),
    Case("run-bad-policy-value", ["run", "--policies", "static-top2,top-p:2"], 2, r"top-p takes a value in \[0, 1\]"),
    Case("run-policy-twice", ["run", "--policies", "nectar,nectar"], 2, r"listed twice"),
    Case("run-price-zero", ["run", "--price", "0"], 2, r"--price: must be a positive number"),
    Case("run-price-nan", ["run", "--price", "nan"], 2, r"--price: must be a positive number"),
    Case("run-temp-cap-absurd", ["run", "--temp-cap", "500"], 2, r"--temp-cap must lie in \[20, 100\]"),
    Case("run-power-schedule-malformed", ["run", "--power-budget", "10:300,0:400"], 2, r"bad schedule|start at 0"),
    Case("run-power-budget-absurd", ["run", "--power-budget", "1"], 2, r"power budget must be in"),
    Case("run-max-ppl-increase", ["run", "--max-ppl-increase", "1.5"], 2, r"--max-ppl-increase must lie in \(0, 1\)"),
    Case("run-unknown-fault", ["run", "--faults", "bogus:1"], 2, r"bogus"),
    Case("run-fault-out-of-range", ["run", "--faults", "nan:2"], 2, r"nan"),
    Case("run-unknown-gpu-preset", ["run", "--gpu", "nosuch"], 2, r"unknown GPU preset 'nosuch'"),
    Case("run-gpu-preset-bad-json", ["run", "--gpu", "{tmp}/bad.json"], 2, r"not valid JSON", write("bad.json", "{")),
    Case("run-unknown-price-as", ["run", "--price-as", "gpt5"], 2, r"unknown price-as target 'gpt5'"),
    Case("run-nvml-without-gpu", ["run", "--backend", "nvml"], 2, r"NVML could not start|NVML"),
    Case("run-negative-seed", ["run", "--seed", "-1"], 2, r"--seed: must be an integer >= 0"),
    Case("run-model-and-model-seed", ["run", "--model", "{demo}", "--model-seed", "3"], 2, r"not allowed with argument"),
    Case("run-out-is-a-file", ["run", "--out", "{tmp}/f"], 2, r"--out .*/f is a file, not a folder", write("f", "x")),
    Case("run-out-under-a-file", ["run", "--out", "{tmp}/f/run"], 2, r"is a file, so the folder cannot be created", write("f", "x")),
    Case("run-out-not-writable", ["run", "--out", "/proc/nectar-fuzz/run"], 2, r"cannot create a folder|not writable"),
    Case("run-out-not-empty", ["run", "--out", "{tmp}/out"], 2, r"not empty .*pass --overwrite", write("out/stale.png", "old")),
    Case("run-out-would-replace-the-model", ["run", *MODEL, "--out", "{tmp}", "--overwrite"], 2,
         r"would replace the input", model_copy()),
    Case("run-ctrl-c-while-loading", ["run", "--out", "{tmp}/out"], 130, r"interrupted; nothing written to .*out",
         patch=interrupt("nectar.train.recipes:load_or_train")),
    Case("run-model-seed-announces-training", ["run", "--model-seed", "7", "--out", "{tmp}/out"], 130,
         r"training the cpu-demo model with model seed 7: 1000 dense \+ 400 MoE steps, about 20-25\s+minutes(.|\n)*"
         r"interrupted; nothing written", patch=interrupt("nectar.train.recipes:train_demo_model")),
    Case("run-ctrl-c-half-written", ["run", *FAST_RUN, "--policies", "static-top2", "--out", "{tmp}/out"], 130,
         r"interrupted; nothing written to .*out", patch=interrupt_while_writing),
    Case("run-all-telemetry-nan", ["run", *FAST_RUN, "--policies", "static-top2", "--faults", "nan:0.99", "--out", "{tmp}/nan"],
         1, r"warning: policy static-top2: no usable energy reading", writes=("nan",), stdout=r"static-top2 +—",
         check=strict_nan_summary),
    Case("run-overwrite-replaces-old-run", ["run", *FAST_RUN, "--policies", "static-top2", "--out", "{tmp}/out", "--overwrite"],
         0, r"^$", write("out/stale.png", "old"), writes=("out",), check=replaced_old_run),
]

TRAIN_CASES = [
    Case("train-steps-dense-negative", ["train", "--steps-dense", "-1"], 2, r"--steps-dense: must be a positive integer"),
    Case("train-steps-moe-zero", ["train", "--steps-moe", "0"], 2, r"--steps-moe: must be a positive integer"),
    Case("train-top-k-too-large", ["train", "--top-k", "99"], 2, r"moe_top_k must be in \[1, 4\]"),
    Case("train-top-k-beyond-specs", ["train", "--top-k", "3", "--expert-specs", '[{"kind": "gelu", "count": 2}]'], 2,
         r"moe_top_k must be in \[1, 2\]"),
    Case("train-expert-specs-not-json", ["train", "--expert-specs", "{oops"], 2, r"--expert-specs is not valid JSON"),
    Case("train-expert-kind-unknown", ["train", "--expert-specs", '[{"kind": "weird"}]'], 2, r"unknown expert kind 'weird'"),
    Case("train-seq-len-beyond-preset", ["train", "--seq-len", "999"], 2, r"--seq-len 999 must lie in \[2, 256\]"),
    Case("train-vocab-too-small", ["train", "--vocab-size", "10"], 2, r"--vocab-size must be >= 257"),
    Case("train-no-cuda", ["train", "--device", "cuda"], 2, r"torch sees no CUDA GPU"),
    Case("train-batch-zero", ["train", "--batch", "0"], 2, r"--batch: must be a positive integer"),
    Case("train-negative-lr", ["train", "--lr", "-1"], 2, r"--lr: must be a positive number"),
    Case("train-unknown-recipe", ["train", "--recipe", "nope"], 2, r"invalid choice: 'nope'"),
    Case("train-threads-zero", ["train", "--threads", "0"], 2, r"--threads must be >= 1"),
    Case("train-out-is-a-file", ["train", "--out", "{tmp}/f"], 2, r"is a file, not a folder", write("f", "x")),
    Case("train-out-not-empty", ["train", "--out", "{tmp}/out"], 2, r"not empty", write("out/old.json", "{}")),
    Case("train-ctrl-c", ["train", "--out", "{tmp}/out", "--no-progress"], 130, r"interrupted; nothing written to",
         patch=interrupt("nectar.train.loop:prepare_data")),
]

HW_RUN_CASES = [
    Case("hw-run-unknown-workload", ["hw-run", "--backend", "sim", "--device", "cpu", "--workloads", "stationary,party"], 2,
         r"hw-run runs the workloads"),
    Case("hw-run-seq-len-beyond-model", ["hw-run", "--backend", "sim", "--device", "cpu", "--model", "{demo}",
                                         "--seq-len", "1024"], 2, r"--seq-len 1024 exceeds the model's 256 positions"),
    Case("hw-run-chunk-not-multiple", ["hw-run", "--backend", "sim", "--device", "cpu", "--model", "{demo}",
                                       "--chunk-tokens", "1000"], 2, r"--chunk-tokens 1000 is not a multiple of --seq-len 256"),
    Case("hw-run-no-cuda", ["hw-run", "--backend", "sim", "--model", "{demo}"], 2, r"torch sees no CUDA GPU"),
    Case("hw-run-model-missing", ["hw-run", "--backend", "sim", "--device", "cpu", "--model", "{tmp}/none"], 2, r"does not exist"),
    Case("hw-run-save-model-with-model", ["hw-run", "--backend", "sim", "--device", "cpu", "--model", "{demo}",
                                          "--save-model", "{tmp}/m"], 2, r"--save-model saves the model hw-run trains"),
    Case("hw-run-out-is-a-file", ["hw-run", "--backend", "sim", "--device", "cpu", "--model", "{demo}", "--out", "{tmp}/f"],
         2, r"is a file, not a folder", write("f", "x")),
    Case("hw-run-temp-cap-absurd", ["hw-run", "--backend", "sim", "--device", "cpu", "--model", "{demo}", "--out",
                                    "{tmp}/o", "--temp-cap", "500"], 2, r"--temp-cap must lie in"),
]

FAST_FRONTIER = ["--tokens", "1024", "--chunk-tokens", "1024", "--price-batch", "4", "--no-progress"]
FRONTIER_CASES = [
    Case("frontier-unknown-workload", ["frontier", "--workload", "tidal"], 2, r"invalid choice: 'tidal'"),
    Case("frontier-no-reference", ["frontier", "--policies", "static-top1,nectar"], 2, r"must include static-top2"),
    Case("frontier-no-static-policy", ["frontier", "--policies", "nectar"], 2, r"must include the reference"),
    Case("frontier-unknown-policy", ["frontier", "--policies", "static-top2,fixed-bias:x"], 2, r"is not a number"),
    Case("frontier-mix-out-of-range", ["frontier", "--policies", "static-top2,mix:1.5"], 2, r"mix takes a value in"),
    Case("frontier-clock-not-positive", ["frontier", "--policies", "static-top2,clock:0"], 2, r"clock must be a positive"),
    Case("frontier-clock-sweep-malformed", ["frontier", "--clock-sweep", "1300,fast"], 2, r"is not a number of MHz"),
    Case("frontier-clock-sweep-twice", ["frontier", "--clock-sweep", "1300,1300"], 2, r"lists a clock twice"),
    Case("frontier-clock-beyond-the-gpu", ["frontier", *FAST_FRONTIER, "--clock-sweep", "1300,2500", "--out", "{tmp}/o"],
         2, r"clock 2500 MHz is outside the simulated h100_sxm's \[345, 1980\] MHz"),
    Case("frontier-thermal-without-cap", ["frontier", "--workload", "thermal"], 2, r"needs --temp-cap"),
    Case("frontier-power-without-budget", ["frontier", "--workload", "power-schedule"], 2, r"needs --power-budget"),
    Case("frontier-heat-malformed", ["frontier", "--workload", "thermal", "--temp-cap", "60", "--heat", "hot"], 2,
         r"bad schedule"),
    Case("frontier-domain-shift-without-domains", ["frontier", "--workload", "domain-shift", *FAST_FRONTIER,
                                                   "--model", "{tmp}/model", "--out", "{tmp}/o"], 2,
         r"domain-shift needs a model saved with per-domain",
         model_copy(lambda m: (m / "heldout_domains.pt").unlink()), writes=("model",)),
    Case("frontier-tokens-not-multiple", ["frontier", "--tokens", "5000"], 2, r"--tokens 5000 is not a multiple"),
    Case("frontier-out-is-a-file", ["frontier", *FAST_FRONTIER, "--out", "{tmp}/file"], 2, r"is a file",
         write("file", "keep me"), writes=("file",)),
    Case("frontier-seq-len-beyond-model", ["frontier", "--seq-len", "512", "--chunk-tokens", "1024", "--tokens", "1024"],
         2, r"exceeds the model's 256 positions"),
]

RECONCILE_CASES = [
    Case("reconcile-missing", ["reconcile", "{tmp}/nope", "--no-progress"], 2, r"does not exist"),
    Case("reconcile-empty", ["reconcile", "{tmp}/empty", "--no-progress"], 2, r"holds no trace", lambda t: (t / "empty").mkdir()),
    Case("reconcile-not-a-trace", ["reconcile", "{tmp}/g", "--no-progress"], 2, r"not a NECTAR trace",
         lambda t: (t / "g").mkdir() or gzip.open(t / "g" / "trace.csv.gz", "wt").write("a,b\n1,2\n")),
    Case("reconcile-truncated-gzip", ["reconcile", "{tmp}/t", "--no-progress"], 2, r"cannot read trace",
         write("t/trace.csv.gz", b"\x1f\x8b\x08\x00garbage")),
    Case("reconcile-one-chunk", ["reconcile", "{tmp}/trace", "--no-progress"], 2, r"at least 2",
         synthetic_trace(mutate=lambda rows: rows[:2])),
    Case("reconcile-unknown-gpu", ["reconcile", "{tmp}/trace", "--no-progress"], 2, r"no shipped preset matches",
         synthetic_trace(gpu="Imaginary GPU 9000")),
    Case("reconcile-counter-backwards", ["reconcile", "{tmp}/trace", "--no-progress"], 2, r"energy counter runs backwards",
         synthetic_trace(mutate=counter_backwards)),
    Case("reconcile-train-fraction", ["reconcile", "{tmp}/trace", "--train-fraction", "1.5"], 2, r"strictly between 0 and 1",
         synthetic_trace()),
    Case("reconcile-save-exists", ["reconcile", "{tmp}/trace", "--save", "{tmp}/p.json", "--max-evaluations", "2"], 2,
         r"--save .*p.json exists; pass --overwrite", both(synthetic_trace(), write("p.json", "{}"))),
    Case("reconcile-save-missing-folder", ["reconcile", "{tmp}/trace", "--save", "{tmp}/no/p.json"], 2,
         r"the folder .* does not exist", synthetic_trace()),
    Case("reconcile-by-segment-single", ["reconcile", "{tmp}/trace", "--by-segment", "--no-progress"], 2,
         r"holds no segment folders", synthetic_trace()),
    Case("reconcile-calibrate-on-missing", ["reconcile", "{tmp}/gpu", "--calibrate-on", "long", "--no-progress"], 2,
         r"no segment 'long' to calibrate on", SEGMENTS),
    Case("reconcile-unknown-preset", ["reconcile", "{tmp}/trace", "--preset", "nosuch", "--no-progress"], 2,
         r"unknown GPU preset 'nosuch'", synthetic_trace()),
    Case("reconcile-ctrl-c", ["reconcile", "{tmp}/trace", "--save", "{tmp}/p.json", "--no-progress"], 130,
         r"nectar reconcile: interrupted", synthetic_trace(), interrupt("analysis.reconcile.score:reconcile")),
]

REPORT_CASES = [
    Case("report-missing", ["report", "{tmp}/nope"], 2, r"does not exist"),
    Case("report-no-summary", ["report", "{tmp}/run"], 2, r"no summary.json", run_dir(lambda r: (r / "summary.json").unlink())),
    Case("report-summary-not-json", ["report", "{tmp}/run"], 2, r"not valid JSON",
         run_dir(lambda r: (r / "summary.json").write_text("{oops"))),
    Case("report-policy-not-an-object", ["report", "{tmp}/run"], 2, r"policy 'nectar' must be an object",
         run_dir(edit_summary(lambda s: s["policies"].update(nectar="oops")))),
    Case("report-policy-non-numeric", ["report", "{tmp}/run"], 2, r"policy 'nectar' has non-numeric \['J_per_token'\]",
         run_dir(edit_summary(lambda s: s["policies"]["nectar"].update(J_per_token="cheap")))),
    Case("report-chunks-bad-expert-counts", ["report", "{tmp}/run"], 2, r"chunks.csv line 2",
         run_dir(edit_chunks(lambda lines: [lines[0], lines[1].replace("[[", "[[oops", 1), *lines[2:]]))),
    Case("report-chunks-missing-column", ["report", "{tmp}/run"], 2, r"lacks the column\(s\) \['policy'\]",
         run_dir(edit_chunks(lambda lines: [lines[0].replace("policy", "polizy", 1), *lines[1:]]))),
    Case("report-chunks-ragged", ["report", "{tmp}/run"], 2, r"line 3 has fewer cells",
         run_dir(edit_chunks(lambda lines: [lines[0], lines[1], "nectar,1", *lines[3:]]))),
    Case("report-trace-dir-missing", ["report", "{tmp}/run", "--trace-dir", "{tmp}/nowhere"], 2, r"does not exist", run_dir()),
    Case("report-ctrl-c-keeps-old-report", ["report", "{tmp}/run", "--no-reconcile"], 130,
         r"interrupted; nothing written to .*report_figures",
         run_dir(lambda r: (r / "report.md").write_text("old report")), interrupt("analysis.report.page:_section_cost")),
]

CONVEXITY_CASES = [
    Case("convexity-trace-missing", ["verify-convexity", "--trace", "{tmp}/missing.csv.gz"], 2, r"--trace .* does not exist"),
    Case("convexity-trace-garbage", ["verify-convexity", "--trace", "{tmp}/t.csv.gz"], 2, r"cannot be read",
         write("t.csv.gz", b"\x1f\x8b\x08\x00garbage")),
    Case("convexity-run-without-instance", ["verify-convexity", "--run", "{tmp}"], 2, r"convexity_instance.npz not found"),
    Case("convexity-run-truncated-instance", ["verify-convexity", "--run", "{tmp}/run"], 2, r"cannot be read",
         convexity_instance(truncated=True)),
    Case("convexity-export-exists", ["verify-convexity", "--export", "{tmp}/e.npz"], 2, r"exists; pass --overwrite",
         write("e.npz", "x")),
    Case("convexity-export-suffix", ["verify-convexity", "--export", "{tmp}/e.txt"], 2, r"must end in .npz"),
    Case("convexity-export-missing-folder", ["verify-convexity", "--export", "{tmp}/no/e.npz"], 2, r"does not exist"),
    Case("convexity-tokens-zero", ["verify-convexity", "--tokens", "0"], 2, r"--tokens: must be a positive integer"),
    Case("convexity-failed-check-is-1", ["verify-convexity", "--run", "{tmp}/run", "--no-energy", "--chunks", "1",
                                         "--goal", "1e-30", "--no-progress"], 1, r"^$", convexity_instance(),
         stdout=r"verdict: FAIL"),
]

CASES = RUN_CASES + TRAIN_CASES + HW_RUN_CASES + FRONTIER_CASES + RECONCILE_CASES + REPORT_CASES + CONVEXITY_CASES
BAD_INPUT_COUNT = sum(c.code != 0 for c in CASES)


# ---------------------------------------------------------------------------- the harness
def _snapshot(root: Path) -> dict[str, tuple]:
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else ("dir",)
            for p in sorted(root.rglob("*"))}


def _leftovers(root: Path) -> list[str]:
    return [str(p) for p in root.rglob("*") if ".partial-" in p.name or ".old-" in p.name]


def test_the_table_is_large_enough():
    assert BAD_INPUT_COUNT >= 40
    assert len({c.id for c in CASES}) == len(CASES)
    commands = {c.argv[0] for c in CASES}
    assert {"run", "train", "hw-run", "reconcile", "report", "verify-convexity"} <= commands


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)                      # default outputs (runs/...) would land here
    if case.setup is not None:
        case.setup(tmp_path)
    before, watched = _snapshot(tmp_path), [_snapshot(p) for p in WATCHED]
    if case.patch is not None:
        case.patch(monkeypatch)
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{demo}", str(DEMO)) for a in case.argv]
    handler = signal.getsignal(signal.SIGTERM)
    try:
        code = nectar_main(argv)
    except SystemExit as exc:                       # argparse's own usage errors
        code = exc.code
    finally:
        signal.signal(signal.SIGTERM, handler)
    out, err = capsys.readouterr()
    assert code == case.code, f"exit {code}, stderr:\n{err}"
    assert "Traceback" not in err and "Traceback" not in out
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) <= 1, err
    assert re.search(case.message, err), f"{case.message!r} not in stderr:\n{err}"
    if case.stdout is not None:
        assert re.search(case.stdout, out), out
    after = _snapshot(tmp_path)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    allowed = {k for k in changed if any(k == w or k.startswith(w + "/") for w in case.writes)}
    assert changed == allowed, f"changed outside {case.writes}: {sorted(changed - allowed)}"
    assert _leftovers(tmp_path) == []
    assert [_snapshot(p) for p in WATCHED] == watched
    if case.check is not None:
        case.check(tmp_path)
