"""`nectar reconcile --decode-steps FILE.json`: the simulator's price of a serving decode step against
captured decode steps measured on a GPU, and the three captured-decode constants fitted to them.

FILE.json is what `benchmarks/decode_step.py` writes: per model (layers, hidden, experts,
expert_hidden, top_k, vocab, parameters, weight_bytes) rows of one (batch, policy) each, measured
over `steps` timed decode steps from about `context` cached positions: `graph_ms` (the whole
captured serving step: inputs staged, one CUDA graph replay, outputs, the expert counts read back),
`replay_ms` (the replay alone), `bytes_per_step` (`nectar.serving.frontier.step_bytes`),
`distinct_experts` and `slots` (means per MoE layer and step).

Each row is rebuilt as the `steps` ChunkWorkloads it timed (`rebuild_row`): B = batch one-token
rows (tokens = batch = B, seq_len = 1, phase "decode"); row r at position
p_r = context − 1 − (r mod 8) + 2 + s in timed step s (the benchmark's schedule: rows start up to 7
positions apart, 2 untimed warm-up steps), so kv_read_tokens = Σ p_r, attention_pairs = Σ (p_r + 1)
and logit_tokens = B; every layer's 64 experts are OLMoE SwiGLU experts of the model's width (the
router a D → E matmul), and the row's distinct experts and slots, totalled over its steps × layers
(means of integers: exact), are spread as evenly as they go over the (step, layer) samples, each
sample's slots over its distinct experts. The rebuilt steps reproduce the row's distinct experts
and slots per layer and its bytes per step (the bytes are checked and reported).

The simulator prices each rebuilt step (`sim.pricing.ChunkPricer`, at the max clock: a decode
step's power is far below the cap) and the row's simulated time is the mean over its steps;
measured is `graph_ms` (or `replay_ms`: `time_key`). Per model: the MAPE before (the preset with
the decode_* fields cleared: a decode step priced like any chunk, every kernel launched from the
host at `launch_overhead_s`, experts `launches_per_expert` each) and after the fit.

The fit (`fit_constants`, scipy least_squares on the relative errors, through the same pricer)
sets the preset's captured-decode fields (`sim.kernels`): `decode_bandwidth_efficiency` (every
kernel of the step reads at this fraction of HBM bandwidth), `decode_block_latency_s` (a fixed time
per block: its small kernels, routing-independent, as the grouped experts are one GEMM) and
`decode_row_latency_s` (per decode row per block). It is fitted on one model's rows
(`calibrate_on`; default the model with the most weight bytes, whose bytes identify the bandwidth)
and scored on every other model's (held out). An ablation without the row latency is reported too.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from nectar.telemetry.workload import ChunkWorkload, ExpertCost, LayerWorkload
from sim.presets import GPUPreset, load_preset
from sim.pricing import ChunkPricer

FORMAT = "nectar-sim-vs-gpu-decode/1"
OUT_NAME = "sim-vs-gpu-decode.json"
ROW_SPREAD = 8          # benchmarks/decode_step.py: row r starts (r mod 8) positions before the context
WARMUP_STEPS = 2        # benchmarks/decode_step.py: untimed steps before the timed ones
TIME_KEYS = ("graph_ms", "replay_ms")
FITTED = ("decode_bandwidth_efficiency", "decode_block_latency_s", "decode_row_latency_s")
START = (0.5, 1e-4, 1e-6)                        # the fit's starting point (independent of the preset)
LOWER, UPPER = (0.02, 0.0, 0.0), (1.0, 0.02, 1e-3)
SCALE = (0.1, 1e-4, 1e-6)


# ---------------------------------------------------------------------------- the measurement
@dataclass(frozen=True)
class DecodeModel:
    """One measured model's shape (what the benchmark's JSON says)."""

    name: str
    layers: int
    hidden: int
    experts: int
    expert_hidden: int
    top_k: int
    vocab: int
    dtype_bytes: int
    heads: int              # does not enter the price (attention is priced by its width)
    rows: tuple[dict, ...]  # the batch rows, then the per-policy rows

    @staticmethod
    def from_dict(d: dict) -> "DecodeModel":
        try:
            dims = {k: int(d[k]) for k in ("layers", "hidden", "experts", "expert_hidden", "top_k", "vocab")}
            name = str(d["name"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"a model in the decode-step JSON lacks or mistypes {exc}") from exc
        params, weight_bytes = d.get("parameters"), d.get("weight_bytes")
        dtype_bytes = int(round(weight_bytes / params)) if params and weight_bytes else 2
        rows = tuple(d.get("rows", [])) + tuple(d.get("policies", []))
        if min(dims.values()) < 1 or not rows:
            raise ValueError(f"model {name!r}: dimensions must be >= 1 and it needs rows, got {dims}, {len(rows)} rows")
        return DecodeModel(name=name, dtype_bytes=dtype_bytes, heads=int(d.get("heads") or max(1, dims["hidden"] // 64)),
                           rows=rows, **dims)


@dataclass(frozen=True)
class Measurement:
    source: str
    gpu: str
    context: int
    steps: int
    models: tuple[DecodeModel, ...]


def load_measurement(path: str | Path) -> Measurement:
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"decode-step file {str(path)!r} does not exist")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict) or not data.get("models"):
        raise ValueError(f"{path}: no 'models' (a benchmarks/decode_step.py JSON has them)")
    context, steps = int(data.get("context", 0)), int(data.get("steps", 0))
    if context < ROW_SPREAD or steps < 1:
        raise ValueError(f"{path}: needs context >= {ROW_SPREAD} and steps >= 1, got {context}, {steps}")
    gpu = str((data.get("environment") or {}).get("device", ""))
    return Measurement(str(path), gpu, context, steps, tuple(DecodeModel.from_dict(m) for m in data["models"]))


# ---------------------------------------------------------------------------- row → workloads
def swiglu_cost(d_model: int, hidden: int, dtype_bytes: int) -> ExpertCost:
    """An OLMoE expert per token (as `nectar.hf.describe.swiglu_cost`): 6·D·H FLOPs, its unfused
    activations, 3·D·H weights."""
    return ExpertCost(flops=6.0 * d_model * hidden, bytes=float((2 * d_model + 6 * hidden) * dtype_bytes),
                      weight_bytes=float(3 * d_model * hidden * dtype_bytes), kind="ffn")


def _spread(total: int, parts: int) -> list[int]:
    """`total` over `parts` as evenly as it goes (the first ones one more)."""
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]


def _total(mean: float, samples: int, what: str, row: dict) -> int:
    total = mean * samples
    if not (math.isfinite(total) and total >= 0):
        raise ValueError(f"row {row.get('batch')}/{row.get('policy')}: {what} must be a number >= 0, got {mean!r}")
    return int(round(total))


def positions(batch: int, context: int, step: int) -> list[int]:
    """Each row's position in timed step `step` (benchmarks/decode_step.py's schedule)."""
    return [context - 1 - (r % ROW_SPREAD) + WARMUP_STEPS + step for r in range(batch)]


def rebuild_row(model: DecodeModel, row: dict, context: int, steps: int) -> list[ChunkWorkload]:
    """The `steps` decode-step workloads a measured row timed (see the module docstring)."""
    batch, L, E = int(row["batch"]), model.layers, model.experts
    samples = steps * L
    distinct = _spread(_total(float(row["distinct_experts"]), samples, "distinct_experts", row), samples)
    slots = _spread(_total(float(row["slots"]), samples, "slots", row), samples)
    if max(distinct) > E or any(n < k for n, k in zip(slots, distinct)) or batch < 1:
        raise ValueError(f"model {model.name!r}, row {batch}/{row.get('policy')}: distinct experts "
                         f"{row['distinct_experts']} and slots {row['slots']} per layer cannot be rebuilt "
                         f"(at most {E} experts, at least one slot each)")
    cost = swiglu_cost(model.hidden, model.expert_hidden, model.dtype_bytes)
    out = []
    for s in range(steps):
        layers = []
        for l in range(L):
            k, n = distinct[s * L + l], slots[s * L + l]
            counts = (_spread(n, k) if k else []) + [0] * (E - k)
            layers.append(LayerWorkload(counts, [cost] * E, router_flops_per_token=2.0 * model.hidden * E))
        pos = positions(batch, context, s)
        out.append(ChunkWorkload(tokens=batch, batch=batch, seq_len=1, d_model=model.hidden, n_layers=L,
                                 n_heads=model.heads, vocab_size=model.vocab, layers=layers,
                                 dtype_bytes=model.dtype_bytes, policy=str(row.get("policy", "")),
                                 attention_pairs=float(sum(pos) + batch), kv_read_tokens=sum(pos),
                                 logit_tokens=batch, phase="decode"))
    return out


def routing_means(workloads: Sequence[ChunkWorkload]) -> tuple[float, float]:
    """(distinct experts, slots) per layer and step, means over the workloads."""
    layers = [layer.tokens_per_expert for w in workloads for layer in w.layers]
    return (float(np.mean([sum(n > 0 for n in t) for t in layers])), float(np.mean([sum(t) for t in layers])))


# ---------------------------------------------------------------------------- pricing
def uncaptured(preset: GPUPreset) -> GPUPreset:
    """The preset without the captured-decode fields: a decode step priced like any chunk."""
    return preset.replace(**{name: None for name in FITTED})


def with_constants(preset: GPUPreset, values: Sequence[float]) -> GPUPreset:
    return preset.replace(**{name: float(v) for name, v in zip(FITTED, values)})


def step_ms(preset: GPUPreset, workloads: Sequence[ChunkWorkload]) -> float:
    """Simulated ms per step at the max clock, mean over the steps."""
    pricer = ChunkPricer(preset)
    return 1e3 * float(np.mean([pricer.price(w).durations_s(1.0).sum() for w in workloads]))


@dataclass
class RowCase:
    """One measured row with its rebuilt steps."""

    model: str
    row: dict
    workloads: list[ChunkWorkload]

    def measured_ms(self, time_key: str) -> float:
        value = self.row.get(time_key)
        if value is None or not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
            raise ValueError(f"model {self.model!r}, row {self.row.get('batch')}/{self.row.get('policy')}: "
                             f"{time_key} must be a number > 0, got {value!r}")
        return float(value)


def row_cases(measurement: Measurement) -> list[RowCase]:
    return [RowCase(m.name, row, rebuild_row(m, row, measurement.context, measurement.steps))
            for m in measurement.models for row in m.rows]


def _relative_errors(preset: GPUPreset, cases: Sequence[RowCase], time_key: str) -> np.ndarray:
    return np.array([step_ms(preset, c.workloads) / c.measured_ms(time_key) - 1 for c in cases])


def fit_constants(base: GPUPreset, cases: Sequence[RowCase], time_key: str = "graph_ms",
                  row_latency: bool = True) -> tuple[float, float, float]:
    """(decode_bandwidth_efficiency, decode_block_latency_s, decode_row_latency_s) minimising the
    squared relative error of the simulated step time over `cases` (row latency 0 if not fitted)."""
    from scipy.optimize import least_squares

    n = 3 if row_latency else 2

    def residuals(x: np.ndarray) -> np.ndarray:
        return _relative_errors(with_constants(base, [*x, 0.0][:3]), cases, time_key)

    result = least_squares(residuals, np.array(START[:n]), bounds=(LOWER[:n], UPPER[:n]), x_scale=np.array(SCALE[:n]),
                           xtol=1e-12, ftol=1e-12, gtol=1e-12, max_nfev=200)
    values = [*result.x.tolist(), 0.0][:3]
    return values[0], values[1], values[2]


# ---------------------------------------------------------------------------- the report
def mape(errors: Sequence[float]) -> float:
    return float(np.mean(np.abs(errors))) if len(errors) else math.nan


def default_model(measurement: Measurement) -> str:
    """The model with the most weight bytes (its bytes identify the bandwidth)."""
    return max(measurement.models, key=lambda m: m.layers * m.experts * m.hidden * m.expert_hidden).name


def reconcile_decode_steps(path: str | Path, preset: str | Path | GPUPreset = "h100_sxm",
                           calibrate_on: str | None = None, time_key: str = "graph_ms") -> dict:
    """The report (see the module docstring): every row measured vs simulated, before and after the
    fit on `calibrate_on`, per-model MAPE, the fitted constants and the fitted preset's fields."""
    if time_key not in TIME_KEYS:
        raise ValueError(f"time_key must be one of {TIME_KEYS}, got {time_key!r}")
    from nectar.serving.frontier import step_bytes

    measurement = load_measurement(path)
    shipped = load_preset(preset)
    names = [m.name for m in measurement.models]
    calibrate_on = calibrate_on or default_model(measurement)
    if calibrate_on not in names:
        raise ValueError(f"--calibrate-on {calibrate_on!r} is not a model of {measurement.source}: {names}")
    cases = row_cases(measurement)
    fit_cases = [c for c in cases if c.model == calibrate_on]
    before = uncaptured(shipped)
    fitted = fit_constants(before, fit_cases, time_key)
    ablation = fit_constants(before, fit_cases, time_key, row_latency=False)
    after, after_2 = with_constants(before, fitted), with_constants(before, ablation)
    models = []
    for m in measurement.models:
        mine = [c for c in cases if c.model == m.name]
        rows = [_row_report(c, before, after, shipped, time_key, step_bytes) for c in mine]
        other_key = [k for k in TIME_KEYS if k != time_key][0]
        other = [c for c in mine if c.row.get(other_key)]
        models.append({
            "name": m.name, "role": "fit" if m.name == calibrate_on else "held out",
            "layers": m.layers, "hidden": m.hidden, "experts": m.experts, "expert_hidden": m.expert_hidden,
            "top_k": m.top_k, "vocab": m.vocab,
            "mape_before": mape([r["error_before"] for r in rows]),
            "mape_after": mape([r["error_after"] for r in rows]),
            "mape_shipped": mape([r["error_shipped"] for r in rows]),
            "mape_after_without_row_latency": mape(_relative_errors(after_2, mine, time_key)),
            f"mape_after_vs_{other_key}": mape(_relative_errors(after, other, other_key)) if other else None,
            "max_bytes_rebuild_error": max(abs(r["bytes_rebuilt"] / r["bytes_per_step"] - 1) for r in rows),
            "rows": rows})
    held = [m for m in models if m["role"] == "held out"]
    held_before = mape([r["error_before"] for m in held for r in m["rows"]])
    held_after = mape([r["error_after"] for m in held for r in m["rows"]])
    return {
        "format": FORMAT, "source": measurement.source, "gpu": measurement.gpu, "preset": shipped.name,
        "measured": time_key, "context": measurement.context, "steps": measurement.steps,
        "calibrate_on": calibrate_on, "held_out": [m["name"] for m in held],
        "constants": dict(zip(FITTED, fitted)),
        "constants_without_row_latency": dict(zip(FITTED, ablation)),
        "held_out_mape_before": held_before, "held_out_mape_after": held_after,
        "improves_held_out": bool(held) and held_after < held_before,
        "models": models,
    }


