"""`nectar frontier` end to end on the committed demo model at a small scale (what CI runs of the
frontier): the stationary and domain-shift workloads, the report's top-level fields checked against
the per-policy rows and an independent linear program for the hull."""

import json

import pytest

from nectar.cli.frontier import main as frontier_main
from nectar.experiment.hull import HullPoint
from tests.experiment.test_hull import lp_saved_at
from tests.tolerance import approx

POLICIES = "static-top2,static-top1,static-cheap,top-p:0.5,fixed-price:2,nectar"
SMALL = ["--tokens", "4096", "--chunk-tokens", "1024", "--seq-len", "128", "--no-progress", "--json"]


def run_frontier(workload, out, capsys):
    extra = ["--block-chunks", "1"] if workload == "domain-shift" else []
    assert frontier_main(["--workload", workload, "--policies", POLICIES, *SMALL, *extra, "--out", str(out / "f")]) == 0
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("workload", ["stationary", "domain-shift"])
def test_small_frontier_report_is_consistent(workload, tmp_path, capsys):
    rep = run_frontier(workload, tmp_path, capsys)
    for key in ("backend", "gpu", "workload", "quality_bound", "nectar_saved", "nectar_dppl", "hull_saved_at_nectar_dppl",
                "nectar_margin_over_hull", "best_fixed_saved_within_bound", "nectar_budget_use"):
        assert key in rep
    assert rep["backend"] == "sim" and rep["workload"] == workload
    rows = {p["name"]: p for p in rep["policies"]}
    assert set(rows) == set(POLICIES.split(","))
    # relative differences of the baseline with itself: 1 − a/a and a/a − 1
    assert rows["static-top2"]["saved"] == approx(0.0, n=2, scale=1.0) and rows["static-top2"]["dppl"] == approx(0.0, n=2, scale=1.0)
    statics = [HullPoint(n, p["dppl"], p["saved"]) for n, p in rows.items() if not p["adaptive"]]
    nectar = rows["nectar"]
    assert rep["nectar_saved"] == approx(nectar["saved"], n=2) and rep["nectar_dppl"] == approx(nectar["dppl"], n=2)
    # not rounding: HiGHS's answer, to its own tolerances (see tests/experiment/test_hull.py)
    assert rep["hull_saved_at_nectar_dppl"] == pytest.approx(lp_saved_at(statics, nectar["dppl"]), abs=1e-9)
    margin_scale = abs(nectar["saved"]) + abs(rep["hull_saved_at_nectar_dppl"])  # a difference: its terms' size
    assert rep["nectar_margin_over_hull"] == approx(nectar["saved"] - rep["hull_saved_at_nectar_dppl"], n=2,
                                                    scale=margin_scale)
    assert rep["nectar_budget_use"] == approx(nectar["dppl"] / rep["quality_bound"], n=2)
    within = [p.saved for p in statics if p.dppl <= rep["quality_bound"]]
    assert rep["best_fixed_saved_within_bound"] == approx(max(within), n=2)
    # energy accounting: NECTAR's guard energy is inside its J/token (a share in [0, 1))
    assert 0.0 <= nectar["guard_share"] < 1.0
    if workload == "domain-shift":
        assert len(set(rep["chunk_domains"])) >= 2                  # the stream really switches domains
    assert (tmp_path / "f" / "frontier.json").is_file() and (tmp_path / "f" / "frontier.png").is_file()


def test_the_table_names_what_each_check_column_checks(capsys):
    """The quality bound and the temperature/power limits are separate columns, each saying what it
    checks: a policy above the bound that holds the limits reads 'ABOVE … held', not 'ok'."""
    from nectar.experiment.frontier_run import print_frontier

    def row(name, dppl, holds, temp=None, adaptive=False):
        return {"name": name, "adaptive": adaptive, "saved": 0.1, "dppl": dppl, "J_per_token": 3e-4,
                "mean_power_W": 400.0, "max_temp_C": 60.0, "pause_share": 0.0,
                "limits": {"holds": holds, "max_temp_after_settle_C": temp}}

    report = {"workload": "thermal", "backend": "sim", "gpu": "H100", "quality_bound": 0.01, "temp_cap_C": 62.0,
              "power_budget_W": None, "policies": [row("static-top2", 0.0, True, 60.0), row("static-top1", 0.02, True, 59.0),
                                                   row("static-cheap", 0.005, False, 65.0), row("top-p:0.5", 0.004, False)]}
    print_frontier(report)
    lines = capsys.readouterr().out.splitlines()
    assert lines[1].endswith("ppl bound  temp/power limits")
    cells = {line.split()[0]: line.split("%")[-1].split() for line in lines[2:]}
    assert cells == {"static-top2": ["within", "held"], "static-top1": ["ABOVE", "held"],
                     "static-cheap": ["within", "NOT", "held"],
                     "top-p:0.5": ["within", "NOT", "held", "(no", "reading", "after", "settling)"]}
    print_frontier({**report, "temp_cap_C": None})
    assert all(line.endswith("none set") for line in capsys.readouterr().out.splitlines()[2:])
