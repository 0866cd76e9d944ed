"""Lossless codec for integer weights: independent blocks, per-block modes, near the entropy.

Pure numpy (+ numba kernels); never imports torch. ``encode(array) -> bytes`` and
``decode(bytes) -> array`` are bit-exact for int8/uint8/int16/uint16 arrays of any shape.
"""

from __future__ import annotations

import numpy as np

from nnshrink.codec.stream import MODE_NAMES, CodecConfig, StreamInfo, decode, encode, stream_info


def entropy_bits(array: np.ndarray) -> float:
    """Order-0 (empirical) entropy of ``array`` in bits, times its size: the bound for a
    code that treats values as independent."""
    flat = np.asarray(array).reshape(-1)
    if flat.size == 0:
        return 0.0
    _, counts = np.unique(flat, return_counts=True)
    p = counts / flat.size
    return float(-(counts * np.log2(p)).sum())


__all__ = ["MODE_NAMES", "CodecConfig", "StreamInfo", "decode", "encode", "entropy_bits", "stream_info"]
