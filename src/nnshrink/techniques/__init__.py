"""Compression techniques, one module each; each registers its plan steps.

Importing this package registers every step kind with :mod:`nnshrink.plan`.
"""

from nnshrink.techniques.astc import Astc, AstcRecord
from nnshrink.techniques.channels import ChannelPrune
from nnshrink.techniques.cluster import CodebookRecord, ShareWeights, codebook_record, kmeans_1d, share_weights
from nnshrink.techniques.lowrank import SpatialSVD, WeightSVD, spatial_svd, weight_svd
from nnshrink.techniques.quant import QuantSim, Quantize
from nnshrink.techniques.sparsity import Pruner, Sparsify, magnitude_masks, n_m_mask, sparsity_of
from nnshrink.techniques.weights import QuantizeWeights, WeightQuant, quantize_weights, weight_quant

__all__ = ["Astc", "AstcRecord", "ChannelPrune", "CodebookRecord", "SpatialSVD", "WeightSVD", "spatial_svd", "weight_svd", "Pruner", "QuantSim", "Quantize", "QuantizeWeights", "ShareWeights", "Sparsify", "WeightQuant",
           "codebook_record", "kmeans_1d", "magnitude_masks", "n_m_mask", "quantize_weights", "share_weights",
           "sparsity_of", "weight_quant"]
