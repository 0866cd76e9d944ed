"""The weight stream: a compact header, independent blocks, a checksum. See docs/FORMATS.md.

Layout (little endian; varint = unsigned LEB128)::

    "NW" | version u8 | packed u8 (dtype: bits 0-2, table flag: bit 3, ndim: bits 4-7)
    | [model u8: predictor t as signed bits 0-5, sign-context flag bit 6,
    |  mirrored-table flag bit 7]                                          versions 2 and 3
    | shape: varint x ndim | log2(block size) u8
    | [table length varint | table]            if the table flag is set
    | byte length of every block but the last: varint x (n_blocks - 1)
    | blocks ... | CRC-32 of everything before it, u32

Each block starts with its mode byte. A decoder that has read the header knows where every block
starts, so it can decode any block alone; the last block's values may be fewer than the block size.
A stream of a tensor under 1K int8 weights costs at most 16 bytes more than the raw bytes.

Version 2 adds two models of the previous value for 8-bit tensors, at most one per stream:
prediction (the blocks hold residuals ``v[i] - ((t * v[i-1] + 8) >> 4)``, ``t`` in [-16, 16]
fitted by least squares) and sign contexts (three rANS tables, one per sign of the previous
value; the table blob holds the three in that order: negative, zero, positive). The previous
value is 0 at each block start, so blocks still decode alone. A stream that uses neither is still
written as version 1, byte for byte as before, so older readers read every stream that does not
need the new features.

Version 3 adds mirrored tables for int8 streams: the table blob holds one table over ``|v|`` and
value ``-v`` gets the level of ``v``, half the table bytes for a near-symmetric histogram (with or
without prediction, never with sign contexts). Streams without one keep their version 1 or 2 bytes.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np

from nnshrink.codec import kernels as K
from nnshrink.codec import table as T
from nnshrink.errors import ConfigError, CorruptDataError, FormatError

MAGIC = b"NW"
VERSION = 3  # the newest version this module reads and writes; older versions are still written
VERSIONS = (1, 2, 3)  # when a stream uses none of the newer features
DTYPES = {1: np.int8, 2: np.uint8, 3: np.int16, 4: np.uint16}
DTYPE_CODES = {np.dtype(v): k for k, v in DTYPES.items()}

CONST, RAW, RICE, RANS, ZRUN, PALETTE, STORED = range(7)
MODE_NAMES = {CONST: "const", RAW: "raw", RICE: "rice", RANS: "rans", ZRUN: "zero-run", PALETTE: "palette",
              STORED: "stored"}
_ALL_MODES = frozenset(MODE_NAMES.values())
_FLAG_TABLE = 8
_MIN_LOG, _MAX_LOG = 6, 20
MAX_ELEMENTS = 1 << 31  # decode refuses larger tensors (a guard against crafted headers)
_MODEL_MIN = 1024  # values below which the version-2 models are not tried
_MODEL_GAIN = 0.995  # a model's estimated bits must be below this fraction of plain coding's
_CTX_TABLE_BITS = 400  # estimated cost of each extra table of the sign-context model
_FLAG_CTX = 0x40
_FLAG_MIRROR = 0x80  # version 3: the table is mirrored (sent for |v|, value -v has the level of v)
_MIRROR_MARGIN_BITS = 8  # a mirrored table must save at least a byte to be used


@dataclass(frozen=True)
class CodecConfig:
    """Encoder settings.

    Attributes:
        block_size: Values per block, a power of two from 64 to 2**20. Smaller blocks give finer
            random access and per-block mode choice; larger ones less overhead.
        modes: Block modes the encoder may choose from (``const`` and ``stored`` are always
            allowed, so every tensor can be written).
        neighbours: Let the encoder model each 8-bit value by the one before it (prediction or
            sign contexts, stream version 2) where that is clearly smaller.
        mirror: Let the encoder send an int8 stream's rANS table for ``|v|`` only (stream
            version 3) where that is smaller: half the table, for a near-symmetric histogram.
    """

    block_size: int = 8192
    modes: frozenset[str] = _ALL_MODES
    neighbours: bool = True
    mirror: bool = True

    def __post_init__(self) -> None:
        bs = self.block_size
        if not isinstance(bs, int) or bs < (1 << _MIN_LOG) or bs > (1 << _MAX_LOG) or bs & (bs - 1):
            raise ConfigError(f"block_size must be a power of two from {1 << _MIN_LOG} to {1 << _MAX_LOG}, got {bs!r}")
        for flag in ("neighbours", "mirror"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"CodecConfig.{flag} must be True or False, got {getattr(self, flag)!r}")
        object.__setattr__(self, "modes", frozenset(self.modes))
        unknown = self.modes - _ALL_MODES
        if unknown:
            raise ConfigError(f"unknown codec modes {sorted(unknown)}; choose from {sorted(_ALL_MODES)}")


@dataclass(frozen=True)
class StreamInfo:
    """What a stream holds: shape, dtype, and each block's mode and byte length."""

    shape: tuple[int, ...]
    dtype: np.dtype
    block_size: int
    table_bytes: int
    header_bytes: int
    block_modes: tuple[str, ...]
    block_bytes: tuple[int, ...]
    total_bytes: int
    predictor: int = 0  # t of the version-2 prediction (value ~ t/16 x previous value); 0: none
    sign_contexts: bool = False  # version-2 sign contexts: rANS blocks use three tables
    mirrored: bool = False  # version-3 mirrored table (sent for |v|)

    @property
    def models(self) -> tuple[str, ...]:
        """The stream-wide models besides the block modes: ``prediction`` and ``sign contexts``
        (version 2), ``mirrored table`` (version 3)."""
        flags = (("prediction", bool(self.predictor)), ("sign contexts", self.sign_contexts),
                 ("mirrored table", self.mirrored))
        return tuple(name for name, on in flags if on)


