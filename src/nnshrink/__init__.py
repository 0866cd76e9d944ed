"""nnshrink: make trained neural networks small and fast for edge accelerators, and prove it.

>>> import nnshrink as ns
>>> model = ns.zoo.build("lenet5")
>>> ns.analyze(model, ns.zoo.example_input(model)).total_macs
2293000

The names below are imported on first use (PEP 562), so ``import nnshrink`` and the command
line's ``--help`` and ``--version`` do not load torch.
"""

from __future__ import annotations

import importlib

from nnshrink.errors import (
    ConfigError,
    CorruptDataError,
    DataError,
    FormatError,
    InputShapeError,
    NnshrinkError,
    UnsupportedLayerError,
    UnsupportedModelError,
    UnsupportedOpError,
)

__version__ = "0.1.0"

_LAZY = {
    "data": "nnshrink.data", "zoo": "nnshrink.zoo",
    "analyze": "nnshrink.graph", "build_dependency_graph": "nnshrink.graph", "fold_batchnorms": "nnshrink.graph",
    "replace_module": "nnshrink.graph",
    "export_onnx": "nnshrink.io", "export_tflite": "nnshrink.io.tflite", "load": "nnshrink.io", "load_model": "nnshrink.io", "save": "nnshrink.io",
    "FineTune": "nnshrink.plan", "FoldBatchNorm": "nnshrink.plan", "Plan": "nnshrink.plan", "compress": "nnshrink.plan",
    "Astc": "nnshrink.techniques", "Pruner": "nnshrink.techniques", "QuantizeWeights": "nnshrink.techniques",
    "ShareWeights": "nnshrink.techniques", "Sparsify": "nnshrink.techniques",
}

__all__ = [
    "ConfigError", "CorruptDataError", "DataError", "FineTune", "FoldBatchNorm", "FormatError",
    "InputShapeError", "NnshrinkError", "Plan", "UnsupportedLayerError", "UnsupportedModelError",
    "UnsupportedOpError", "analyze", "build_dependency_graph", "compress", "data", "export_onnx", "export_tflite",
    "Astc", "Pruner", "QuantizeWeights", "ShareWeights", "Sparsify", "fold_batchnorms", "load", "load_model",
    "replace_module", "save", "zoo",
]


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'nnshrink' has no attribute {name!r}")
    mod = importlib.import_module(module)
    value = mod if module.endswith("." + name) else getattr(mod, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
