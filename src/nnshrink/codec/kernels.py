"""Compiled inner loops of the codec (numba): bit I/O, Rice, zero-run, palette, rANS.

Why numba and our own coders: the block modes need bit-exact, specified bitstreams that a
hardware decoder can implement (the stream format is ours, documented in
``docs/FORMATS.md``), while general-purpose libraries (zstd, lzma) are far from the entropy bound
on weights, and entropy-coding libraries fix their own stream layout. The loops are short and
compiled with ``cache=True`` so the cost of compiling is paid once per machine.

Every decoder checks its reads against the end of its buffer and returns an error code instead
of reading past it: corrupt input must give an error, never a crash or garbage.

Bit order: most significant bit first within each byte.
"""

from __future__ import annotations

import numpy as np
from numba import njit

ESC_BITS = 24  # width of an escaped Rice value
RICE_QMAX = 24  # unary prefixes at this length are escapes
PROB_BITS = 16  # rANS probability resolution: frequencies sum to 2**16
RANS_L = 1 << 16  # lower bound of the rANS state; the state lives in [2**16, 2**32)

OK = 0
ERR_OVERRUN = 1  # a read past the end of the block
ERR_VALUE = 2  # a decoded value outside what the header allows
ERR_STATE = 3  # rANS final state check failed


# -- bit I/O: state arrays so the helpers stay plain functions ------------------------------
# writer state: [accumulator, bits in accumulator, byte position]
# reader state: [accumulator, bits in accumulator, byte position, error flag]


@njit(cache=True, inline="always")
def put(buf, st, value, nbits):
    st[0] = (st[0] << nbits) | (value & ((1 << nbits) - 1))
    st[1] += nbits
    while st[1] >= 8:
        st[1] -= 8
        buf[st[2]] = (st[0] >> st[1]) & 0xFF
        st[2] += 1
    st[0] &= (1 << st[1]) - 1


@njit(cache=True)
def flush(buf, st):
    """Pad the last byte with zero bits; return the number of bytes written."""
    if st[1] > 0:
        put(buf, st, 0, 8 - st[1])
    return st[2]


@njit(cache=True)
def reader_at(start):
    """A fresh reader state positioned at byte ``start``."""
    st = np.zeros(4, np.int64)
    st[2] = start
    return st


@njit(cache=True, inline="always")
def get(data, end, st, nbits):
    while st[1] < nbits:
        if st[2] >= end:
            st[3] = ERR_OVERRUN
            return 0
        st[0] = (st[0] << 8) | data[st[2]]
        st[2] += 1
        st[1] += 8
    st[1] -= nbits
    v = (st[0] >> st[1]) & ((1 << nbits) - 1)
    st[0] &= (1 << st[1]) - 1
    return v


@njit(cache=True, inline="always")
def zigzag(v):
    return (v << 1) if v >= 0 else ((-v << 1) - 1)


def zigzag_array(v: np.ndarray) -> np.ndarray:
    """:func:`zigzag` over a numpy array (for histograms outside the compiled loops)."""
    return np.where(v >= 0, v << 1, ((-v) << 1) - 1).astype(np.int64)


@njit(cache=True, inline="always")
def unzigzag(u):
    return (u >> 1) if (u & 1) == 0 else -((u + 1) >> 1)


@njit(cache=True, inline="always")
def put_rice(buf, st, u, k):
    q = u >> k
    if q >= RICE_QMAX:
        put(buf, st, (1 << RICE_QMAX) - 1, RICE_QMAX)
        put(buf, st, u, ESC_BITS)
        return
    # q ones then a zero, then the k low bits
    put(buf, st, ((1 << (q + 1)) - 2), q + 1)
    if k > 0:
        put(buf, st, u & ((1 << k) - 1), k)


@njit(cache=True, inline="always")
def get_rice(data, end, st, k):
    q = 0
    while True:
        b = get(data, end, st, 1)
        if st[3] != OK:
            return 0
        if b == 0:
            break
        q += 1
        if q == RICE_QMAX:
            return get(data, end, st, ESC_BITS)
    low = get(data, end, st, k) if k > 0 else 0
    return (q << k) | low


@njit(cache=True, inline="always")
def rice_len(u, k):
    q = u >> k
    if q >= RICE_QMAX:
        return RICE_QMAX + ESC_BITS
    return q + 1 + k


