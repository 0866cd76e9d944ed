"""ASTC weight compression: weights as real ASTC texture blocks that a GPU's texture unit decodes.

- :mod:`.codec`: astcenc encoding, the one decode profile (float16), ``.astc`` files.
- :mod:`.layout`: weights as 2-D textures (rows, conv kernels, input-shaped tiles).
- :mod:`.record`: the ``astc`` storage kind (blocks stored byte for byte, plus scales).
- :mod:`.step`: the ``astc`` plan step (footprints per layer for a budget, re-training A).
- :mod:`.blocks`: re-training B, a differentiable model of a block, written back as real blocks.
"""

from nnshrink.techniques.astc.codec import FOOTPRINTS
from nnshrink.techniques.astc.record import AstcRecord
from nnshrink.techniques.astc.step import Astc, encode_weight

__all__ = ["FOOTPRINTS", "Astc", "AstcRecord", "encode_weight"]
