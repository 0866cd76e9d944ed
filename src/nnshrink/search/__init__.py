"""The decision engine and searches over configurations.

- :mod:`~nnshrink.search.engine`: units, measurements at a setting, one cache, one executor.
- :mod:`~nnshrink.search.solvers`: the Lagrangian MAC allocation and the byte-budget knapsack.
- :mod:`~nnshrink.search.budget`: the ``budget`` step, one target across pruning, sharing and bits.
- :mod:`~nnshrink.search.frontier`: sweeps of plans measured from their containers, the Pareto front.
- :mod:`~nnshrink.search.sensitivity`: each layer pruned / shared alone, scored by the user's metric.

Names are imported on first use (PEP 562): techniques import the engine, and the searches import
techniques, so importing the package must not import them all.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "Point": "frontier", "pareto": "frontier", "smallest_within": "frontier", "sweep": "frontier",
    "Sensitivity": "sensitivity", "allocate": "sensitivity", "layer_sensitivity": "sensitivity",
    "per_layer_plan": "sensitivity", "Budget": "budget",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nnshrink.search' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"nnshrink.search.{module}"), name)
    globals()[name] = value
    return value
