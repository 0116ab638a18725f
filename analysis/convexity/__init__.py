"""Convexity checks: the chunk routing problem in cvxpy, and the energy-model assumptions tested on data."""
