"""`nectar frontier` end to end on the committed demo model at a small scale (what CI runs of the
frontier): the stationary and domain-shift workloads, the report's top-level fields checked against
the per-policy rows and an independent linear program for the hull."""

import json

import pytest

from nectar.cli.frontier import main as frontier_main
from nectar.experiment.hull import HullPoint
from tests.experiment.test_hull import lp_saved_at

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
    assert rows["static-top2"]["saved"] == pytest.approx(0.0) and rows["static-top2"]["dppl"] == pytest.approx(0.0)
    statics = [HullPoint(n, p["dppl"], p["saved"]) for n, p in rows.items() if not p["adaptive"]]
    nectar = rows["nectar"]
    assert rep["nectar_saved"] == pytest.approx(nectar["saved"]) and rep["nectar_dppl"] == pytest.approx(nectar["dppl"])
    assert rep["hull_saved_at_nectar_dppl"] == pytest.approx(lp_saved_at(statics, nectar["dppl"]), abs=1e-9)
    assert rep["nectar_margin_over_hull"] == pytest.approx(nectar["saved"] - rep["hull_saved_at_nectar_dppl"])
    assert rep["nectar_budget_use"] == pytest.approx(nectar["dppl"] / rep["quality_bound"])
    within = [p.saved for p in statics if p.dppl <= rep["quality_bound"]]
    assert rep["best_fixed_saved_within_bound"] == pytest.approx(max(within))
    # energy accounting: NECTAR's guard energy is inside its J/token (a share in [0, 1))
    assert 0.0 <= nectar["guard_share"] < 1.0
    if workload == "domain-shift":
        assert len(set(rep["chunk_domains"])) >= 2                  # the stream really switches domains
    assert (tmp_path / "f" / "frontier.json").is_file() and (tmp_path / "f" / "frontier.png").is_file()
