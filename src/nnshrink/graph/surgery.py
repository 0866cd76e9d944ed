"""Module surgery: replace a submodule by qualified name, fold batch norm into convolutions."""

from __future__ import annotations

import copy

import torch
from torch import fx, nn

from nnshrink.errors import UnsupportedLayerError
from nnshrink.graph.fx import trace


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Replace the submodule called ``name`` (``"features.3"``) by ``new``, **in place**.

    Returns:
        The module that was replaced.

    Raises:
        KeyError: ``model`` has no submodule called ``name``.
    """
    if not name:
        raise KeyError("cannot replace the root module; build a new model instead")
    parent_name, _, child = name.rpartition(".")
    try:
        parent = model.get_submodule(parent_name) if parent_name else model
        old = parent.get_submodule(child)
    except AttributeError as exc:
        raise KeyError(f"no submodule named {name!r}") from exc
    setattr(parent, child, new)
    return old


def fold_bn(conv: nn.Conv1d | nn.Conv2d | nn.Linear | nn.ConvTranspose2d, bn: nn.modules.batchnorm._BatchNorm) -> nn.Module:
    """Return a new layer computing ``bn(conv(x))`` in inference mode.

    ``w' = w * gamma / sqrt(var + eps)`` per output channel and
    ``b' = (b - mean) * gamma / sqrt(var + eps) + beta``.

    Raises:
        UnsupportedLayerError: ``bn`` has no running statistics or the channel counts differ.
    """
    out_channels = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
    if bn.running_mean is None or bn.running_var is None:
        raise UnsupportedLayerError("batch norm without running statistics cannot be folded")
    if bn.num_features != out_channels:
        raise UnsupportedLayerError(
            f"batch norm has {bn.num_features} channels but the layer has {out_channels} outputs")
    fused = copy.deepcopy(conv)
    with torch.no_grad():
        scale = torch.rsqrt(bn.running_var.double() + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        bias = conv.bias.double() if conv.bias is not None else torch.zeros(out_channels, dtype=torch.float64)
        beta = bn.bias.double() if bn.bias is not None else 0.0
        new_bias = (bias - bn.running_mean.double()) * scale + beta
        shape = (-1,) + (1,) * (conv.weight.dim() - 1)
        if isinstance(conv, nn.modules.conv._ConvTransposeNd):  # weight (in, out, k...): outputs on axis 1
            shape = (1, -1) + (1,) * (conv.weight.dim() - 2)
        fused.weight.copy_((conv.weight.double() * scale.reshape(shape)).to(conv.weight.dtype))
        if fused.bias is None:
            fused.bias = nn.Parameter(new_bias.to(conv.weight.dtype))
        else:
            fused.bias.copy_(new_bias.to(conv.weight.dtype))
    return fused


class ChannelAffine(nn.Module):
    """``x * scale + shift`` per channel (axis 1): an inference-mode batch norm kept apart from
    the layer before it (ONNX exporters fuse a BatchNormalization into the conv before it, which
    would change that conv's stored weights)."""

    def __init__(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = [-1] + [1] * (x.dim() - 2)
        return x * self.scale.reshape(shape) + self.shift.reshape(shape)


def fold_batchnorms(model: nn.Module, hold=None) -> tuple[nn.Module, list[tuple[str, str]]]:
    """Fold every batch norm that directly follows a conv, linear or (ungrouped) transposed conv.

    A pair is folded only when the layer's output feeds the batch norm alone; the batch norm is
    replaced by ``nn.Identity`` so module names stay stable. The input model is not changed.
    ``hold(layer) -> bool`` names layers whose weights must stay as they are (a stored record:
    a codebook scaled per channel is no longer a codebook); the batch norm after one becomes a
    :class:`ChannelAffine` (in eval mode) instead, and the pair is not listed.

    Returns:
        A new model and the ``(layer, batchnorm)`` pairs that were folded.
    """
    new = copy.deepcopy(model)
    gm = trace(new)
    modules = dict(gm.named_modules())
    folded = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules[node.target], nn.modules.batchnorm._BatchNorm):
            continue
        src = node.args[0]
        if not isinstance(src, fx.Node) or src.op != "call_module" or len(src.users) != 1:
            continue
        layer = modules[src.target]
        if not isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)) and not (
                isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d)) and layer.groups == 1):
            continue
        bn = modules[node.target]
        if hold is not None and hold(layer):
            scale = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps) if bn.affine else \
                1 / torch.sqrt(bn.running_var + bn.eps)
            shift = (bn.bias.detach() if bn.affine else 0) - bn.running_mean * scale
            replace_module(new, node.target, ChannelAffine(scale, shift))
            continue
        fused = fold_bn(layer, bn).train(layer.training)
        replace_module(new, src.target, fused)
        replace_module(new, node.target, nn.Identity())
        folded.append((src.target, node.target))
    return new, folded


def fold_batchnorms_eager(model: nn.Module, example_input) -> tuple[nn.Module, list[tuple[str, str]]]:
    """:func:`fold_batchnorms` for models torch.fx cannot trace: pairs found by running the model
    once with hooks (a batch norm whose input is exactly a conv/linear layer's output tensor),
    each fold kept only if the model's outputs on ``example_input`` stay the same (a conv output
    that something else also reads would change them)."""
    import torch

    from nnshrink.graph.analysis import run_forward

    new = copy.deepcopy(model).eval()
    names = {m: n for n, m in new.named_modules()}
    produced: dict[int, str] = {}
    pairs: list[tuple[str, str]] = []
    layer_types = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.ConvTranspose1d, nn.ConvTranspose2d)

    def hook(module, args, output):
        if isinstance(module, layer_types) and isinstance(output, torch.Tensor):
            produced[id(output)] = names[module]
        elif isinstance(module, nn.modules.batchnorm._BatchNorm) and args and id(args[0]) in produced:
            pairs.append((produced[id(args[0])], names[module]))

    handles = [m.register_forward_hook(hook) for m in new.modules() if m is not new]
    try:
        with torch.no_grad():
            reference = run_forward(new, example_input)
    finally:
        for h in handles:
            h.remove()
    modules = dict(new.named_modules())
    folded = []
    for layer_name, bn_name in dict.fromkeys(pairs):
        layer, bn = modules[layer_name], modules[bn_name]
        if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d)) and layer.groups != 1:
            continue
        replace_module(new, layer_name, fold_bn(layer, bn).train(layer.training))
        replace_module(new, bn_name, nn.Identity())
        with torch.no_grad():
            now = run_forward(new, example_input)
        if _same(reference, now):
            folded.append((layer_name, bn_name))
        else:  # the layer's output is read elsewhere too: undo
            replace_module(new, layer_name, layer)
            replace_module(new, bn_name, bn)
    return new, folded


def _same(a, b) -> bool:
    import torch

    if isinstance(a, torch.Tensor):
        return torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    return all(_same(x, y) for x, y in zip(a, b))
