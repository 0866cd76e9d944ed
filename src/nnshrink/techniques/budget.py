"""Per-layer choices for a budget: the least estimated noise within a byte budget, and the
smallest model within an accuracy floor.

Each layer has options (float, a bit width, an ASTC footprint, ...), each with its stored bytes
and the output noise it adds when that layer alone takes it (measured). Added noises of
independent errors add, so an assignment's noise is estimated as their sum. For a byte budget
:func:`least_noise` solves the multiple-choice knapsack exactly by dynamic programming over bytes
(in ``resolution`` steps, rounded up, so the answer always fits). For an accuracy floor,
:func:`smallest_within` bisects over byte budgets, each budget's least-noise assignment checked
by one full evaluation: about ``log2(len(budgets))`` evaluations in all.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def least_noise(options: dict[str, list[tuple[float, float]]], budget: float,
                resolution: int = 4000) -> dict[str, int] | None:
    """``options[layer] = [(bytes, added_noise), ...]``: the option index per layer with the least
    total noise whose bytes fit ``budget``, or None if even the smallest options do not fit."""
    names = list(options)
    if sum(min(b for b, _ in options[n]) for n in names) > budget:
        return None
    unit = max(budget, 1.0) / resolution
    size = resolution + 1
    dp = np.zeros(size)  # least noise with at most b units used
    choice = np.zeros((len(names), size), np.int32)
    for li, n in enumerate(names):
        new = np.full(size, np.inf)
        for oi, (b, noise) in enumerate(options[n]):
            w = int(np.ceil(b / unit - 1e-9))
            if w >= size:
                continue
            cand = np.full(size, np.inf)
            cand[w:] = dp[:size - w] + noise
            better = cand < new
            new[better] = cand[better]
            choice[li][better] = oi
        dp = new
    if not np.isfinite(dp[-1]):
        return None
    out, b = {}, resolution
    for li in range(len(names) - 1, -1, -1):
        oi = int(choice[li][b])
        out[names[li]] = oi
        b -= int(np.ceil(options[names[li]][oi][0] / unit - 1e-9))
    return out


def estimated_noise(options: dict[str, list[tuple[float, float]]], assignment: dict[str, int]) -> float:
    return float(sum(options[n][i][1] for n, i in assignment.items()))


def total_bytes(options: dict[str, list[tuple[float, float]]], assignment: dict[str, int]) -> float:
    return float(sum(options[n][i][0] for n, i in assignment.items()))


def budgets(options: dict[str, list[tuple[float, float]]], count: int = 32) -> list[float]:
    """Byte budgets from the largest assignment down to the smallest, evenly spaced in log."""
    hi = sum(max(b for b, _ in o) for o in options.values())
    lo = sum(min(b for b, _ in o) for o in options.values())
    return [float(v) for v in np.geomspace(hi, lo, count)] if hi > lo else [hi]


def smallest_within(options: dict[str, list[tuple[float, float]]], accept: Callable[[dict[str, int]], bool],
                    count: int = 32) -> tuple[dict[str, int], int]:
    """The least-noise assignment at the smallest budget that ``accept`` takes (bisection over
    ``count`` budgets; the largest budget is assumed acceptable), and the evaluations run."""
    plans = [least_noise(options, b) for b in budgets(options, count)]
    plans = [p for p in plans if p is not None]
    lo, hi, evaluations = 0, len(plans) - 1, 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        evaluations += 1
        if accept(plans[mid]):
            lo = mid
        else:
            hi = mid - 1
    return plans[lo], evaluations
