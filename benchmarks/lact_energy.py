#!/usr/bin/env python3
"""Benchmark: tokens/s and J/token of trained MoE models' own static forward on held-out sequences (issue 28).

Each MODEL_DIR (written by `nectar train`) is placed where the backend measures it, the way `nectar
hw-run` does (bf16 weights on CUDA, fp32 on the CPU), and runs its own routing — the static top-k
routers it was saved with, nothing installed — over consecutive --seq-len-token sequences of its own
held-out stream (cycled when a window needs more), --chunk-rows sequences per
`nectar.experiment.forward.forward_chunk` call in micro-batches of --micro-batch rows. The telemetry
backend measures windows of back-to-back chunks: NVML on a GPU (`hw.backend.NvmlBackend`, read-only:
no GPU setting is changed) or the simulator (`--backend sim`: CPU smoke runs and tests). After one
unmeasured warm-up window per model (--warmup-s), --rounds rounds give every model one window of
--seconds / --rounds seconds each, the order rotating by round so that drift and heat hit every
model alike. Per model (name = its recipe, from nectar_model.json):

  tokens_per_s      tokens over the windows' seconds (the forward with its host reads, as measured)
  J_per_token       the windows' energy (`nectar.telemetry.energy.window_energy_J`) over their tokens
  mean_power_W      energy over seconds; peak_power_W, max_gpu_temp_C over the windows
  measured_ppl      perplexity of the measured sequences in this dtype (a check on the bf16 forward)
  windows           each window's tokens, seconds, energy_J, power, temperature, SM clock and flags

    PYTHONPATH=. python benchmarks/lact_energy.py runs/m1 runs/m2 --seconds 5 --json-out energy.json
    PYTHONPATH=. python benchmarks/lact_energy.py runs/m1 --backend sim --seconds 1   # no GPU needed

Bad input, or a backend that cannot run here (no GPU, no nvidia-ml-py), ends with one line
`lact_energy: error: …` and exit status 2; a model without a usable energy reading gives exit
status 1 (its J_per_token is null). The JSON is written atomically.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.timing import write_json  # noqa: E402
from nectar.experiment.forward import forward_chunk  # noqa: E402
from nectar.telemetry.energy import window_energy_J  # noqa: E402
from nectar.telemetry.workload import merge_workloads  # noqa: E402

DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class UsageError(ValueError):
    """Bad input or an unusable backend: reported as one line, exit status 2."""


@dataclass
class MeasureConfig:
    """How every model is measured."""

    seq_len: int = 1024
    chunk_rows: int = 256
    micro_batch: int = 64
    seconds: float = 5.0            # measured seconds per model, over all rounds
    rounds: int = 3
    warmup_s: float = 2.0

    @property
    def window_s(self) -> float:
        return self.seconds / self.rounds


@dataclass
class WindowRecord:
    """One measured window of back-to-back chunks of one model."""

    tokens: int
    duration_s: float
    energy_J: float
    mean_power_W: float
    peak_power_W: float
    gpu_temp_C: float
    sm_clock_MHz: float | None
    nll_sum: float
    nll_tokens: int
    flags: list[str]


@dataclass
class MeasuredModel:
    """A loaded model, its held-out chunks on the device, and its measured windows."""

    name: str
    model_dir: str
    model: Any
    chunks: list[torch.Tensor]      # [chunk_rows, seq_len] each, on the device
    windows: list[WindowRecord] = field(default_factory=list)
    taken: int = 0

    def next_chunk(self) -> torch.Tensor:
        chunk = self.chunks[self.taken % len(self.chunks)]
        self.taken += 1
        return chunk

    def summary(self) -> dict:
        tokens = sum(w.tokens for w in self.windows)
        seconds = sum(w.duration_s for w in self.windows)
        energy_J = sum(w.energy_J for w in self.windows)
        nll_tokens = sum(w.nll_tokens for w in self.windows)
        return {"name": self.name, "model_dir": self.model_dir, "tokens": tokens, "seconds": seconds,
                "energy_J": finite(energy_J), "tokens_per_s": tokens / seconds if seconds > 0 else None,
                "J_per_token": finite(energy_J / tokens) if tokens else None,
                "mean_power_W": finite(energy_J / seconds) if seconds > 0 else None,
                "peak_power_W": finite_max(w.peak_power_W for w in self.windows),
                "max_gpu_temp_C": finite_max(w.gpu_temp_C for w in self.windows),
                "measured_ppl": perplexity(sum(w.nll_sum for w in self.windows), nll_tokens),
                "windows": [{k: finite(v) if isinstance(v, float) else v for k, v in asdict(w).items()}
                            for w in self.windows]}


def finite(value: float | None) -> float | None:
    """value, or None when it is missing, NaN or infinite (strict JSON)."""
    return value if value is not None and math.isfinite(value) else None


def perplexity(nll_sum: float, tokens: int) -> float | None:
    """exp(mean NLL), None without tokens or when not finite."""
    return finite(math.exp(nll_sum / tokens)) if tokens else None


def finite_max(values) -> float | None:
    """The largest finite value, None when there is none."""
    kept = [v for v in values if finite(v) is not None]
    return max(kept) if kept else None


# ----- arguments --------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="lact_energy", description=__doc__.splitlines()[0])
    p.add_argument("model_dirs", type=Path, nargs="+", help="folders written by `nectar train`")
    p.add_argument("--backend", choices=("nvml", "sim"), default="nvml",
                   help="nvml: measure the GPU (read-only); sim: the simulator prices the forward (no GPU)")
    p.add_argument("--device", default=None, help="torch device (default: cuda for nvml, cpu for sim)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                   help="weights' dtype (default: bfloat16 on CUDA, float32 on the CPU, as nectar hw-run)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--chunk-rows", type=int, default=256, help="sequences per forward_chunk call (one host read)")
    p.add_argument("--micro-batch", type=int, default=64, help="sequences per forward inside a chunk")
    p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per model, over all rounds")
    p.add_argument("--rounds", type=int, default=3, help="interleaved windows per model")
    p.add_argument("--warmup-s", type=float, default=2.0, help="unmeasured warm-up window per model")
    p.add_argument("--json-out", type=Path, default=None)
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if args.backend == "nvml" else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    return args


def check_args(args: argparse.Namespace) -> MeasureConfig:
    """The measurement's settings, or UsageError naming the first bad one."""
    for name in ("seq_len", "chunk_rows", "micro_batch", "rounds"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not (math.isfinite(args.seconds) and args.seconds > 0 and math.isfinite(args.warmup_s) and args.warmup_s >= 0):
        raise UsageError(f"--seconds must be > 0 and --warmup-s >= 0, got {args.seconds} and {args.warmup_s}")
    if args.backend == "nvml" and not args.device.startswith("cuda"):
        raise UsageError(f"--backend nvml measures a GPU: use --device cuda (got {args.device}), or --backend sim")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: torch sees no CUDA GPU (use --backend sim --device cpu)")
    if args.json_out is not None and args.json_out.is_dir():
        raise UsageError(f"--json-out {args.json_out} is a folder; name a file")
    return MeasureConfig(args.seq_len, args.chunk_rows, args.micro_batch, args.seconds, args.rounds, args.warmup_s)


# ----- models -----------------------------------------------------------------------------------------
def heldout_chunks(ids: torch.Tensor, cfg: MeasureConfig, device: str) -> list[torch.Tensor]:
    """The held-out stream as consecutive [chunk_rows, seq_len] chunks on the device (the stream is
    cycled when it holds fewer than chunk_rows sequences; a partial last chunk is dropped)."""
    sequences = ids.numel() // cfg.seq_len
    if sequences == 0:
        raise UsageError(f"the held-out stream has {ids.numel()} tokens, fewer than --seq-len {cfg.seq_len}")
    windows = ids[: sequences * cfg.seq_len].view(sequences, cfg.seq_len)            # [S, T]
    if sequences < cfg.chunk_rows:
        windows = windows.repeat(math.ceil(cfg.chunk_rows / sequences), 1)
    usable = windows.shape[0] // cfg.chunk_rows * cfg.chunk_rows
    return list(windows[:usable].to(device).split(cfg.chunk_rows))


def load_model(model_dir: Path, cfg: MeasureConfig, device: str, dtype: torch.dtype) -> MeasuredModel:
    """A saved model on the device in `dtype`, with its held-out chunks; UsageError when it cannot be."""
    from nectar.train.saved_model import load_demo_model

    try:
        demo = load_demo_model(model_dir)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    positions = demo.model.config.n_positions
    if cfg.seq_len > positions:
        raise UsageError(f"--seq-len {cfg.seq_len} exceeds {model_dir}'s {positions} positions")
    name = (demo.info.get("recipe") or {}).get("preset") or model_dir.name
    model = demo.model.to(device, dtype).eval()
    return MeasuredModel(name, str(model_dir), model, heldout_chunks(demo.heldout_ids, cfg, device))


def make_backend(name: str):
    """The telemetry backend by name; UsageError (one line) when it cannot run here."""
    from nectar.plugins import make_backend as plugin_backend

    options = {"price_as": "none"} if name == "sim" else {}
    try:
        return plugin_backend(name, **options)
    except (RuntimeError, ImportError, ValueError) as exc:   # hw.NvmlUnavailable is a RuntimeError
        raise UsageError(f"the {name} backend cannot run here: {str(exc).splitlines()[0]}") from None


# ----- measurement ------------------------------------------------------------------------------------
def measure_window(backend, entry: MeasuredModel, cfg: MeasureConfig, seconds: float) -> WindowRecord:
    """One backend window of back-to-back chunks of `entry`, lasting at least `seconds` of host time."""
    done = {"tokens": 0, "nll_sum": 0.0, "nll_tokens": 0}

    def compute():
        workloads, start = [], time.perf_counter()
        while not workloads or time.perf_counter() - start < seconds:
            chunk = entry.next_chunk()
            obs = forward_chunk(entry.model, chunk, cfg.micro_batch, "own", max_sample_tokens=0)  # one host read
            workloads.append(obs.workload)
            done["tokens"] += chunk.numel()
            done["nll_sum"] += obs.nll_sum
            done["nll_tokens"] += obs.nll_tokens
        return merge_workloads(workloads, "own")

    window = backend.run_chunk(compute)
    return WindowRecord(tokens=done["tokens"], duration_s=window.duration_s,
                        energy_J=window_energy_J(window), mean_power_W=window.mean_power_W,
                        peak_power_W=window.peak_power_W, gpu_temp_C=window.gpu_temp_C,
                        sm_clock_MHz=window.sm_clock_MHz, nll_sum=done["nll_sum"], nll_tokens=done["nll_tokens"],
                        flags=list(window.flags))


def measure(models: list[MeasuredModel], backend, cfg: MeasureConfig,
            say: Callable[[str], None] = print) -> list[dict]:
    """Warm-up per model, then `cfg.rounds` rounds of one window per model (rotating order)."""
    with torch.no_grad():
        if cfg.warmup_s > 0:
            for entry in models:
                measure_window(backend, entry, cfg, cfg.warmup_s)
        for r in range(cfg.rounds):
            shift = r % len(models)
            for entry in models[shift:] + models[:shift]:
                entry.windows.append(measure_window(backend, entry, cfg, cfg.window_s))
            say(f"# round {r + 1}/{cfg.rounds} done")
    return [entry.summary() for entry in models]


# ----- main -------------------------------------------------------------------------------------------
def report(rows: list[dict], gpu: str, say: Callable[[str], None] = print) -> None:
    say(f"{'model':<26}{'tokens/s':>12}{'mJ/token':>10}{'W':>7}{'ppl':>9}  ({gpu})")
    for row in rows:
        joules = row["J_per_token"]
        energy = f"{joules * 1e3:10.4f}" if joules is not None else f"{'n/a':>10}"
        power = f"{row['mean_power_W']:7.0f}" if row["mean_power_W"] is not None else f"{'n/a':>7}"
        say(f"{row['name']:<26}{row['tokens_per_s']:12.0f}{energy}{power}{row['measured_ppl'] or math.nan:9.2f}")


def run(args: argparse.Namespace) -> int:
    cfg = check_args(args)
    dtype = DTYPES[args.dtype]
    models = [load_model(d, cfg, args.device, dtype) for d in args.model_dirs]
    names = [m.name for m in models]
    if len(set(names)) < len(names):
        raise UsageError(f"two models share a recipe name: {names}")
    backend = make_backend(args.backend)
    try:
        gpu = backend.gpu_name()
        rows = measure(models, backend, cfg)
    finally:
        backend.close()
    report(rows, gpu)
    write_json(args.json_out, {"gpu": gpu, "backend": args.backend, "device": args.device, "dtype": args.dtype,
                               "torch": torch.__version__, **asdict(cfg), "models": rows})
    if args.json_out:
        print(f"wrote {args.json_out}")
    missing = [row["name"] for row in rows if row["J_per_token"] is None]
    if missing:
        print(f"lact_energy: no usable energy reading for {', '.join(missing)}", file=sys.stderr)
    return 1 if missing else 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except UsageError as exc:
        print(f"lact_energy: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