def _row_report(case: RowCase, before: GPUPreset, after: GPUPreset, shipped: GPUPreset, time_key: str,
                step_bytes) -> dict:
    measured = case.measured_ms(time_key)
    sim_before, sim_after, sim_shipped = (step_ms(p, case.workloads) for p in (before, after, shipped))
    distinct, slots = routing_means(case.workloads)
    r = case.row
    return {"batch": int(r["batch"]), "policy": str(r.get("policy", "")), "measured_ms": measured,
            "graph_ms": r.get("graph_ms"), "replay_ms": r.get("replay_ms"),
            "sim_before_ms": sim_before, "sim_after_ms": sim_after, "sim_shipped_ms": sim_shipped,
            "error_before": sim_before / measured - 1, "error_after": sim_after / measured - 1,
            "error_shipped": sim_shipped / measured - 1,
            "bytes_per_step": float(r["bytes_per_step"]),
            "bytes_rebuilt": float(np.mean([step_bytes(w) for w in case.workloads])),
            "distinct_experts": float(r["distinct_experts"]), "distinct_rebuilt": distinct,
            "slots": float(r["slots"]), "slots_rebuilt": slots}


def fitted_preset(report: dict, base: GPUPreset, name: str) -> GPUPreset:
    """`base` with the report's fitted constants and where they come from in its `source`."""
    c = report["constants"]
    held = ", ".join(f"{m['name']} {100 * m['mape_before']:.0f} % -> {100 * m['mape_after']:.1f} %"
                     for m in report["models"] if m["role"] == "held out")
    note = (f" Captured decode step (decode_bandwidth_efficiency {c['decode_bandwidth_efficiency']:.4g}, "
            f"decode_block_latency_s {c['decode_block_latency_s']:.4g}, decode_row_latency_s "
            f"{c['decode_row_latency_s']:.4g}): fitted by analysis/reconcile/decode_steps.py to the {report['measured']} "
            f"of the {report['calibrate_on']} rows of {report['source']} ({report['gpu']}), held out: {held} MAPE.")
    source = base.source.split(" Captured decode step (")[0]
    return with_constants(base, [c[k] for k in FITTED]).replace(name=name, source=source + note)


