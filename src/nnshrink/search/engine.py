"""The decision engine's measuring half: units, settings, measurements, one cache, one executor.

Every per-layer search in nnshrink (ranks and channels for a MAC target, pruning, sharing and bit
widths for a byte budget, ASTC footprints) asks the same question: how much does the model's
output change when one unit (a layer, or a channel group) alone takes one setting? This module
answers it once for all of them:

- a **measurement** is ``fn(model, x, reference_output, unit, level) -> float``: compress a copy of
  the model at one setting and score it (normalised output error on sampled inputs by default,
  the user's metric where a caller passes one), never changing the model;
- the **cache** is one JSON file per (weights, inputs, settings key, measuring code) under
  :func:`nnshrink.cache.cache_dir`, written as results arrive, so an interrupted search resumes
  without measuring again and a second run of the same search measures nothing;
- the **executor** runs the missing measurements serially, on a local process pool, or on Ray.

The choosing half (Lagrangian allocation for a MAC target, the multiple-choice knapsack for a byte
budget) is :mod:`nnshrink.search.solvers`. Neither imports a technique, so techniques use them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nnshrink.cache import atomic_write_bytes, cache_dir, code_fingerprint
from nnshrink.errors import ConfigError
from nnshrink.progress import progress_bar

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


def output_loss(reference, out) -> float:
    """Normalised mean squared error of an output against the original one; of several outputs
    (a tuple, list or dict of tensors, as a detector's scores and boxes), the mean of each one's,
    so an output on a large scale does not drown the others."""
    if isinstance(reference, dict):
        reference, out = list(reference.values()), list(out.values())
    if isinstance(reference, (tuple, list)):
        return float(sum(output_loss(r, o) for r, o in zip(reference, out)) / max(1, len(reference)))
    return float(((out - reference) ** 2).mean() / (reference ** 2).mean().clamp_min(1e-12))


def output_rows(output, rows: slice):
    """``output[rows]`` along the batch axis, for a tensor or a tuple, list or dict of them."""
    if isinstance(output, dict):
        return {k: v[rows] for k, v in output.items()}
    if isinstance(output, (tuple, list)):
        return type(output)(v[rows] for v in output)
    return output[rows]


def sensitivity_table(measure: str, settings: list[str], values: dict[str, list],
                      labels: dict[str, list[str]] | None = None) -> dict:
    """A per-layer sensitivity table for a step's details (and the report's heatmap): one row per
    unit, one column per setting (mildest first), each cell what was measured (None: not measured
    there). ``labels`` names the setting of each cell where a column means a different setting per
    unit (the measured ranks or channel counts)."""
    table = {"measure": measure, "settings": list(settings),
             "layers": {n: [None if v is None else float(f"{float(v):.6g}") for v in vs] for n, vs in values.items()}}
    if labels:
        table["labels"] = {n: list(v) for n, v in labels.items()}
    return table


def level_table(measure: str, losses: dict[tuple[str, int], float], levels: dict[str, list],
                fraction: dict[str, float], noun: str) -> dict:
    """:func:`sensitivity_table` of measured ``losses[(unit, setting)]`` where each unit has its own
    settings (``levels``, mildest first) out of ``fraction[unit]`` (its full rank or channels):
    column ``j`` is each unit's ``j``-th measured setting, titled by the mean fraction kept."""
    picked = {n: [lv for lv in levels[n] if (n, lv) in losses] for n in levels}
    width = max((len(v) for v in picked.values()), default=0)
    values = {n: [losses[(n, lv)] for lv in v] + [None] * (width - len(v)) for n, v in picked.items()}
    labels = {n: [f"{noun} {lv}/{fraction[n]:g}" for lv in v] + [""] * (width - len(v)) for n, v in picked.items()}
    titles = []
    for j in range(width):
        kept = [lv / fraction[n] for n, v in picked.items() for lv in v[j:j + 1]]
        titles.append(f"~{np.mean(kept):.0%} kept" if kept else "")
    return sensitivity_table(measure, titles, values, labels)


def interpolate(measured: dict[int, float], count: int) -> list[float]:
    """Loss at every level ``0..count-1`` from losses measured at some (linear between them)."""
    xs = sorted(measured)
    return list(np.interp(np.arange(count), xs, [measured[x] for x in xs]))


