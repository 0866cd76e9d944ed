"""The decision engine's choosing half: per-unit settings for a budget, from measured losses.

Two solvers, one per kind of budget:

- **A MAC target** (ranks, channel groups): minimise the summed predicted loss subject to the
  MAC budget by a Lagrangian relaxation, ``min sum_u loss_u(s_u) + lambda * MACs(s)``, solved by
  coordinate descent for fixed ``lambda`` (the MAC count need not be separable: pruning a channel
  group shrinks its producers and consumers), with ``lambda`` bisected to the largest MAC count
  within budget, then a repair pass that moves single units to land in ``[target - tolerance,
  target]`` (:func:`allocate`, :func:`repair`).
- **A byte budget** (bits, sparsity, codebooks, ASTC footprints): each unit has options, each with
  its stored bytes and the loss it adds when that unit alone takes it; added noises of
  independent errors add, so an assignment's loss is estimated as their sum. :func:`least_noise`
  solves the multiple-choice knapsack exactly by dynamic programming over bytes (in
  ``resolution`` steps, rounded up, so the answer always fits). For an accuracy floor,
  :func:`smallest_within` bisects over byte budgets, each budget's least-noise assignment checked
  by one full evaluation: about ``log2(len(budgets))`` evaluations in all.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from nnshrink.errors import ConfigError

if TYPE_CHECKING:
    from nnshrink.search.engine import Unit


def allocate(units: list[Unit], macs_of: Callable[[dict[str, int]], int], target: int, floor: int,
             sweeps: int = 3) -> dict[str, int]:
    """Levels (unit name -> index) whose MACs lie in ``[floor, target]`` with the least summed loss.

    Raises:
        ConfigError: Even the most compressed setting of every unit stays above ``target``.
    """
    most = {u.name: len(u.levels) - 1 for u in units}
    if macs_of(most) > target:
        raise ConfigError(f"the MAC target cannot be reached: compressing every eligible layer as far as "
                          f"allowed leaves {macs_of(most):,} MACs, the target is {target:,}")
    none = {u.name: 0 for u in units}
    if macs_of(none) <= target:
        return none

    def solve(lam: float) -> dict[str, int]:
        choice = dict(none)
        for _ in range(sweeps):
            changed = False
            for u in units:
                best, best_cost = choice[u.name], None
                for i in range(len(u.levels)):
                    trial = {**choice, u.name: i}
                    cost = u.loss[i] + lam * macs_of(trial)
                    if best_cost is None or cost < best_cost - 1e-15:
                        best, best_cost = i, cost
                if best != choice[u.name]:
                    choice[u.name], changed = best, True
            if not changed:
                break
        return choice

    total = macs_of(none)
    lo, hi = 0.0, 1.0 / max(1, total)
    while macs_of(solve(hi)) > target:  # grow lambda until the budget holds
        hi *= 4
        if hi > 1e12:
            break
    best = solve(hi)
    for _ in range(40):
        mid = (lo + hi) / 2
        trial = solve(mid)
        if macs_of(trial) <= target:
            hi, best = mid, trial
        else:
            lo = mid
    return repair(units, best, macs_of, target, floor)


def repair(units: list[Unit], choice: dict[str, int], macs_of, target: int, floor: int) -> dict[str, int]:
    """Single-unit moves: over budget, compress where it costs least per MAC saved; under the
    floor, relax where it gains most per MAC spent, never crossing the target."""
    by = {u.name: u for u in units}
    for _ in range(10_000):
        macs = macs_of(choice)
        if macs > target:
            moves = [(by[n].loss[i + 1] - by[n].loss[i], macs - macs_of({**choice, n: i + 1}), n, i + 1)
                     for n, i in choice.items() if i + 1 < len(by[n].levels)]
            moves = [m for m in moves if m[1] > 0]
            if not moves:
                break
            _, _, n, i = min(moves, key=lambda m: m[0] / m[1])
        elif macs < floor:
            moves = [(by[n].loss[i] - by[n].loss[i - 1], macs_of({**choice, n: i - 1}) - macs, n, i - 1)
                     for n, i in choice.items() if i > 0]
            moves = [m for m in moves if m[1] > 0 and macs + m[1] <= target]
            if not moves:
                break
            _, _, n, i = max(moves, key=lambda m: m[0] / m[1])
        else:
            break
        choice = {**choice, n: i}
    return choice


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


def least_noise_ilp(options: dict[str, list[tuple[float, float]]], limits: dict[str, tuple[dict[str, list[float]], float]],
                    time_limit: float = 60.0) -> dict[str, int] | None:
    """The multiple-choice knapsack of :func:`least_noise` under several budgets at once, as an
    integer linear programme: ``limits[name] = (cost[unit][option], limit)``, each a sum over the
    units that must stay ``<= limit`` (bytes, and MACs as each unit's change from the original).
    ``options`` gives the noise (its bytes are a cost only where ``limits`` names them). None if no
    assignment fits.

    Solved exactly by HiGHS through :func:`scipy.optimize.milp` (one binary per unit and option,
    one "exactly one option" row per unit, one row per budget): the dynamic programme of
    :func:`least_noise` handles one budget only, and a MAC budget beside a byte budget is two.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    names = list(options)
    offsets, count = {}, 0
    for n in names:
        offsets[n] = count
        count += len(options[n])
    if not names:
        return {}
    noise = np.zeros(count)
    for n in names:
        noise[offsets[n]:offsets[n] + len(options[n])] = [e for _, e in options[n]]
    one = np.zeros((len(names), count))
    for i, n in enumerate(names):
        one[i, offsets[n]:offsets[n] + len(options[n])] = 1
    rows, upper = [], []
    for cost, limit in limits.values():
        row = np.zeros(count)
        for n in names:
            row[offsets[n]:offsets[n] + len(options[n])] = cost[n]
        rows.append(row)
        upper.append(limit)
    constraints = [LinearConstraint(one, 1, 1)]
    if rows:
        # a relative slack of 1e-9 so that a limit met exactly is not lost to the solver's rounding
        constraints.append(LinearConstraint(np.array(rows), -np.inf, np.array(upper) + 1e-9 * np.abs(upper)))
    res = milp(noise, integrality=np.ones(count), bounds=Bounds(0, 1), constraints=constraints,
               options={"time_limit": time_limit})
    if res.x is None:
        return None
    out = {n: int(np.argmax(res.x[offsets[n]:offsets[n] + len(options[n])])) for n in names}
    for cost, limit in limits.values():  # the answer is held to the limits as given, not the solver's tolerance
        if sum(cost[n][i] for n, i in out.items()) > limit + 1e-6 * max(1.0, abs(limit)):
            return None
    return out