def table_text(report: dict) -> str:
    lines = [f"{report['gpu']}: simulated vs measured decode step ({report['measured']}), preset {report['preset']}; "
             f"fitted on {report['calibrate_on']}, held out: {', '.join(report['held_out']) or 'none'}",
             "constants: " + ", ".join(f"{k} {v:.4g}" for k, v in report["constants"].items()),
             f"{'model':<13}{'batch':>6} {'policy':<15}{'measured':>9}{'before':>10}{'after':>9}{'err before':>12}"
             f"{'err after':>11}"]
    for m in report["models"]:
        for r in m["rows"]:
            lines.append(f"{m['name']:<13}{r['batch']:>6} {r['policy']:<15}{r['measured_ms']:>9.3f}"
                         f"{r['sim_before_ms']:>10.2f}{r['sim_after_ms']:>9.3f}{100 * r['error_before']:>11.0f}%"
                         f"{100 * r['error_after']:>10.1f}%")
    for m in report["models"]:
        lines.append(f"{m['name']} ({m['role']}): MAPE {100 * m['mape_before']:.0f} % before, "
                     f"{100 * m['mape_after']:.1f} % after ({100 * m['mape_after_without_row_latency']:.1f} % "
                     f"without the row latency); bytes rebuilt within {100 * m['max_bytes_rebuild_error']:.2g} %")
    return "\n".join(lines)


