"""`nectar frontier --clock-sweep` end to end at CI scale on the simulator: the clock family
`clock:MHZ`, the best clock, and NECTAR alone and on top of it, each figure checked against the
per-policy rows and an independent linear program for every hull."""

import json

import pytest

from nectar.cli.frontier import main as frontier_main
from nectar.experiment.hull import HullPoint
from tests.experiment.test_hull import lp_saved_at
from tests.tolerance import approx

# static-top2 is not listed first: the first policy runs on the backend that ran the cost
# calibration (a warmer GPU), and clock:1980 must meet static-top2 on equal terms
POLICIES = "static-top1,static-top2,nectar"
SMALL = ["--tokens", "512", "--chunk-tokens", "256", "--seq-len", "128", "--no-progress", "--json"]


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("clocks") / "f"
    import contextlib
    import io

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert frontier_main(["--policies", POLICIES, "--clock-sweep", "1980,1000", *SMALL, "--out", str(out)]) == 0
    return json.loads(buffer.getvalue())


def _hull(rows, keep, dppl):
    return lp_saved_at([HullPoint(n, p["dppl"], p["saved"]) for n, p in rows.items() if not p["adaptive"] and keep(n)],
                       dppl)


def test_the_sweep_runs_every_policy_again_on_the_best_clock(report):
    rows = {p["name"]: p for p in report["policies"]}
    sweep = {r["policy"]: r for r in report["clock_sweep"]}
    assert set(sweep) == {"clock:1980", "clock:1000"} and "simulated" in report["clock_figures"]
    best = max(sweep.values(), key=lambda r: r["saved"])
    assert report["best_clock"] == best and best["dppl"] <= report["quality_bound"]
    at = f"{best['clock_MHz']:g}"
    assert set(rows) == {*POLICIES.split(","), *sweep, f"static-top1@clock:{at}", f"nectar@clock:{at}"}
    assert report["nectar_on_best_clock"] == f"nectar@clock:{at}"
    # the clock at the max is the reference itself: same routing, same clock, same fresh GPU
    assert sweep["clock:1980"]["saved"] == approx(0.0, n=2, scale=1.0) and sweep["clock:1980"]["slowdown"] == approx(0.0, n=4, scale=1.0)
    assert sweep["clock:1000"]["slowdown"] > 0.2 and sweep["clock:1000"]["dppl"] == approx(0.0, n=2, scale=1.0)
    for name, row in sweep.items():
        assert (row["saved"], row["dppl"]) == (rows[name]["saved"], rows[name]["dppl"])


def test_nectar_alone_and_on_the_best_clock_against_their_hulls(report):
    rows = {p["name"]: p for p in report["policies"]}
    at = f"{report['best_clock']['clock_MHz']:g}"
    nectar, locked = rows["nectar"], rows[f"nectar@clock:{at}"]
    # not rounding: HiGHS's answer, to its own tolerances (see tests/experiment/test_hull.py)
    lp = pytest.approx
    assert report["hull_saved_at_nectar_dppl"] == lp(_hull(rows, lambda n: True, nectar["dppl"]), abs=1e-9)
    unlocked = _hull(rows, lambda n: "clock:" not in n, nectar["dppl"])
    assert report["nectar_margin_over_unlocked_hull"] == lp(nectar["saved"] - unlocked, abs=1e-9)
    assert report["nectar_on_best_clock_saved"] == locked["saved"] and report["nectar_on_best_clock_dppl"] == locked["dppl"]
    full = _hull(rows, lambda n: True, locked["dppl"])
    assert report["hull_saved_at_nectar_on_best_clock_dppl"] == lp(full, abs=1e-9)
    assert report["nectar_on_best_clock_margin_over_hull"] == lp(locked["saved"] - full, abs=1e-9)
    at_clock = _hull(rows, lambda n: n.endswith(f"clock:{at}"), locked["dppl"])
    assert report["best_clock_hull_saved_at_nectar_on_best_clock_dppl"] == lp(at_clock, abs=1e-9)
    assert report["nectar_on_best_clock_margin_over_best_clock_hull"] == lp(locked["saved"] - at_clock, abs=1e-9)
    on_top = 1.0 - locked["J_per_token"] / rows[f"clock:{at}"]["J_per_token"]
    assert report["nectar_on_best_clock_saved_over_best_clock"] == approx(on_top, n=2)


def test_clock_policies_need_a_backend_that_can_lock_its_clock():
    """The core asks the backend, never which backend it is: one without `lock_clock` (and the
    NVML backend, which refuses: tests/hw/test_backend.py) stops the run before any chunk."""
    import torch

    from nectar.experiment.runner import RunConfig, run_experiment
    from tests.conftest import tiny_moe

    class Plain:
        name, isolated, torch_device = "plain", True, "cpu"

        def run_chunk(self, compute):  # pragma: no cover - never reached
            raise AssertionError("a chunk ran")

    cfg = RunConfig(policies=["static-top2", "clock:1300"], tokens=64, chunk_tokens=64, seq_len=16)
    with pytest.raises(ValueError, match="cannot lock its SM clock"):
        run_experiment(tiny_moe(), torch.zeros(64, dtype=torch.long), Plain, cfg, progress=False)
