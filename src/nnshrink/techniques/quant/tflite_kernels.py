"""TFLite's int8 kernels for the ops beyond conv/linear/add: what the integer reference's
``fixed`` mode computes for them, element for element as LiteRT's reference kernels do.

Each function takes and returns int64 arrays of int8 values. Written in numpy from the kernels'
published arithmetic (TFLite's ``reference_ops``, gemmlowp's fixed-point exp and reciprocal);
no library exposes them outside a TFLite interpreter, and the reference must not need one.
Checked against LiteRT 2.3's reference kernels on every input value (unary ops) and on 832,000
random softmax rows' elements (tests and ``benchmarks/ethos_u.py``).

- lookup tables (LOGISTIC, TANH): ``TfLiteRound(f(s_in * (q - z_in)) * (1 / s_out)) + z_out``
  in float32, for each of the 256 inputs;
- HARD_SWISH: its 16-bit fixed-point form (a "reluish" multiplier in [0, 1] times the input on
  the output scale);
- LEAKY_RELU and PRELU: two requantizations, one per sign (PRELU's alpha an int8 tensor);
- SOFTMAX: gemmlowp's fixed point: differences to the row's maximum scaled into Q5.26, exp of
  negative values, the sum in Q12.19, its reciprocal by Newton-Raphson, output on 1/256.
"""

from __future__ import annotations

import math

import numpy as np

from nnshrink.techniques.quant.reference import multiply_by_quantized_multiplier, quantize_multiplier

I32_MAX, I32_MIN = 2**31 - 1, -(2**31)


# -- gemmlowp's fixed-point primitives, on int64 arrays holding int32 values ----------------------
def srdhm(a, b) -> np.ndarray:
    """Saturating rounding doubling high multiply (the product of two Q0.31 values)."""
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    ab = a * b
    t = ab + np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    r = np.where(t >= 0, t >> 31, -((-t) >> 31))
    return np.where((a == b) & (a == I32_MIN), I32_MAX, r)


def rdpot(x, exponent) -> np.ndarray:
    """Rounding divide by a power of two (half away from zero)."""
    x = np.asarray(x, np.int64)
    e = np.asarray(exponent, np.int64)
    mask = (np.int64(1) << e) - 1
    return (x >> e) + ((x & mask) > ((mask >> 1) + (x < 0)))


def sat_shift_left(x, e: int) -> np.ndarray:
    """Saturating left shift (gemmlowp's SaturatingRoundingMultiplyByPOT for a positive exponent)."""
    x = np.asarray(x, np.int64)
    threshold = (1 << (31 - e)) - 1
    return np.where(x > threshold, I32_MAX, np.where(x < -threshold, I32_MIN, x << e))


def wrap32(x) -> np.ndarray:
    return ((np.asarray(x, np.int64) + 2**31) % 2**32) - 2**31


def _exp_interval(a: np.ndarray) -> np.ndarray:
    """exp on [-1/4, 0) in Q0.31: a Taylor expansion around -1/8."""
    x = wrap32(a + (1 << 28))
    x2 = srdhm(x, x)
    x3 = srdhm(x2, x)
    x4 = srdhm(x2, x2)
    t = rdpot(wrap32(srdhm(wrap32(rdpot(x4, 2) + x3), 715827883) + x2), 1)  # 715827883: 1/3
    c = 1895147668  # exp(-1/8)
    return wrap32(c + srdhm(c, wrap32(x + t)))


_BARREL = ((-2, 1672461947), (-1, 1302514674), (0, 790015084), (1, 290630308), (2, 39332535), (3, 720401),
           (4, 242))  # exp(-2**k) in Q0.31


def exp_on_negative_values(a: np.ndarray) -> np.ndarray:
    """exp of Q5.26 values <= 0, in Q0.31."""
    a = np.asarray(a, np.int64)
    quarter = 1 << 24
    amq = wrap32((a & (quarter - 1)) - quarter)
    result = _exp_interval(sat_shift_left(amq, 5))
    remainder = wrap32(amq - a)
    for k, mult in _BARREL:
        result = np.where((remainder & (1 << (26 + k))) != 0, srdhm(result, mult), result)
    return np.where(a == 0, I32_MAX, result)


