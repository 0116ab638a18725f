"""A real Ctrl-C (SIGINT) and SIGTERM to a real `nectar run` process in the middle of its work: exit
status 130, one line saying nothing was written, and no folder left behind, half-written or not."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_signal_mid_run_leaves_nothing(tmp_path, sig):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "nectar", "run", "--out", str(out), "--no-progress", "--policies", "static-top2,nectar"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)})
    deadline = time.monotonic() + 240
    while not list(tmp_path.glob(".out.partial-*")):       # the run has checked --out and started
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run never started"
        time.sleep(0.2)
    time.sleep(3.0)                                          # well inside model loading / the experiment
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert f"interrupted; nothing written to {out}" in err and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []
