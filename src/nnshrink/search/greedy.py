"""The greedy path from the largest to the smallest per-layer assignment, cheapest noise per byte first.

Each layer has options ordered from most to fewest bytes (float, 8-bit, ..., or ASTC footprints
from 4x4 to 12x12), each with its stored bytes and the output noise it adds when that layer alone
takes it (measured). Added noises of independent errors add, so each step of the path moves one
layer to whichever of its later options adds the least estimated noise per byte saved. The path
is one ordered list of assignments, from largest to smallest: a size budget takes the first
assignment that fits; an accuracy budget bisects the list with a few full evaluations.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Move:
    layer: str
    option: int
    total_bytes: float
    noise: float


def greedy_path(options: dict[str, list[tuple[float, float]]]) -> list[Move]:
    """``options[layer] = [(bytes, added_noise), ...]`` (index 0 is where every layer starts)."""
    level = dict.fromkeys(options, 0)
    total = sum(opts[0][0] for opts in options.values())
    noise = sum(opts[0][1] for opts in options.values())
    path = []
    while True:
        best = None
        for name, opts in options.items():
            b0, n0 = opts[level[name]]
            for j in range(level[name] + 1, len(opts)):
                b1, n1 = opts[j]
                saved = b0 - b1
                if saved <= 0:
                    continue
                ratio = max(n1 - n0, 0.0) / saved
                if best is None or ratio < best[0]:
                    best = (ratio, name, j)
        if best is None:
            return path
        _, name, j = best
        total += options[name][j][0] - options[name][level[name]][0]
        noise += max(options[name][j][1] - options[name][level[name]][1], 0.0)
        level[name] = j
        path.append(Move(name, j, total, noise))


def assignment(options: dict[str, list], path: list[Move], k: int) -> dict[str, int]:
    """The option index of every layer after the first ``k`` moves of ``path``."""
    out = dict.fromkeys(options, 0)
    for move in path[:k]:
        out[move.layer] = move.option
    return out


def fit_bytes(options: dict[str, list[tuple[float, float]]], path: list[Move], budget: float) -> int:
    """The fewest moves whose total bytes are within ``budget`` (all of them if none is)."""
    start = sum(opts[0][0] for opts in options.values())
    if start <= budget:
        return 0
    for i, move in enumerate(path):
        if move.total_bytes <= budget:
            return i + 1
    return len(path)


def bisect_floor(path: list[Move], accept: Callable[[int], bool]) -> tuple[int, int]:
    """The longest prefix ``k`` with ``accept(k)`` (``accept(0)`` assumed), and the evaluations run."""
    lo, hi, evaluations = 0, len(path), 0
    while lo < hi:
        mid = (lo + hi + 1) // 2
        evaluations += 1
        if accept(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo, evaluations
