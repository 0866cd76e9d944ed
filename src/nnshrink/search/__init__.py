"""Searching configurations: accuracy-vs-size sweeps and their Pareto frontier."""

from nnshrink.search.frontier import Point, pareto, smallest_within, sweep
from nnshrink.search.sensitivity import Sensitivity, allocate, layer_sensitivity, per_layer_plan

__all__ = ["Point", "Sensitivity", "allocate", "layer_sensitivity", "pareto", "per_layer_plan", "smallest_within",
           "sweep"]