# -- costs ------------------------------------------------------------------------------------


@njit(cache=True)
def best_rice_k(counts, offset, kmax):
    """Cheapest Rice parameter for values ``u = index - offset`` weighted by ``counts``."""
    best_k, best = 0, -1
    for k in range(kmax + 1):
        total = 0
        for i in range(counts.shape[0]):
            c = counts[i]
            if c:
                total += c * rice_len(i - offset, k)
        if best < 0 or total < best:
            best, best_k = total, k
    return best_k, best


@njit(cache=True)
def level_rice_bits(levels, order, kmax):
    """:func:`best_rice_k` for a table's zigzagged ``order``-th differences of ``levels`` (zeros
    before the first), histogrammed here without a numpy round trip per candidate table."""
    n = levels.shape[0]
    u = np.empty(n, np.int64)
    p1, p2 = 0, 0
    top = 0
    for i in range(n):
        v = levels[i]
        u[i] = zigzag(v - p1 if order == 1 else v - 2 * p1 + p2)
        top = max(top, u[i])
        p2, p1 = p1, v
    counts = np.zeros(top + 1, np.int64)
    for i in range(n):
        counts[u[i]] += 1
    return best_rice_k(counts, 0, kmax)


@njit(cache=True)
def freq_from_levels(levels, grid, exp2_eighths, prob_bits):
    """Integer frequencies summing to ``2**prob_bits`` from a table's levels (see table.py)."""
    n = levels.shape[0]
    step = 8 // grid
    top = 0
    for i in range(n):
        if levels[i] > 0:
            top = max(top, (levels[i] - 1) * step)
    top //= 8
    # 2**(e/8) relative to the top octave, scaled so the largest is below 2**47 and the sum of
    # 1024 of them below 2**57: products with 2**16 stay inside int64
    w = np.zeros(n, np.int64)
    total = 0
    for i in range(n):
        if levels[i] > 0:
            e = (levels[i] - 1) * step
            shift = e // 8 - top + 30
            base = exp2_eighths[e % 8]
            w[i] = base << shift if shift >= 0 else base >> min(-shift, 62)
            total += w[i]
    m = np.int64(1) << prob_bits
    freq = np.zeros(n, np.int64)
    fsum = 0
    for i in range(n):
        if levels[i] > 0:
            freq[i] = max(1, (w[i] * m) // total)
            fsum += freq[i]
    diff = m - fsum
    if diff > 0:  # to the largest, the first of equals
        big = -1
        for i in range(n):
            if levels[i] > 0 and (big < 0 or freq[i] > freq[big]):
                big = i
        freq[big] += diff
    elif diff < 0:  # taken from the largest first (ties by index), keeping each at least 1
        idx = np.flatnonzero(levels > 0)
        order = idx[np.argsort(-freq[idx], kind="mergesort")]
        for i in order:
            if diff == 0:
                break
            take = min(freq[i] - 1, -diff)
            freq[i] -= take
            diff += take
    return freq


@njit(cache=True)
def zero_runs(values, n):
    """Runs of zeros before each nonzero value, and the trailing run (as the last entry)."""
    nnz = 0
    for i in range(n):
        if values[i] != 0:
            nnz += 1
    runs = np.empty(nnz + 1, np.int64)
    nz = np.empty(nnz, np.int64)
    run, j = 0, 0
    for i in range(n):
        v = values[i]
        if v == 0:
            run += 1
        else:
            runs[j] = run
            nz[j] = v
            j += 1
            run = 0
    runs[nnz] = run
    return runs, nz


# -- block encoders: each writes one block into buf with writer state st ----------------------


@njit(cache=True)
def enc_raw(buf, st, values, n, vmin, width):
    put(buf, st, zigzag(vmin), 17)
    put(buf, st, width, 5)
    if width > 0:
        for i in range(n):
            put(buf, st, values[i] - vmin, width)


@njit(cache=True)
def enc_rice(buf, st, values, n, center, k):
    put(buf, st, zigzag(center), 17)
    put(buf, st, k, 5)
    for i in range(n):
        put_rice(buf, st, zigzag(values[i] - center), k)


@njit(cache=True)
def enc_zrun(buf, st, runs, nz, kr, kv):
    put(buf, st, kr, 5)
    put(buf, st, kv, 5)
    for j in range(nz.shape[0]):
        put_rice(buf, st, runs[j], kr)
        put_rice(buf, st, zigzag(nz[j]) - 1, kv)
    put_rice(buf, st, runs[nz.shape[0]], kr)


@njit(cache=True)
def enc_palette(buf, st, values, n, palette, width):
    put(buf, st, palette.shape[0] - 1, 8)
    for p in range(palette.shape[0]):
        put(buf, st, zigzag(palette[p]), 17)
    for i in range(n):
        # binary search in the sorted palette
        lo, hi = 0, palette.shape[0] - 1
        v = values[i]
        while lo < hi:
            mid = (lo + hi) // 2
            if palette[mid] < v:
                lo = mid + 1
            else:
                hi = mid
        if width > 0:
            put(buf, st, lo, width)


@njit(cache=True)
def enc_rans(out, values, n, tmin, shift, freq, cum):
    """rANS-encode bins ``(v - tmin) >> shift``; returns bytes written to ``out``.

    Layout: the 32-bit final state (little endian), the ``shift`` low bits of every value
    (bit-packed, ``ceil(n * shift / 8)`` bytes), then 16-bit words (little endian) in the order
    the decoder reads them.
    """
    words = np.empty(n + 4, np.uint16)
    nw = 0
    x = np.uint64(RANS_L)
    for i in range(n - 1, -1, -1):
        s = (values[i] - tmin) >> shift
        x, nw = _rans_put(x, freq[s], cum[s], words, nw)
    _put_state(out, x)
    pos = 4
    if shift > 0:
        st = np.zeros(3, np.int64)
        st[2] = 4
        for i in range(n):
            put(out, st, (values[i] - tmin) & ((1 << shift) - 1), shift)
        pos = flush(out, st)
    return _put_words(out, pos, words, nw)


@njit(cache=True, inline="always")
def _rans_put(x, freq, cum, words, nw):
    """One rANS encoding step (renormalize, then push the symbol); returns state and word count."""
    f = np.uint64(freq)
    x_max = np.uint64((RANS_L >> PROB_BITS) << 16) * f
    while x >= x_max:
        words[nw] = np.uint16(x & np.uint64(0xFFFF))
        nw += 1
        x >>= np.uint64(16)
    return ((x // f) << np.uint64(PROB_BITS)) + (x % f) + np.uint64(cum), nw


@njit(cache=True, inline="always")
def _put_state(out, x):
    for b in range(4):
        out[b] = np.uint8((x >> np.uint64(8 * b)) & np.uint64(0xFF))


@njit(cache=True, inline="always")
def _put_words(out, pos, words, nw):
    """The 16-bit words in the order the decoder reads them (little endian); returns the end."""
    for j in range(nw - 1, -1, -1):
        w = words[j]
        out[pos] = np.uint8(w & 0xFF)
        out[pos + 1] = np.uint8(w >> 8)
        pos += 2
    return pos


# -- block decoders: each returns an error code and fills out[:n] ---------------------------


@njit(cache=True)
def dec_raw(data, start, end, out, n, lo, hi):
    st = reader_at(start)
    vmin = unzigzag(get(data, end, st, 17))
    width = get(data, end, st, 5)
    if st[3] != OK:
        return st[3]
    if width > 17:
        return ERR_VALUE
    for i in range(n):
        v = vmin + (get(data, end, st, width) if width > 0 else 0)
        if v < lo or v > hi:
            return ERR_VALUE if st[3] == OK else st[3]
        out[i] = v
    return st[3]


@njit(cache=True)
def dec_rice(data, start, end, out, n, lo, hi):
    st = reader_at(start)
    center = unzigzag(get(data, end, st, 17))
    k = get(data, end, st, 5)
    if st[3] != OK:
        return st[3]
    if k > 20:
        return ERR_VALUE
    for i in range(n):
        v = center + unzigzag(get_rice(data, end, st, k))
        if st[3] != OK:
            return st[3]
        if v < lo or v > hi:
            return ERR_VALUE
        out[i] = v
    return OK


@njit(cache=True)
def dec_zrun(data, start, end, out, n, lo, hi):
    st = reader_at(start)
    kr = get(data, end, st, 5)
    kv = get(data, end, st, 5)
    if st[3] != OK:
        return st[3]
    if kr > 24 or kv > 20:
        return ERR_VALUE
    i = 0
    while True:
        run = get_rice(data, end, st, kr)
        if st[3] != OK:
            return st[3]
        if run > n - i:
            return ERR_VALUE
        for j in range(run):
            out[i + j] = 0
        i += run
        if i == n:
            return OK
        v = unzigzag(get_rice(data, end, st, kv) + 1)
        if st[3] != OK:
            return st[3]
        if v < lo or v > hi:
            return ERR_VALUE
        out[i] = v
        i += 1


@njit(cache=True)
def dec_palette(data, start, end, out, n, lo, hi):
    st = reader_at(start)
    size = get(data, end, st, 8) + 1
    palette = np.empty(size, np.int64)
    for p in range(size):
        palette[p] = unzigzag(get(data, end, st, 17))
        if palette[p] < lo or palette[p] > hi:
            return ERR_VALUE if st[3] == OK else st[3]
    width = 0
    while (1 << width) < size:
        width += 1
    for i in range(n):
        idx = get(data, end, st, width) if width > 0 else 0
        if st[3] != OK:
            return st[3]
        if idx >= size:
            return ERR_VALUE
        out[i] = palette[idx]
    return OK


@njit(cache=True, inline="always")
def _get_state(data, start):
    x = np.uint64(0)
    for b in range(4):
        x |= np.uint64(data[start + b]) << np.uint64(8 * b)
    return x


@njit(cache=True)
def dec_rans(data, start, end, out, n, tmin, shift, freq, cum, sym):
    low_bytes = (n * shift + 7) // 8
    if end - start < 4 + low_bytes:
        return ERR_OVERRUN
    x = _get_state(data, start)
    if x < np.uint64(RANS_L):
        return ERR_STATE
    bits = reader_at(start + 4)
    pos = start + 4 + low_bytes
    mask = np.uint64((1 << PROB_BITS) - 1)
    for i in range(n):
        slot = x & mask
        s = sym[slot]
        x = np.uint64(freq[s]) * (x >> np.uint64(PROB_BITS)) + slot - np.uint64(cum[s])
        while x < np.uint64(RANS_L):
            if pos + 2 > end:
                return ERR_OVERRUN
            x = (x << np.uint64(16)) | np.uint64(data[pos]) | (np.uint64(data[pos + 1]) << np.uint64(8))
            pos += 2
        low = get(data, start + 4 + low_bytes, bits, shift) if shift > 0 else 0
        out[i] = tmin + (np.int64(s) << shift) + low
    if x != np.uint64(RANS_L) or pos != end or bits[3] != OK:
        return ERR_STATE
    return OK


@njit(cache=True)
def rans_cost_bits(counts, freq):
    """Exact-model cost in bits (times 1) of coding ``counts`` with ``freq`` (sum 2**16)."""
    total = 0.0
    for i in range(counts.shape[0]):
        if counts[i]:
            total += counts[i] * (PROB_BITS - np.log2(freq[i]))
    return total


@njit(cache=True)
def write_levels(buf, st, u, k):
    for i in range(u.shape[0]):
        put_rice(buf, st, u[i], k)


@njit(cache=True)
def read_levels(data, end, st, k, order, max_level, levels):
    """Inverse of the table's delta coding; returns an error code."""
    prev1 = 0
    prev2 = 0
    for i in range(levels.shape[0]):
        d = unzigzag(get_rice(data, end, st, k))
        if st[3] != OK:
            return st[3]
        value = d + prev1 if order == 1 else d + 2 * prev1 - prev2
        if value < 0 or value > max_level:
            return ERR_VALUE
        levels[i] = value
        prev2 = prev1
        prev1 = value
    return OK


# -- prediction (stream version 2): each value minus a fraction of the one before -----------
# Neighbouring weights along a row are correlated (a fully connected layer's row is an image of
# smooth receptive fields; a conv kernel row is smooth too), so a stream may code residuals
# r[i] = v[i] - ((t * v[i-1] + 8) >> 4) with t/16 in [-1, 1], the predecessor reset to 0 at
# every block start so blocks still decode alone. Integer arithmetic only (>> floors).


@njit(cache=True)
def predict(values, block, t):
    out = np.empty_like(values)
    n = values.shape[0]
    for start in range(0, n, block):
        prev = 0
        for i in range(start, min(n, start + block)):
            out[i] = values[i] - ((t * prev + 8) >> 4)
            prev = values[i]
    return out


@njit(cache=True)
def unpredict_blocks(res, block, t, lo, hi):
    """Undo :func:`predict` in place; returns the index of the first value outside
    ``[lo, hi]`` (a corrupt stream), else -1."""
    n = res.shape[0]
    for start in range(0, n, block):  # nested loops: a modulo per value cost more than the work
        prev = 0
        for i in range(start, min(n, start + block)):
            v = res[i] + ((t * prev + 8) >> 4)
            if v < lo or v > hi:
                return i
            res[i] = v
            prev = v
    return -1


# -- sign contexts (stream version 2): three rANS tables, picked by the previous value's sign --
# In pruned tensors a zero tends to follow a zero and a weight's sign its neighbour's; coding each
# value with the table of its context (previous value < 0, = 0, > 0; 0 at a block start) takes
# that up. The decoder knows the context before it decodes the value, as rANS needs.


@njit(cache=True, inline="always")
def sign_context(prev):
    return 0 if prev < 0 else (1 if prev == 0 else 2)


@njit(cache=True)
def enc_rans_ctx(out, values, n, tmins, freqs, cums):
    """rANS with per-context tables; layout as :func:`enc_rans` without low bits."""
    words = np.empty(n + 4, np.uint16)
    nw = 0
    x = np.uint64(RANS_L)
    for i in range(n - 1, -1, -1):
        c = sign_context(values[i - 1]) if i > 0 else 1
        s = values[i] - tmins[c]
        x, nw = _rans_put(x, freqs[c, s], cums[c, s], words, nw)
    _put_state(out, x)
    return _put_words(out, 4, words, nw)


@njit(cache=True)
def dec_rans_ctx(data, start, end, out, n, tmins, freqs, cums, syms):
    if end - start < 4:
        return ERR_OVERRUN
    x = _get_state(data, start)
    if x < np.uint64(RANS_L):
        return ERR_STATE
    pos = start + 4
    mask = np.uint64((1 << PROB_BITS) - 1)
    prev = 0
    for i in range(n):
        c = sign_context(prev)
        slot = x & mask
        s = syms[c, slot]
        x = np.uint64(freqs[c, s]) * (x >> np.uint64(PROB_BITS)) + slot - np.uint64(cums[c, s])
        while x < np.uint64(RANS_L):
            if pos + 2 > end:
                return ERR_OVERRUN
            x = (x << np.uint64(16)) | np.uint64(data[pos]) | (np.uint64(data[pos + 1]) << np.uint64(8))
            pos += 2
        prev = tmins[c] + s
        out[i] = prev
    if x != np.uint64(RANS_L) or pos != end:
        return ERR_STATE
    return OK


@njit(cache=True)
def neighbour_stats(values, block, vmin, width):
    """One pass for the encoder's model choice: sums for the least-squares predictor over pairs
    inside a block, and the histogram of values by sign context, shape (3, width)."""
    hist = np.zeros((3, width), np.int64)
    cross = 0
    power = 0
    n = values.shape[0]
    for start in range(0, n, block):
        prev = 0
        for i in range(start, min(n, start + block)):
            v = values[i]
            hist[sign_context(prev), v - vmin] += 1
            cross += v * prev
            power += prev * prev
            prev = v
    return cross, power, hist


@njit(cache=True)
def residual_hist(values, block, t, lo, width):
    """Histogram of the prediction residuals (offset ``lo``) without writing them out."""
    hist = np.zeros(width, np.int64)
    n = values.shape[0]
    for start in range(0, n, block):
        prev = 0
        for i in range(start, min(n, start + block)):
            hist[values[i] - ((t * prev + 8) >> 4) - lo] += 1
            prev = values[i]
    return hist


@njit(cache=True)
def context_hist(values, tmins, sizes):
    """Per-context histograms of one block under given tables; -1 in [0, 0] if a value falls
    outside its context's table."""
    width = 0
    for c in range(3):
        width = max(width, sizes[c])
    hist = np.zeros((3, width), np.int64)
    prev = 0
    for i in range(values.shape[0]):
        c = sign_context(prev)
        s = values[i] - tmins[c]
        if s < 0 or s >= sizes[c]:
            hist[0, 0] = -1
            return hist
        hist[c, s] += 1
        prev = values[i]
    return hist
