"""The serving loop on the simulator: the teacher-forced NLL it accumulates equals a plain uncached
forward of every request, every request gets all its tokens, and `nectar serve` writes the report."""

import json
import math

import pytest
import torch

from nectar.cli.serve import main as serve_main
from nectar.experiment.forward import install
from nectar.plugins import make_backend
from nectar.serving.frontier import ServingConfig, routers_for, serve_policy, serving_report
from nectar.serving.loop import ServeLimits, request_tokens
from nectar.serving.scheduler import Scheduler
from nectar.serving.traces import LengthDist, TraceConfig, make_trace
from sim.presets import load_preset
from tests.tolerance import approx

TRACE = TraceConfig("bursty", n_requests=8, rate_rps=200.0, seed=3, prompt=LengthDist(12, 0.5, 4, 30),
                    output=LengthDist(6, 0.5, 2, 12))
LIMITS = ServeLimits(batch_max=3, prefill_chunk_tokens=8, max_context_tokens=64)


def _uncached_nll(model, stream, policy: str) -> float:
    """Σ over requests of the NLL of the reference continuation, one plain forward per request."""
    install(model, routers_for(model, policy))
    sched = Scheduler(LIMITS.batch_max, LIMITS.prefill_chunk_tokens, LIMITS.max_context_tokens)
    sched.add(make_trace(TRACE))
    total = 0.0
    for rid, req in request_tokens(stream, sched.requests(), seed=0).items():
        ids = torch.tensor(req.prompt + req.reference)
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0].float(), -1)
        p = len(req.prompt)
        total += float(-logp[p - 1: p - 1 + len(req.reference)].gather(-1, ids[p:, None]).sum())
    return total


def test_served_nll_equals_the_uncached_forward_under_static_routing(model, stream):
    cfg = ServingConfig(TRACE, LIMITS, policies=("static-top2",))
    run = serve_policy(model, make_backend("sim", seed=0, price_as="none"), "static-top2", cfg, stream)
    assert run.nll_tokens == sum(r.output_tokens for r in run.requests)
    assert all(r.generated == r.output_tokens and r.t_done_s is not None for r in run.requests)
    assert run.nll_sum == approx(_uncached_nll(model, stream, "static-top2"), n=4096, dtype=torch.float32)
    assert sum(len(v) for v in run.greedy.values()) == run.nll_tokens


def _frontier(model, stream, preset) -> tuple[dict, dict]:
    policies = ("static-top2", "static-top1", "batch-aware:2", "nectar")
    cfg = ServingConfig(TRACE, LIMITS, policies=policies)
    runs = {p: serve_policy(model, make_backend("sim", seed=0, price_as="none", preset=preset), p, cfg, stream)
            for p in policies}
    report = serving_report(runs, cfg, {"backend": "sim", "gpu": "sim"})
    for key in ("backend", "gpu", "workload", "quality_bound", "nectar_saved", "nectar_dppl", "hull_saved_at_nectar_dppl",
                "nectar_margin_over_hull", "best_fixed_saved_within_bound", "policies", "trace", "batch_max"):
        assert key in report
    rows = {p["name"]: p for p in report["policies"]}
    assert rows["static-top2"]["saved"] == 0 and rows["static-top2"]["greedy_agreement"] == 1
    assert all(math.isfinite(rows[p]["tpot_p99_s"]) for p in policies)
    assert rows["nectar"]["controller"]["windows"] or rows["nectar"]["controller"]["final_price"] > 0
    return rows, runs


def _decode_s(run) -> float:
    """Mean simulated time of a run's decode steps."""
    decode = [s.t_end_s - s.t_start_s for s in run.steps if s.phase == "decode"]
    return sum(decode) / len(decode)


def test_the_frontier_of_a_serving_run(model, stream):
    """Decode priced with every kernel launched from the host (the H100 preset without its
    captured-decode fields): fewer experts read per step is cheaper. As a captured step (the shipped
    preset) this tiny model's step is latency-bound — its blocks' fixed latency, not the experts'
    bytes — so top-1 decodes no faster than top-2, as the H100 measured for the small OLMoE model
    (docs/serving.md); its sub-millisecond steps' energies are then the sensor's reading noise."""
    h100 = load_preset("h100_sxm")
    eager = h100.replace(decode_bandwidth_efficiency=None, decode_block_latency_s=None, decode_row_latency_s=None)
    rows, runs = _frontier(model, stream, eager)
    assert rows["static-top1"]["saved"] > 0
    assert _decode_s(runs["static-top1"]) < 0.9 * _decode_s(runs["static-top2"])
    rows, runs = _frontier(model, stream, h100)
    assert abs(_decode_s(runs["static-top1"]) / _decode_s(runs["static-top2"]) - 1) < 0.005


