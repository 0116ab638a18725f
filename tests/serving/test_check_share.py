"""What NECTAR's ride-along quality checks cost inside its serving totals.

A checked decode step's window holds two forwards (the static shadow, then the policy's); the check is
attributed its share of the step's predicted bytes (`nectar.serving.step_cost`). The references here
are computed apart from the code under test: the checked steps from the controller's schedule (every
`check_every`-th decode step, the first included) and the records' order, the bytes from their
definition (weights read once per forward: dense and head, the distinct experts touched; the KV read
and written), the energies and times from the step records and from steps.csv."""

import csv
import json
import math

import pytest

from nectar.cli.serve import main as serve_main
from nectar.serving.controller import ServingControllerConfig
from nectar.serving.frontier import ServingConfig, serve_policy, serving_report
from nectar.serving.loop import ServeLimits
from nectar.serving.metrics import StepRecord, summarize
from nectar.serving.step_cost import check_share
from nectar.serving.traces import LengthDist, TraceConfig
from nectar.telemetry.workload import ChunkWorkload, ExpertCost, LayerWorkload
from tests.tolerance import approx

TRACE = TraceConfig("bursty", n_requests=8, rate_rps=200.0, seed=3, prompt=LengthDist(12, 0.5, 4, 30),
                    output=LengthDist(6, 0.5, 2, 12))
LIMITS = ServeLimits(batch_max=3, prefill_chunk_tokens=8, max_context_tokens=64)
POLICIES = ("static-top2", "static-top1", "nectar")


def _bytes_read(w: ChunkWorkload) -> float:
    """One forward's bytes by their definition: per layer the attention's 4·d² weights and the K/V of
    every position read or written (2·d each), the experts with tokens once each, the tied head V·d."""
    per_layer = sum(4 * w.d_model ** 2 + 2 * w.d_model * (w.kv_read_tokens + w.tokens) for _ in range(w.n_layers))
    head = w.vocab_size * w.d_model
    experts = sum(cost.weight_bytes for layer in w.layers
                  for tokens, cost in zip(layer.tokens_per_expert, layer.expert_costs) if tokens)
    return (per_layer + head) * w.dtype_bytes + experts


def _check_part(w: ChunkWorkload) -> float:
    """The check's share of a checked step: its forward's bytes over both forwards'."""
    check, own = _bytes_read(w.before), _bytes_read(w)       # `before` has no `before` of its own here
    return check / (check + own)


def _serve(model, stream, check_every: int):
    pytest.importorskip("simpy", reason="the serving loop runs on the simulator's clock (the GPU hosts have no simpy)")
    from nectar.plugins import make_backend

    cfg = ServingConfig(TRACE, LIMITS, policies=POLICIES,
                        controller=ServingControllerConfig(check_every=check_every, window_steps=3,
                                                           quality_signal="checks"))
    runs = {p: serve_policy(model, make_backend("sim", seed=0, price_as="none"), p, cfg, stream) for p in POLICIES}
    report = serving_report(runs, cfg, {"backend": "sim", "gpu": "sim"})
    return runs, report, {row["name"]: row for row in report["policies"]}


def test_check_share_is_the_checks_bytes_over_the_steps():
    """Two forwards of one layer, d = 4, V = 10, 2-byte values: the check (2 rows, both experts) reads
    (4·16 + 2·4·(5 + 2)) · 2 + 10·4·2 + 100 + 60 = 480 bytes, the step's own forward (2 rows, the
    first expert) 420; the check's share is 480 / 900. Without a check, 0."""
    def forward(counts, before=None):
        layer = LayerWorkload(counts, [ExpertCost(1.0, 1.0, 100.0), ExpertCost(1.0, 1.0, 60.0)])
        return ChunkWorkload(tokens=2, batch=2, seq_len=1, d_model=4, n_layers=1, n_heads=1, vocab_size=10,
                             layers=[layer], kv_read_tokens=5, logit_tokens=2, phase="decode", before=before)

    check, own = forward([2, 2]), forward([4, 0])
    assert (_bytes_read(check), _bytes_read(own)) == (480, 420)
    assert check_share(forward([4, 0], before=check)) == approx(480 / 900)
    assert check_share(own) == 0.0 and check_share(None) == 0.0