def write_plot(report: dict, path: Path) -> Path:
    """Left: simulated vs measured ms per row, before and after the fit (log-log). Right: each
    row's error after the fit, per model (held out marked)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nectar.experiment.outputs import atomic_write

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.8))
    values = [v for m in report["models"] for r in m["rows"] for v in (r["measured_ms"], r["sim_before_ms"], r["sim_after_ms"])]
    lo, hi = min(values) / 1.5, max(values) * 1.5
    ax.plot([lo, hi], [lo, hi], color="0.4", lw=0.8, label="simulated = measured")
    offset = 0
    for i, m in enumerate(report["models"]):
        colour = f"C{i}"
        measured = [r["measured_ms"] for r in m["rows"]]
        ax.scatter(measured, [r["sim_before_ms"] for r in m["rows"]], marker="x", color=colour, s=18,
                   label=f"{m['name']} before ({100 * m['mape_before']:.0f} %)")
        ax.scatter(measured, [r["sim_after_ms"] for r in m["rows"]], marker="o", color=colour, s=18,
                   label=f"{m['name']} after, {m['role']} ({100 * m['mape_after']:.1f} %)")
        xs = range(offset, offset + len(m["rows"]))
        bx.bar(xs, [100 * r["error_after"] for r in m["rows"]], color=colour, hatch="" if m["role"] == "fit" else "//",
               label=f"{m['name']} ({m['role']})")
        offset += len(m["rows"]) + 1
    labels = [f"{r['policy'].replace('static-', '')} B{r['batch']}" for m in report["models"] for r in m["rows"]]
    bx.set_xticks(_positions(report), labels, rotation=90, fontsize=6)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(lo, hi)
    ax.set_xlabel(f"measured ms per decode step ({report['measured']})")
    ax.set_ylabel("simulated ms per decode step")
    ax.set_title(f"{report['gpu']}: captured decode steps vs the simulator", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    bx.axhline(0, color="0.4", lw=0.8)
    bx.set_ylabel("simulated / measured − 1 after the fit (%)")
    bx.set_title(f"fitted on {report['calibrate_on']}", fontsize=9)
    bx.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))
    plt.close(fig)
    return path


def _positions(report: dict) -> list[int]:
    out, offset = [], 0
    for m in report["models"]:
        out += list(range(offset, offset + len(m["rows"])))
        offset += len(m["rows"]) + 1
    return out


def default_out(path: str | Path) -> Path:
    """Beside the decode-step JSON."""
    return Path(path).absolute().parent / OUT_NAME


def synthetic_measurement(preset: GPUPreset, models: Sequence[dict], context: int = 24, steps: int = 3,
                          batches: Sequence[int] = (1, 4, 16), ks: Sequence[int] = (1, 2)) -> dict:
    """A decode-step JSON whose times are the simulator's own under `preset` (tests: a fit must
    recover the preset's constants). Each model dict has the DecodeModel dimensions and a name;
    routing: every token's top-k on distinct experts, spread round-robin (distinct = min(E, B·k))."""
    from nectar.serving.frontier import step_bytes

    out = []
    for spec in models:
        model = DecodeModel.from_dict({**spec, "rows": [{}]})
        rows = []
        for batch in batches:
            for k in (model.top_k, *ks):
                row = {"batch": batch, "policy": f"static-top{k}", "distinct_experts": float(min(model.experts, batch * k)),
                       "slots": float(batch * k), "bytes_per_step": 0.0}
                workloads = rebuild_row(model, row, context, steps)
                row["bytes_per_step"] = float(np.mean([step_bytes(w) for w in workloads]))
                row["graph_ms"] = row["replay_ms"] = step_ms(preset, workloads)
                rows.append(row)
        out.append({**spec, "rows": rows, "policies": []})
    return {"environment": {"device": preset.gpu_name}, "context": context, "steps": steps,
            "weights": "synthetic (the simulator's own times)", "models": out}
