"""Per-layer sensitivity to pruning and weight sharing, and per-layer settings from it.

Each layer is compressed alone, one-shot (no retraining), at every candidate setting, and the
model is evaluated on validation data: the accuracy a layer keeps says how far it can be pushed.
:func:`allocate` turns a tolerated one-shot drop into per-layer sparsities and codebook sizes;
sweeping that tolerance gives per-layer plans whose retrained results form a frontier.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from nnshrink.plan import Plan
from nnshrink.plan.config import glob_escape
from nnshrink.search.engine import measure_curves
from nnshrink.techniques import ShareWeights, Sparsify, magnitude_masks, share_weights
from nnshrink.techniques.sparsity import prunable_layers


@dataclass(frozen=True)
class Sensitivity:
    """Validation accuracy with one layer compressed at a time.

    Attributes:
        baseline: Accuracy of the untouched model.
        sparsity: layer -> {sparsity: accuracy} with only that layer pruned.
        bits: layer -> {bits: accuracy} with only that layer's weights shared.
    """

    baseline: float
    sparsity: dict[str, dict[float, float]]
    bits: dict[str, dict[int, float]]

    def to_dict(self) -> dict:
        return {"baseline": self.baseline,
                "sparsity": {n: {str(k): v for k, v in d.items()} for n, d in self.sparsity.items()},
                "bits": {n: {str(k): v for k, v in d.items()} for n, d in self.bits.items()}}


_BITS = 10_000  # a codebook size's level is this plus its bits; a sparsity's is its thousandths


def _accuracy(model: nn.Module, x, reference, unit: str, level: int,
              evaluate: Callable[[nn.Module], float]) -> float:
    """The metric with layer ``unit`` alone pruned (level: thousandths of sparsity) or shared
    (level: ``_BITS`` + bits), one-shot; the model is restored."""
    layer = model.get_submodule(unit)
    original = layer.weight.detach().clone()
    if level >= _BITS:
        shared = copy.deepcopy(layer)
        share_weights(shared, level - _BITS)
        weight = shared.weight.detach()
    else:
        weight = original * magnitude_masks({unit: layer}, {unit: level / 1000}, "layer")[unit]
    with torch.no_grad():
        layer.weight.copy_(weight)
    try:
        return evaluate(model)
    finally:
        with torch.no_grad():
            layer.weight.copy_(original)


def layer_sensitivity(model: nn.Module, evaluate: Callable[[nn.Module], float],
                      sparsities: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98),
                      bits: tuple[int, ...] = (2, 3, 4, 5), exclude: tuple[str, ...] = (),
                      show_progress: bool = True) -> Sensitivity:
    """Measure every Conv/Linear layer alone at each sparsity and codebook size (one-shot).

    The measurements run on the decision engine (:func:`nnshrink.search.engine.measure_curves`),
    serially and uncached: the metric is the user's, over data the cache cannot hash. The model
    is restored after each measurement; it is never left changed.
    """
    layers = prunable_layers(model, exclude)
    baseline = evaluate(model)
    tasks = [(n, int(round(s * 1000))) for n in layers for s in sparsities] + \
        [(n, _BITS + b) for n in layers for b in bits]
    got = measure_curves(model, None, tasks, functools.partial(_accuracy, evaluate=evaluate), None, "serial",
                         show_progress=show_progress, cache=False, description="layer sensitivity")
    by_sparsity = {n: {s: got[(n, int(round(s * 1000)))] for s in sparsities} for n in layers}
    by_bits = {n: {b: got[(n, _BITS + b)] for b in bits} for n in layers}
    return Sensitivity(baseline, by_sparsity, by_bits)


def allocate(sens: Sensitivity, max_drop: float) -> tuple[dict[str, float], dict[str, int]]:
    """Per layer, the highest sparsity and the fewest bits whose one-shot drop is ``<= max_drop``.

    Settings are walked from the mildest: a layer gets the last one before the first that drops
    more (a lucky spike further on is not trusted). A layer whose mildest setting already drops
    more is left dense (sparsity 0) or gets the most bits measured.
    """
    def walk(curve: dict, keys: list):
        chosen = None
        for k in keys:
            if sens.baseline - curve[k] > max_drop:
                break
            chosen = k
        return chosen

    sparsity = {n: walk(d, sorted(d)) or 0.0 for n, d in sens.sparsity.items()}
    bits = {n: walk(d, sorted(d, reverse=True)) or max(d) for n, d in sens.bits.items()}
    return sparsity, bits


def per_layer_plan(sens: Sensitivity, max_drop: float, prune_steps: int = 800, share_steps: int = 300) -> Plan:
    """Prune and share with per-layer settings from :func:`allocate`, retraining after each."""
    sparsity, bits = allocate(sens, max_drop)
    return Plan([
        Sparsify(sparsity=0.0, steps=prune_steps, layers={glob_escape(n): {"sparsity": s} for n, s in sparsity.items()}),
        ShareWeights(bits=max(bits.values()), steps=share_steps, layers={glob_escape(n): {"bits": b} for n, b in bits.items()}),
    ])
