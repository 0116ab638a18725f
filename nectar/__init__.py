"""NECTAR: energy- and thermal-aware Mixture-of-Experts inference with test-time-adapted routing.

The core package (pure torch + transformers). It never imports simpy, pynvml or cvxpy, nor the
backends (`sim`, `hw`) or `analysis`; those are reached through `nectar.plugins` by name.
"""

__version__ = "0.1.0"
