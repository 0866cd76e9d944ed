"""The ``astc`` storage kind: a layer's weights as real ASTC blocks plus the range they map to."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from nnshrink.techniques.astc import codec
from nnshrink.techniques.astc.layout import Layout
from nnshrink.techniques.records import register


@register
@dataclass(frozen=True, eq=False)
class AstcRecord:
    """``weight == offset + scale * decode(blocks)`` exactly, in float32.

    Attributes:
        shape: The weight's shape.
        footprint: Block width and height in texels.
        layout: Where each weight sits in the texture.
        blocks: The texture's 16-byte blocks, row by row (uint8, ``(n, 16)``): what a GPU uploads.
        offset, scale: float32, one per layer or one per output (``range: row``).
        origin: ``astcenc`` (encoded by astcenc) or ``trained`` (blocks written by re-training B).
    """

    shape: tuple[int, ...]
    footprint: tuple[int, int]
    layout: Layout
    blocks: np.ndarray
    offset: np.ndarray
    scale: np.ndarray
    origin: str = "astcenc"
    name: str = "weight"
    _cache: dict = field(default_factory=dict, repr=False, compare=False)

    kind: ClassVar[str] = "astc"
    #: parts stored byte for byte (the container entropy-codes other integer arrays)
    raw_parts: ClassVar[tuple[str, ...]] = ("blocks",)

    @property
    def bits(self) -> int:
        return max(1, round(codec.bits_per_texel(self.footprint) / self.layout.channels))

    @property
    def texture_shape(self) -> tuple[int, int]:
        return self.layout.height, self.layout.width

    def texture(self) -> np.ndarray:
        """The float16 texture (H x W x channels) the blocks decode to (decode profile of :mod:`.codec`), cached."""
        if "texture" not in self._cache:
            self._cache["texture"] = codec.decode(self.blocks.tobytes(), self.layout.width, self.layout.height,
                                                  self.footprint, self.name, self.layout.channels)
        return self._cache["texture"]

    def dequantize(self) -> np.ndarray:
        if "values" not in self._cache:
            t = self.layout.from_texture(self.texture()).astype(np.float32).reshape(self.layout.outputs, -1)
            w = t * self.scale.reshape(-1, 1) + self.offset.reshape(-1, 1)
            self._cache["values"] = w.astype(np.float32).reshape(self.shape)
        return self._cache["values"]

    def astc_file(self) -> bytes:
        """The texture as an ``.astc`` file (16-byte header, then the blocks)."""
        return codec.header(self.layout.width, self.layout.height, self.footprint) + self.blocks.tobytes()

    def to_parts(self) -> tuple[dict, dict[str, np.ndarray]]:
        arrays = {"blocks": self.blocks, "offset": self.offset.astype(np.float32), "scale": self.scale.astype(np.float32)}
        if self.layout.order is not None:
            arrays["order"] = np.asarray(self.layout.order, np.uint16 if self.layout.outputs <= 65536 else np.int64)
        return ({"shape": list(self.shape), "footprint": list(self.footprint), "layout": self.layout.to_dict(),
                 "origin": self.origin}, arrays)

    @classmethod
    def from_parts(cls, fields: dict, arrays: dict[str, np.ndarray], name: str = "ASTC texture") -> AstcRecord:
        fp = codec.parse_footprint(tuple(fields["footprint"]))
        layout = Layout.from_dict(fields["layout"], arrays.get("order"))
        shape = tuple(int(d) for d in fields["shape"])
        blocks, offset, scale = arrays["blocks"], arrays["offset"], arrays["scale"]
        if layout.count() != int(np.prod(shape)):
            raise ValueError(f"the layout holds {layout.count()} weights, the shape {shape} {int(np.prod(shape))}")
        n = codec.block_count(layout.width, layout.height, fp)
        if blocks.dtype != np.uint8 or blocks.shape != (n, codec.BLOCK_BYTES):
            raise ValueError(f"{blocks.shape} block bytes for a {layout.width}x{layout.height} texture at "
                             f"{codec.footprint_name(fp)} ({n} blocks expected)")
        if offset.shape != scale.shape or offset.size not in (1, layout.outputs):
            raise ValueError("the offsets and scales do not match the outputs")
        record = cls(shape, fp, layout, blocks, offset, scale, str(fields.get("origin", "astcenc")), name)
        record.texture()  # every block checked on read (raises CorruptDataError naming the layer)
        return record
