"""Model analysis: compressible layers, MACs, dependency groups, module surgery."""

from nnshrink.graph.analysis import (
    ANALYSIS_SCHEMA,
    Analysis,
    LayerInfo,
    SkippedLayer,
    analyze,
    is_compressible,
    layer_kind,
)
from nnshrink.graph.fx import concrete_args, trace
from nnshrink.graph.groups import ChannelGroup, Consumer, DependencyGraph, build_dependency_graph
from nnshrink.graph.surgery import fold_batchnorms, fold_batchnorms_eager, fold_bn, replace_module

__all__ = [
    "ANALYSIS_SCHEMA", "Analysis", "concrete_args", "ChannelGroup", "Consumer", "DependencyGraph", "LayerInfo",
    "SkippedLayer", "analyze", "build_dependency_graph", "fold_batchnorms", "fold_batchnorms_eager", "fold_bn",
    "is_compressible", "layer_kind", "replace_module", "trace",
]