def one_over_one_plus_x(a: np.ndarray) -> np.ndarray:
    """1 / (1 + x) for Q0.31 x in [0, 1), by three Newton-Raphson steps in Q2.29."""
    a = np.asarray(a, np.int64)
    s = a + I32_MAX
    s = s + np.where(s >= 0, 1, -1)
    half = np.where(s >= 0, s // 2, -((-s) // 2))
    x = wrap32(1515870810 + srdhm(half, -1010580540))  # 48/17 - 32/17 * d
    for _ in range(3):
        x = wrap32(x + sat_shift_left(srdhm(x, wrap32((1 << 29) - srdhm(half, x))), 2))
    return sat_shift_left(x, 1)


# -- the kernels -----------------------------------------------------------------------------------
def round_away(v: np.ndarray) -> np.ndarray:
    """``TfLiteRound`` of float32 values (half away from zero), exactly (in float64)."""
    v = np.asarray(v, np.float32).astype(np.float64)
    return (np.sign(v) * np.floor(np.abs(v) + 0.5)).astype(np.int64)


def lookup_table(fn, s_in, z_in: int, s_out, z_out: int, qmin: int = -128, qmax: int = 127) -> np.ndarray:
    """TFLite's int8 table of ``fn`` (``LUTPopulate``), indexed by ``q + 128``."""
    v = np.arange(-128, 128, dtype=np.int64)
    deq = (np.float32(s_in) * (v - z_in).astype(np.float32)).astype(np.float32)
    y = np.asarray(fn(deq.astype(np.float64)), np.float64).astype(np.float32)
    r = round_away((y * (np.float32(1.0) / np.float32(s_out))).astype(np.float32))
    return np.clip(r + z_out, qmin, qmax)


def apply_table(table: np.ndarray, q: np.ndarray) -> np.ndarray:
    return table[np.asarray(q, np.int64) + 128]


def hard_swish(q: np.ndarray, s_in, z_in: int, s_out, z_out: int) -> np.ndarray:
    """TFLite's int8 HARD_SWISH."""
    hires = np.float32(np.float32(1.0 / 128.0) * np.float32(s_in))
    om_q, om_e = (int(v) for v in quantize_multiplier(np.float64(np.float32(hires / np.float32(s_out)))))
    rm_q, rm_e = (int(v) for v in quantize_multiplier(np.float64(np.float32(hires / np.float32(3.0 / 32768.0)))))
    if om_e > 0:
        raise ValueError("HARD_SWISH needs an output scale above the input's / 128")

    def down16(m: int) -> int:
        return 32767 if m >= I32_MAX - (1 << 15) else (m + (1 << 15)) >> 16

    def srdhm16(a, b):
        ab = np.asarray(a, np.int64) * b
        t = ab + np.where(ab >= 0, 1 << 14, 1 - (1 << 14))
        r = np.where(t >= 0, t >> 15, -((-t) >> 15))
        return np.where((a == b) & (a == -32768), 32767, r)

    def sat16(x):
        return np.clip(x, -32768, 32767)

    om16, rm16 = down16(om_q), down16(rm_q)
    hi = (np.asarray(q, np.int64) - z_in) * 128
    pre = srdhm16(hi, om16)
    r = hi
    if rm_e > 0:
        r = sat16(r * (1 << (rm_e - 1)))
    r = srdhm16(r, rm16)
    if rm_e > 0:
        r = sat16(r * 2)
    if rm_e < 0:
        r = rdpot(r, -rm_e)
    r = (r + (1 << 15)) >> 1
    ab = r * pre
    p = np.where(ab >= 0, ab >> 15, -((-ab) >> 15))  # doubling high multiply, rounding toward zero
    p = np.where((r == pre) & (r == -32768), 32767, p)
    return np.clip(rdpot(p, -om_e) + z_out, -128, 127)


def two_slopes(q: np.ndarray, alpha_q, s_in, z_in: int, s_alpha, s_out, z_out: int, qmin=-128, qmax=127):
    """PRELU (``alpha_q`` int8 at ``s_alpha``, broadcast) and LEAKY_RELU (``alpha_q`` None and
    ``s_alpha`` the float alpha): one requantization for x >= 0, one for x < 0."""
    x = np.asarray(q, np.int64) - z_in
    m1, e1 = quantize_multiplier(np.float64(s_in) / np.float64(s_out))
    pos = multiply_by_quantized_multiplier(x, m1, e1, single=False)
    if alpha_q is None:
        m2, e2 = quantize_multiplier(np.float64(s_in) * np.float64(s_alpha) / np.float64(s_out))
        neg = multiply_by_quantized_multiplier(x, m2, e2, single=False)
    else:
        m2, e2 = quantize_multiplier(np.float64(s_in) * np.float64(s_alpha) / np.float64(s_out))
        neg = multiply_by_quantized_multiplier(x * np.asarray(alpha_q, np.int64), m2, e2, single=False)
    return np.clip(np.where(x >= 0, pos, neg) + z_out, qmin, qmax)


def softmax(q: np.ndarray, axis: int, s_in, beta: float = 1.0) -> np.ndarray:
    """TFLite's int8 SOFTMAX (output scale 1/256, zero point -128) along ``axis``."""
    x = np.moveaxis(np.asarray(q, np.int64), axis, -1)
    real = min(float(beta) * float(np.float32(s_in)) * float(1 << 26), float(I32_MAX))
    mult, shift = (int(v) for v in quantize_multiplier(np.float64(real)))
    diff_min = -math.floor(31.0 * (1 << 26) / (1 << shift))
    diff = x - x.max(-1, keepdims=True)
    keep = diff >= diff_min
    scaled = srdhm(np.clip(diff << shift, I32_MIN, I32_MAX), mult)
    e = exp_on_negative_values(np.where(keep, scaled, 0))
    total = wrap32(np.where(keep, rdpot(e, 12), 0).sum(-1, keepdims=True))
    headroom = 32 - np.frexp(total.astype(np.float64))[1].astype(np.int64)  # leading zeros of a 32-bit value
    bits_over_unit = 12 - headroom
    shifted = wrap32((((total << headroom) % 2**32) - 2**31))
    scale = one_over_one_plus_x(shifted)
    out = rdpot(srdhm(scale, e), bits_over_unit + 31 - 8) - 128
    out = np.where(keep, np.clip(out, -128, 127), -128)
    return np.moveaxis(out, -1, axis)
