"""Encoding a texture strip by strip while the weights not yet encoded make up for the error.

astcenc minimises the error of each block's texels; a layer's outputs care about the error
weighted by how its inputs co-vary (``H = X^T X`` of its input columns on calibration data).
Following GPTQ's optimal-brain-surgeon update (Frantar et al., 2023) and its use for vector
codebooks (GPTVQ, van Baalen et al., 2024), the texture is encoded one column of blocks at a time,
left to right: astcenc encodes the strip from the current weights, the strip's decode becomes
those weights for good, and their error is spread over the weights to their right in the same
row by the upper Cholesky factor of ``H^-1``. On LeNet-5's layers this leaves about a tenth of
the output error plain encoding leaves at the same footprints, for the same bytes.

Why this is not astcenc's own option: astcenc weights texels' errors by channel and by alpha,
not by a matrix across texels, and it has no way to change texels it has not encoded yet.

Every layout of :mod:`.layout` places an input at the same column offset in every output's tiles
(the outputs differ only in where their tiles start), so ordering the inputs by that offset gives
one column order for all outputs: one Cholesky factor serves every row, and each strip fixes, in
every row, a run of inputs that continues the run the strip before fixed.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch

from nnshrink.techniques.astc import codec
from nnshrink.techniques.astc.layout import Layout
from nnshrink.techniques.calibration import inverse_hessian_factor


@dataclass(frozen=True, eq=False)
class Gram:
    """A layer's ``X^T X`` on calibration inputs, with a digest that keys the encodings made with it."""

    matrix: torch.Tensor
    digest: str = field(init=False)

    def __post_init__(self) -> None:
        data = np.ascontiguousarray(self.matrix.detach().cpu().numpy())
        object.__setattr__(self, "digest", hashlib.sha1(data.tobytes()).hexdigest())


def input_order(layout: Layout, inputs: int) -> np.ndarray | None:
    """Inputs ordered by their texture column within an output's tiles (None if the layout does
    not place every output's inputs alike, which no layout of :mod:`.layout` does)."""
    _, cols, _ = layout.index()
    cols = cols.reshape(layout.outputs, inputs)
    offset = cols - cols.min(axis=1, keepdims=True)
    if not (offset == offset[0]).all():  # pragma: no cover - every layout shares the offsets
        return None
    return np.lexsort((np.arange(inputs), offset[0]))


def encode_compensated(weights: np.ndarray, hessian: torch.Tensor, layout: Layout, fp: tuple[int, int],
                       offset: np.ndarray, scale: np.ndarray, quality, threads: int) -> bytes | None:
    """The blocks (row by row, as :func:`.codec.encode` returns them) of ``weights`` (``(O, n)``)
    encoded strip by strip with the error compensation above; None where ``hessian`` does not fit
    the layer (a grouped conv) or cannot be factored even damped."""
    O, n = weights.shape
    order = input_order(layout, n)
    if order is None or tuple(hessian.shape) != (n, n):
        return None
    W = torch.tensor(weights[:, order], dtype=torch.float64)
    U = inverse_hessian_factor(hessian[order][:, order], W)  # zeroes dead inputs in W
    if U is None:
        return None
    rows, cols, chan = (a.reshape(O, n)[:, order] for a in layout.index())
    lo = np.broadcast_to(offset.astype(np.float64).reshape(-1, 1), (O, 1))
    span = np.broadcast_to(scale.astype(np.float64).reshape(-1, 1), (O, 1))
    bw, bh = fp
    across, down = -(-layout.width // bw), -(-layout.height // bh)
    blocks = np.empty((down, across, codec.BLOCK_BYTES), np.uint8)
    strip_of = cols // bw
    for k in range(across):
        texels = np.clip((W.numpy() - lo) / span, 0.0, 1.0)
        tex = np.full((layout.height, layout.width, layout.channels), float(texels.mean()), np.float32)
        tex[rows, cols, chan] = texels
        x0, x1 = k * bw, min((k + 1) * bw, layout.width)
        data = codec.encode(np.ascontiguousarray(tex[:, x0:x1]), fp, quality, threads)
        blocks[:, k] = np.frombuffer(data, np.uint8).reshape(down, codec.BLOCK_BYTES)
        decoded = codec.decode(data, x1 - x0, layout.height, fp, "strip", layout.channels).astype(np.float64)
        here = strip_of == k
        count = here.sum(axis=1)
        start = np.where(count > 0, here.argmax(axis=1), 0)
        # rows whose strip k holds the same run of inputs are updated together
        for a, c in {(int(s), int(m)) for s, m in zip(start, count) if m}:
            R = np.nonzero((start == a) & (count == c))[0]
            b = a + c
            q = decoded[rows[R, a:b], cols[R, a:b] - x0, chan[R, a:b]] * span[R] + lo[R]
            q = torch.from_numpy(q)
            run = W[R, a:b].clone()
            err = torch.empty_like(run)
            for i in range(c):  # within the run one input at a time, then the rest of the row at once
                err[:, i] = (run[:, i] - q[:, i]) / U[a + i, a + i]
                run[:, i + 1:] -= err[:, i:i + 1] * U[a + i, a + i + 1:b]
            W[R, a:b] = q
            W[R, b:] -= err @ U[a:b, b:]
    return blocks.reshape(-1, codec.BLOCK_BYTES).tobytes()
