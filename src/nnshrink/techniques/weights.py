"""Weight-only quantization: symmetric, per output channel or per group of input columns.

The quantized layer keeps float weights equal to ``q * scale`` (exactly, in float32), so it runs
anywhere, and carries a record with the integers and scales (:class:`WeightQuant` per channel,
:class:`GroupQuant` per group), which the container stores as an entropy-coded integer stream
plus scales. The full quantization story (activations, calibration, CLE, AdaRound, QAT, QDQ
export) builds on this record.

Scales are min-max or MSE-optimal (the clipping of each channel or group that minimizes its
squared rounding error, searched on a grid). Rounding is to nearest, or GPTQ (Frantar et al.,
2022: columns quantized in order, each one's rounding error spread over the columns not yet
quantized through the inverse Hessian ``(X^T X)^-1`` of the layer's inputs), which needs only
unlabelled calibration inputs and is what makes 3-4 bit weights hold without retraining.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from nnshrink.errors import ConfigError, UnsupportedModelError
from nnshrink.graph.analysis import is_compressible
from nnshrink.graph.surgery import fold_batchnorms
from nnshrink.plan.config import SKIP, StepConfig, StepResult
from nnshrink.techniques.calibration import calibration_inputs, inverse_hessian_factor, layer_hessians
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


@register
@dataclass(frozen=True)
class GroupQuant:
    """Integer form of a weight with one scale per group of input columns: the weight viewed as
    ``(out, columns)`` (a conv's ``in x kh x kw`` flattened) is ``q * scale`` with ``scale`` of
    shape ``(out, ceil(columns / group_size))``, each scale shared by ``group_size`` consecutive
    columns (the last group may be shorter)."""

    q: np.ndarray
    scale: np.ndarray
    group_size: int
    bits: int

    kind: ClassVar[str] = "grouped"

    def dequantize(self) -> np.ndarray:
        q = self.q.reshape(self.q.shape[0], -1).astype(np.float32)
        return (q * _per_column(self.scale, self.group_size, q.shape[1])).reshape(self.q.shape).astype(np.float32)

    def to_parts(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {"bits": self.bits, "group_size": self.group_size}, {"q": self.q, "scale": self.scale.astype(np.float32)}

    @classmethod
    def from_parts(cls, fields: dict, arrays: dict[str, np.ndarray]) -> GroupQuant:
        q, scale, g = arrays["q"], arrays["scale"], int(fields["group_size"])
        cols = int(np.prod(q.shape[1:])) if q.ndim > 1 else 1
        if g < 1 or scale.shape != (q.shape[0], -(-cols // g)):
            raise ValueError(f"scales of shape {scale.shape} do not fit integers of shape {q.shape} in groups of {g}")
        return cls(q, scale.astype(np.float32), g, int(fields["bits"]))


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


SCALES = ("minmax", "mse")
ROUNDINGS = ("nearest", "gptq")
_MSE_GRID = np.linspace(0.35, 1.0, 66)  # clipping ratios searched for MSE-optimal scales


def _per_column(scale: np.ndarray, group: int, cols: int) -> np.ndarray:
    """``(out, groups)`` scales repeated over each group's columns: ``(out, cols)``."""
    return np.repeat(scale, group, axis=1)[:, :cols]


def group_scales(w2d: np.ndarray, bits: int, group: int, method: str = "minmax") -> np.ndarray:
    """Symmetric scales of ``w2d`` (``(out, columns)``), one per row and group of ``group``
    columns (the last may be shorter): ``(out, ceil(columns / group))``; ``mse`` picks per group
    the clipping ratio of the absolute maximum that minimizes the squared rounding error."""
    qmax = 2 ** (bits - 1) - 1
    out, cols = w2d.shape
    n = -(-cols // group)
    padded = np.zeros((out, n * group), np.float64)  # zero columns change no maximum and no error
    padded[:, :cols] = w2d
    g = padded.reshape(out, n, group)
    amax = np.abs(g).max(axis=2)
    if method == "minmax":
        best = amax / qmax
    else:
        best, err = amax / qmax, np.full(amax.shape, np.inf)
        for ratio in _MSE_GRID:
            sc = np.where(amax > 0, ratio * amax / qmax, 1.0)
            e = ((np.clip(np.round(g / sc[..., None]), -qmax, qmax) * sc[..., None] - g) ** 2).sum(axis=2)
            better = e < err
            best, err = np.where(better, sc, best), np.where(better, e, err)
    return np.where(amax > 0, best, 1.0).astype(np.float32)


def _columns(w: np.ndarray) -> np.ndarray:
    return w.reshape(w.shape[0], -1)


def quantize_layer(layer: nn.Module, bits: int, scales: str = "minmax", group_size: int = 0,
                   hessian: torch.Tensor | None = None, damp: float = 0.01) -> WeightQuant | GroupQuant:
    """Quantize ``layer.weight`` (Conv/Linear) in place: symmetric, per output channel
    (``group_size`` 0) or per group of input columns, min-max or MSE scales, nearest rounding or,
    with ``hessian`` (``X^T X`` of the layer's input columns), GPTQ. Returns the record."""
    w = layer.weight.detach().cpu().numpy().astype(np.float32)
    w2d = _columns(w)
    out, cols = w2d.shape
    group = group_size or cols
    qmax = 2 ** (bits - 1) - 1
    if hessian is None:
        sc = group_scales(w2d, bits, group, scales)
        q = np.clip(np.round(w2d / _per_column(sc, group, cols)), -qmax, qmax)
    else:
        q, sc = _gptq(w2d, hessian, bits, group, scales, damp)
    q = q.astype(np.int8).reshape(w.shape)
    if group_size:
        return attach(layer, GroupQuant(q, sc.astype(np.float32), group, bits))
    return attach(layer, WeightQuant(q, sc.reshape(-1).astype(np.float32), 0, bits, 0))


def _gptq(w2d: np.ndarray, hessian: torch.Tensor, bits: int, group: int, scales: str, damp: float):
    """GPTQ's column-by-column rounding with error feedback through the inverse Hessian's
    Cholesky factor (the paper's Algorithm 1, unblocked: our layers have at most a few
    thousand columns). Group scales are chosen from the columns as updated so far."""
    qmax = 2 ** (bits - 1) - 1
    W = torch.from_numpy(w2d.astype(np.float64)).clone()
    U = inverse_hessian_factor(hessian, W, damp)
    if U is None:  # not positive definite even damped: plain rounding
        sc = group_scales(w2d, bits, group, scales)
        return np.clip(np.round(w2d / _per_column(sc, group, w2d.shape[1])), -qmax, qmax), sc
    out, cols = W.shape
    Q = torch.zeros_like(W)
    S = torch.zeros(out, -(-cols // group), dtype=W.dtype)
    for i in range(cols):
        if i % group == 0:
            block = W[:, i:i + group].numpy()
            S[:, i // group] = torch.from_numpy(group_scales(block, bits, block.shape[1], scales)[:, 0]).double()
        s_col = S[:, i // group]
        q = torch.clamp(torch.round(W[:, i] / s_col), -qmax, qmax)
        Q[:, i] = q
        err = (W[:, i] - q * s_col) / U[i, i]
        W[:, i + 1:] -= err[:, None] * U[i, i + 1:][None, :]
    return Q.numpy(), S.float().numpy()


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
    """Weight-only quantization of every Conv/Linear layer (and ConvTranspose, LSTM/GRU
    matrices per channel), batch norms folded first.

    Attributes:
        bits: Bit width, 2 to 8.
        layers: Per-layer rules (first matching pattern wins): ``skip`` leaves a layer float;
            ``{"bits": 4}`` gives it its own width. Version-1 plans' ``exclude`` is read into it.
        scales: ``minmax`` or ``mse`` (the clipping that minimizes each channel's or group's
            squared rounding error).
        rounding: ``nearest`` or ``gptq`` (error feedback through the inverse Hessian of the
            layer's calibration inputs; needs ``calib``, no labels).
        group_size: 0 for one scale per output channel, else one per this many input columns
            (the last group of a layer may be shorter).
        calib_samples: Calibration inputs for ``gptq``.
    """

    kind = "quantize_weights"
    bits: int = 8
    scales: str = "minmax"
    rounding: str = "nearest"
    group_size: int = 0
    calib_samples: int = 256

    layer_settings = {"bits": lambda v: None if isinstance(v, int) and not isinstance(v, bool) and 2 <= v <= 8
                      else "a whole number from 2 to 8"}
    legacy = {"exclude": lambda v: dict.fromkeys(v, SKIP)}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= self.bits <= 8:
            raise ConfigError(f"quantize_weights.bits must be from 2 to 8, got {self.bits}")
        if self.scales not in SCALES:
            raise ConfigError(f"quantize_weights.scales must be one of {', '.join(SCALES)}, got {self.scales!r}")
        if self.rounding not in ROUNDINGS:
            raise ConfigError(f"quantize_weights.rounding must be one of {', '.join(ROUNDINGS)}, got {self.rounding!r}")
        if self.group_size < 0 or self.calib_samples < 1:
            raise ConfigError("quantize_weights.group_size must be 0 (per channel) or more, calib_samples at least 1")

    def apply(self, model: nn.Module, ctx) -> StepResult:
        try:
            new, folded = fold_batchnorms(model)
        except UnsupportedModelError:  # untraceable: batch norms stay, layers are quantized alone
            new, folded = copy.deepcopy(model), []
        plain = self.scales == "minmax" and self.rounding == "nearest" and not self.group_size
        targets, layers, skipped = {}, {}, []
        owners = [n for n, m in new.named_modules() if weight_params(m)]
        rules = self.layer_rules(owners, "layer with weights")
        bits_of = {n: r.get("bits", self.bits) if isinstance(r, dict) else self.bits for n, r in rules.items()}
        for name, module in new.named_modules():
            params = weight_params(module)
            if not params:
                continue
            if rules.get(name) == SKIP:
                skipped.append({"layer": name, "reason": "skipped by the plan's layer rules"})
                continue
            bits = bits_of.get(name, self.bits)
            # per-channel min-max with nearest rounding stays quantize_weights' arithmetic (float32
            # throughout), so the int8 containers written before these options are reproduced
            if plain or not is_compressible(module) or getattr(module, "groups", 1) != 1:
                why = None if plain else ("not a Conv/Linear" if not is_compressible(module) else "grouped conv")
                records = [quantize_weights(module, bits, p, axis) for p, axis in params]
                layers[name] = {"bits": bits, "distinct_values": max(int(np.unique(r.q).size) for r in records)}
                if why:
                    layers[name]["method"] = f"per-channel min-max, nearest ({why})"
                if len(params) > 1:
                    layers[name]["params"] = [p for p, _ in params]
                continue
            targets[name] = module
        hessians = {}
        if targets and self.rounding == "gptq":
            hessians = layer_hessians(new, targets, calibration_inputs(ctx.calib, self.calib_samples,
                                                                       "quantize_weights with rounding gptq"))
        for name, module in targets.items():
            bits = bits_of.get(name, self.bits)
            record = quantize_layer(module, bits, self.scales, self.group_size, hessians.get(name))
            layers[name] = {"bits": bits, "distinct_values": int(np.unique(record.q).size),
                            "method": f"{'per-group ' + str(self.group_size) if self.group_size else 'per-channel'} "
                                      f"{self.scales}, {self.rounding}"}
        return StepResult(self.kind, new, {"layers": layers, "folded": [list(p) for p in folded]}, skipped)
