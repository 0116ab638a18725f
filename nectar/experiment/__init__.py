"""Experiments: routing policies run on one token stream against a telemetry backend (runner), their
outputs and plots, and the on-GPU campaign of `nectar hw-run`."""
