"""nnshrink: make trained neural networks small and fast for edge accelerators, and prove it.

>>> import nnshrink as ns
>>> model = ns.zoo.build("lenet5")
>>> ns.analyze(model, ns.zoo.example_input(model)).total_macs
2293000
"""

from nnshrink import data, zoo
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
from nnshrink.graph import analyze, build_dependency_graph, fold_batchnorms, replace_module
from nnshrink.io import export_onnx, load, load_model, save
from nnshrink.plan import FineTune, FoldBatchNorm, Plan, compress
from nnshrink.techniques import Pruner, QuantizeWeights, ShareWeights, Sparsify

__version__ = "0.1.0"

__all__ = [
    "ConfigError", "CorruptDataError", "DataError", "FineTune", "FoldBatchNorm", "FormatError",
    "InputShapeError", "NnshrinkError", "Plan", "UnsupportedLayerError", "UnsupportedModelError",
    "UnsupportedOpError", "analyze", "build_dependency_graph", "compress", "data", "export_onnx",
    "Pruner", "QuantizeWeights", "ShareWeights", "Sparsify", "fold_batchnorms", "load", "load_model",
    "replace_module", "save", "zoo",
]
