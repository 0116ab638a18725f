"""sim: a deterministic simpy model of one GPU's energy, power and temperature behind NECTAR's
telemetry interface.

The core (`nectar`) hands over the workload it actually produced (`nectar.telemetry.workload.ChunkWorkload`);
`sim.backend.SimBackend` prices it kernel by kernel with a roofline, runs the kernels as simpy
processes on a GPU whose power depends on utilisation, clock and temperature (lumped RC thermal
model, slowdown threshold, power limit), and reads the result back through an NVML-like sensor
with the real one's habits (100 ms energy-counter ticks, 1 s averaged power, integer °C) and
optional faults. Parameters live in per-GPU JSON presets (`sim/presets/*.json`).

Modules: presets (parameters), kernels (workload → kernels and their roofline, readable),
workload_arrays + pricing (the same, vectorised), power, thermal (exact RC steps), gpu (the simpy
GPU process), sensor (NVML-like readings), faults, reader (telemetry windows), backend (the
`TelemetryBackend`), synthetic_workload (hand-built DistilGPT2-MoE chunks).
"""

from sim.presets import GPUPreset, list_presets, load_preset, save_preset

__all__ = ["GPUPreset", "list_presets", "load_preset", "save_preset"]
