"""Per-layer settings for a MAC target: cheap sensitivity curves and a Lagrangian allocation.

Not a technique itself: the search that MAC-reducing techniques (SVD, channel pruning) share.

1. **Sensitivity curves.** Each unit (a layer for SVD, a channel group for channel pruning) is
   compressed alone at a few levels, and the model's output on a small batch of sampled inputs
   is compared with the original output (normalised mean squared error). No accuracy
   evaluation is run: the cost grows with units x levels only in forward passes over a few
   hundred inputs. Measurements run serially, on a local process pool, or on Ray, and are
   cached on disk by a hash of the weights, the inputs and the settings, so a second run with
   the same model is instant.
2. **Allocation.** Minimise the summed predicted loss subject to the MAC budget: a Lagrangian
   relaxation ``min sum_u loss_u(s_u) + lambda * MACs(s)``, solved by coordinate descent for
   fixed ``lambda`` (the MAC count need not be separable: pruning a channel group shrinks its
   producers and consumers), with ``lambda`` bisected to the largest MAC count within budget,
   then a repair pass that moves single units to land in ``[target - tolerance, target]``.
   Curves measured at a few levels are interpolated to every level (every channel count, every
   rank), which is what lets the result hit the target exactly.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nnshrink.cache import atomic_write_bytes, cache_dir, code_fingerprint
from nnshrink.errors import ConfigError
from nnshrink.graph.analysis import analyze
from nnshrink.progress import progress_bar
from nnshrink.techniques.calibration import calibration_inputs

EXECUTORS = ("serial", "process", "ray")


@dataclass
class Unit:
    """One independently compressible thing and its options.

    Attributes:
        name: Layer name or group label.
        levels: The settings, from no compression (index 0) to the most.
        loss: Predicted loss at each level (0 at index 0).
    """

    name: str
    levels: list
    loss: list[float]


def check_target_options(kind: str, mac_ratio: float, tolerance: float, executor: str, samples: int,
                         measured_levels: int) -> None:
    """Validate the options every MAC-target step shares; raises ConfigError naming the option."""
    if not 0 < mac_ratio <= 1:
        raise ConfigError(f"{kind}.mac_ratio must be in (0, 1], got {mac_ratio}")
    if not 0 < tolerance < mac_ratio:
        raise ConfigError(f"{kind}.tolerance must be in (0, mac_ratio), got {tolerance}")
    if executor not in EXECUTORS:
        raise ConfigError(f"{kind}.executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if samples < 1 or measured_levels < 2:
        raise ConfigError(f"{kind}.samples must be >= 1 and measured_levels >= 2, got {samples} and {measured_levels}")


def output_loss(reference: torch.Tensor, out: torch.Tensor) -> float:
    """Normalised mean squared error of an output against the original one."""
    return float(((out - reference) ** 2).mean() / (reference ** 2).mean().clamp_min(1e-12))


def interpolate(measured: dict[int, float], count: int) -> list[float]:
    """Loss at every level ``0..count-1`` from losses measured at some (linear between them)."""
    xs = sorted(measured)
    return list(np.interp(np.arange(count), xs, [measured[x] for x in xs]))


def _fingerprint(model: nn.Module, x: torch.Tensor, extra: object) -> str:
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    h.update(x.detach().cpu().contiguous().numpy().tobytes())
    h.update(json.dumps(extra, sort_keys=True, default=str).encode())
    return h.hexdigest()[:32]


# The measurement function runs in worker processes: it gets everything it needs as arguments.
_WORKER: dict = {}


def _init_worker(model: nn.Module, x: torch.Tensor, reference: torch.Tensor) -> None:
    torch.set_num_threads(1)
    _WORKER.update(model=model, x=x, reference=reference)


def _run_task(task) -> float:
    fn, unit, level = task
    return fn(_WORKER["model"], _WORKER["x"], _WORKER["reference"], unit, level)


def measure_curves(model: nn.Module, x: torch.Tensor, tasks: Sequence[tuple[str, int]],
                   fn: Callable[[nn.Module, torch.Tensor, torch.Tensor, str, int], float],
                   key: object, executor: str = "process", workers: int | None = None,
                   show_progress: bool = True) -> dict[tuple[str, int], float]:
    """Loss of each ``(unit, level)`` task: ``fn(model, x, reference_output, unit, level)``.

    ``fn`` must not change ``model`` (it compresses a copy) and, for the process pool and Ray,
    must be a module-level function. Results are cached under the cache folder by a hash of the
    weights, ``x`` and ``key``.
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    model = model.eval()
    with torch.no_grad():
        reference = model(x)
    code = code_fingerprint(sys.modules[__name__], sys.modules[fn.__module__])
    path = cache_dir() / "sensitivity" / f"{_fingerprint(model, x, [key, fn.__module__, fn.__name__, code])}.json"
    done: dict[tuple[str, int], float] = {}
    if path.is_file():
        try:
            done = {(u, int(lv)): float(v) for u, lv, v in json.loads(path.read_text())}
        except (ValueError, TypeError):  # a damaged cache file is measured again
            done = {}
    todo = [t for t in tasks if t not in done]
    if todo:
        with progress_bar("sensitivity", len(todo), show_progress) as advance:
            if executor == "serial" or len(todo) < 4:
                for unit, level in todo:
                    done[(unit, level)] = fn(model, x, reference, unit, level)
                    advance(1)
            elif executor == "process":
                done.update(_process_pool(model, x, reference, todo, fn, workers, advance))
            else:
                done.update(_ray(model, x, reference, todo, fn, advance))
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps([[u, lv, v] for (u, lv), v in done.items()]).encode())
    return {t: done[t] for t in tasks}


