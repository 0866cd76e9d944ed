"""Per-layer sensitivity to pruning and weight sharing, and per-layer settings from it.

Each layer is compressed alone, one-shot (no retraining), at every candidate setting, and the
model is evaluated on validation data: the accuracy a layer keeps says how far it can be pushed.
:func:`allocate` turns a tolerated one-shot drop into per-layer sparsities and codebook sizes;
sweeping that tolerance gives per-layer plans whose retrained results form a frontier.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from nnshrink.plan import Plan
from nnshrink.plan.config import glob_escape
from nnshrink.progress import progress_bar
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


def layer_sensitivity(model: nn.Module, evaluate: Callable[[nn.Module], float],
                      sparsities: tuple[float, ...] = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98),
                      bits: tuple[int, ...] = (2, 3, 4, 5), exclude: tuple[str, ...] = (),
                      show_progress: bool = True) -> Sensitivity:
    """Measure every Conv/Linear layer alone at each sparsity and codebook size (one-shot).

    The model is restored after each measurement; it is never left changed.
    """
    layers = prunable_layers(model, exclude)
    baseline = evaluate(model)
    by_sparsity: dict[str, dict[float, float]] = {}
    by_bits: dict[str, dict[int, float]] = {}
    total = len(layers) * (len(sparsities) + len(bits))
    with progress_bar("layer sensitivity", total, show_progress) as advance:
        for name, layer in layers.items():
            original = layer.weight.detach().clone()

            def measure(weight: torch.Tensor) -> float:
                with torch.no_grad():
                    layer.weight.copy_(weight)
                try:
                    return evaluate(model)
                finally:
                    with torch.no_grad():
                        layer.weight.copy_(original)

            by_sparsity[name] = {}
            for s in sparsities:
                mask = magnitude_masks({name: layer}, {name: s}, "layer")[name]
                by_sparsity[name][s] = measure(original * mask)
                advance(1)
            by_bits[name] = {}
            for b in bits:
                shared = copy.deepcopy(layer)
                share_weights(shared, b)
                by_bits[name][b] = measure(shared.weight.detach())
                advance(1)
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
