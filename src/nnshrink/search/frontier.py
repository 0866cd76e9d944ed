"""Sweeps over compression plans, measured from the containers they write.

Every point's size is the byte count of a real ``.nsz`` file; its accuracy is measured on the
model read back from that file. The selection (:func:`smallest_within`) uses the validation
accuracy; the test accuracy is only reported.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from nnshrink.io import load, save
from nnshrink.plan import Plan, compress
from nnshrink.progress import progress_bar


@dataclass(frozen=True)
class Point:
    """One configuration: its label, plan, container bytes and accuracies."""

    label: str
    plan: dict
    bytes: int
    val_accuracy: float
    test_accuracy: float | None

    def to_dict(self) -> dict:
        return asdict(self)


def sweep(model: nn.Module, plans: dict[str, Plan], example_input: torch.Tensor,
          evaluate: Callable[[nn.Module], float], test: Callable[[nn.Module], float] | None = None,
          train: Callable[[nn.Module, int], nn.Module] | None = None, show_progress: bool = True) -> list[Point]:
    """Run each plan on a copy of ``model``, write its container, and measure it.

    Args:
        model: The float model (never changed).
        plans: Label -> plan.
        example_input: An input the model accepts (batch first).
        evaluate: Validation accuracy, used for selection.
        test: Held-out accuracy, only reported.
        train: ``train(model, steps)`` for plans that fine-tune.
    """
    points = []
    with tempfile.TemporaryDirectory() as tmp, progress_bar("sweeping plans", len(plans), show_progress) as advance:
        for i, (label, plan) in enumerate(plans.items()):
            result = compress(model, plan, example_input, evaluate=evaluate, train=train)
            path = Path(tmp) / f"point{i}.nsz"
            save(result.model, path, example_input.repeat(2, *([1] * (example_input.dim() - 1))))
            written = load(path)
            points.append(Point(label, plan.to_dict(), path.stat().st_size, evaluate(written),
                                test(written) if test else None))
            advance(1)
    return points


def pareto(points: list[Point], accuracy: str = "val_accuracy") -> list[Point]:
    """The points no other point beats on both size and ``accuracy`` (a field name), smallest first."""
    def acc(p: Point) -> float:
        return getattr(p, accuracy)

    front = [p for p in points
             if not any(q.bytes <= p.bytes and acc(q) >= acc(p) and (q.bytes < p.bytes or acc(q) > acc(p))
                        for q in points)]
    return sorted(front, key=lambda p: p.bytes)


def smallest_within(points: list[Point], baseline_accuracy: float, max_drop: float) -> Point | None:
    """The smallest point whose validation accuracy is at least ``baseline - max_drop``."""
    ok = [p for p in points if p.val_accuracy >= baseline_accuracy - max_drop]
    return min(ok, key=lambda p: p.bytes) if ok else None
