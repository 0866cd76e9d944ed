"""Export a torch model to ONNX with a dynamic batch dimension, written atomically."""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from pathlib import Path

import torch
from torch import nn

from nnshrink.cache import atomic_write_bytes
from nnshrink.errors import ConfigError, UnsupportedModelError
from nnshrink.graph import signature
from nnshrink.graph.analysis import run_forward
from nnshrink.io import onnx_opaque, onnx_rnn
from nnshrink.progress import quiet_exporter


def to_onnx(model: nn.Module, example_input: torch.Tensor | None = None, dynamic_batch: bool = True,
            opset: int | None = None, dynamic_axes: list[int] | None = None):
    """Export ``model`` to an in-memory ``onnx.ModelProto`` (see :func:`export_onnx`).

    A model imported from ONNX is written with the source's interface (:mod:`nnshrink.graph.signature`):
    its input and output names, every axis that was symbolic there symbolic again under the same
    name, its ``metadata_props``, and its opset where that is 18 or newer (the exporter's conversion to older ones is not
    safe).

    A quantized model (the result of a ``quantize`` step) is written as QDQ ONNX by
    :func:`nnshrink.io.qdq.to_qdq_onnx`, which ONNX Runtime runs with integer kernels.
    """
    if getattr(model, "is_quant_sim", False):
        from nnshrink.io.qdq import to_qdq_onnx

        return to_qdq_onnx(model)
    sig = signature.get(model)
    if example_input is None:
        from nnshrink.zoo import example_input as zero_input

        example_input = zero_input(model, batch=2)
    if not isinstance(example_input, torch.Tensor):
        raise ConfigError("export takes one example input tensor")
    run_forward(model, example_input)  # a wrong shape gives our error, not the exporter's
    model = _inference_form(model)
    axes = set(dynamic_axes or ())
    if sig is not None and len(sig.inputs) == 1:
        axes |= set(sig.dynamic_axes(0))  # symbolic in the source: symbolic in what we write
        if not dynamic_batch:
            axes.discard(0)
    elif dynamic_batch:
        axes.add(0)
    example_input = _unspecialized(example_input, axes)
    dims = {a: (torch.export.Dim.AUTO if sig is not None else torch.export.Dim.DYNAMIC) for a in sorted(axes)}
    names = [n for n, _ in sig.inputs] if sig is not None and len(sig.inputs) == 1 else ["input"]
    outputs = [n for n, _ in sig.outputs] if sig is not None else None
    if opset is None:
        # the source's opset from 18 up; below 18 the exporter's down-conversion is not safe
        # (measured: a Split written with opset 18's num_outputs into an opset 17 file)
        opset = max(18, sig.opset) if sig is not None else 18
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()), quiet_exporter():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(model, (example_input,), dynamo=True,
                                        dynamic_shapes=(dims,) if dims else None,
                                        opset_version=opset, input_names=names,
                                        output_names=outputs or ["output"], external_data=False, verbose=False,
                                        custom_translation_table={**onnx_rnn.TRANSLATIONS,
                                                                          **onnx_opaque.TRANSLATIONS})
    except Exception as exc:  # the exporter raises a wide variety of internal errors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnsupportedModelError(f"ONNX export of {type(model).__name__} failed: {first}") from exc
    _strip_metadata(program.model)
    proto = program.model_proto
    signature.apply(proto, sig)
    return proto


def _unspecialized(x: torch.Tensor, axes) -> torch.Tensor:
    """``x`` with size 2 on every dynamic axis where it has size 1 (the exporter would make a
    size-1 axis a constant 1)."""
    for a in axes:
        if a < x.dim() and x.shape[a] == 1:
            x = torch.cat([x, x], dim=a)
    return x


def export_onnx(model: nn.Module, path: str | Path, example_input: torch.Tensor | None = None,
                dynamic_batch: bool = True, opset: int | None = None,
                dynamic_axes: list[int] | None = None) -> Path:
    """Write ``model`` as an ONNX file that ONNX Runtime runs.

    Uses torch's ``torch.export``-based exporter (the TorchScript one is deprecated). The model
    is exported in eval mode with batch norms folded; the input model is not changed. An
    existing file at ``path`` is replaced only once the new one is complete.

    Args:
        model: The model to export.
        path: Output ``.onnx`` path.
        example_input: An input the model accepts; defaults to zeros of ``model.input_shape``.
        dynamic_batch: Make the batch dimension symbolic.
        opset: ONNX opset of the default domain (default: 18, or an imported model's own).
        dynamic_axes: More input axes to make symbolic (a fully convolutional net's height and
            width); an imported model's symbolic axes are symbolic without being listed.

    Raises:
        UnsupportedModelError: The exporter cannot capture the model.
    """
    proto = to_onnx(model, example_input, dynamic_batch, opset, dynamic_axes)
    target = Path(path)
    atomic_write_bytes(target, proto.SerializeToString())
    return target


def _inference_form(model: nn.Module) -> nn.Module:
    """A copy in eval mode with batch norms folded, so each Conv keeps its own module name.

    (torch's exporter fuses BatchNorm into Conv itself, but then records the batch norm's name
    on the fused node.) A layer with a stored record (a codebook, quantized or sparse weights)
    keeps its weights: its batch norm is written as a per-channel Mul and Add, which the exporter
    leaves apart, so the container still finds the record's weights in the graph. Models that
    torch.fx cannot trace are exported as they are.
    """
    from nnshrink.errors import UnsupportedModelError as TraceFailed
    from nnshrink.graph.surgery import fold_batchnorms
    from nnshrink.techniques.records import records_of

    try:
        folded, _ = fold_batchnorms(model, hold=lambda layer: bool(records_of(layer)))
    except TraceFailed:
        folded = copy.deepcopy(model)
    return folded.eval()


# The exporter annotates every node with stack traces, fx dumps and module scopes: a quarter of
# a small model's file, and local paths leak into it. Layer names survive without them: weight
# initializers are named after their modules (``conv1.weight``).


def _strip_metadata(ir_model) -> None:
    for node in ir_model.graph.all_nodes():
        node.metadata_props.clear()
