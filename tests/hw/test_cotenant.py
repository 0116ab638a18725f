"""The co-tenant process: it starts, keeps running, stops on request with exit code 0, leaves no
orphan when its parent's CoTenant exits, and refuses a bad duty; the simulator's stand-in raises
the ambient only while the block runs."""

import time

import pytest

from hw.cotenant import CoTenant, main
from sim.backend import COTENANT_HEAT_C, SimBackend
from tests.tolerance import approx


def test_cotenant_runs_until_stopped():
    with CoTenant(0.5, device="cpu", size=64, period_s=0.02) as tenant:
        time.sleep(1.0)                              # long enough to import torch and loop
        assert tenant.running
        process = tenant.process
    assert process.poll() == 0 and not tenant.running


def test_cotenant_exits_on_its_own_after_max_s():
    tenant = CoTenant(1.0, device="cpu", size=16, period_s=0.01, max_s=0.5).start()
    process = tenant.process
    process.wait(30)
    assert process.returncode == 0
    assert tenant.stop() == 0


@pytest.mark.parametrize("duty", [0.0, -0.1, 1.5])
def test_cotenant_refuses_a_bad_duty(duty, capsys):
    with pytest.raises(ValueError, match="duty"):
        CoTenant(duty, device="cpu")
    assert main(["--duty", str(duty), "--device", "cpu"]) == 2
    assert "duty" in capsys.readouterr().err


def test_sim_cotenant_heats_only_inside_the_block():
    backend = SimBackend(seed=0)
    base = backend.gpu.model.ambient_C
    with backend.cotenant(0.4):
        assert backend.gpu.model.ambient_C == approx(base + 0.4 * COTENANT_HEAT_C, n=2)  # ×, +
    assert backend.gpu.model.ambient_C == approx(base, n=2)  # + and − the same heat
    with pytest.raises(ValueError, match="duty"):
        with backend.cotenant(2.0):
            pass
