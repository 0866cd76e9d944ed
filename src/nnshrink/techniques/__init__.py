"""Compression techniques, one module each; each registers its plan steps.

Importing this package registers every step kind with :mod:`nnshrink.plan`.
"""

from nnshrink.techniques.weights import QuantizeWeights, WeightQuant, quantize_weights, weight_quant

__all__ = ["QuantizeWeights", "WeightQuant", "quantize_weights", "weight_quant"]
