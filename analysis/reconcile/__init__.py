"""Simulated vs measured: replay traces through the simulator, calibrate its preset, score held-out error."""
