"""Plans: ordered lists of steps, each a ``model -> model`` transform with a small config.

Later techniques (SVD, channel pruning, sparsity, quantization, ASTC) plug in as more
:class:`StepConfig` subclasses; the plan, the YAML format and :func:`compress` stay the same.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import nn

from nnshrink.errors import ConfigError
from nnshrink.plan.config import (PLAN_VERSION, READABLE_PLAN_VERSIONS, SKIP, StepConfig, StepResult, match_layers,
                                  registered_steps, step_from_dict)
from nnshrink.plan.steps import FineTune, FoldBatchNorm


@dataclass(frozen=True)
class Plan:
    """An ordered list of steps."""

    steps: tuple[StepConfig, ...]

    def __init__(self, steps: Sequence[StepConfig]) -> None:
        steps = tuple(steps)
        for s in steps:
            if not isinstance(s, StepConfig):
                raise ConfigError(f"a plan holds step configs, got {type(s).__name__}")
        object.__setattr__(self, "steps", steps)

    @classmethod
    def from_dict(cls, data: object, where: str = "plan") -> Plan:
        if not isinstance(data, dict):
            raise ConfigError(f"{where}: a plan is a mapping with 'version' and 'steps'")
        unknown = sorted(set(data) - {"version", "steps", "description"})
        if unknown:
            raise ConfigError(f"{where}: unknown key(s) {', '.join(map(repr, unknown))}; "
                              "a plan has 'version', 'steps' and an optional 'description'")
        version = data.get("version")
        if version not in READABLE_PLAN_VERSIONS or isinstance(version, bool):
            raise ConfigError(f"{where}: plan version {version!r} is not supported; this nnshrink reads "
                              f"versions {', '.join(map(str, READABLE_PLAN_VERSIONS))}")
        steps = data.get("steps")
        if not isinstance(steps, list):
            raise ConfigError(f"{where}: 'steps' must be a list of steps")
        return cls([step_from_dict(s, f"{where}, step {i + 1}", version) for i, s in enumerate(steps)])

    @classmethod
    def from_yaml(cls, path: str | Path) -> Plan:
        """Read a plan file (YAML); errors name the file and the step."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no such plan file: {path}")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
        return cls.from_dict(data, str(path))

    def to_dict(self) -> dict:
        return {"version": PLAN_VERSION, "steps": [s.to_dict() for s in self.steps]}


@dataclass
class Context:
    """What steps may use besides the model.

    Attributes:
        example_input: An input the model accepts (batch first).
        evaluate: ``evaluate(model) -> float``, higher is better, on validation data.
        train: ``train(model, steps) -> model``, for steps that fine-tune.
        calib: Batches of inputs for calibration and sampling activations.
        original: The model the plan started from (MAC targets are ratios of its MACs).
    """

    example_input: torch.Tensor
    evaluate: Callable[[nn.Module], float] | None = None
    train: Callable[[nn.Module, int], nn.Module] | None = None
    calib: object | None = None
    original: nn.Module | None = None


@dataclass
class CompressResult:
    """The compressed model and what each step did."""

    model: nn.Module
    steps: list[StepResult] = field(default_factory=list)


def compress(model: nn.Module, plan: Plan, example_input: torch.Tensor,
             evaluate: Callable[[nn.Module], float] | None = None,
             train: Callable[[nn.Module, int], nn.Module] | None = None,
             calib: object | None = None) -> CompressResult:
    """Run ``plan`` on a copy of ``model``; the input model is never changed.

    Args:
        model: A torch module, or a model imported by :func:`nnshrink.load_model`.
        plan: The steps, in order (``Plan([...])`` or ``Plan.from_yaml(path)``).
        example_input: One input the model accepts, batch first; its shape is recorded on the
            result (``input_shape``) where the model had no fixed one, so ``ns.save`` and
            ``ns.export_onnx`` need no second example.
        evaluate: ``evaluate(model) -> float``, higher is better, on validation data: steps that
            choose between candidates score them with it.
        train: ``train(model, steps) -> model``, for steps that fine-tune or retrain.
        calib: Inputs for calibration and for the activations that sensitivity curves and
            reconstruction sample: a tensor, a list of tensors or of ``(input, target)`` tuples
            (batches may differ in shape), a DataLoader, or a callable returning one of these.

    Returns:
        The compressed model (``.model``) and each step's result (``.steps``: details and the
        layers it left alone, with the reason).

    Raises:
        ConfigError: A step needs something that was not given (``calib``, ``train``), or a
            setting does not fit the model.
    """
    from nnshrink.data.calib import as_source

    current = copy.deepcopy(model).eval()
    ctx = Context(example_input, evaluate, train, as_source(calib), copy.deepcopy(current))
    results = []
    for step in plan.steps:
        result = step.apply(current, ctx)
        current = result.model
        results.append(result)
    shape = getattr(current, "input_shape", None)
    if not shape or not all(isinstance(d, int) for d in shape):
        current.input_shape = tuple(example_input.shape[1:])
    return CompressResult(current.eval(), results)


__all__ = ["SKIP", "CompressResult", "Context", "FineTune", "FoldBatchNorm", "PLAN_VERSION", "Plan", "match_layers",
           "StepConfig", "StepResult", "compress", "registered_steps"]
