"""Moving models in and out: ONNX import/export and model resolution."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from nnshrink.errors import FormatError
from nnshrink.io.container import describe, load, read_onnx_from_container, save
from nnshrink.io.onnx_export import export_onnx, to_onnx
from nnshrink.io.onnx_import import load_onnx, onnx_to_torch, read_onnx


def load_model(path: str | Path, constant_inputs: dict | None = None) -> nn.Module:
    """Load a model file as a torch module the techniques can work on.

    ``.onnx`` files are converted to a torch.fx ``GraphModule`` whose outputs match ONNX
    Runtime's; ``.nsz`` containers are decoded (checksums verified) and converted the same way.
    ``constant_inputs`` pins ONNX inputs that are constant in use (see :func:`load_onnx`).

    Raises:
        FileNotFoundError: No such file.
        FormatError: Unknown suffix or not a valid file of its kind.
        CorruptDataError: A damaged container.
        UnsupportedOpError: ONNX operators without a converter (all listed).
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".nsz":
        return load(path)
    if suffix != ".onnx":
        raise FormatError(f"{path}: unknown model file type {path.suffix!r}; expected .onnx or .nsz")
    return load_onnx(path, constant_inputs)


__all__ = ["describe", "export_onnx", "load", "load_model", "load_onnx", "onnx_to_torch", "read_onnx",
           "read_onnx_from_container", "save", "to_onnx"]
