"""`nectar report`: a run directory built here (chunks from the simulator, the lead's ChunkRecord
columns) becomes report.md with working figure links, correct tables and, for measured traces,
the same reconciliation numbers as analysis.reconcile.score."""

from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest

from analysis.reconcile.calibrate import CalibrationConfig
from analysis.reconcile.score import load_trace_dir, reconcile
from analysis.report.page import affine_cost_fit, expert_shares, main as report_main, pareto_front, read_chunks
from analysis.reconcile.synthetic_trace import Schedule, perturbed_preset, synthetic_measured_rows, write_synthetic_trace
from nectar.experiment.runner import ChunkRecord
from nectar.telemetry.trace import TraceRow, write_meta, write_trace
from sim.backend import SimBackend
from sim.presets import load_preset
from sim.synthetic_workload import distilgpt2_moe_workload
from tests.tolerance import approx, tol

POLICIES = {"static-top2": 2, "static-top1": 1, "nectar": 1}
TINY = Schedule(chunks=16, burst_every=6, burst_len=3)


def _chunk_rows(seed: int = 0) -> tuple[list[dict], list[TraceRow]]:
    rows, trace = [], []
    rng = np.random.default_rng(seed)
    for policy, k in POLICIES.items():
        backend = SimBackend("h100_sxm", seed=seed)
        for i in range(8):
            share = rng.dirichlet(np.full(8, 4.0))                             # [E] uneven loads
            counts = [list(rng.multinomial(256 * 1024 * k, share)) for _ in range(6)]
            workload = distilgpt2_moe_workload(k, batch=256, counts=[[int(c) for c in layer] for layer in counts])
            w = backend.run_chunk(lambda: workload)
            trace.append(TraceRow(w, workload, kind="chunk", policy=policy, chunk_index=i))
            rec = ChunkRecord(policy=policy, chunk=i, t_start_s=w.t_start_s, t_end_s=w.t_end_s, tokens=4096,
                              energy_J=w.energy_J, mean_power_W=w.mean_power_W, peak_power_W=w.peak_power_W,
                              temp_C=w.gpu_temp_C, sm_clock_MHz=w.sm_clock_MHz, nll_sum=4096 * 3.0, nll_tokens=4080,
                              routing_agreement=1.0 if policy == "static-top2" else 0.8,
                              cost_residual=0.1 / (i + 1) if policy == "nectar" else None,
                              expert_counts=workload.expert_counts(), flags=list(w.flags))
            rows.append(asdict(rec))
            backend.idle(0.3)
    return rows, trace


def _summary(backend: str) -> dict:
    policies = {
        "static-top2": {"tokens": 32768, "energy_J": 30.0, "J_per_token": 30.0 / 32768, "perplexity": 20.0,
                        "routing_agreement": 1.0, "max_temp_C": 45.0, "mean_power_W": 500.0, "fallback_chunks": 0},
        "static-top1": {"tokens": 32768, "energy_J": 24.0, "J_per_token": 24.0 / 32768, "perplexity": 21.0,
                        "routing_agreement": 0.7, "max_temp_C": 43.0, "mean_power_W": 480.0, "fallback_chunks": 0},
        "nectar": {"tokens": 32768, "energy_J": 26.0, "J_per_token": 26.0 / 32768, "perplexity": 20.2,
                   "routing_agreement": 0.9, "max_temp_C": 44.0, "mean_power_W": 490.0, "fallback_chunks": 1},
        "worse": {"tokens": 32768, "energy_J": 31.0, "J_per_token": 31.0 / 32768, "perplexity": 20.5,
                  "routing_agreement": 0.9, "max_temp_C": 46.0, "mean_power_W": 510.0, "fallback_chunks": 0},
    }
    return {"backend": backend, "seed": 0, "gpu": "NVIDIA H100 80GB HBM3", "chunk_tokens": 4096, "lambda": 0.5,
            "policies": policies}


