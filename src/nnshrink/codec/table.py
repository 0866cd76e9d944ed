"""The shared rANS frequency table of a stream: cheap to transmit, rebuilt bit-exactly.

A table costs bits, and for a 16K-weight tensor with ~250 distinct values an exact histogram
would cost more than 1% of the stream. So the table sends each symbol's frequency as a *level*
on a logarithmic grid (``S`` levels per octave), delta-coded against the previous symbol with a
Rice code: weight histograms are smooth, so the deltas are small. Coding with the rounded
frequencies costs almost nothing (a relative error of 4% costs ~0.0005 bits per symbol). The
encoder tries every grid and keeps the one with the smallest total (table + coded symbols).

The decoder turns levels back into frequencies with integers only (a fixed table of 2**(j/8)
and shifts), then normalizes them to sum to 2**16 with a fixed integer procedure, so encoder and
decoder agree bit for bit on every machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from nnshrink.codec import kernels as K

MAX_RANGE = 1024  # symbols a table can span (int8 and 4-bit weights, narrow int16)
GRIDS = (1, 2, 4, 8)  # levels per octave
# round(2**(j/8) * 2**15) for j = 0..7, fixed here so no platform's pow() is involved
_EXP2_EIGHTHS = np.array([32768, 35734, 38968, 42495, 46341, 50535, 55109, 60097], dtype=np.int64)
_MAX_LEVEL = 8 * 64  # no table needs more levels; a larger one is corrupt


@dataclass(frozen=True)
class Table:
    """A frequency table over bins ``(v - tmin) >> shift``, ``len(freq)`` bins.

    ``shift`` > 0 lets one table cover a wide range (int16): the bin is entropy-coded and the
    ``shift`` low bits are stored as they are.
    """

    tmin: int
    shift: int
    grid: int
    order: int
    levels: np.ndarray  # int64, 0 = absent
    freq: np.ndarray  # int64, sums to 2**16
    cum: np.ndarray  # int64, exclusive prefix sums
    sym: np.ndarray  # int32, slot -> bin

    @property
    def size(self) -> int:
        return int(self.freq.shape[0])


def _freq_from_levels(levels: np.ndarray, grid: int) -> np.ndarray:
    """Integer frequencies summing to 2**16 from levels; integer arithmetic only: each present
    level ``l`` weighs ``2**((l - 1) / grid)`` (from the fixed eighths table and shifts), the
    weights are scaled to 2**16 with floors (at least 1 each), and the remainder goes to the
    largest (or is taken from the largest first, ties by index). A compiled loop: the encoder
    evaluates a dozen candidate tables per stream."""
    return K.freq_from_levels(levels.astype(np.int64), grid, _EXP2_EIGHTHS, K.PROB_BITS)


def _finish(tmin: int, shift: int, grid: int, order: int, levels: np.ndarray) -> Table:
    freq = _freq_from_levels(levels, grid)
    cum = np.concatenate([[0], np.cumsum(freq)[:-1]]).astype(np.int64)
    sym = np.repeat(np.arange(freq.shape[0], dtype=np.int32), freq)
    return Table(tmin, shift, grid, order, levels.astype(np.int64), freq, cum, sym)


def _smooth(counts: np.ndarray, width: float) -> np.ndarray:
    if width == 0:
        return counts.astype(np.float64)
    radius = int(np.ceil(3 * width))
    x = np.arange(-radius, radius + 1)
    kernel = np.exp(-0.5 * (x / width) ** 2)
    kernel /= kernel.sum()
    out = np.convolve(counts.astype(np.float64), kernel, mode="full")[radius:radius + counts.shape[0]]
    return np.where(counts > 0, np.maximum(out, 0.5), out)


def build(counts: np.ndarray, tmin: int, shift: int = 0) -> tuple[Table, int]:
    """The table over ``counts`` (bin ``i`` = values ``tmin + (i << shift) ..``) with the fewest
    total bits: the table itself plus the symbols coded with it.

    Tried: grids of 1-8 levels per octave, counts smoothed with kernels of 0-4 bins (histograms
    of weights are smooth; their sampling noise is what makes a table expensive), first or
    second differences.

    Returns:
        The table and its serialized size in bits.
    """
    return _search(counts, tmin, shift, _WIDTHS, GRIDS)


_WIDTHS = (0, 1.0, 2.5)


def _search(counts: np.ndarray, tmin: int, shift: int, widths, grids) -> tuple[Table, int]:
    best = None
    counts = counts.astype(np.int64)
    for width in widths:
        smooth = _smooth(counts, width)
        present = (smooth >= 0.25) | (counts > 0)
        logc = np.log2(np.maximum(smooth, 0.25))
        for grid in grids:
            raw = np.round(grid * logc).astype(np.int64)
            levels = np.where(present, raw - raw[present].min() + 1, 0)
            freq = _freq_from_levels(levels, grid)
            coded = K.rans_cost_bits(counts, freq)
            for order in (1, 2):
                bits = table_bits(levels, order)
                if best is None or bits + coded < best[0]:
                    best = (bits + coded, levels, grid, order, bits)
    _, levels, grid, order, bits = best
    return _finish(tmin, shift, grid, order, levels), bits


def _mirror_levels(half_levels: np.ndarray) -> np.ndarray:
    return np.concatenate([half_levels[:0:-1], half_levels])


def mirror(half: Table) -> Table:
    """The full table of a mirrored one: ``half`` covers ``|v|`` = 0 .. size-1 (``tmin`` 0, no
    shift); value ``-v`` gets the level of ``v``. Integer-only, like every table."""
    return _finish(-(half.size - 1), 0, half.grid, half.order, _mirror_levels(half.levels))


def centred(counts: np.ndarray, tmin: int) -> np.ndarray:
    """``counts`` over values ``tmin ..`` placed on ``-m .. m`` (index ``v + m``), with ``m`` the
    largest magnitude present: the value range a mirrored table spans."""
    m = max(-tmin, tmin + counts.shape[0] - 1, 0)
    full = np.zeros(2 * m + 1, np.int64)
    full[tmin + m:tmin + m + counts.shape[0]] = counts
    return full


def build_mirrored(full: np.ndarray, like: Table) -> tuple[Table, Table]:
    """A mirrored table for the :func:`centred` counts ``full``: the half table to transmit and
    the full table it stands for (spanning the same values as ``full``). Weight histograms are
    close to symmetric about 0, and half the levels cost half the bits, which pays on small
    tensors.

    The half table is built on ``c(v) + c(-v)`` with the zero bin doubled, so every bin counts
    two values' worth and the levels stay on one scale. It uses the grid of ``like`` (the plain
    table of the same values) and searches only the smoothing, so trying it costs a fraction of
    building the plain table."""
    m = full.shape[0] // 2
    half = full[m:].copy()
    half[1:] += full[:m][::-1]
    half[0] *= 2
    table, _ = _search(half, 0, 0, _WIDTHS, (like.grid,))
    return table, mirror(table)


def _deltas(levels: np.ndarray, order: int) -> np.ndarray:
    d = np.diff(levels, n=order, prepend=np.zeros(order, np.int64))
    return K.zigzag_array(d)


def _header_bits() -> int:
    return 17 + 4 + 11 + 2 + 1 + 4


def table_bits(levels: np.ndarray, order: int) -> int:
    _, bits = K.level_rice_bits(levels, order, 12)
    return _header_bits() + int(bits)


def write(buf: np.ndarray, st: np.ndarray, table: Table) -> None:
    u = _deltas(table.levels, table.order)
    k, _ = K.best_rice_k(np.bincount(u, minlength=1).astype(np.int64), 0, 12)
    K.put(buf, st, K.zigzag(table.tmin), 17)
    K.put(buf, st, table.shift, 4)
    K.put(buf, st, table.size - 1, 11)
    K.put(buf, st, GRIDS.index(table.grid), 2)
    K.put(buf, st, table.order - 1, 1)
    K.put(buf, st, k, 4)
    K.write_levels(buf, st, u, k)


def read(data: np.ndarray, end: int, st: np.ndarray, mirrored: bool = False) -> Table | None:
    """Parse a table (with ``mirrored``: a half table, returned as the full table it stands
    for); None if the bits are inconsistent (the caller reports corruption)."""
    tmin = int(K.unzigzag(K.get(data, end, st, 17)))
    shift = int(K.get(data, end, st, 4))
    size = int(K.get(data, end, st, 11)) + 1
    grid = GRIDS[int(K.get(data, end, st, 2))]
    order = int(K.get(data, end, st, 1)) + 1
    k = int(K.get(data, end, st, 4))
    if st[3] != K.OK or size > MAX_RANGE or k > 12:
        return None
    levels = np.empty(size, dtype=np.int64)
    if K.read_levels(data, end, st, k, order, _MAX_LEVEL, levels) != K.OK:
        return None
    if not (levels > 0).any():
        return None
    if mirrored:
        if tmin or shift or 2 * size - 1 > MAX_RANGE:
            return None
        tmin, levels = -(size - 1), _mirror_levels(levels)
    return _finish(tmin, shift, grid, order, levels)