@dataclass(frozen=True)
class _SignTables:
    """The three rANS tables of the sign-context model, stacked for the kernels."""

    tables: tuple[T.Table, ...]
    tmins: np.ndarray
    sizes: np.ndarray
    freqs: np.ndarray
    cums: np.ndarray
    syms: np.ndarray

    @classmethod
    def of(cls, tables: list[T.Table]) -> _SignTables:
        width = max(t.size for t in tables)
        freqs, cums = np.zeros((3, width), np.int64), np.zeros((3, width), np.int64)
        syms = np.empty((3, 1 << K.PROB_BITS), np.int32)
        for c, t in enumerate(tables):
            freqs[c, :t.size], cums[c, :t.size], syms[c] = t.freq, t.cum, t.sym
        return cls(tuple(tables), np.array([t.tmin for t in tables], np.int64),
                   np.array([t.size for t in tables], np.int64), freqs, cums, syms)


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        b = v & 0x7F
        v >>= 7
        out.append(b | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _read_varint(data: bytes, pos: int, end: int, name: str) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= end or shift > 35:
            raise CorruptDataError(f"{name}: truncated or malformed header")
        b = data[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, pos


def _check_input(array: np.ndarray) -> np.ndarray:
    array = np.asarray(array)
    if array.dtype not in DTYPE_CODES:
        raise ConfigError(f"the codec takes int8, uint8, int16 or uint16 arrays, got {array.dtype}")
    if array.ndim > 8:
        raise ConfigError(f"at most 8 dimensions, got {array.ndim}")
    return array


def _choose(values: np.ndarray, table: T.Table | _SignTables | None, modes: frozenset[str],
            itemsize: int) -> tuple[tuple, tuple | None]:
    """The cheapest mode for one block without the shared table, and the rANS choice with it
    (None if the table cannot code the block). Each is ``(bits, mode, *parameters)``; bit
    counts are exact for every mode but rANS, whose estimate is the model's code length plus
    its state."""
    n = values.shape[0]
    vmin, vmax = int(values.min()), int(values.max())
    if vmin == vmax:
        return (24, CONST, vmin), None
    candidates = [(8 * n * itemsize, STORED)]
    width = int(vmax - vmin).bit_length()
    if "raw" in modes:
        candidates.append((n * width + 22, RAW, vmin, width))
    counts = np.bincount(values - vmin).astype(np.int64)
    if "rice" in modes:
        center = int(np.searchsorted(np.cumsum(counts), (n + 1) // 2)) + vmin  # the median
        k, bits = K.best_rice_k(_zigzag_counts(counts, vmin, center), 0, 16)
        candidates.append((bits + 22, RICE, center, k))
    zeros = int(counts[-vmin]) if vmin <= 0 <= vmax else 0
    if "zero-run" in modes and zeros:
        runs, nz = K.zero_runs(values, n)
        kr, rbits = K.best_rice_k(np.bincount(runs).astype(np.int64), 0, 20)
        vbits, kv = 0, 0
        if nz.shape[0]:
            kv, vbits = K.best_rice_k(np.bincount(K.zigzag_array(nz) - 1).astype(np.int64), 0, 16)
        candidates.append((rbits + vbits + 10, ZRUN, runs, nz, kr, kv))
    distinct = np.flatnonzero(counts)
    if "palette" in modes and len(distinct) <= 256:
        pw = (len(distinct) - 1).bit_length()
        candidates.append((n * pw + 8 + 17 * len(distinct), PALETTE, (distinct + vmin).astype(np.int64), pw))
    best = min(candidates, key=lambda c: c[0])
    if isinstance(table, _SignTables) and "rans" in modes:
        hist, bits = K.context_hist(values, table.tmins, table.sizes), 40.0
        if hist[0, 0] < 0:
            return best, None
        for c, t in enumerate(table.tables):
            if hist[c, t.size:].any() or hist[c, :t.size][t.freq == 0].any():
                return best, None
            bits += K.rans_cost_bits(hist[c, :t.size], t.freq)
        return best, (bits, RANS)
    if table is not None and "rans" in modes:
        lo_bin, hi_bin = (vmin - table.tmin) >> table.shift, (vmax - table.tmin) >> table.shift
        if lo_bin >= 0 and hi_bin < table.size:
            bins = (values - table.tmin) >> table.shift if table.shift else values - table.tmin
            hist = np.bincount(bins, minlength=table.size).astype(np.int64)
            if not (hist[table.freq == 0]).any():
                return best, (K.rans_cost_bits(hist, table.freq) + n * table.shift + 40, RANS)
    return best, None


def _emit(values: np.ndarray, choice: tuple, table: T.Table | _SignTables | None, itemsize: int,
          scratch: np.ndarray) -> bytes:
    """Write one block in the chosen mode (mode byte included)."""
    n, mode = values.shape[0], choice[1]
    if mode == CONST:
        return bytes([CONST]) + _bits(lambda b, s: K.put(b, s, K.zigzag(choice[2]), 17), scratch)
    if mode == STORED:
        return bytes([STORED]) + _stored_bytes(values, itemsize)
    if mode == RANS and isinstance(table, _SignTables):
        out = np.empty(4 + 2 * n + 8, np.uint8)
        size = K.enc_rans_ctx(out, values, n, table.tmins, table.freqs, table.cums)
        return bytes([RANS]) + out[:size].tobytes()
    if mode == RANS:
        out = np.empty(4 + 2 * n + (n * table.shift + 7) // 8 + 8, np.uint8)
        size = K.enc_rans(out, values, n, table.tmin, table.shift, table.freq, table.cum)
        return bytes([RANS]) + out[:size].tobytes()
    if mode == RAW:
        body = _bits(lambda b, s: K.enc_raw(b, s, values, n, choice[2], choice[3]), scratch)
    elif mode == RICE:
        body = _bits(lambda b, s: K.enc_rice(b, s, values, n, choice[2], choice[3]), scratch)
    elif mode == ZRUN:
        body = _bits(lambda b, s: K.enc_zrun(b, s, choice[2], choice[3], choice[4], choice[5]), scratch)
    else:
        body = _bits(lambda b, s: K.enc_palette(b, s, values, n, choice[2], choice[3]), scratch)
    return bytes([mode]) + body


def _stored_bytes(values: np.ndarray, itemsize: int) -> bytes:
    """Values as two's-complement little-endian integers of the stream's width."""
    return (values & ((1 << (8 * itemsize)) - 1)).astype(f"<u{itemsize}").tobytes()


def _zigzag_counts(counts: np.ndarray, vmin: int, center: int) -> np.ndarray:
    v = np.arange(counts.shape[0]) + vmin - center
    u = K.zigzag_array(v)
    return np.bincount(u, weights=counts).astype(np.int64)


def _bits(write, scratch: np.ndarray) -> bytes:
    st = np.zeros(3, np.int64)
    write(scratch, st)
    return scratch[:K.flush(scratch, st)].tobytes()


def _serialize(tables: list[T.Table]) -> bytes:
    buf = np.empty(64 * len(tables) + 8 * 64 * sum(t.size for t in tables), np.uint8)
    st = np.zeros(3, np.int64)
    for t in tables:
        T.write(buf, st, t)
    return buf[:K.flush(buf, st)].tobytes()


def _asymmetry_bits(full: np.ndarray) -> float:
    """Bits lost by coding the :func:`~nnshrink.codec.table.centred` counts ``full`` with their
    histogram made symmetric about 0 instead of with the histogram itself (ignoring both tables)."""
    sym = (full + full[::-1]) / 2
    seen = full > 0
    return float((full[seen] * np.log2(full[seen] / sym[seen])).sum())


def _make_table(flat: np.ndarray, mirrorable: bool = False) -> tuple[T.Table | None, bytes, bool]:
    """The stream's rANS table and its blob; with ``mirrorable`` also a mirrored table (version 3)
    is tried and kept where table plus coded symbols come out smaller. Returns (table, blob,
    mirrored)."""
    lo, hi = int(flat.min()), int(flat.max())
    if lo == hi:
        return None, b"", False
    shift = 0
    while ((hi - lo) >> shift) >= T.MAX_RANGE:
        shift += 1
    counts = np.bincount((flat - lo) >> shift).astype(np.int64)
    table, _ = T.build(counts, lo, shift)
    blob = _serialize([table])
    if not mirrorable or shift:
        return table, blob, False
    full_counts = T.centred(counts, lo)
    # a mirrored table saves at most about half the table's bits
    if full_counts.shape[0] > T.MAX_RANGE or _asymmetry_bits(full_counts) > 4 * len(blob):
        return table, blob, False
    half, full = T.build_mirrored(full_counts, table)
    half_blob = _serialize([half])
    plain_bits = 8 * len(blob) + K.rans_cost_bits(counts, table.freq)
    mirrored_bits = 8 * len(half_blob) + K.rans_cost_bits(full_counts, full.freq)
    if mirrored_bits < plain_bits - _MIRROR_MARGIN_BITS:
        return full, half_blob, True
    return table, blob, False


def _make_sign_tables(hist: np.ndarray, vmin: int) -> tuple[_SignTables, bytes]:
    """The three tables from the (3, width) histogram of values by context (offset ``vmin``)."""
    tables = []
    for c in range(3):
        present = np.flatnonzero(hist[c])
        if present.shape[0] == 0:  # a context no value has: a one-symbol table (never used)
            tables.append(T.build(np.ones(1, np.int64), 0)[0])
            continue
        lo, hi = int(present[0]), int(present[-1])
        tables.append(T.build(hist[c, lo:hi + 1], vmin + lo)[0])
    return _SignTables.of(tables), _serialize(tables)


def encode(array: np.ndarray, config: CodecConfig | None = None) -> bytes:
    """Encode an integer array losslessly into a self-describing stream.

    Args:
        array: int8, uint8, int16 or uint16, any shape (not modified).
        config: Block size and allowed modes; the default picks the cheapest mode per block.

    Raises:
        ConfigError: Unsupported dtype or config.
    """
    config = config or CodecConfig()
    array = _check_input(array)
    flat = np.ascontiguousarray(array).reshape(-1).astype(np.int64)
    n = flat.shape[0]
    nblocks = -(-n // config.block_size) if n else 0
    scratch = np.empty(config.block_size * 8 + 1024, np.uint8)
    itemsize = array.dtype.itemsize
    t, contexts = (0, None)
    if config.neighbours:
        t, contexts = _neighbour_model(flat, config.block_size, itemsize, "rans" in config.modes)
    if t:  # residuals span twice the range: stored blocks take 16 bits per value
        flat, itemsize = K.predict(flat, config.block_size, t), 2
    chunks = [flat[i * config.block_size:(i + 1) * config.block_size] for i in range(nblocks)]
    table, table_blob, mirrored = (None, b"", False)
    if contexts is not None:
        table, table_blob = _make_sign_tables(*contexts)
    elif n and "rans" in config.modes:
        table, table_blob, mirrored = _make_table(flat, config.mirror and array.dtype == np.int8)
    options = [_choose(c, table, config.modes, itemsize) for c in chunks]
    choices = [r if r is not None and r[0] < b[0] else b for b, r in options]
    # the table pays off only if the blocks that use it save more than it costs
    saved_bits = sum(b[0] - c[0] for (b, _), c in zip(options, choices))
    if table is not None and saved_bits <= 8 * (len(table_blob) + len(_varint(len(table_blob)))):
        choices = [b for b, _ in options]
        table, table_blob = None, b""
    blocks = [_emit(c, choice, table, itemsize, scratch) for c, choice in zip(chunks, choices)]
    model = ((t & 0x3F) | (_FLAG_CTX if table_blob and contexts is not None else 0)
             | (_FLAG_MIRROR if table_blob and mirrored else 0))
    return _assemble(array, config.block_size, table_blob, blocks, model)


def _entropy(counts: np.ndarray) -> float:
    """Order-0 entropy in bits of a histogram, times its total."""
    counts = counts[counts > 0]
    return float(-(counts * np.log2(counts / counts.sum())).sum()) if counts.shape[0] else 0.0


def _neighbour_model(flat: np.ndarray, block_size: int, itemsize: int,
                     rans: bool) -> tuple[int, tuple[np.ndarray, int] | None]:
    """Which version-2 model to use, by estimated bits (order-0 entropies): returns the
    prediction coefficient ``t`` (0: none), or the histogram by sign context and its offset for
    the sign-context tables, or neither when no model is clearly below plain coding."""
    n = flat.shape[0]
    if itemsize != 1 or n < _MODEL_MIN:
        return 0, None
    vmin, vmax = int(flat.min()), int(flat.max())
    cross, power, hist = K.neighbour_stats(flat, block_size, vmin, vmax - vmin + 1)
    best = (_MODEL_GAIN * _entropy(hist.sum(axis=0)), 0, None)
    t = int(np.clip(np.round(16 * cross / power), -16, 16)) if power else 0
    if t:
        reach = max(abs(vmin), abs(vmax)) + 1  # |prediction| <= |previous value| <= reach
        lo = vmin - reach
        bits = _entropy(K.residual_hist(flat, block_size, t, lo, vmax + reach - lo + 1))
        if bits < best[0]:
            best = (bits, t, None)
    if rans:  # the contexts only change how rANS blocks are coded
        bits = 2 * _CTX_TABLE_BITS + sum(_entropy(h) for h in hist)
        if bits < best[0]:
            best = (bits, 0, (hist, vmin))
    return best[1], best[2]


def _assemble(array: np.ndarray, block_size: int, table_blob: bytes, blocks: list[bytes], model: int = 0) -> bytes:
    packed = DTYPE_CODES[array.dtype] | (_FLAG_TABLE if table_blob else 0) | (array.ndim << 4)
    if model:
        version = bytes([3 if model & _FLAG_MIRROR else 2, packed, model])
    else:
        version = bytes([1, packed])
    head = MAGIC + version + b"".join(_varint(d) for d in array.shape)
    head += bytes([block_size.bit_length() - 1])
    if table_blob:
        head += _varint(len(table_blob)) + table_blob
    head += b"".join(_varint(len(b)) for b in blocks[:-1])
    body = head + b"".join(blocks)
    return body + struct.pack("<I", zlib.crc32(body))


@dataclass(frozen=True)
class _Header:
    dtype: np.dtype
    shape: tuple[int, ...]
    size: int
    block_size: int
    starts: tuple[int, ...]  # absolute offset of each block
    ends: tuple[int, ...]
    table: T.Table | None
    table_bytes: int
    header_bytes: int
    predictor: int = 0
    signs: _SignTables | None = None
    mirrored: bool = False

    @cached_property
    def block_range(self) -> tuple[int, int, np.dtype]:
        """The range of the values a block holds, and the dtype of its stored form (computed
        once per stream, not once per block)."""
        info = np.iinfo(self.dtype)
        lo, hi = int(info.min), int(info.max)
        if self.predictor:
            return lo - hi, hi - lo, np.dtype("<i2")
        return lo, hi, np.dtype(self.dtype).newbyteorder("<")


def _parse(data: bytes, name: str, max_elements: int = MAX_ELEMENTS) -> _Header:
    if len(data) >= 2 and data[:2] != MAGIC:
        raise FormatError(f"{name}: not an nnshrink weight stream (it starts with {bytes(data[:4])!r})")
    if len(data) < 9:
        raise CorruptDataError(f"{name}: truncated stream ({len(data)} bytes)")
    (crc,) = struct.unpack_from("<I", data, len(data) - 4)
    if zlib.crc32(data[:-4]) != crc:
        raise CorruptDataError(f"{name}: checksum mismatch (the stream is truncated or damaged)")
    version, packed = data[2], data[3]
    if version not in VERSIONS:
        raise FormatError(f"{name}: stream format version {version} is not supported (this reader: "
                          f"{', '.join(map(str, VERSIONS))})")
    dcode, ndim = packed & 7, packed >> 4
    if dcode not in DTYPES or ndim > 8:
        raise CorruptDataError(f"{name}: invalid header (dtype code {dcode}, ndim {ndim})")
    end = len(data) - 4
    pos, shape, predictor, ctx, mirrored = 4, [], 0, False, False
    if version >= 2:
        model = data[4]
        predictor = (model & 0x3F) - 64 if model & 0x20 else model & 0x3F
        ctx, mirrored = bool(model & _FLAG_CTX), bool(model & _FLAG_MIRROR)
        pos = 5
        if version == 2:  # exactly one of prediction and sign contexts
            bad = mirrored or bool(predictor) == ctx
        else:  # a mirrored int8 table, with or without prediction
            bad = not mirrored or ctx or DTYPES[dcode] is not np.int8 or not packed & _FLAG_TABLE
        if (bad or abs(predictor) > 16 or np.dtype(DTYPES[dcode]).itemsize != 1
                or (ctx and not packed & _FLAG_TABLE)):
            raise CorruptDataError(f"{name}: invalid model byte {model:#04x} (predictor {predictor}, "
                                   f"sign contexts {ctx}, mirrored {mirrored}) in a version {version} "
                                   f"stream of {np.dtype(DTYPES[dcode])} values")
    for _ in range(ndim):
        d, pos = _read_varint(data, pos, end, name)
        shape.append(d)
    size = int(np.prod(shape, dtype=object)) if shape else 1
    if size > max_elements:
        raise CorruptDataError(f"{name}: header claims {size} values, above the limit of {max_elements}")
    if pos >= end or not _MIN_LOG <= data[pos] <= _MAX_LOG:
        raise CorruptDataError(f"{name}: invalid block size")
    block_size = 1 << data[pos]
    pos += 1
    table, table_bytes, signs = None, 0, None
    if packed & _FLAG_TABLE:
        table_bytes, pos = _read_varint(data, pos, end, name)
        if pos + table_bytes > end:
            raise CorruptDataError(f"{name}: truncated frequency table")
        st, raw = K.reader_at(pos), np.frombuffer(data, np.uint8)
        tables = [T.read(raw, pos + table_bytes, st, mirrored) for _ in range(3 if ctx else 1)]
        if any(t is None for t in tables) or (ctx and any(t.shift for t in tables)):
            raise CorruptDataError(f"{name}: invalid {'mirrored ' if mirrored else ''}frequency table")
        table = tables[0] if not ctx else None
        signs = _SignTables.of(tables) if ctx else None
        pos += table_bytes
    nblocks = -(-size // block_size) if size else 0
    lengths = []
    for _ in range(max(0, nblocks - 1)):
        length, pos = _read_varint(data, pos, end, name)
        lengths.append(length)
    starts, at = [], pos
    for length in lengths:
        starts.append(at)
        at += length
    if nblocks:
        starts.append(at)
    ends = starts[1:] + [end] if nblocks else []
    if any(e <= s for s, e in zip(starts, ends)) or (ends and ends[-1] != end) or (not nblocks and pos != end):
        raise CorruptDataError(f"{name}: block lengths do not add up to the stream length")
    return _Header(np.dtype(DTYPES[dcode]), tuple(shape), size, block_size, tuple(starts), tuple(ends),
                   table, table_bytes, pos, predictor, signs, mirrored)


def decode(data: bytes, name: str = "stream", max_elements: int = MAX_ELEMENTS) -> np.ndarray:
    """Decode a stream written by :func:`encode`, bit-exactly.

    Args:
        data: The stream bytes.
        name: Used in error messages (the container passes the tensor name).
        max_elements: Refuse streams that claim more values than this.

    Raises:
        FormatError: Not a stream, or a version this reader does not know.
        CorruptDataError: Truncated or damaged; the message names the block and what failed.
    """
    data = bytes(data)
    head = _parse(data, name, max_elements)
    info = np.iinfo(head.dtype)
    out = np.empty(head.size, head.dtype)
    # predicted streams keep every residual, then undo the prediction in one call (a call per
    # block cost 12% of decoding the zoo's weights)
    residuals = np.empty(head.size, np.int64) if head.predictor else None
    scratch = np.empty(head.block_size, np.int64)
    buf = np.frombuffer(data, np.uint8)
    for b, (start, end) in enumerate(zip(head.starts, head.ends)):
        lo_i, hi_i = b * head.block_size, min(head.size, (b + 1) * head.block_size)
        block = residuals[lo_i:hi_i] if residuals is not None else scratch[:hi_i - lo_i]
        _decode_block(buf, start, end, block, head, f"{name}: block {b}")
        if residuals is None:
            out[lo_i:hi_i] = block
    if residuals is not None and head.size:
        bad = K.unpredict_blocks(residuals, head.block_size, head.predictor, int(info.min), int(info.max))
        if bad >= 0:
            raise CorruptDataError(f"{name}: block {bad // head.block_size} predicts values outside {head.dtype}")
        out[:] = residuals
    return out.reshape(head.shape)


def _decode_block(buf, start, end, out, head: _Header, where: str) -> None:
    mode = int(buf[start])
    n = out.shape[0]
    lo, hi, stored = head.block_range
    if mode == CONST:
        st = K.reader_at(start + 1)
        v = int(K.unzigzag(K.get(buf, end, st, 17)))
        err = st[3] if st[3] else (K.OK if lo <= v <= hi else K.ERR_VALUE)
        if not err and st[2] != end:
            err = K.ERR_STATE
        out[:] = v
    elif mode == STORED:
        size = stored.itemsize
        if end - start - 1 != n * size:
            raise CorruptDataError(f"{where} (stored) has {end - start - 1} bytes for {n} values")
        out[:] = np.frombuffer(buf[start + 1:end].tobytes(), stored)
        err = K.OK
    elif mode == RAW:
        err = K.dec_raw(buf, start + 1, end, out, n, lo, hi)
    elif mode == RICE:
        err = K.dec_rice(buf, start + 1, end, out, n, lo, hi)
    elif mode == ZRUN:
        err = K.dec_zrun(buf, start + 1, end, out, n, lo, hi)
    elif mode == PALETTE:
        err = K.dec_palette(buf, start + 1, end, out, n, lo, hi)
    elif mode == RANS and head.signs is not None:
        sg = head.signs
        err = K.dec_rans_ctx(buf, start + 1, end, out, n, sg.tmins, sg.freqs, sg.cums, sg.syms)
        if not err and n and (out.min() < lo or out.max() > hi):
            err = K.ERR_VALUE
    elif mode == RANS:
        t = head.table
        if t is None:
            raise CorruptDataError(f"{where}: rANS block in a stream without a table")
        err = K.dec_rans(buf, start + 1, end, out, n, t.tmin, t.shift, t.freq, t.cum, t.sym)
        if not err and n and (out.min() < lo or out.max() > hi):
            err = K.ERR_VALUE
    else:
        raise CorruptDataError(f"{where}: unknown block mode {mode}")
    if err:
        what = {K.ERR_OVERRUN: "reads past the end of the block", K.ERR_VALUE: "holds a value out of range",
                K.ERR_STATE: "does not end where its length says"}.get(int(err), f"error {err}")
        raise CorruptDataError(f"{where} ({MODE_NAMES[mode]}) {what}")


def stream_info(data: bytes, name: str = "stream") -> StreamInfo:
    """Describe a stream (shape, dtype, block modes and sizes) without decoding its blocks."""
    data = bytes(data)
    head = _parse(data, name)
    modes = tuple(MODE_NAMES.get(data[s], "?") for s in head.starts)
    sizes = tuple(e - s for s, e in zip(head.starts, head.ends))
    return StreamInfo(head.shape, head.dtype, head.block_size, head.table_bytes, head.header_bytes,
                      modes, sizes, len(data), head.predictor, head.signs is not None, head.mirrored)
