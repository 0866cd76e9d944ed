"""How a layer's weights are laid out as one 2-D texture, and how they come back.

A weight of shape ``(O, ...)`` is seen as ``O`` outputs of ``C`` tiles of ``th x tw`` texels.
Each output's tiles sit side by side; ``group`` outputs share a texture row of tiles; tile rows
are stacked. Three layouts:

- ``rows``: one tile of ``1 x inputs`` per output: the weight matrix as it is (row-major).
- ``kernels``: a conv's ``kh x kw`` kernels as tiles, inputs across, outputs down, so that a block
  covers whole smooth receptive fields (a 5x5 footprint holds one 5x5 kernel exactly).
- ``input``: each output's weights shaped like the tensor it reads (a first-layer filter as an
  image, a Linear after a flatten as its ``C`` feature maps), ``group`` chosen to waste the fewest
  texels at the footprint. Weights that see neighbouring pixels sit next to each other, which is
  where ASTC's interpolated weight grids pay off.

With ``channels = 2`` the first half of the outputs goes to the luminance channel and the second
half to alpha at the same places (astcenc's luminance-alpha endpoint modes, with a second weight
plane where the two disagree): two weights per texel, so 0.44 to 4 bits per weight.

Outputs may be placed in another order than their own (``order``, stored with the record):
:func:`chain_order` puts each output next to the one most like it, so neighbouring rows (or tile
rows) of the texture are alike and a block's interpolated weights fit them better.

Texels beyond the last output (when ``O`` is not a multiple of ``group``) hold the texture's mean.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from nnshrink.techniques.astc.codec import MAX_SIDE, block_count

LAYOUTS = ("auto", "rows", "kernels", "input")


@dataclass(frozen=True)
class Layout:
    """Outputs of ``tiles`` tiles of ``tile_h x tile_w`` texels, ``group`` outputs per tile row,
    split over ``channels`` texture channels."""

    kind: str
    outputs: int
    tiles: int
    tile_h: int
    tile_w: int
    group: int = 1
    channels: int = 1
    order: tuple[int, ...] | None = None  # slot -> output; None: outputs in their own order

    @property
    def per_channel(self) -> int:
        return -(-self.outputs // self.channels)

    @property
    def height(self) -> int:
        return -(-self.per_channel // self.group) * self.tile_h

    @property
    def width(self) -> int:
        return self.group * self.tiles * self.tile_w

    def to_dict(self) -> dict:
        """The layout as JSON fields (``order`` is stored as an array part by the record)."""
        return {k: v for k, v in self.__dict__.items() if k != "order"}

    @classmethod
    def from_dict(cls, d: dict, order: np.ndarray | None = None) -> Layout:
        out = cls(str(d["kind"]), *(int(d[k]) for k in ("outputs", "tiles", "tile_h", "tile_w", "group")),
                  int(d.get("channels", 1)), None if order is None else tuple(int(v) for v in order))
        if min(out.outputs, out.tiles, out.tile_h, out.tile_w, out.group) < 1 or out.channels not in (1, 2):
            raise ValueError(f"layout {d} has a dimension below 1 or a channel count other than 1 or 2")
        if out.order is not None and sorted(out.order) != list(range(out.outputs)):
            raise ValueError("the output order is not a permutation of the outputs")
        return out

    def count(self) -> int:
        return self.outputs * self.tiles * self.tile_h * self.tile_w

    def index(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Texture row, column and channel of every weight, in the weight's (flat) order."""
        o, c, y, x = np.meshgrid(np.arange(self.outputs), np.arange(self.tiles), np.arange(self.tile_h),
                                 np.arange(self.tile_w), indexing="ij")
        if self.order is not None:  # output -> its slot
            slot = np.empty(self.outputs, np.int64)
            slot[np.asarray(self.order)] = np.arange(self.outputs)
            o = slot[o]
        chan, local = o // self.per_channel, o % self.per_channel
        rows = (local // self.group) * self.tile_h + y
        cols = ((local % self.group) * self.tiles + c) * self.tile_w + x
        return rows.reshape(-1), cols.reshape(-1), chan.reshape(-1)

    def to_texture(self, values: np.ndarray) -> np.ndarray:
        """Weights (any shape with ``count()`` values, output first) -> the texture (H x W x channels)."""
        flat = np.asarray(values, np.float32).reshape(-1)
        tex = np.full((self.height, self.width, self.channels), float(flat.mean()), np.float32)
        rows, cols, chan = self.index()
        tex[rows, cols, chan] = flat
        return tex

    def from_texture(self, texture: np.ndarray) -> np.ndarray:
        """The texture (H x W x channels) -> the flat weights, in the order :meth:`to_texture` took them."""
        rows, cols, chan = self.index()
        return texture[rows, cols, chan]


def _best_group(outputs: int, tiles: int, th: int, tw: int, fp: tuple[int, int]) -> int:
    """Outputs per tile row that waste the fewest texels at footprint ``fp`` (near-square on ties)."""
    best, best_key = 1, None
    for g in range(1, outputs + 1):
        width = g * tiles * tw
        if width > MAX_SIDE:
            break
        height = -(-outputs // g) * th
        if height > MAX_SIDE:
            continue
        key = (block_count(width, height, fp), abs(math.log(width / height)))
        if best_key is None or key < best_key:
            best, best_key = g, key
    return best


_CHAIN_MAX = 4096  # outputs beyond this keep their order (the chain costs outputs^2 distances)


def chain_order(rows: np.ndarray) -> np.ndarray | None:
    """Outputs (rows) in a nearest-neighbour chain: start at the row first along the principal
    direction, then always the closest row not yet taken. None for one row or too many."""
    rows = np.asarray(rows, np.float64).reshape(len(rows), -1)
    n = len(rows)
    if n < 3 or n > _CHAIN_MAX:
        return None
    centred = rows - rows.mean(0)
    first = centred @ np.linalg.svd(centred, full_matrices=False)[2][0]
    sq = (rows ** 2).sum(1)
    dist = sq[:, None] + sq[None, :] - 2 * rows @ rows.T
    taken = np.zeros(n, bool)
    cur = int(np.argmin(first))
    out = [cur]
    taken[cur] = True
    for _ in range(n - 1):
        d = np.where(taken, np.inf, dist[cur])
        cur = int(np.argmin(d))
        out.append(cur)
        taken[cur] = True
    return np.array(out, np.int64)


def make_layout(kind: str, shape: tuple[int, ...], fp: tuple[int, int],
                input_hw: tuple[int, int] | None = None, channels: int = 1,
                order: np.ndarray | None = None) -> tuple[Layout, str | None]:
    """The layout of a weight of ``shape`` at footprint ``fp``, and why it is not ``kind`` (or None).

    ``input_hw`` is the spatial shape of the tensor a Linear reads before it is flattened (for
    ``input``); conv weights are ``(O, I, kh, kw)``.
    """
    layout, why = _layout(kind, shape, fp, input_hw, channels)
    return Layout(layout.kind, layout.outputs, layout.tiles, layout.tile_h, layout.tile_w, layout.group, channels,
                  None if order is None else tuple(int(v) for v in order)), why


def _layout(kind, shape, fp, input_hw, channels) -> tuple[Layout, str | None]:
    outputs, per = shape[0], math.prod(shape[1:])
    half = -(-outputs // channels)
    conv = len(shape) == 4 and shape[2] * shape[3] > 1
    if kind == "auto":
        kind = "input" if (input_hw is not None or (conv and shape[1] == 1)) else "kernels" if conv else "rows"
    if kind == "kernels":
        if not conv:
            return Layout("rows", outputs, 1, 1, per), "no spatial kernel (kernels needs a conv with k > 1)"
        return Layout("kernels", outputs, shape[1], shape[2], shape[3]), None
    if kind == "input":
        if conv:
            c, th, tw = shape[1], shape[2], shape[3]
        elif input_hw is not None and per % (input_hw[0] * input_hw[1]) == 0:
            th, tw = input_hw
            c = per // (th * tw)
        else:
            return Layout("rows", outputs, 1, 1, per), "the input's spatial shape is unknown (not read through a flatten)"
        return Layout("input", outputs, c, th, tw, _best_group(half, c, th, tw, fp)), None
    return Layout("rows", outputs, 1, 1, per), None
