"""An integer reference executor of the quantized graph (:class:`~.graph.QuantGraph`), in numpy.

Inputs are quantized once; from there every integer op works on integers: int8 activations and
weights, int32 accumulators and biases, and a requantization to the next int8 tensor; moves
rearrange the integers. Ops the target has no integer kernel for (float islands) run in float32
torch on the dequantized inputs and are quantized at the island border as ``QuantizeLinear``
does, which is what a runtime with a CPU fallback computes. Two requantizations are provided:

- ``fixed`` (default): as TFLite does it, bit for bit against LiteRT's reference kernels (tested
  on every element of the zoo's int8 TFLite files, :mod:`nnshrink.io.tflite`). Each real
  multiplier ``M = s_in * s_w / s_out`` (float64) is held as a 31-bit fixed-point multiplier and
  a shift (``QuantizeMultiplier``); the accumulator is multiplied with a rounding doubling high
  multiply and shifted right with rounding, as gemmlowp rounds, except in fully connected
  layers, whose kernel rounds the exact 64-bit product once. Additions rescale both inputs to
  a common scale with 20 extra bits, as TFLite's int8 ADD; average pooling averages the stored
  integers (rounded half away from zero) and requantizes where the output's scale differs, as
  AVERAGE_POOL_2D and a QUANTIZE after it; a fused ReLU6's bound is ``round(6 / s)`` in float32.
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

import math

import numpy as np
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view

from nnshrink.errors import ConfigError, InputShapeError
from nnshrink.techniques.quant.graph import TensorQ, _fill, freeze, invoke, key
from nnshrink.techniques.quant.quantizers import int_range
from nnshrink.techniques.quant.sim import QuantSim


def quantize_multiplier(m: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Real multipliers as (int32 multiplier in [2**30, 2**31), shift): ``m = mult * 2**(shift - 31)``.

    As TFLite's ``QuantizeMultiplier``: the fraction rounded half away from zero (``std::round``),
    a shift above 30 clamped (the single-rounding kernels take no more), a multiplier below
    ``2**-31`` zero."""
    m = np.asarray(m, np.float64)
    frac, exp = np.frexp(m)
    mult = np.floor(frac * (1 << 31) + 0.5).astype(np.int64)
    carry = mult == (1 << 31)
    mult = np.where(carry, mult // 2, mult)
    exp = np.where(carry, exp + 1, exp)
    tiny = (m == 0) | (exp < -31)
    mult = np.where(tiny, 0, mult)
    exp = np.where(tiny, 0, exp)
    big = exp > 30
    mult = np.where(big, (1 << 31) - 1, mult)
    exp = np.where(big, 30, exp)
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


def multiply_by_quantized_multiplier(x: np.ndarray, mult: np.ndarray, shift: np.ndarray,
                                     single: bool = False) -> np.ndarray:
    """TFLite's ``MultiplyByQuantizedMultiplier``: ``x * mult * 2**(shift - 31)`` with rounding.

    Default: gemmlowp's two roundings (a rounding doubling high multiply, then a rounding right
    shift), as LiteRT's int8 kernels do; ``single``: one rounding, half up, of the exact 64-bit
    product (TFLite's ``TFLITE_SINGLE_ROUNDING`` form, which LiteRT's FULLY_CONNECTED uses). The two differ by 1 where the product lies just below a half."""
    shift = np.asarray(shift, np.int64)
    x = np.asarray(x, np.int64)
    if single:
        total = 31 - shift
        return (x * np.asarray(mult, np.int64) + (np.int64(1) << (total - 1))) >> total
    left = np.maximum(shift, 0)
    right = np.maximum(-shift, 0)
    xs = np.clip(x << left, -(2**31), 2**31 - 1)
    return _rounding_divide_by_pot(_srdhm(xs, mult), right)


def quantize_bound(value: float, t) -> int:
    """A real bound (a ReLU6's 6) on tensor ``t``'s grid as TFLite computes it: ``zp +
    round(value / scale)`` in float32, half away from zero, within the int range."""
    v = float(np.float32(value) / np.float32(t.scale))  # float32, then exact in float64
    r = math.floor(abs(v) + 0.5)
    return int(np.clip((r if v >= 0 else -r) + t.zp, t.qmin, t.qmax))


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


class IntegerModel:
    """The quantized graph (:class:`~.graph.QuantGraph`, or the :class:`~.sim.QuantSim` it is
    frozen from) run with integers: every integer op on integers, float ops (what the target
    has no integer kernel for) in float32 torch on the dequantized inputs, quantized at the
    island border as ``QuantizeLinear`` does.

    Args:
        graph: The quantized graph, or a calibrated sim.
        requant: ``fixed`` (TFLite's integer arithmetic, bit-exact against LiteRT's reference
            kernels) or ``float`` (ONNX Runtime's).
    """

    def __init__(self, graph, requant: str = "fixed") -> None:
        if requant not in ("fixed", "float"):
            raise ConfigError(f"requant must be 'fixed' or 'float', got {requant!r}")
        if getattr(graph, "is_quant_sim", False):
            for op in graph.layer_ops():
                if op.name not in graph.float_layers and not graph.weight_quantizer(op.name).enabled:
                    raise ConfigError(f"layer {op.name!r} has its weight quantizer switched off")
            graph = freeze(graph)
        self.graph = graph
        self.requant = requant
        self.ops = list(graph.ops)
        self.params = graph.tensors
        self.output = graph.outputs[0]
        bits = graph.act_bits
        self.qmin, self.qmax = int_range(bits, False)

    # -- requantization ---------------------------------------------------------------------
    def _requant(self, acc: np.ndarray, real_scale_f32: np.ndarray, real_scale_f64: np.ndarray, out: TensorQ,
                 channel_axis: int | None, single: bool = False) -> np.ndarray:
        shape = [1] * acc.ndim
        if channel_axis is not None:
            shape[channel_axis] = -1
        if self.requant == "float":
            v = acc.astype(np.float32) * np.asarray(real_scale_f32, np.float32).reshape(shape)
            v = np.clip(v, np.float32(out.qmin - out.zp), np.float32(out.qmax - out.zp))
            q = _round_half_even_f32(v) + out.zp
        else:
            mult, shift = quantize_multiplier(real_scale_f64)
            q = self._mbqm(acc, mult.reshape(shape), shift.reshape(shape), single) + out.zp
        return np.clip(q, out.qmin, out.qmax)

    @staticmethod
    def _mbqm(x, mult, shift, single: bool = False) -> np.ndarray:
        return multiply_by_quantized_multiplier(x, mult, shift, single=single)

    def _act(self, op, q: np.ndarray, out: TensorQ) -> np.ndarray:
        if op.act == "relu":
            return np.maximum(q, out.zp)
        if op.act == "relu6":
            if self.requant == "float":
                return np.clip(q, out.zp, int(np.clip(np.round(6.0 / np.float64(out.scale)) + out.zp, out.qmin, out.qmax)))
            return np.clip(q, out.zp, quantize_bound(6.0, out))
        return q

    # -- conversions ------------------------------------------------------------------------
    def quantize_input(self, x: np.ndarray) -> np.ndarray:
        return self._quantize(x, self.params["input"])

    @staticmethod
    def _quantize(x, t: TensorQ) -> np.ndarray:
        """``QuantizeLinear`` in float32: round half to even of ``x / scale``, plus the zero point."""
        x = x.detach().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        v = np.rint(x.astype(np.float32) / np.float32(t.scale)).astype(np.int64) + t.zp
        return np.clip(v, t.qmin, t.qmax)

    @staticmethod
    def _dequantize(q: np.ndarray, t: TensorQ) -> torch.Tensor:
        """``DequantizeLinear`` in float32: ``(q - zp) * scale``."""
        return torch.from_numpy(((q - t.zp).astype(np.float32) * np.float32(t.scale)).astype(np.float32))

    def _float(self, name: str, v):
        """A value as the float ops read it: quantized tensors dequantized (also inside tuples)."""
        if isinstance(v, np.ndarray):
            return self._dequantize(v, self.params[name])
        if isinstance(v, tuple) and v and isinstance(v[0], np.ndarray):
            return tuple(self._dequantize(e, self.params[name]) for e in v)
        return v

    def _centered(self, name: str, v):
        """A quantized tensor as a float64 torch tensor of ``q - zp`` (exact), for moves."""
        if isinstance(v, np.ndarray):
            return torch.from_numpy((v - self.params[name].zp).astype(np.float64))
        if isinstance(v, tuple) and v and isinstance(v[0], np.ndarray):
            return tuple(self._centered(name, e) for e in v)
        return v

    # -- ops ----------------------------------------------------------------------------------
    def _layer(self, op, xq: np.ndarray) -> np.ndarray:
        lq = self.graph.layers[op.name]
        t_in, t_out = self.params[op.inputs[0]], self.params[op.name]
        if lq.q is None:  # kept in float: the float layer on the dequantized input
            return self._quantize(self._float_layer(op, lq, self._dequantize(xq, t_in)), t_out)
        w = (lq.q - lq.zp.reshape([-1 if i == lq.axis else 1 for i in range(lq.q.ndim)])).astype(np.float64)
        x = (xq - t_in.zp).astype(np.float64)
        geo = lq.geometry
        if op.kind == "linear":
            acc = (x.reshape(-1, x.shape[-1]) @ w.T).reshape(*x.shape[:-1], w.shape[0])
            axis = acc.ndim - 1
        elif op.kind == "conv":
            if geo["one_d"]:
                acc = _conv(x[:, :, None, :], w[:, :, None, :], _geo2d(geo))[:, :, 0, :]
            else:
                acc = _conv(x, w, _geo2d(geo))
            axis = 1
        else:
            if geo["one_d"]:
                acc = _conv_transpose(x[:, :, None, :], w[:, :, None, :], _geo2d(geo))[:, :, 0, :]
            else:
                acc = _conv_transpose(x, w, _geo2d(geo))
            axis = 1
        acc = np.rint(acc).astype(np.int64)
        if lq.bias is not None:
            shape = [1] * acc.ndim
            shape[axis] = -1
            acc = acc + lq.bias.reshape(shape)
            if self.requant == "fixed":  # TFLite's int32 accumulator wraps (a bias at the int32 limit)
                acc = ((acc + 2**31) % 2**32) - 2**31
        scale = lq.scale if lq.scale.size > 1 else lq.scale.reshape(())
        s32 = (np.float32(t_in.scale) * scale).astype(np.float32) / np.float32(t_out.scale)
        s64 = np.float64(t_in.scale) * scale.astype(np.float64) / np.float64(t_out.scale)
        single = op.kind in _SINGLE_ROUNDING
        return self._act(op, self._requant(acc, s32.astype(np.float32), s64, t_out, axis, single), t_out)

    @staticmethod
    def _float_layer(op, lq, x: torch.Tensor) -> torch.Tensor:
        w = torch.from_numpy(lq.weight)
        b = torch.from_numpy(lq.float_bias) if lq.float_bias is not None else None
        g = lq.geometry
        if op.kind == "linear":
            y = F.linear(x, w, b)
        elif op.kind == "conv":
            y = (F.conv1d if g["one_d"] else F.conv2d)(x, w, b, g["stride"], g["padding"], g["dilation"], g["groups"])
        else:
            y = (F.conv_transpose1d if g["one_d"] else F.conv_transpose2d)(
                x, w, b, g["stride"], g["padding"], g["output_padding"], g["groups"], g["dilation"])
        return QuantSim.activation(op, y)

    def _matmul(self, op, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ta, tb, tc = self.params[op.inputs[0]], self.params[op.inputs[1]], self.params[op.name]
        acc = np.rint(np.matmul((a - ta.zp).astype(np.float64), (b - tb.zp).astype(np.float64))).astype(np.int64)
        s32 = np.float32(np.float32(ta.scale) * np.float32(tb.scale)) / np.float32(tc.scale)
        s64 = np.float64(ta.scale) * np.float64(tb.scale) / np.float64(tc.scale)
        return self._act(op, self._requant(acc, np.asarray(s32), np.asarray(s64), tc, None), tc)

    def _mul(self, op, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ta, tb, tc = self.params[op.inputs[0]], self.params[op.inputs[1]], self.params[op.name]
        if self.requant == "float":  # ONNX Runtime's QLinearMul: in float32 on the dequantized values
            f32 = np.float32
            v = ((a - ta.zp).astype(f32) * f32(ta.scale)) * ((b - tb.zp).astype(f32) * f32(tb.scale)) / f32(tc.scale)
            v = np.clip(v, f32(tc.qmin - tc.zp), f32(tc.qmax - tc.zp))
            q = _round_half_even_f32(v) + tc.zp
            return self._act(op, np.clip(q, tc.qmin, tc.qmax), tc)
        acc = (a - ta.zp) * (b - tb.zp)  # TFLite int8 MUL
        s64 = np.float64(ta.scale) * np.float64(tb.scale) / np.float64(tc.scale)
        return self._act(op, self._requant(acc, np.asarray(np.float32(s64)), np.asarray(s64), tc, None), tc)

    def _add(self, op, a: np.ndarray, b: np.ndarray) -> np.ndarray:
        ta, tb, tc = self.params[op.inputs[0]], self.params[op.inputs[1]], self.params[op.name]
        if self.requant == "float":  # MLAS QLinearAdd, on the uint8 values ONNX Runtime holds
            off = 128 if tc.qmin == -128 else 0
            f32 = np.float32
            ra, rb = f32(ta.scale) / f32(tc.scale), f32(tb.scale) / f32(tc.scale)
            # its AVX2 kernel (also the one CPUs with AVX-512 run) chains fused multiply-adds:
            # c = fma(a, ra, fma(b, rb, zc - fma(ra, za, rb * zb))); separate roundings differed
            # from it on 8 of 983,040 random elements (measured)
            fixed = f32(tc.zp + off) - _fma_f32(ra, f32(ta.zp + off), f32(rb * f32(tb.zp + off)))
            a, b = np.broadcast_arrays(a, b)
            v = _fma_f32((a + off).astype(f32), ra, _fma_f32((b + off).astype(f32), rb, fixed))
            v = np.clip(v, f32(tc.qmin + off), f32(tc.qmax + off))
            q = _round_half_even_f32(v) - off
        else:  # TFLite int8 ADD
            left = 20
            twice_max = 2 * max(float(ta.scale), float(tb.scale))
            ma, sa = quantize_multiplier(np.float64(ta.scale) / twice_max)
            mb, sb = quantize_multiplier(np.float64(tb.scale) / twice_max)
            mo, so = quantize_multiplier(twice_max / ((1 << left) * np.float64(tc.scale)))
            xa = self._mbqm((a - ta.zp) << left, ma, sa)
            xb = self._mbqm((b - tb.zp) << left, mb, sb)
            q = self._mbqm(xa + xb, mo, so) + tc.zp
        return self._act(op, np.clip(q, tc.qmin, tc.qmax), tc)

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
        if self.requant != "float":
            # TFLite's int8 AVERAGE_POOL_2D: the stored integers averaged, rounded half away from
            # zero (C division); then requantized to the output's scale (a QUANTIZE) where it differs
            off = 128 if t_in.qmin == 0 else 0  # TFLite holds int8: the rounding is not shift-invariant
            sums, half = sums - n * off, n // 2
            avg = np.where(sums > 0, (sums + half) // n, -((-sums + half) // n)) + off
            if float(t_in.scale) == float(t_out.scale) and t_in.zp == t_out.zp:
                return avg
            mult, shift = quantize_multiplier(np.float64(t_in.scale) / np.float64(t_out.scale))
            return np.clip(self._mbqm(avg - t_in.zp, mult, shift) + t_out.zp, t_out.qmin, t_out.qmax)
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

    def _clamp(self, op, xq: np.ndarray) -> np.ndarray:
        t = self.params[op.name]
        if self.requant == "float":
            lo, hi = (int(np.clip(np.round(v / np.float64(t.scale)) + t.zp, t.qmin, t.qmax)) for v in
                      (op.attrs["lo"], op.attrs["hi"]))
        else:  # TFLite's RELU6 bounds
            lo, hi = (quantize_bound(v, t) for v in (op.attrs["lo"], op.attrs["hi"]))
        return np.clip(xq, lo, hi)

    def _move(self, op, xs: list):
        if op.quant in ("shared", "tuple"):  # the integers moved: exact on q - zp in float64
            zp = self.params[op.name].zp
            y = invoke(op, [self._centered(n, v) for n, v in zip(op.inputs, xs)], self.graph.modules)
            if isinstance(y, (tuple, list)):
                return tuple(np.rint(e.numpy()).astype(np.int64) + zp for e in y)
            return np.rint(y.numpy()).astype(np.int64) + zp
        return self._compute(op, xs)

    def _compute(self, op, xs: list):
        if op.op_type == "Softmax" and op.integer and self.requant == "float" and op.quant == "own":
            return self._softmax_ort(op, xs[0])
        if self.requant == "fixed" and op.integer and op.quant == "own" and op.op_type in TFLITE_KERNELS \
                and isinstance(xs[0], np.ndarray) and self.params[op.inputs[0]].bits == 8:
            return self._tflite_kernel(op, xs[0])
        with torch.no_grad():
            y = invoke(op, [self._float(n, v) for n, v in zip(op.inputs, xs)], self.graph.modules)
        if op.quant == "own":
            return self._quantize(y, self.params[op.name])
        return y

    def _tflite_kernel(self, op, xq: np.ndarray) -> np.ndarray:
        """An op with an int8 TFLite kernel, as that kernel computes it (:mod:`.tflite_kernels`)."""
        from nnshrink.techniques.quant import tflite_kernels as K

        t_in, t_out = self.params[op.inputs[0]], self.params[op.name]
        kind = op.op_type
        if kind in ("Sigmoid", "Tanh"):
            fn = (lambda v: 1.0 / (1.0 + np.exp(-v))) if kind == "Sigmoid" else np.tanh
            return K.apply_table(K.lookup_table(fn, t_in.scale, t_in.zp, t_out.scale, t_out.zp), xq)
        if kind == "HardSwish":
            return K.hard_swish(xq, t_in.scale, t_in.zp, t_out.scale, t_out.zp)
        if kind == "LeakyRelu":
            return K.two_slopes(xq, None, t_in.scale, t_in.zp, np.float32(slope(op, self.graph.modules, xq.shape)),
                                t_out.scale, t_out.zp)
        if kind == "PRelu":
            q, s = prelu_alpha(op, self.graph.modules, xq.shape)
            return K.two_slopes(xq, q, t_in.scale, t_in.zp, s, t_out.scale, t_out.zp)
        if kind == "Softmax":
            q = K.softmax(xq, op.attrs["axis"], t_in.scale)
            return np.clip(q + (t_out.zp + 128), t_out.qmin, t_out.qmax)  # the grid is fixed at 1/256, qmin
        if kind == "HardSigmoid":
            return hard_sigmoid(self, xq, t_in, t_out)
        raise AssertionError(kind)

    def _softmax_ort(self, op, xq: np.ndarray) -> np.ndarray:
        """ONNX Runtime's QLinearSoftmax: a float32 table of ``exp((i - 255 + shift) * s_x)`` over
        the uint8 inputs, indexed from the row's maximum; the row's float32 sum; each output
        ``nearbyint(e * floor(1 / s_y) / sum) + z_y``, saturated at 255."""
        t_in, t_out = self.params[op.inputs[0]], self.params[op.name]
        axis, off = op.attrs["axis"], (128 if t_out.qmin == -128 else 0)
        x = np.moveaxis(xq + off, axis, -1)
        d = x.shape[-1]
        shift = max(0.0, float(np.log(np.float64(np.finfo(np.float32).max) / d)) - 5.0) / np.float64(t_in.scale)
        table = np.exp((np.arange(256, dtype=np.float64) - 255 + shift) * np.float64(t_in.scale)).astype(np.float32)
        e = table[255 - x.max(axis=-1, keepdims=True) + x]
        total = np.zeros(e.shape[:-1] + (1,), np.float32)
        for i in range(d):  # summed in order, in float32
            total = (total + e[..., i:i + 1]).astype(np.float32)
        y_scale = np.float32(np.floor(np.float32(1.0) / np.float32(t_out.scale)))
        q = np.rint((e * y_scale).astype(np.float32) / total).astype(np.int64) + (t_out.zp + off)
        q = np.minimum(q, 255) - off
        return np.moveaxis(q, -1, axis)

    def _value(self, op, xs: list):
        def as_torch(v):
            if isinstance(v, np.ndarray):
                return torch.from_numpy(v)
            if isinstance(v, tuple) and v and isinstance(v[0], np.ndarray):
                return tuple(torch.from_numpy(e) for e in v)
            return v
        return invoke(op, [as_torch(v) for v in xs], self.graph.modules)

    def _const(self, op, xs: list):
        value = self.graph.consts.get(key(op.name))
        if value is None:
            return op.attrs["value"]
        return self._quantize(value.detach(), self.params[op.name]) if op.quant == "own" else value.detach()

    def run(self, x: np.ndarray) -> dict[str, object]:
        """Every value: integer tensors (``input`` when quantized, and every quantized op's
        output) as int64 arrays of int8 values, float tensors as torch tensors."""
        x = np.asarray(x, np.float32)
        env = {"input": self.quantize_input(x) if "input" in self.params else torch.from_numpy(x)}
        try:
            for op in self.ops:
                env[op.name] = _INT[op.kind](self, op, [env[i] for i in op.inputs])
        except (ValueError, RuntimeError) as exc:
            raise InputShapeError(f"the integer reference cannot run on inputs of shape {x.shape[1:]}: {exc}") from exc
        return env

    def __call__(self, x: np.ndarray):
        """The model's float output(s): output integers dequantized."""
        env = self.run(x)
        outs = []
        for name in self.graph.outputs:
            v = env[name]
            outs.append(self._dequantize(v, self.params[name]).numpy() if isinstance(v, np.ndarray)
                        else v.detach().numpy() if isinstance(v, torch.Tensor) else v)
        result = _fill(self.graph.output_tree, outs)
        return result


# Ops whose TFLite int8 kernel the fixed mode computes as TFLite does (:meth:`IntegerModel._tflite_kernel`)
TFLITE_KERNELS = frozenset({"Sigmoid", "Tanh", "HardSwish", "LeakyRelu", "PRelu", "Softmax", "HardSigmoid"})

# HardSigmoid has no TFLite builtin: relu6(x + 3) / 6 is an ADD of the constant 3 onto a grid
# spanning exactly [0, 6] (its int8 saturation is the ReLU6), then a MUL by the constant 1/6
HSIG_MID = TensorQ(np.float32(6.0 / 255.0), -128, 8, -128, 127, "")
HSIG_THREE = TensorQ(np.float32(3.0 / 127.0), 0, 8, -127, 127, "")  # 3.0 is 127 on it
HSIG_SIXTH = TensorQ(np.float32(1.0 / 6.0 / 127.0), 0, 8, -127, 127, "")  # 1/6 is 127 on it


def hard_sigmoid(ref: IntegerModel, xq: np.ndarray, t_in: TensorQ, t_out: TensorQ) -> np.ndarray:
    """HardSigmoid as the two int8 ops the TFLite writer emits for it."""
    from nnshrink.techniques.quant.graph import Op

    add = Op("", "add", ["a", "b"])
    mul = Op("", "mul", ["a", "b"])
    saved = ref.params
    try:
        ref.params = {"a": t_in, "b": HSIG_THREE, "": HSIG_MID}
        mid = ref._add(add, xq, np.array(127))
        ref.params = {"a": HSIG_MID, "b": HSIG_SIXTH, "": t_out}
        return ref._mul(mul, mid, np.array(127))
    finally:
        ref.params = saved


def _probe(op, modules, shape) -> np.ndarray:
    """The op's output on -1 everywhere (float64): minus its negative slope, per element."""
    with torch.no_grad():
        y = invoke(op, [-torch.ones(shape, dtype=torch.float32)], modules)
    return -y.double().numpy()


def slope(op, modules, shape) -> float:
    """A LeakyRelu's negative slope (the same everywhere)."""
    a = _probe(op, modules, shape)
    return float(np.float32(a.flat[0]))


def prelu_alpha(op, modules, shape) -> tuple[np.ndarray, np.float32]:
    """A PReLU's slopes as TFLite's int8 PRELU takes them: one per channel (axis 1, or one
    for all), symmetric int8 on one scale. Returns (integers, broadcast against the NCHW
    input; scale)."""
    a = _probe(op, modules, shape)
    per = a.reshape(a.shape[0], a.shape[1], -1) if a.ndim > 1 else a.reshape(1, -1, 1)
    alpha = per[0, :, 0].astype(np.float32)
    scale = np.float32(max(float(np.abs(alpha).max()), 1e-12) / 127.0)
    q = np.clip(np.rint(alpha / scale), -127, 127).astype(np.int64)
    return q.reshape([1, -1] + [1] * (len(shape) - 2)) if len(shape) > 1 else q, scale


# The ops whose TFLite kernel rounds a requantization once (the exact 64-bit product, half up);
# the others round twice as gemmlowp does. Measured against LiteRT 2.3's reference kernels: its
# FULLY_CONNECTED rounds once, CONV_2D, DEPTHWISE_CONV_2D, MUL and QUANTIZE twice (each
# differs from the other rounding on thousands of random elements); ADD is the same either way
# on every element tried (its 20 extra bits leave no near-ties).
_SINGLE_ROUNDING = frozenset({"linear"})
_INT = {
    "conv": lambda m, op, xs: m._layer(op, xs[0]),
    "convt": lambda m, op, xs: m._layer(op, xs[0]),
    "linear": lambda m, op, xs: m._layer(op, xs[0]),
    "matmul": lambda m, op, xs: m._matmul(op, *xs),
    "add": lambda m, op, xs: m._add(op, *xs),
    "mul": lambda m, op, xs: m._mul(op, *xs),
    "gap": lambda m, op, xs: m._pool_avg(op, xs[0]),
    "avgpool": lambda m, op, xs: m._pool_avg(op, xs[0]),
    "concat": lambda m, op, xs: m._concat(op, xs),
    "clamp": lambda m, op, xs: m._clamp(op, xs[0]),
    "move": lambda m, op, xs: m._move(op, xs),
    "compute": lambda m, op, xs: m._compute(op, xs),
    "value": lambda m, op, xs: m._value(op, xs),
    "const": lambda m, op, xs: m._const(op, xs),
}


def _geo2d(geo: dict) -> dict:
    one = geo["one_d"]

    def pair(v):
        v = tuple(v)
        return (1, v[0]) if one else (v[0], v[1])

    out = {"stride": pair(geo["stride"]), "padding": (0, geo["padding"][0]) if one else tuple(geo["padding"]),
           "dilation": pair(geo["dilation"]), "groups": geo["groups"]}
    if "output_padding" in geo:
        out["output_padding"] = (0, geo["output_padding"][0]) if one else tuple(geo["output_padding"])
    return out


def _conv_transpose(x: np.ndarray, w: np.ndarray, geo: dict) -> np.ndarray:
    """Grouped 2-D transposed convolution of float64 arrays holding integers (exact): the input
    spread out by the stride, padded by ``dilation * (k - 1) - padding``, convolved with the
    kernel flipped and its in/out axes swapped."""
    (sh, sw), (ph, pw), (dh, dw), g = geo["stride"], geo["padding"], geo["dilation"], geo["groups"]
    oph, opw = geo.get("output_padding", (0, 0))
    n, c, h, wd = x.shape
    cin, og, kh, kw = w.shape
    xs = np.zeros((n, c, (h - 1) * sh + 1, (wd - 1) * sw + 1))
    xs[:, :, ::sh, ::sw] = x
    eh, ew = dh * (kh - 1), dw * (kw - 1)
    top, left = eh - ph, ew - pw
    bottom, right = eh - ph + oph, ew - pw + opw
    xs = np.pad(xs, ((0, 0), (0, 0), (max(top, 0), max(bottom, 0)), (max(left, 0), max(right, 0))))
    xs = xs[:, :, max(-top, 0):xs.shape[2] - max(-bottom, 0), max(-left, 0):xs.shape[3] - max(-right, 0)]
    wf = w[:, :, ::-1, ::-1].reshape(g, cin // g, og, kh, kw).transpose(0, 2, 1, 3, 4).reshape(g * og, cin // g, kh, kw)
    return _conv(xs, np.ascontiguousarray(wf), {"stride": (1, 1), "padding": (0, 0), "dilation": (dh, dw), "groups": g})


def _conv(x: np.ndarray, w: np.ndarray, geo: dict) -> np.ndarray:
    """Grouped 2-D convolution of float64 arrays holding integers (exact)."""
    (sh, sw), (ph, pw), (dh, dw), g = geo["stride"], geo["padding"], geo["dilation"], geo["groups"]
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
