"""Offline analysis: cvxpy convexity checks, energy-model assumption tests, sim-vs-measured reconciliation.

This package depends on the core (`nectar`), never the other way round.
"""
