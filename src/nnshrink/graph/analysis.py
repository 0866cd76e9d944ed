"""Per-layer analysis: which layers can be compressed, their parameters, MACs and bytes.

MACs are counted from a real forward pass (forward hooks record each layer's output shape), so
what is counted is what runs: a layer called twice counts twice, a layer never called counts zero
and is reported as skipped.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from nnshrink.errors import InputShapeError

#: Schema name and version of :meth:`Analysis.to_dict`; bump the version on any breaking change.
ANALYSIS_SCHEMA = "nnshrink.analysis/1"

FLOAT32_BYTES = 4

_COMPRESSIBLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
_NORMALIZATION = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)


@dataclass(frozen=True)
class LayerInfo:
    """One compressible layer as measured in a forward pass.

    Attributes:
        name: Qualified module name (``features.0``).
        kind: ``linear``, ``conv1d``, ``conv2d``, ``conv2d-depthwise`` or ``conv2d-grouped``
            (likewise for conv1d).
        weight_shape: Shape of the weight tensor.
        params: Parameters of the layer (weight and bias).
        macs: Multiply-accumulates per sample, summed over all calls in the forward pass.
        bytes: Parameter bytes at float32.
        groups: Convolution groups (1 for linear layers).
        in_shape: Input shape of the first call, batch dimension removed.
        out_shape: Output shape of the first call, batch dimension removed.
        calls: How often the layer ran in the forward pass.
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    params: int
    macs: int
    bytes: int
    groups: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    calls: int


@dataclass(frozen=True)
class SkippedLayer:
    """A module holding parameters that nnshrink does not compress, with the reason."""

    name: str
    type: str
    params: int
    reason: str


@dataclass(frozen=True)
class Analysis:
    """Result of :func:`analyze`.

    Attributes:
        input_shape: Shape of the example input, batch dimension included.
        layers: Compressible layers in execution order.
        skipped: Modules with parameters that are not compressed, each with its reason.
        total_macs: MACs per sample of all compressible layers.
        total_params: Parameters of the whole model (every ``nn.Parameter``).
        total_bytes: ``total_params`` at float32.
        compressible_params: Parameters held by the compressible layers.
    """

    input_shape: tuple[int, ...]
    layers: tuple[LayerInfo, ...]
    skipped: tuple[SkippedLayer, ...]
    total_macs: int
    total_params: int
    total_bytes: int
    compressible_params: int = field(default=0)

    def layer(self, name: str) -> LayerInfo:
        """Return the layer called ``name``."""
        for info in self.layers:
            if info.name == name:
                return info
        raise KeyError(f"no compressible layer named {name!r}; known: {[i.name for i in self.layers]}")

    def to_dict(self) -> dict:
        """JSON-ready form following the documented schema ``nnshrink.analysis/1``."""
        return {
            "schema": ANALYSIS_SCHEMA,
            "input_shape": list(self.input_shape),
            "totals": {
                "macs": self.total_macs,
                "params": self.total_params,
                "bytes": self.total_bytes,
                "compressible_params": self.compressible_params,
                "layers": len(self.layers),
            },
            "layers": [
                {**asdict(i), "weight_shape": list(i.weight_shape), "in_shape": list(i.in_shape),
                 "out_shape": list(i.out_shape)}
                for i in self.layers
            ],
            "skipped": [asdict(s) for s in self.skipped],
        }


def layer_kind(module: nn.Module) -> str:
    """Name the kind of a compressible module (``conv2d-depthwise`` and so on)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        base = "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"
        if module.groups == 1:
            return base
        if module.groups == module.in_channels == module.out_channels:
            return f"{base}-depthwise"
        return f"{base}-grouped"
    raise TypeError(f"{type(module).__name__} is not a compressible layer")


def is_compressible(module: nn.Module) -> bool:
    """True for the layer types nnshrink compresses (Conv1d, Conv2d, Linear)."""
    return isinstance(module, _COMPRESSIBLE) and not isinstance(module, nn.LazyLinear)


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _layer_macs(module: nn.Module, out: torch.Tensor, batch: int) -> int:
    per_sample_out = out.numel() // batch
    if isinstance(module, nn.Linear):
        return per_sample_out * module.in_features
    kernel = math.prod(module.kernel_size)
    return per_sample_out * (module.in_channels // module.groups) * kernel


def _skip_reason(module: nn.Module) -> str:
    if isinstance(module, _NORMALIZATION):
        return "normalization layer: folded into the preceding conv or kept in float"
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return "transposed convolution is not supported yet"
    if isinstance(module, nn.Conv3d):
        return "Conv3d is not supported yet"
    if isinstance(module, (nn.RNNBase,)):
        return "recurrent layers are not supported"
    if isinstance(module, nn.Embedding):
        return "embeddings are not supported yet"
    return f"{type(module).__name__} is not a compressible layer type (Conv1d, Conv2d, Linear)"


def run_forward(model: nn.Module, example_input: torch.Tensor | tuple) -> object:
    """Run ``model`` on ``example_input`` without gradients, turning shape errors into ours."""
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        with torch.no_grad():
            return model(*args)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputShapeError(f"the model's forward pass failed on an input of shape {shapes}: {first}") from exc


def analyze(model: nn.Module, example_input: torch.Tensor | tuple) -> Analysis:
    """Measure every compressible layer of ``model`` in one forward pass.

    Args:
        model: Any ``torch.nn.Module``; it is run in eval mode and restored afterwards.
        example_input: A tensor (or tuple of tensors) the model accepts; its first dimension is
            the batch, and MACs are reported per sample.

    Returns:
        The per-layer table and totals.

    Raises:
        InputShapeError: The model cannot run on ``example_input``.
    """
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() == 0:
        raise InputShapeError("the example input must be a tensor with a batch dimension")
    batch = args[0].shape[0]
    names = {m: n for n, m in model.named_modules()}
    records: dict[str, dict] = {}
    order: list[str] = []

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        name = names[module]
        rec = records.get(name)
        macs = _layer_macs(module, output, batch)
        if rec is None:
            order.append(name)
            records[name] = {"macs": macs, "calls": 1,
                             "in": tuple(inputs[0].shape[1:]), "out": tuple(output.shape[1:])}
        else:
            rec["macs"] += macs
            rec["calls"] += 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if is_compressible(m)]
    was_training = model.training
    model.eval()
    try:
        run_forward(model, example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    layers = []
    for name in order:
        module = model.get_submodule(name)
        rec = records[name]
        params = _own_params(module)
        layers.append(LayerInfo(
            name=name, kind=layer_kind(module), weight_shape=tuple(module.weight.shape),
            params=params, macs=rec["macs"], bytes=params * FLOAT32_BYTES,
            groups=getattr(module, "groups", 1), in_shape=rec["in"], out_shape=rec["out"],
            calls=rec["calls"]))
    skipped = []
    for name, module in model.named_modules():
        params = _own_params(module)
        if is_compressible(module) and name not in records:
            skipped.append(SkippedLayer(name, type(module).__name__, params,
                                        "not called in the forward pass"))
        elif not is_compressible(module) and params:
            skipped.append(SkippedLayer(name or "<root>", type(module).__name__, params,
                                        _skip_reason(module)))
    total_params = sum(p.numel() for p in model.parameters())
    return Analysis(
        input_shape=tuple(args[0].shape), layers=tuple(layers), skipped=tuple(skipped),
        total_macs=sum(i.macs for i in layers), total_params=total_params,
        total_bytes=total_params * FLOAT32_BYTES,
        compressible_params=sum(i.params for i in layers))