def _process_pool(model, x, reference, todo, fn, workers, advance) -> dict:
    import concurrent.futures as cf
    import multiprocessing as mp

    workers = workers or max(1, min(len(todo), os.cpu_count() or 1))
    out = {}
    # fork where there is one: spawn re-imports the user's main script (which may not guard
    # itself with ``if __name__ == "__main__"``); the workers run torch single-threaded, which
    # keeps them off the OpenMP pool inherited from the parent
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with cf.ProcessPoolExecutor(workers, mp.get_context(method), initializer=_init_worker,
                                initargs=(model, x, reference)) as pool:
        futures = {pool.submit(_run_task, (fn, u, lv)): (u, lv) for u, lv in todo}
        for fut in cf.as_completed(futures):
            out[futures[fut]] = fut.result()
            advance(1)
    return out


def _ray(model, x, reference, todo, fn, advance) -> dict:
    try:
        import ray
    except ImportError as exc:
        raise ConfigError("executor 'ray' needs Ray: pip install 'nnshrink[ray]'") from exc
    if not ray.is_initialized():
        ray.init(address=os.environ.get("RAY_ADDRESS"), ignore_reinit_error=True, log_to_driver=False)
    refs = ray.put({"model": model, "x": x, "reference": reference})

    @ray.remote(num_cpus=1)
    def one(state, unit, level):
        torch.set_num_threads(1)
        return fn(state["model"], state["x"], state["reference"], unit, level)

    pending = {one.remote(refs, u, lv): (u, lv) for u, lv in todo}
    out = {}
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for r in ready:
            out[pending.pop(r)] = ray.get(r)
            advance(1)
    return out


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


def sample_inputs(ctx, samples: int) -> torch.Tensor:
    """Up to ``samples`` inputs from the context's calibration data (or its example input)."""
    if ctx.calib is None:
        return ctx.example_input
    return torch.cat(calibration_inputs(ctx.calib, samples, "sampling activations"))


def target_macs(ctx, model: nn.Module, x: torch.Tensor, ratio: float, tolerance: float) -> tuple[int, int, int]:
    """(MACs of the plan's original model, budget, floor) for a MAC ratio of the original."""
    base = analyze(ctx.original if ctx.original is not None else model, x[:1]).total_macs
    return base, int(ratio * base), int((ratio - tolerance) * base)