def make_run_dir(path: Path, backend: str = "sim", trace_rows: list[TraceRow] | None = None) -> Path:
    """A run directory in the layout `nectar run` writes (summary.json, chunks.csv, trace, meta)."""
    path.mkdir(parents=True, exist_ok=True)
    rows, trace = _chunk_rows()
    (path / "summary.json").write_text(json.dumps(_summary(backend), indent=2))
    with open(path / "chunks.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, list) else v for k, v in row.items()})
    write_trace(path / "trace.csv.gz", trace_rows if trace_rows is not None else trace)
    write_meta(path, backend=backend, gpu_name="NVIDIA H100 80GB HBM3", command="nectar run --out test")
    return path


def _links_exist(run_dir: Path, text: str) -> list[str]:
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links, "the report shows no figures"
    for link in links:
        assert (run_dir / link).is_file() and (run_dir / link).stat().st_size > 1000, link
    return links


def test_simulated_run_report(tmp_path, capsys):
    run_dir = make_run_dir(tmp_path / "run")
    assert report_main([str(run_dir), "--no-progress"]) == 0
    assert "report.md" in capsys.readouterr().out
    text = (run_dir / "report.md").read_text()
    links = _links_exist(run_dir, text)
    assert {Path(link).name for link in links} == {"pareto.png", "temperature.png", "expert_loads.png", "cost_model.png"}
    summary = _summary("sim")["policies"]
    for name, p in summary.items():      # every policy row with its own mJ/token and the change vs static-top2
        rel = 100 * (p["J_per_token"] / summary["static-top2"]["J_per_token"] - 1)
        assert f"| {name} | 32768 | {p['energy_J']:.1f} | {1e3 * p['J_per_token']:.4f} | {rel:+.2f}% |" in text
    assert "**static-top2**, **static-top1**, **nectar**." in text   # "worse" is dominated by static-top2
    assert "no measurement to compare" in text


def test_measured_run_reconciles_its_own_trace(tmp_path):
    base = load_preset("h100_sxm_datasheet")   # a fixed base: the shipped h100_sxm is refitted to new traces
    measured = synthetic_measured_rows(perturbed_preset(base), TINY, seed=2)
    run_dir = make_run_dir(tmp_path / "hw", backend="nvml", trace_rows=measured)
    assert report_main([str(run_dir), "--no-progress", "--max-evaluations", "20", "--preset", "h100_sxm_datasheet"]) == 0
    text = (run_dir / "report.md").read_text()
    links = _links_exist(run_dir, text)
    assert {"reconcile_energy.png", "reconcile_temperature.png"} <= {Path(link).name for link in links}
    direct = reconcile(load_trace_dir(run_dir), base, CalibrationConfig(max_evaluations=20))
    h = direct.heldout
    assert (f"| held-out, calibrated | {h.chunks} | {100 * h.energy_mape:.2f}% | {100 * h.total_energy_error:+.2f}% "
            f"| {h.temp_rmse_C:.2f} |") in text
    assert f"| gemm_efficiency | 0.275 | {direct.calibration.preset.gemm_efficiency:.5g}" in text


def test_trace_dir_option_adds_reconciliation_to_a_simulated_run(tmp_path):
    run_dir = make_run_dir(tmp_path / "run")
    trace_dir = write_synthetic_trace(tmp_path / "trace", perturbed_preset(load_preset("h100_sxm")), TINY, seed=4)
    assert report_main([str(run_dir), "--trace-dir", str(trace_dir), "--no-progress", "--max-evaluations", "5"]) == 0
    text = (run_dir / "report.md").read_text()
    assert "held-out, base preset" in text and str(trace_dir) in text


def test_report_errors(tmp_path, capsys):
    assert report_main([str(tmp_path / "missing")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert report_main([str(tmp_path)]) == 2
    assert "no summary.json" in capsys.readouterr().err
    (tmp_path / "summary.json").write_text("{not json")
    assert report_main([str(tmp_path)]) == 2
    assert "not valid JSON" in capsys.readouterr().err
    run_dir = make_run_dir(tmp_path / "run")
    assert report_main([str(run_dir), "--trace-dir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_pareto_front_by_dominance():
    points = {"a": (1.0, 3.0), "b": (2.0, 2.0), "c": (3.0, 1.0), "d": (2.5, 2.5), "e": (2.0, 3.5), "twin": (3.0, 1.0)}
    assert pareto_front(points) == ["a", "b", "c", "twin"]
    brute = [n for n, p in points.items()
             if not any(q[0] <= p[0] and q[1] <= p[1] and (q[0] < p[0] or q[1] < p[1]) for q in points.values())]
    assert pareto_front(points) == brute


def test_affine_cost_fit_recovers_known_costs():
    rng = np.random.default_rng(0)
    idle_W, per_token = 85.0, np.array([2e-5, 3e-5, 1e-5, 4e-5])           # [E]
    rows = []
    for i in range(20):
        counts = rng.integers(500, 5000, size=(3, 4))                         # [L, E]
        duration = float(rng.uniform(0.05, 0.5))
        energy = idle_W * duration + float(counts.sum(axis=0) @ per_token)
        rows.append({"policy": "p", "chunk": i, "t_start_s": 10.0 * i, "t_end_s": 10.0 * i + duration,
                     "energy_J": energy, "expert_counts": counts.tolist()})
    fit = affine_cost_fit(rows)
    # Exact data up to rounding: each duration is t_end − t_start, one rounding at the clock's size
    # (up to 190 s for durations down to 0.05 s: a relative error of t_end/duration roundings), and
    # NNLS sums over the 20 chunks and 5 unknowns; the least-squares solution amplifies relative
    # data errors by the (column-scaled) design's condition number, the safety
    # (normwise, in the fit's column-scaled unknowns: each coefficient's scale is the largest scaled
    # unknown over its column's scale)
    durations = np.array([r["t_end_s"] - r["t_start_s"] for r in rows])
    design = np.column_stack([durations, [np.sum(r["expert_counts"], axis=0) for r in rows]])
    columns = design.max(axis=0)
    kappa = float(np.linalg.cond(design / columns))
    n = int(max(r["t_end_s"] for r in rows) / durations.min()) + 20 * 5
    scales = np.abs(np.r_[idle_W, per_token] * columns).max() / columns
    assert fit.idle_W == approx(idle_W, n=n, safety=kappa, scale=scales[0])
    for got, want, scale in zip(fit.joule_per_token, per_token, scales[1:]):
        assert got == approx(want, n=n, safety=kappa, scale=scale)
    assert fit.r2 == approx(1.0, n=n, safety=kappa)                 # 1 − (residual / spread)²
    assert fit.mape <= tol(float, n=n, safety=kappa)               # the residuals, relative
    assert affine_cost_fit(rows[:4]) is None                                   # fewer chunks than unknowns


def test_expert_shares_and_chunks_roundtrip(tmp_path):
    run_dir = make_run_dir(tmp_path / "run")
    rows = read_chunks(run_dir / "chunks.csv")
    assert isinstance(rows[0]["expert_counts"], list) and rows[0]["cost_residual"] is None
    assert rows[0]["fallback"] is False and isinstance(rows[0]["energy_J"], float)
    shares = expert_shares(rows)
    for policy, share in shares.items():
        total = np.sum([r["expert_counts"] for r in rows if r["policy"] == policy], axis=0)  # [L, E]
        experts = total.shape[1]
        assert share == approx(total / total.sum(axis=1, keepdims=True), n=experts + 1)  # Σ over experts, ÷
        assert share.sum(axis=1) == approx(np.ones(share.shape[0]), n=2 * experts + 1)