def test_nectars_checks_are_reported_inside_its_totals(model, stream):
    """Every 3rd decode step of `nectar` (the first included) is checked: checked_steps counts them,
    check_energy_J and check_time_s are their steps' energies and durations times the check's byte
    share, and nectar_guard_share is that energy over the decode energy of the step records. A
    static policy runs no check: 0 everywhere. (Before the checks were reported the share was 0.)"""
    runs, report, rows = _serve(model, stream, check_every=3)
    decode = [s for s in runs["nectar"].steps if s.phase == "decode"]
    workloads = runs["nectar"].workloads
    assert len(workloads) == len(decode) > 3
    checked = [i for i in range(len(decode)) if i % 3 == 0]
    assert [i for i, w in enumerate(workloads) if w.before is not None] == checked

    nectar = rows["nectar"]
    assert nectar["checked_steps"] == len(checked) == math.ceil(len(decode) / 3)
    energy = sum(decode[i].energy_J * _check_part(workloads[i]) for i in checked)
    seconds = sum((decode[i].t_end_s - decode[i].t_start_s) * _check_part(workloads[i]) for i in checked)
    assert energy > 0 and seconds > 0
    assert nectar["check_energy_J"] == approx(energy, n=2 * len(decode))
    assert nectar["check_time_s"] == approx(seconds, n=2 * len(decode))
    decode_J = sum(s.energy_J for s in decode)
    assert report["nectar_guard_share"] == approx(energy / decode_J, n=4 * len(decode))
    assert 0 < report["nectar_guard_share"] == nectar["guard_share"] < 1
    assert nectar["check_energy_J"] < nectar["decode_J"]                   # inside the totals, not on top
    # the simulator runs a full-batch check as a forward of its own: about half its step
    assert all(0.4 < _check_part(workloads[i]) < 0.7 for i in checked)
    for name in ("static-top2", "static-top1"):
        assert (rows[name]["checked_steps"], rows[name]["check_energy_J"], rows[name]["check_time_s"],
                rows[name]["guard_share"]) == (0, 0.0, 0.0, 0.0)
        assert all(s.check_share == 0 for s in runs[name].steps)


def test_sparser_checks_cost_a_smaller_share_and_one_check_is_the_least(model, stream):
    """The controller checks the first decode step and every check_every-th after it, so no run of
    `nectar` is without a check: with check_every beyond the run's decode steps only the first is
    checked, and the share is that step's part alone."""
    dense_runs, dense, _ = _serve(model, stream, check_every=3)
    runs, report, rows = _serve(model, stream, check_every=10_000)
    decode = [s for s in runs["nectar"].steps if s.phase == "decode"]
    assert len(decode) < 10_000 and rows["nectar"]["checked_steps"] == 1
    first = decode[0].energy_J * _check_part(runs["nectar"].workloads[0])
    assert report["nectar_guard_share"] == approx(first / sum(s.energy_J for s in decode), n=4 * len(decode))
    assert 0 < report["nectar_guard_share"] < dense["nectar_guard_share"]


def test_steps_without_checks_have_a_zero_share():
    """The summary of records that carry no check: nothing checked, no check energy, share 0; a check
    share is refused on anything but a decode step."""
    steps = [StepRecord("prefill", 0.0, 1.0, 4.0, 0, 4, 1, [0]), StepRecord("decode", 1.0, 2.0, 2.0, 1, 1, 1, [0])]
    m = summarize(steps, [], batch_max=1)
    assert (m.checked_steps, m.check_energy_J, m.check_time_s, m.guard_share) == (0, 0.0, 0.0, 0.0)
    checked = StepRecord("decode", 2.0, 4.0, 3.0, 1, 1, 1, [0], check_share=0.25)
    m = summarize([*steps, checked], [], batch_max=1)
    assert (m.checked_steps, m.check_energy_J, m.check_time_s) == (1, 0.75, 0.5)
    assert m.guard_share == approx(0.75 / 5.0)
    with pytest.raises(ValueError, match="check_share"):
        StepRecord("prefill", 0.0, 1.0, 4.0, 0, 4, 1, [0], check_share=0.5).validate()
    with pytest.raises(ValueError, match="check_share"):
        StepRecord("decode", 0.0, 1.0, 4.0, 1, 1, 1, [0], check_share=1.0).validate()


def test_nectar_serve_reports_the_checks_share(tiny_model_dir, tmp_path, capsys):
    """frontier.json, steps.csv and the printed summary agree: the nectar rows of steps.csv with a
    check share are its checked steps, and their energies times the shares add up to its check
    energy (steps.csv keeps 6 decimals)."""
    pytest.importorskip("simpy", reason="the default backend is the simulator (the GPU hosts have no simpy)")
    out = tmp_path / "serve"
    code = serve_main(["--model", str(tiny_model_dir), "--requests", "5", "--rate", "100", "--prompt-median", "8",
                       "--output-median", "4", "--batch-max", "2", "--prefill-chunk", "8", "--check-every", "2",
                       "--policies", "static-top2,nectar", "--out", str(out), "--no-progress"])
    assert code == 0
    report = json.loads((out / "frontier.json").read_text())
    rows = {row["name"]: row for row in report["policies"]}
    with open(out / "steps.csv", newline="") as f:
        steps = [r for r in csv.DictReader(f) if r["policy"] == "nectar" and r["phase"] == "decode"]
    shares = [float(r["check_share"]) for r in steps]
    assert rows["nectar"]["checked_steps"] == sum(share > 0 for share in shares) == math.ceil(len(steps) / 2)
    assert [share > 0 for share in shares] == [i % 2 == 0 for i in range(len(steps))]
    energy = sum(float(r["energy_J"]) * share for r, share in zip(steps, shares))
    assert rows["nectar"]["check_energy_J"] == pytest.approx(energy, rel=1e-4, abs=1e-5)   # steps.csv's 6 decimals
    assert report["nectar_guard_share"] > 0 and report["nectar_guard_share_per_repeat"] == [report["nectar_guard_share"]]
    assert rows["static-top2"]["checked_steps"] == 0 and rows["static-top2"]["check_energy_J"] == 0
    printed = capsys.readouterr().out
    assert f"{100 * report['nectar_guard_share']:.2f} % of its decode energy" in printed
