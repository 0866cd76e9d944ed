"""Weight-only quantization: per-output-channel, symmetric, min-max scales.

The quantized layer keeps float weights equal to ``q * scale`` (exactly, in float32), so it runs
anywhere, and carries a :class:`WeightQuant` record with the integers and scales, which the
container stores as an entropy-coded integer stream plus scales. The full quantization story
(activations, calibration, CLE, AdaRound, QAT, QDQ export) builds on this record.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
from torch import nn

from nnshrink.errors import ConfigError, UnsupportedModelError
from nnshrink.graph.analysis import is_compressible
from nnshrink.graph.surgery import fold_batchnorms
from nnshrink.plan.config import StepConfig, StepResult
from nnshrink.techniques.records import attach, record_of, register

@register
@dataclass(frozen=True)
class WeightQuant:
    """Integer form of a layer's weight: ``weight == (q - zero_point) * scale`` along ``axis``.

    Attributes:
        q: Integer weights (int8 storage for up to 8 bits), same shape as the weight.
        scale: float32 scales, one per slice along ``axis``.
        zero_point: Integer offset (0 for symmetric quantization).
        bits: Bit width of the integers.
        axis: Axis of the per-channel scales (0: output channels).
    """

    q: np.ndarray
    scale: np.ndarray
    zero_point: int
    bits: int
    axis: int = 0

    kind: ClassVar[str] = "quantized"

    def dequantize(self) -> np.ndarray:
        shape = [1] * self.q.ndim
        shape[self.axis] = -1
        return ((self.q.astype(np.int32) - self.zero_point).astype(np.float32) * self.scale.reshape(shape)).astype(np.float32)

    def to_parts(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {"bits": self.bits, "axis": self.axis, "zero_point": self.zero_point}, \
            {"q": self.q, "scale": self.scale.astype(np.float32)}

    @classmethod
    def from_parts(cls, fields: dict, arrays: dict[str, np.ndarray]) -> WeightQuant:
        q, scale, axis = arrays["q"], arrays["scale"], int(fields["axis"])
        if not 0 <= axis < q.ndim or scale.shape != (q.shape[axis],):
            raise ValueError(f"{scale.size} scales do not fit integers of shape {q.shape} along axis {axis}")
        return cls(q, scale.astype(np.float32), int(fields["zero_point"]), int(fields["bits"]), axis)


def weight_quant(module: nn.Module) -> WeightQuant | None:
    """The :class:`WeightQuant` record of a quantized layer, if it has one and it still holds."""
    record = record_of(module)
    return record if isinstance(record, WeightQuant) else None


def quantize_weights(layer: nn.Module, bits: int, param: str = "weight", axis: int = 0) -> WeightQuant:
    """Quantize ``layer.<param>`` in place per slice along ``axis`` (output channels), symmetric;
    return the record."""
    w = getattr(layer, param).detach().cpu().numpy().astype(np.float32)
    qmax = 2 ** (bits - 1) - 1
    flat = np.abs(np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)).max(axis=1)
    scale = np.where(flat > 0, flat / qmax, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.round(w / scale.reshape(shape)), -qmax, qmax).astype(np.int8)
    return attach(layer, WeightQuant(q, scale, 0, bits, axis), param)


def weight_params(module: nn.Module) -> list[tuple[str, int]]:
    """The ``(parameter, output axis)`` pairs weight-only quantization stores as integers:
    ``weight`` of Conv/Linear (axis 0) and ConvTranspose (axis 1, its output channels), and the
    input and recurrent matrices of LSTM/GRU layers (per gate row)."""
    if is_compressible(module):
        return [("weight", 0)]
    if isinstance(module, nn.modules.conv._ConvTransposeNd):
        return [("weight", 1)]
    if isinstance(module, nn.RNNBase):
        return [(n, 0) for n, _ in module.named_parameters(recurse=False) if n.startswith("weight_")]
    return []


@dataclass(frozen=True)
class QuantizeWeights(StepConfig):
    """Weight-only quantization of every Conv/Linear layer (batch norms folded first).

    Attributes:
        bits: Bit width, 2 to 8.
        exclude: Layer names left in float.
    """

    kind = "quantize_weights"
    bits: int = 8
    exclude: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"quantize_weights.bits must be from 2 to 8, got {self.bits}")

    def apply(self, model: nn.Module, ctx) -> StepResult:
        try:
            new, folded = fold_batchnorms(model)
        except UnsupportedModelError:  # untraceable: batch norms stay, layers are quantized alone
            new, folded = copy.deepcopy(model), []
        layers, skipped = {}, []
        for name, module in new.named_modules():
            params = weight_params(module)
            if not params:
                continue
            if name in self.exclude:
                skipped.append({"layer": name, "reason": "excluded by the plan"})
                continue
            records = [quantize_weights(module, self.bits, p, axis) for p, axis in params]
            layers[name] = {"bits": self.bits,
                            "distinct_values": max(int(np.unique(r.q).size) for r in records)}
            if len(params) > 1:
                layers[name]["params"] = [p for p, _ in params]
        return StepResult(self.kind, new, {"layers": layers, "folded": [list(p) for p in folded]}, skipped)
