"""Real NVML energy windows around bf16 matmuls on a GPU host (skipped without CUDA and NVML).

Reference: the counter's energy against the integral of the instant-power samples, and power
readings against the device's own limits. Windows are ≥ 2 s, as published NVML studies advise.
"""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.gpu

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU here", allow_module_level=True)

from hw.backend import NvmlBackend  # noqa: E402
from hw.info import device_info  # noqa: E402
from hw.nvml_api import NvmlApi, NvmlUnavailable  # noqa: E402

try:
    NvmlApi().shutdown()
except NvmlUnavailable as exc:  # pragma: no cover - depends on the host
    pytest.skip(f"NVML unavailable: {exc}", allow_module_level=True)


def matmul_for(seconds: float, n: int = 8192):
    """A compute() that keeps the GPU busy with bf16 matmuls for about `seconds`."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(5):
        a @ b
    torch.cuda.synchronize()
    per_matmul = (time.perf_counter() - start) / 5
    count = max(1, int(seconds / per_matmul))

    def compute():
        for _ in range(count):
            a @ b

    return compute


@pytest.fixture(scope="module")
def backend():
    with NvmlBackend(sample_period_s=0.01) as b:
        yield b


def test_matmul_window_counter_agrees_with_integrated_power(backend):
    backend.run_chunk(matmul_for(1.0))  # warm-up: clocks up, kernels loaded
    idle = backend.idle(2.0)
    busy = backend.run_chunk(matmul_for(3.0))
    limit = backend.nvml.power_limit_W()
    print(f"\nidle: {idle.mean_power_W:.1f} W, busy: {busy.mean_power_W:.1f} W over {busy.duration_s:.2f} s, "
          f"counter {busy.energy_J:.1f} J vs integrated {busy.energy_power_J:.1f} J, flags {busy.flags}")
    assert busy.is_valid() and idle.is_valid()
    assert busy.duration_s >= 2.0
    assert not {"stale", "counter_reset", "energy_from_power", "short_window"} & set(busy.flags)
    assert busy.samples >= 0.3 * busy.duration_s / 0.01
    assert busy.mean_power_W > idle.mean_power_W + 50
    assert busy.peak_power_W <= 1.3 * limit
    # a real GPU (not rounding): the energy counter and 10 ms power samples agree to 15 %
    assert abs(busy.energy_J - busy.energy_power_J) / busy.energy_power_J < 0.15
    assert abs(busy.energy_J / busy.duration_s - busy.mean_power_W) / busy.mean_power_W < 0.15
    assert 10 < busy.gpu_temp_C < 100 and busy.sm_clock_MHz > 0
    assert 0 < busy.mem_used_B <= busy.mem_total_B


def test_short_window_is_flagged_with_a_power_estimate(backend):
    def tiny():
        return torch.ones(16, device="cuda").sum()

    tiny()  # the first launch loads kernels lazily (~0.1 s); measure a warm one
    torch.cuda.synchronize()
    window = backend.run_chunk(tiny)
    assert "short_window" in window.flags
    assert window.energy_power_J is not None and window.energy_power_J > 0


def test_device_info_reads_the_gpu():
    info = device_info()
    assert info["gpu_name"] and info["driver_version"]
    assert info["memory_total_B"] > 2**30
    assert info["power_limit_W"] is None or info["power_limit_W"] > 50
    assert info["cuda_torch_version"] == torch.version.cuda
