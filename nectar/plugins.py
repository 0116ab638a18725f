"""Name → implementation registry for backends and analysis commands.

The core must not import `sim`, `hw` or `analysis`; it reaches them by dotted name at run time,
so the dependency arrow points from the backends to the core and never back.
"""

from __future__ import annotations

import importlib
from typing import Any

BACKENDS = {
    "sim": "sim.backend:create",
    "nvml": "hw.backend:create",
}

COMMANDS = {
    "verify-convexity": "analysis.convexity.cli:main",
    "reconcile": "analysis.reconcile.cli:main",
    "report": "analysis.report.page:main",
}


def load_object(spec: str) -> Any:
    """Import "package.module:attr" and return attr, with a clear error if it is missing."""
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise RuntimeError(f"cannot load {spec!r}: {exc}. Is the project installed (make install)?") from exc
    try:
        return getattr(module, attr)
    except AttributeError as exc:
        raise RuntimeError(f"{module_name} has no {attr!r}") from exc


def make_backend(name: str, **options: Any):
    """The backend registered under `name` ("sim" or "nvml"), built by its module's `create` from
    options every backend takes (seed, preset, faults, price_as, price_batch); a backend refuses
    the options it cannot honour with a clear error."""
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {sorted(BACKENDS)}")
    return load_object(BACKENDS[name])(**options)