def held_memo(store: dict, key: object, owners: tuple, compute):
    """``compute()``, remembered under ``key`` for as long as it is asked for with the very same
    ``owners`` (a model and its inputs). One entry a store: another key or other owners drop it.
    The entry holds its owners, so no later object can take their ids or memory (a cache keyed by
    ``id()`` or ``data_ptr()`` gave a new tensor an old tensor's Hessian when it reused its
    memory)."""
    entry = store.get(key)
    if entry is None or len(entry[0]) != len(owners) or any(a is not b for a, b in zip(entry[0], owners)):
        store.clear()
        store[key] = entry = (owners, compute())
    return entry[1]


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


def measure_curves(model: nn.Module, x: torch.Tensor | None, tasks: Sequence[tuple[str, int]],
                   fn: Callable[[nn.Module, torch.Tensor, torch.Tensor, str, int], float],
                   key: object, executor: str = "process", workers: int | None = None,
                   show_progress: bool = True, cache: bool = True,
                   description: str = "sensitivity", reference: bool = True) -> dict[tuple[str, int], float]:
    """Loss of each ``(unit, level)`` task: ``fn(model, x, reference_output, unit, level)``, a
    float or a list of floats (several figures of one setting measured at once).

    ``fn`` must not change ``model`` (it compresses a copy) and, for the process pool and Ray,
    must be a module-level function, or a :func:`functools.partial` of one whose bound arguments
    pickle (settings the measurement needs; ``key`` must then name them). Results are cached under the cache folder by a hash of the
    weights, ``x``, ``key`` and the code of this module and of ``fn``'s; the file is rewritten
    (atomically) as results arrive, at most every two seconds, so a search killed half-way
    resumes where it stopped. ``cache=False`` for a measurement the hash cannot see (a user's
    metric over data of its own); ``x`` None (no sampled inputs, no reference output: ``fn``
    gets None for both) for one that scores with such a metric alone, uncached. ``reference``
    False: ``fn`` compares with an output of its own, so the model's is not computed (None).
    """
    if executor not in EXECUTORS:
        raise ConfigError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if x is None and cache:
        raise ValueError("measure_curves without sampled inputs has nothing to key a cache by: pass cache=False")
    model = model.eval()
    with torch.no_grad():
        reference = model(x) if x is not None and reference else None
    path = None
    done: dict[tuple[str, int], float] = {}
    if cache:
        base = getattr(fn, "func", fn)  # a partial: the function it binds
        code = code_fingerprint(sys.modules[__name__], sys.modules[base.__module__])
        name = _fingerprint(model, x, [key, base.__module__, base.__name__, code])
        path = cache_dir() / "sensitivity" / f"{name}.json"
        if path.is_file():
            try:
                done = {(u, int(lv)): [float(e) for e in v] if isinstance(v, list) else float(v)
                        for u, lv, v in json.loads(path.read_text())}
            except (ValueError, TypeError):  # a damaged cache file is measured again
                done = {}
    todo = [t for t in tasks if t not in done]
    if todo:
        last = [time.monotonic()]

        def flush() -> None:
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(path, json.dumps([[u, lv, v] for (u, lv), v in done.items()]).encode())
            last[0] = time.monotonic()

        def record(task: tuple[str, int], value: float) -> None:
            done[task] = value
            if time.monotonic() - last[0] > 2.0:
                flush()

        with progress_bar(description, len(todo), show_progress) as advance:
            try:
                if executor == "serial" or len(todo) < 4:
                    for unit, level in todo:
                        record((unit, level), fn(model, x, reference, unit, level))
                        advance(1)
                elif executor == "process":
                    _process_pool(model, x, reference, todo, fn, workers, advance, record)
                else:
                    _ray(model, x, reference, todo, fn, advance, record)
            finally:  # what was measured before an interruption is kept
                flush()
    return {t: done[t] for t in tasks}


def _process_pool(model, x, reference, todo, fn, workers, advance, record) -> None:
    import concurrent.futures as cf
    import multiprocessing as mp

    workers = workers or max(1, min(len(todo), os.cpu_count() or 1))
    # fork where there is one: spawn re-imports the user's main script (which may not guard
    # itself with ``if __name__ == "__main__"``); the workers run torch single-threaded, which
    # keeps them off the OpenMP pool inherited from the parent
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    with cf.ProcessPoolExecutor(workers, mp.get_context(method), initializer=_init_worker,
                                initargs=(model, x, reference)) as pool:
        futures = {pool.submit(_run_task, (fn, u, lv)): (u, lv) for u, lv in todo}
        for fut in cf.as_completed(futures):
            record(futures[fut], fut.result())
            advance(1)


def _ray(model, x, reference, todo, fn, advance, record) -> None:
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
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1)
        for r in ready:
            record(pending.pop(r), ray.get(r))
            advance(1)


