"""Moving models in and out: ONNX import/export and model resolution."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from nnshrink.errors import FormatError
from nnshrink.io.onnx_export import export_onnx
from nnshrink.io.onnx_import import load_onnx, onnx_to_torch, read_onnx


def load_model(path: str | Path) -> nn.Module:
    """Load a model file as a torch module the techniques can work on.

    ``.onnx`` files are converted to a torch.fx ``GraphModule`` whose outputs match ONNX
    Runtime's. (The ``.nsz`` container arrives with the codec; version 0 of ``.nsz``, written by
    ``nnshrink compress`` until then, holds a plain ONNX model and is read the same way.)

    Raises:
        FileNotFoundError: No such file.
        FormatError: Unknown suffix or not a valid file of its kind.
        UnsupportedOpError: ONNX operators without a converter (all listed).
    """
    path = Path(path)
    if path.suffix.lower() not in (".onnx", ".nsz"):
        raise FormatError(f"{path}: unknown model file type {path.suffix!r}; expected .onnx or .nsz")
    return load_onnx(path)


__all__ = ["export_onnx", "load_model", "load_onnx", "onnx_to_torch", "read_onnx"]
