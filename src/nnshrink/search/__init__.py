"""Searching configurations: accuracy-vs-size sweeps and their Pareto frontier."""

from nnshrink.search.frontier import Point, pareto, smallest_within, sweep

__all__ = ["Point", "pareto", "smallest_within", "sweep"]
