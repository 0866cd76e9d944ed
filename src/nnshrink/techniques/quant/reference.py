"""An integer-only reference executor of the quantized graph, in numpy.

Inputs are quantized once; from there every op works on integers: int8 activations and weights,
int32 accumulators and biases, and a requantization to the next int8 tensor. Two
requantizations are provided:

- ``fixed`` (default): as TFLite and Ethos-U do it. Each real multiplier ``M = s_in * s_w /
  s_out`` is held as a 31-bit fixed-point multiplier and a shift; the accumulator is multiplied
  with a rounding doubling high multiply and shifted right with rounding, bit for bit as
  gemmlowp (which TFLite uses) rounds.
  Additions rescale both inputs to a common scale with 20 extra bits, as TFLite's int8 ADD.
- ``float``: as ONNX Runtime's x86 kernels (MLAS) do it: ``float32(acc) * float32(s_in * s_w /
  s_out)``, clamped, rounded half to even; QLinearAdd (with its fused multiply-adds) and global
  average pooling likewise in float32 on the uint8 values ONNX Runtime holds. This mode
  reproduces ONNX Runtime's integers exactly on every x86 CPU for a model written for the
  ``ort-x86`` target (tested on the zoo, natively and on an emulated AVX2-only CPU).

The two differ by at most one step (1 LSB) per requantization, because the fixed-point multiplier
rounds ``M`` to 31 bits and the rounding of ties differs; each layer of the fixed mode, fed the
same integers, is within 1 LSB of ONNX Runtime (tested). Over a whole network those steps can
add up; the float mode is the one to compare end to end.

Products of int8 values are summed in float64 (BLAS), which is exact: every partial sum stays far
below 2**53.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

from nnshrink.errors import ConfigError, InputShapeError


def quantize_multiplier(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Real multipliers as (int32 multiplier in [2**30, 2**31), shift): ``m = mult * 2**(shift - 31)``."""
    m = np.asarray(m, np.float64)
    frac, exp = np.frexp(m)
    mult = np.round(frac * (1 << 31)).astype(np.int64)
    carry = mult == (1 << 31)
    mult = np.where(carry, mult // 2, mult)
    exp = np.where(carry, exp + 1, exp)
    mult = np.where(m == 0, 0, mult)
    exp = np.where(m == 0, 0, exp)
    return mult.astype(np.int64), exp.astype(np.int64)


def _srdhm(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Saturating rounding doubling high multiply of int32 values (gemmlowp), in int64."""
    ab = a.astype(np.int64) * b.astype(np.int64)
    nudge = np.where(ab >= 0, 1 << 30, 1 - (1 << 30))
    out = ab + nudge
    # C division truncates toward zero
    res = np.where(out >= 0, out >> 31, -((-out) >> 31))
    overflow = (a == b) & (a == -(2**31))
    return np.where(overflow, 2**31 - 1, res)


def _rounding_divide_by_pot(x: np.ndarray, exponent: np.ndarray) -> np.ndarray:
    """``x / 2**exponent`` rounded half away from zero (gemmlowp's RoundingDivideByPOT)."""
    exponent = np.asarray(exponent, np.int64)
    mask = (np.int64(1) << exponent) - 1
    remainder = x & mask
    threshold = (mask >> 1) + (x < 0)
    return (x >> exponent) + (remainder > threshold)


def multiply_by_quantized_multiplier(x: np.ndarray, mult: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """TFLite's ``MultiplyByQuantizedMultiplier``: ``x * mult * 2**(shift - 31)`` with rounding."""
    shift = np.asarray(shift, np.int64)
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    xs = np.clip(x.astype(np.int64) << left, -(2**31), 2**31 - 1)
    return _rounding_divide_by_pot(_srdhm(xs, mult), right)


def _fma_f32(x, y, z) -> np.ndarray:
    """float32 ``x * y + z`` rounded once, as an FMA instruction computes it (numpy has none).

    The product of two float32 values is exact in float64; the sum is rounded to odd in float64
    (TwoSum gives its exact error), and rounding that to float32 is then the correctly rounded
    result, because float64 has more than 2 * 24 + 1 bits."""
    x, y, z = (np.asarray(v, np.float32).astype(np.float64) for v in (x, y, z))
    prod = x * y
    total = prod + z
    virtual = total - z
    err = (prod - virtual) + (z - (total - virtual))
    even = (total.view(np.int64) & 1) == 0
    total = np.where((err != 0) & even, np.nextafter(total, np.where(err > 0, np.inf, -np.inf)), total)
    return total.astype(np.float32)


def _round_half_even_f32(v: np.ndarray) -> np.ndarray:
    return np.rint(v.astype(np.float32)).astype(np.int64)


@dataclass
class _T:
    """Quantization of an integer tensor: ``real = (q - zp) * scale``."""

    scale: np.float32
    zp: int


class IntegerModel:
    """The quantized graph of a :class:`~nnshrink.techniques.quant.QuantSim`, run with integers only.

    Args:
        sim: The quantized model (calibrated; weights of every layer quantized).
        requant: ``fixed`` (TFLite / Ethos-U arithmetic) or ``float`` (ONNX Runtime's).
    """

    def __init__(self, sim, requant: str = "fixed") -> None:
        if requant not in ("fixed", "float"):
            raise ConfigError(f"requant must be 'fixed' or 'float', got {requant!r}")
        if sim.float_layers:
            raise ConfigError("the integer reference needs every layer quantized; kept in float: "
                              + ", ".join(sorted(sim.float_layers)))
        self.requant = requant
        self.ops = list(sim.ops)
        self.output = sim.output
        aq = sim.aq["input"]
        self.qmin, self.qmax = aq.qmin, aq.qmax
        self.params: dict[str, _T] = {"input": self._t(aq)}
        self.weights: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray | None, dict]] = {}
        for op in self.ops:
            if op.quantized_output:
                self.params[op.name] = self._t(sim.aq[op.name.replace(".", "__")])
            else:
                self.params[op.name] = self.params[op.inputs[0]]
            if op.kind in ("conv", "linear"):
                layer, wq = sim.layer(op.name), sim.weight_quantizer(op.name)
                if not wq.enabled:
                    raise ConfigError(f"layer {op.name!r} has its weight quantizer switched off")
                q = wq.integers(layer.weight).numpy().astype(np.int64)
                w_scale = wq.scale.detach().numpy().astype(np.float32).reshape(-1)
                w_zp = wq.zero_point.numpy().astype(np.int64).reshape(-1)
                w_scale = np.broadcast_to(w_scale, (q.shape[0],)).copy()
                w_zp = np.broadcast_to(w_zp, (q.shape[0],)).copy()
                s_in = self.params[op.inputs[0]].scale
                bscale = (np.float32(s_in) * w_scale).astype(np.float32)
                bias = None
                if layer.bias is not None:
                    b = layer.bias.detach().numpy().astype(np.float64)
                    bias = np.clip(np.round(b / bscale.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int64)
                geo = {}
                if op.kind == "conv":
                    one_d = layer.weight.dim() == 3
                    geo = {"stride": _pair(layer.stride, one_d), "padding": _pair(layer.padding, one_d),
                           "dilation": _pair(layer.dilation, one_d), "groups": layer.groups, "one_d": one_d}
                    if one_d:
                        q = q[:, :, None, :]
                self.weights[op.name] = (q - w_zp.reshape((-1,) + (1,) * (q.ndim - 1)), w_scale, bias, geo)

    @staticmethod
    def _t(aq) -> _T:
        return _T(np.float32(aq.scale.detach()), int(aq.zero_point))

    # -- requantization ---------------------------------------------------------------------
    def _requant(self, acc: np.ndarray, real_scale_f32: np.ndarray, real_scale_f64: np.ndarray, out: _T,
                 channel_axis: int | None) -> np.ndarray:
        shape = [1] * acc.ndim
        if channel_axis is not None:
            shape[channel_axis] = -1
        if self.requant == "float":
            v = acc.astype(np.float32) * real_scale_f32.reshape(shape)
            v = np.clip(v, np.float32(self.qmin - out.zp), np.float32(self.qmax - out.zp))
            q = _round_half_even_f32(v) + out.zp
        else:
            mult, shift = quantize_multiplier(real_scale_f64)
            q = multiply_by_quantized_multiplier(acc, mult.reshape(shape), shift.reshape(shape)) + out.zp
        return np.clip(q, self.qmin, self.qmax)

    def _act(self, op, q: np.ndarray, out: _T) -> np.ndarray:
        if op.act == "relu" or op.kind == "relu":
            return np.maximum(q, out.zp)
        if op.act == "relu6" or op.kind == "relu6":
            q6 = int(np.clip(np.round(6.0 / np.float64(out.scale)) + out.zp, self.qmin, self.qmax))
            return np.clip(q, out.zp, q6)
        return q

    # -- ops ----------------------------------------------------------------------------------
    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        t = self.params["input"]
        v = np.rint(x.astype(np.float32) / t.scale).astype(np.int64) + t.zp
        return np.clip(v, self.qmin, self.qmax)

    def _layer(self, op, xq: np.ndarray) -> np.ndarray:
        w, w_scale, bias, geo = self.weights[op.name]
        t_in, t_out = self.params[op.inputs[0]], self.params[op.name]
        x = (xq - t_in.zp).astype(np.float64)
        if op.kind == "linear":
            acc = x @ w.astype(np.float64).T
            axis = 1
        else:
            acc = _conv(x[:, :, None, :] if geo["one_d"] else x, w.astype(np.float64), geo)
            if geo["one_d"]:
                acc = acc[:, :, 0, :]
            axis = 1
        acc = np.rint(acc).astype(np.int64)
        if bias is not None:
            shape = [1] * acc.ndim
            shape[axis] = -1
            acc = acc + bias.reshape(shape)
        s32 = (np.float32(t_in.scale) * w_scale).astype(np.float32) / np.float32(t_out.scale)
        s64 = np.float64(t_in.scale) * w_scale.astype(np.float64) / np.float64(t_out.scale)
        return self._act(op, self._requant(acc, s32.astype(np.float32), s64, t_out, axis), t_out)

    def _add(self, op, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ta, tb, tc = self.params[op.inputs[0]], self.params[op.inputs[1]], self.params[op.name]
        if self.requant == "float":  # MLAS QLinearAdd, on the uint8 values ONNX Runtime holds
            off = 128 if self.qmin == -128 else 0
            f32 = np.float32
            ra, rb = f32(ta.scale) / f32(tc.scale), f32(tb.scale) / f32(tc.scale)
            # its AVX2 kernel (also the one CPUs with AVX-512 run) chains fused multiply-adds:
            # c = fma(a, ra, fma(b, rb, zc - fma(ra, za, rb * zb))); separate roundings differed
            # from it on 8 of 983,040 random elements (measured)
            fixed = f32(tc.zp + off) - _fma_f32(ra, f32(ta.zp + off), f32(rb * f32(tb.zp + off)))
            v = _fma_f32((a + off).astype(f32), ra, _fma_f32((b + off).astype(f32), rb, fixed))
            v = np.clip(v, f32(self.qmin + off), f32(self.qmax + off))
            q = _round_half_even_f32(v) - off
        else:  # TFLite int8 ADD
            left = 20
            twice_max = 2 * max(float(ta.scale), float(tb.scale))
            ma, sa = quantize_multiplier(np.float64(ta.scale) / twice_max)
            mb, sb = quantize_multiplier(np.float64(tb.scale) / twice_max)
            mo, so = quantize_multiplier(twice_max / ((1 << left) * np.float64(tc.scale)))
            xa = multiply_by_quantized_multiplier((a - ta.zp) << left, ma, sa)
            xb = multiply_by_quantized_multiplier((b - tb.zp) << left, mb, sb)
            q = multiply_by_quantized_multiplier(xa + xb, mo, so) + tc.zp
        return self._act(op, np.clip(q, self.qmin, self.qmax), tc)

    def _pool_avg(self, op, xq: np.ndarray) -> np.ndarray:
        t_in, t_out = self.params[op.inputs[0]], self.params[op.name]
        if op.kind == "gap":
            n = xq.shape[2] * xq.shape[3]
            sums = xq.sum(axis=(2, 3), keepdims=True)
        else:
            kh, kw = op.attrs["kernel"]
            sh, sw = op.attrs["stride"]
            n = kh * kw
            win = sliding_window_view(xq, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
            sums = win.sum(axis=(-1, -2))
        acc = sums - n * t_in.zp
        s32 = np.float32(t_in.scale) / (np.float32(t_out.scale) * np.float32(n))
        s64 = np.float64(t_in.scale) / (np.float64(t_out.scale) * n)
        return self._requant(acc, np.asarray(s32, np.float32), np.asarray(s64), t_out, None)

    def _concat(self, op, xs: list[np.ndarray]) -> np.ndarray:
        tc = self.params[op.name]
        parts = []
        for name, x in zip(op.inputs, xs):
            t = self.params[name]
            s32 = np.asarray(np.float32(t.scale) / np.float32(tc.scale), np.float32)
            s64 = np.asarray(np.float64(t.scale) / np.float64(tc.scale))
            parts.append(self._requant(x - t.zp, s32, s64, tc, None))
        return np.concatenate(parts, axis=op.attrs["axis"])

    def run(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """All integer tensors (``input`` and every op's output), as int64 arrays of int8 values."""
        x = np.asarray(x, np.float32)
        env = {"input": self.quantize_input(x)}
        try:
            for op in self.ops:
                xs = [env[i] for i in op.inputs]
                k = op.kind
                if k in ("conv", "linear"):
                    y = self._layer(op, xs[0])
                elif k == "add":
                    y = self._add(op, xs[0], xs[1])
                elif k in ("gap", "avgpool"):
                    y = self._pool_avg(op, xs[0])
                elif k == "maxpool":
                    y = _maxpool(xs[0], op.attrs, self.qmin)
                elif k == "flatten":
                    y = xs[0].reshape(len(xs[0]), -1)
                elif k in ("relu", "relu6"):
                    y = self._act(op, xs[0], self.params[op.name])
                elif k == "concat":
                    y = self._concat(op, xs)
                else:  # pragma: no cover - the lowering makes only the kinds above
                    raise ConfigError(f"no integer form for op kind {k!r}")
                env[op.name] = y
        except ValueError as exc:
            raise InputShapeError(f"the integer reference cannot run on inputs of shape {x.shape[1:]}: {exc}") from exc
        return env

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The model's float output: the output integers dequantized."""
        q = self.run(x)[self.output]
        t = self.params[self.output]
        return ((q - t.zp) * np.float32(t.scale)).astype(np.float32)


def _pair(v, one_d: bool) -> tuple[int, int]:
    v = tuple(v) if isinstance(v, (tuple, list)) else (v,)
    if one_d:
        return (1, v[0]) if len(v) == 1 else (1, v[-1])
    return (v[0], v[0]) if len(v) == 1 else (v[0], v[1])


def _conv(x: np.ndarray, w: np.ndarray, geo: dict) -> np.ndarray:
    """Grouped 2-D convolution of float64 arrays holding integers (exact)."""
    (sh, sw), (ph, pw), (dh, dw), g = geo["stride"], geo["padding"], geo["dilation"], geo["groups"]
    if geo["one_d"]:
        ph = 0
    x = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    o, cg, kh, kw = w.shape
    n, c, h, wd = x.shape
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    win = sliding_window_view(x, (eh, ew), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]  # n c oh ow kh kw
    oh, ow = win.shape[2], win.shape[3]
    win = win.reshape(n, g, cg, oh, ow, kh, kw)
    wg = w.reshape(g, o // g, cg, kh, kw)
    out = np.einsum("ngchwij,gocij->ngohw", win, wg, optimize=True)
    return out.reshape(n, o, oh, ow)


def _maxpool(x: np.ndarray, attrs: dict, pad_value: int) -> np.ndarray:
    (kh, kw), (sh, sw), (ph, pw) = attrs["kernel"], attrs["stride"], attrs["padding"]
    (dh, dw) = attrs.get("dilation", (1, 1))
    if attrs.get("ceil"):
        raise ConfigError("the integer reference does not implement ceil_mode max pooling")
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    eh, ew = dh * (kh - 1) + 1, dw * (kw - 1) + 1
    win = sliding_window_view(xp, (eh, ew), axis=(2, 3))[:, :, ::sh, ::sw, ::dh, ::dw]
    return win.max(axis=(-1, -2))