@pytest.mark.parametrize("check_rows", [None, 1])
def test_nectars_checks_are_charged_as_forwards_of_their_own(model, stream, check_rows):
    """Every check_every-th decode step of `nectar` carries its static shadow forward (`before`), whose
    routing is static top-2's on the same rows (or the first `check_rows`), and the simulator charges
    it: those steps take about twice the time of the others (this tiny model's captured step is its
    blocks' fixed latency); the controller counts the rows it checked."""
    from nectar.serving.controller import ServingControllerConfig

    cfg = ServingConfig(TRACE, LIMITS, policies=("static-top2", "nectar"),
                        controller=ServingControllerConfig(check_every=3, check_rows=check_rows, window_steps=3,
                                                           quality_signal="checks"))
    run = serve_policy(model, make_backend("sim", seed=0, price_as="none"), "nectar", cfg, stream)
    decode = [s for s in run.steps if s.phase == "decode"]
    checked = [w.before is not None for w in run.workloads]
    assert checked == [i % 3 == 0 for i in range(len(decode))]
    rows = [min(w.batch, check_rows or w.batch) for w in run.workloads if w.before is not None]
    for w, n in zip([w for w in run.workloads if w.before is not None], rows):
        assert w.before.batch == n and w.before.before is None
        assert [sum(layer.tokens_per_expert) for layer in w.before.layers] == [2 * n] * len(w.layers)
    counted = [window["window_tokens"] for window in run.controller["windows"]]
    assert counted == rows[:len(counted)]                           # a window of 3 steps holds one check
    seconds = [s.t_end_s - s.t_start_s for s in decode]
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    with_check = mean([t for t, c in zip(seconds, checked) if c])
    without = mean([t for t, c in zip(seconds, checked) if not c])
    assert 1.6 < with_check / without < 2.4


def test_nectar_serve_writes_its_outputs(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "serve"
    code = serve_main(["--model", str(tiny_model_dir), "--requests", "5", "--rate", "100", "--prompt-median", "8",
                       "--output-median", "4", "--batch-max", "2", "--prefill-chunk", "8",
                       "--policies", "static-top2,batch-aware:2,nectar", "--out", str(out), "--no-progress"])
    assert code == 0
    report = json.loads((out / "frontier.json").read_text())
    assert report["trace"] == "bursty" and report["batch_max"] == 2
    for name in ("steps.csv", "requests.csv", "frontier.png", "j_per_token_vs_load.png", "tpot_vs_load.png"):
        assert (out / name).exists()
    assert "margin over the hull" in capsys.readouterr().out


def test_a_baseline_missing_from_the_policies_is_refused(tiny_model_dir, tmp_path):
    code = serve_main(["--model", str(tiny_model_dir), "--policies", "batch-aware:2", "--out", str(tmp_path / "x")])
    assert code == 2 and not (tmp_path / "x").exists()


def test_repeats_give_one_margin_per_seed_and_an_interval(tiny_model_dir, tmp_path):
    out = tmp_path / "serve"
    code = serve_main(["--model", str(tiny_model_dir), "--requests", "4", "--rate", "100", "--prompt-median", "8",
                       "--output-median", "4", "--batch-max", "2", "--policies", "static-top2,static-top1,nectar",
                       "--repeats", "2", "--out", str(out), "--no-progress", "--json"])
    assert code == 0
    report = json.loads((out / "frontier.json").read_text())
    assert report["repeats"] == 2 and len(report["nectar_margin_per_repeat"]) == 2
    assert "nectar_margin_ci95" in report


def test_on_the_nvml_backend_a_run_reads_the_counter_twice_and_its_steps_add_up_to_it(model, stream):
    """Step windows are light (instant power at the edges: the counter costs ~3 ms a read); the
    counter is read at the start and end of the run, and the steps are scaled to what it measured."""
    from hw.backend import NvmlBackend
    from tests.hw.fake_nvml import FakeClock, FakeNvml

    clock = FakeClock()
    fake = FakeNvml(clock, 250.0, counter_period_s=1e-3)
    backend = NvmlBackend(sample_period_s=None, sync=lambda: clock.advance(1e-3), nvml=fake, clock=clock,
                          sleep=clock.advance)
    cfg = ServingConfig(TRACE, LIMITS, policies=("static-top2",))
    run = serve_policy(model, backend, "static-top2", cfg, stream)
    assert fake.log.count("counter") == 2
    assert "gpu_temp" not in fake.log                                   # no slow sensors at step edges
    busy = [s for s in run.steps if s.phase != "idle"]
    assert busy and all(s.energy_J > 0 for s in busy)
    counted_J = fake.true_energy_J(0.0, clock())
    assert sum(s.energy_J for s in run.steps) == pytest.approx(counted_J, rel=0.02)
