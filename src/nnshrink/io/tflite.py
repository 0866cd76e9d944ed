"""A fully int8 TFLite model written from the quantized graph, without TensorFlow.

The writer is one more reader of :class:`~nnshrink.techniques.quant.graph.QuantGraph`, beside the
ONNX QDQ writer and the integer reference: each op kind has one handler that emits TFLite
builtins, with the integers the graph derived (int8 per-channel weights, int32 biases, every
activation's scale and zero point). The flatbuffer is built with the ``flatbuffers`` runtime and
the generated TFLite schema of the PyPI ``tflite`` package; TensorFlow and its converter are not
needed (and would not see our integers: the converter re-quantizes a float model itself).

What is written is what Ethos-U's compiler (Vela) and TFLite Micro take:

- NHWC activations (a 1-D conv's ``[N, C, L]`` as ``[N, 1, L, C]``), batch 1, static shapes;
  a 4-D input or output is NHWC, as TFLite models have them;
- int8 activations (uint8 grids shifted by 128: the same arithmetic), int8 weights (symmetric,
  per output channel), int32 biases at ``s_in * s_w``;
- CONV_2D, DEPTHWISE_CONV_2D, FULLY_CONNECTED, ADD, MUL, AVERAGE_POOL_2D (also for a global
  average pool), MAX_POOL_2D, CONCATENATION, RESHAPE, TRANSPOSE, STRIDED_SLICE, PAD,
  RESIZE_NEAREST_NEIGHBOR, RELU, RELU6 with fused ReLU/ReLU6, and QUANTIZE where TFLite's int8
  kernel wants its inputs at the output's scale (CONCATENATION, AVERAGE_POOL_2D) and ours has its
  own;
- a flatten of an NHWC tensor into a fully connected layer permutes the layer's weight columns
  instead of transposing the activations (what TFLite converters do).

Bit-exactness: TFLite's reference kernels (LiteRT's ``OpResolverType.BUILTIN_REF``) give exactly
the integers of :class:`~nnshrink.techniques.quant.reference.IntegerModel` in ``fixed`` mode,
every element (tests). LiteRT's default path (XNNPACK) rounds some requantizations differently
(1 LSB), so the comparison is made with the reference kernels.

An op with no int8 TFLite form here (a float island, a grouped conv that is not depthwise, an
LSTM, LayerNorm, a sigmoid...) is refused with its name and type: a fully int8 file has no
float fallback.
"""

from __future__ import annotations

import importlib
import itertools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nnshrink.cache import atomic_write_bytes
from nnshrink.errors import ConfigError, UnsupportedModelError, UnsupportedOpError
from nnshrink.techniques.quant.graph import QuantGraph, TensorQ, freeze, invoke, key

NHWC = (0, 2, 3, 1)  # torch NCHW axes in TFLite's order
NLC = (0, 2, 1)  # a 1-D conv's [N, C, L] as [N, L, C] (written [N, 1, L, C])


def _schema():
    try:
        import flatbuffers  # noqa: F401
        import tflite
    except ImportError as exc:
        raise ConfigError("writing TFLite needs the tflite schema package: pip install 'nnshrink[tflite]'") from exc
    return tflite


def _m(name: str):
    return importlib.import_module(f"tflite.{name}")


@dataclass
class _Tensor:
    name: str
    shape: tuple[int, ...]
    dtype: str  # int8 | int32
    buffer: int = 0
    scale: list[float] | None = None
    zero_point: list[int] | None = None
    axis: int = 0


@dataclass
class _Value:
    """A value of the graph as written: its TFLite tensor and how its data is ordered.

    ``layout`` is ``plain`` (as torch), ``nhwc``, ``nlc`` or ``flat`` (a rank-2 tensor whose
    columns are the torch columns permuted by ``perm``: a flatten of an NHWC tensor); ``source``
    names the value a ``flat`` one was flattened from."""

    tensor: int
    layout: str
    shape: tuple[int, ...]  # the torch shape
    perm: np.ndarray | None = None
    source: str | None = None


class _Model:
    """TFLite tensors, buffers and operators, serialized at the end (flatbuffers builds
    children before parents)."""

    def __init__(self) -> None:
        self.tensors: list[_Tensor] = []
        self.buffers: list[bytes] = [b""]
        self.ops: list[tuple] = []
        self.codes: dict[tuple[int, int], int] = {}

    def tensor(self, name: str, shape, dtype: str = "int8", data: np.ndarray | None = None,
               scale=None, zero_point=None, axis: int = 0) -> int:
        buffer = 0
        if data is not None:
            arr = np.ascontiguousarray(np.asarray(data).astype({"int8": np.int8, "int32": np.int32}[dtype]))
            if arr.shape != tuple(shape):
                raise AssertionError(f"{name}: data {arr.shape} for shape {tuple(shape)}")
            self.buffers.append(arr.astype(arr.dtype.newbyteorder("<")).tobytes())
            buffer = len(self.buffers) - 1
        if scale is not None:
            scale = [float(s) for s in np.atleast_1d(scale)]
            zero_point = [int(z) for z in np.atleast_1d(zero_point if zero_point is not None else 0)]
        self.tensors.append(_Tensor(name, tuple(int(d) for d in shape), dtype, buffer, scale, zero_point, axis))
        return len(self.tensors) - 1

    def const_i32(self, name: str, values) -> int:
        v = np.asarray(values, np.int32)
        return self.tensor(name, v.shape, "int32", v)

    def op(self, code: str, inputs: list[int], outputs: list[int], options: tuple | None = None,
           version: int = 1) -> None:
        self.ops.append((code, inputs, outputs, options, version))

    # -- serialization ----------------------------------------------------------------------------
    def serialize(self, inputs: list[int], outputs: list[int], description: str) -> bytes:
        import flatbuffers

        tfl = _schema()
        b = flatbuffers.Builder(1024)

        def vec_offsets(start, items):
            start(b, len(items))
            for o in reversed(items):
                b.PrependUOffsetTRelative(o)
            return b.EndVector()

        def vec_i32(values):
            return b.CreateNumpyVector(np.asarray(values, np.int32))

        buffers = []
        for data in self.buffers:
            off = None
            if data:
                b.StartVector(1, len(data), 16)  # 16-byte aligned data, as TFLite's writer does
                b.head = b.head - len(data)
                b.Bytes[b.head:b.head + len(data)] = data
                off = b.EndVector()
            _m("Buffer").Start(b)
            if off is not None:
                _m("Buffer").AddData(b, off)
            buffers.append(_m("Buffer").End(b))
        tensors = []
        for t in self.tensors:
            name = b.CreateString(t.name)
            shape = vec_i32(t.shape)
            quant = None
            if t.scale is not None:
                q = _m("QuantizationParameters")
                scale = b.CreateNumpyVector(np.asarray(t.scale, np.float32))
                zp = b.CreateNumpyVector(np.asarray(t.zero_point, np.int64))
                q.Start(b)
                q.AddScale(b, scale)
                q.AddZeroPoint(b, zp)
                q.AddQuantizedDimension(b, t.axis)
                quant = q.End(b)
            m = _m("Tensor")
            m.Start(b)
            m.AddShape(b, shape)
            m.AddType(b, {"int8": tfl.TensorType.INT8, "int32": tfl.TensorType.INT32}[t.dtype])
            m.AddBuffer(b, t.buffer)
            m.AddName(b, name)
            if quant is not None:
                m.AddQuantization(b, quant)
            tensors.append(m.End(b))
        operators = []
        for code, ins, outs, options, version in self.ops:
            builtin = getattr(tfl.BuiltinOperator, code)
            index = self.codes.setdefault((builtin, version), len(self.codes))
            opt = None
            if options is not None:
                kind, fields = options
                om = _m(kind)
                built = {k: (vec_i32(v) if isinstance(v, (list, tuple)) else v) for k, v in fields.items()}
                om.Start(b)
                for k, v in built.items():
                    getattr(om, "Add" + k)(b, v)
                opt = om.End(b)
            ins_v, outs_v = vec_i32(ins), vec_i32(outs)
            m = _m("Operator")
            m.Start(b)
            m.AddOpcodeIndex(b, index)
            m.AddInputs(b, ins_v)
            m.AddOutputs(b, outs_v)
            if opt is not None:
                m.AddBuiltinOptionsType(b, getattr(tfl.BuiltinOptions, options[0]))
                m.AddBuiltinOptions(b, opt)
            operators.append(m.End(b))
        codes = []
        for (builtin, version), _ in sorted(self.codes.items(), key=lambda kv: kv[1]):
            m = _m("OperatorCode")
            m.Start(b)
            m.AddDeprecatedBuiltinCode(b, min(builtin, 127))
            m.AddBuiltinCode(b, builtin)
            m.AddVersion(b, version)
            codes.append(m.End(b))
        sg = _m("SubGraph")
        t_vec = vec_offsets(sg.StartTensorsVector, tensors)
        o_vec = vec_offsets(sg.StartOperatorsVector, operators)
        i_vec, out_vec = vec_i32(inputs), vec_i32(outputs)
        sg_name = b.CreateString("main")
        sg.Start(b)
        sg.AddTensors(b, t_vec)
        sg.AddInputs(b, i_vec)
        sg.AddOutputs(b, out_vec)
        sg.AddOperators(b, o_vec)
        sg.AddName(b, sg_name)
        subgraph = sg.End(b)
        mm = _m("Model")
        c_vec = vec_offsets(mm.StartOperatorCodesVector, codes)
        s_vec = vec_offsets(mm.StartSubgraphsVector, [subgraph])
        b_vec = vec_offsets(mm.StartBuffersVector, buffers)
        desc = b.CreateString(description)
        mm.Start(b)
        mm.AddVersion(b, 3)
        mm.AddOperatorCodes(b, c_vec)
        mm.AddSubgraphs(b, s_vec)
        mm.AddDescription(b, desc)
        mm.AddBuffers(b, b_vec)
        b.Finish(mm.End(b), file_identifier=b"TFL3")
        return bytes(b.Output())


def _act_code(act: str | None) -> int:
    tfl = _schema()
    return {None: tfl.ActivationFunctionType.NONE, "relu": tfl.ActivationFunctionType.RELU,
            "relu6": tfl.ActivationFunctionType.RELU6}[act]


def _padding_modes(size: int, k: int, s: int, d: int, p: int) -> set[str]:
    """TFLite's padding modes (``SAME``, ``VALID``) that give torch's symmetric padding ``p`` on
    one axis: none, one, or both (a 1x1 axis)."""
    eff = d * (k - 1) + 1
    out = (size + 2 * p - eff) // s + 1
    modes = set()
    if p == 0 and out == -(-(size - eff + 1) // s):
        modes.add("VALID")
    same_out = -(-size // s)
    total = max((same_out - 1) * s + eff - size, 0)
    if out == same_out and total // 2 == p:
        modes.add("SAME")
    return modes


def _padding_mode(axes) -> str | None:
    """The one mode every axis ``(size, k, s, d, p)`` takes (VALID where both do), else None."""
    common = {"SAME", "VALID"}
    for axis in axes:
        common &= _padding_modes(*axis)
    return "VALID" if "VALID" in common else ("SAME" if common else None)


class _Writer:
    def __init__(self, graph: QuantGraph, example: torch.Tensor) -> None:
        from nnshrink.techniques.quant.reference import IntegerModel

        self.g = graph
        self.m = _Model()
        self.ref = IntegerModel(graph, "fixed")
        self.env = self.ref.run(example.detach().numpy().astype(np.float32))
        self.values: dict[str, _Value] = {}
        self.cache: dict[tuple, int] = {}
        self.by_name = {op.name: op for op in graph.ops}

    # -- tensors --------------------------------------------------------------------------------
    def tq(self, name: str) -> TensorQ:
        t = self.g.tensors.get(name)
        if t is None:
            raise UnsupportedModelError(f"{name!r} is not quantized; a fully int8 TFLite model needs every tensor in int8")
        if t.bits != 8:
            raise UnsupportedModelError(f"{name!r} has {t.bits}-bit activations; the TFLite writer takes 8-bit ones")
        return t

    @staticmethod
    def zp8(t: TensorQ) -> int:
        return int(t.zp) - (128 if t.qmin == 0 else 0)

    def act_tensor(self, name: str, shape, t: TensorQ | None = None) -> int:
        t = t or self.tq(name)
        return self.m.tensor(name, shape, "int8", scale=[t.scale], zero_point=[self.zp8(t)])

    @staticmethod
    def layout_of(shape: tuple, want_nlc: bool = False) -> str:
        if len(shape) == 4:
            return "nhwc"
        if len(shape) == 3 and want_nlc:
            return "nlc"
        return "plain"

    @staticmethod
    def tfl_shape(shape: tuple, layout: str) -> tuple:
        if layout == "nhwc":
            return tuple(shape[i] for i in NHWC)
        if layout == "nlc":
            return (shape[0], 1, shape[2], shape[1])
        return tuple(shape)

    @staticmethod
    def perm_of(shape: tuple, layout: str, perm=None) -> np.ndarray:
        """Torch flat index of each TFLite element, in TFLite order."""
        a = np.arange(int(np.prod(shape))).reshape(shape)
        if layout == "nhwc":
            return a.transpose(NHWC).ravel()
        if layout == "nlc":
            return a.transpose(NLC).ravel()
        if layout == "flat":
            return perm
        return a.ravel()

    def shape(self, name: str) -> tuple:
        v = self.env[name]
        if not isinstance(v, np.ndarray):
            raise UnsupportedModelError(f"{name!r} is not an integer tensor in the quantized graph")
        return tuple(v.shape)

    def out(self, name: str, layout: str, t: TensorQ | None = None) -> int:
        shape = self.shape(name)
        idx = self.act_tensor(name, self.tfl_shape(shape, layout), t)
        self.values[name] = _Value(idx, layout, shape)
        return idx

    def get(self, name: str, layout: str) -> int:
        """The TFLite tensor of value ``name`` in ``layout`` (TRANSPOSE/RESHAPE where needed)."""
        v = self.values.get(name)
        if v is None:
            raise UnsupportedOpError(f"{name!r} has no int8 TFLite form here")
        if v.layout == layout:
            return v.tensor
        if (name, layout) in self.cache:
            return self.cache[(name, layout)]
        shape, t = v.shape, self.tq(name)
        if np.array_equal(self.perm_of(shape, v.layout, v.perm), self.perm_of(shape, layout)):
            idx = self.reshape(v.tensor, self.tfl_shape(shape, layout), f"{name}/{layout}", t)
        else:
            src = v.tensor
            if v.layout == "flat":  # flattened from an NHWC tensor: go back to it, in torch order
                src = self.get(v.source, "plain")
                cur = self.values[v.source].shape
            else:
                cur = shape
                if v.layout == "nlc":  # [N, 1, L, C] -> [N, L, C]
                    src = self.reshape(src, (shape[0], shape[2], shape[1]), f"{name}/nlc3", t)
                if v.layout in ("nhwc", "nlc"):
                    axes = (0, 3, 1, 2) if v.layout == "nhwc" else (0, 2, 1)
                    src = self.transpose(src, axes, shape, f"{name}/plain", t)
            if layout == "plain":
                idx = src if tuple(cur) == tuple(shape) else self.reshape(src, shape, f"{name}/plain", t)
            else:
                base = src if tuple(cur) == tuple(shape) else self.reshape(src, shape, f"{name}/torch", t)
                axes = NHWC if layout == "nhwc" else NLC
                idx = self.transpose(base, axes, tuple(shape[i] for i in axes), f"{name}/{layout}", t)
                if layout == "nlc":
                    idx = self.reshape(idx, self.tfl_shape(shape, "nlc"), f"{name}/nlc", t)
        self.cache[(name, layout)] = idx
        return idx

    def reshape(self, src: int, shape, name: str, t: TensorQ) -> int:
        """A new tensor ``name``: ``src`` reshaped to ``shape``."""
        idx = self.act_tensor(name, shape, t)
        self.emit_reshape(src, idx, name)
        return idx

    def emit_reshape(self, src: int, out: int, name: str) -> None:
        self.m.op("RESHAPE", [src, self.m.const_i32(name + "/shape", self.m.tensors[out].shape)], [out],
                  ("ReshapeOptions", {}))

    def transpose(self, src: int, axes, shape, name: str, t: TensorQ) -> int:
        idx = self.act_tensor(name, shape, t)
        self.m.op("TRANSPOSE", [src, self.m.const_i32(name + "/perm", axes)], [idx], ("TransposeOptions", {}), 2)
        return idx

    def requantized(self, name: str, layout: str, to: TensorQ, label: str) -> int:
        """``name`` at scale and zero point ``to``: itself if it has them, else a QUANTIZE."""
        src, t = self.get(name, layout), self.tq(name)
        if float(t.scale) == float(to.scale) and self.zp8(t) == self.zp8(to):
            return src
        idx = self.act_tensor(f"{name}/{label}", self.m.tensors[src].shape, to)
        self.m.op("QUANTIZE", [src], [idx], None, 2)
        return idx

    # -- ops ------------------------------------------------------------------------------------------
    def layer(self, op) -> None:
        lq = self.g.layers[op.name]
        if lq.q is None:
            raise UnsupportedOpError(f"layer {op.name!r} is kept in float; a fully int8 TFLite model has no float layers")
        if np.any(lq.zp != 0):
            raise UnsupportedModelError(f"layer {op.name!r} has asymmetric weights; TFLite's int8 kernels take "
                                        f"symmetric ones (quantize with weight_symmetric: true)")
        t_in, t_out = self.tq(op.inputs[0]), self.tq(op.name)
        channels = lq.q.shape[0]
        bias = lq.bias if lq.bias is not None else np.zeros(channels, np.int64)
        bscale = lq.bias_scale if lq.bias_scale is not None else (np.float32(t_in.scale) * lq.scale).astype(np.float32)
        b_idx = self.m.tensor(f"{op.name}.bias", (channels,), "int32", bias, scale=bscale, zero_point=np.zeros(channels))
        if op.kind == "linear":
            return self.linear(op, lq, b_idx)
        if op.kind == "convt":
            return self.transpose_conv(op, lq, b_idx)
        geo = lq.geometry
        one_d = geo["one_d"]
        w = lq.q[:, :, None, :] if one_d else lq.q
        in_shape = self.shape(op.inputs[0])
        x = self.get(op.inputs[0], "nlc" if one_d else "nhwc")
        h_w = (1, in_shape[2]) if one_d else in_shape[2:]

        def pair(v):
            return (1, v[0]) if one_d else tuple(v)

        stride, dil = pair(geo["stride"]), pair(geo["dilation"])
        pad = (0, geo["padding"][0]) if one_d else tuple(geo["padding"])
        kh, kw = w.shape[2:]
        mode = _padding_mode((h_w[i], (kh, kw)[i], stride[i], dil[i], pad[i]) for i in range(2))
        if mode is None:  # explicit zero padding, then VALID
            x = self.pad(x, op.inputs[0], [(0, 0), (pad[0], pad[0]), (pad[1], pad[1]), (0, 0)], f"{op.name}/pad")
            mode = "VALID"
        tfl = _schema()
        padding = tfl.Padding.SAME if mode == "SAME" else tfl.Padding.VALID
        groups, cin = geo["groups"], in_shape[1]
        out = self.out(op.name, "nlc" if one_d else "nhwc")
        if groups == 1:
            w_idx = self.m.tensor(f"{op.name}.weight", (channels, kh, kw, w.shape[1]), "int8", w.transpose(0, 2, 3, 1),
                                  scale=lq.scale, zero_point=np.zeros(channels), axis=0)
            self.m.op("CONV_2D", [x, w_idx, b_idx], [out], ("Conv2DOptions", {
                "Padding": padding, "StrideH": stride[0], "StrideW": stride[1], "DilationHFactor": dil[0],
                "DilationWFactor": dil[1], "FusedActivationFunction": _act_code(op.act)}), 3)
        elif groups == cin and w.shape[1] == 1:
            w_idx = self.m.tensor(f"{op.name}.weight", (1, kh, kw, channels), "int8", w.transpose(1, 2, 3, 0),
                                  scale=lq.scale, zero_point=np.zeros(channels), axis=3)
            self.m.op("DEPTHWISE_CONV_2D", [x, w_idx, b_idx], [out], ("DepthwiseConv2DOptions", {
                "Padding": padding, "StrideH": stride[0], "StrideW": stride[1], "DepthMultiplier": channels // cin,
                "DilationHFactor": dil[0], "DilationWFactor": dil[1],
                "FusedActivationFunction": _act_code(op.act)}), 3)
        else:
            raise UnsupportedOpError(f"{op.name!r} is a grouped conv ({groups} groups of {cin // groups} channels); "
                                     f"TFLite's int8 kernels take groups of 1 or depthwise ones")

    def transpose_conv(self, op, lq, b_idx: int) -> None:
        geo = lq.geometry
        if geo["one_d"] or geo["groups"] != 1 or tuple(geo["dilation"]) != (1, 1):
            raise UnsupportedOpError(f"{op.name!r}: a 1-D, grouped or dilated ConvTranspose has no TFLite form here")
        in_shape, out_shape = self.shape(op.inputs[0]), self.shape(op.name)
        w = lq.q  # [in, out, kh, kw]
        kh, kw = w.shape[2:]
        stride, pad = tuple(geo["stride"]), tuple(geo["padding"])
        modes = set()
        for i, (h_in, h_out, k) in enumerate(zip(in_shape[2:], out_shape[2:], (kh, kw))):
            total = max((h_in - 1) * stride[i] + k - h_out, 0)  # TFLite pads the output as a forward conv would
            modes.add("VALID" if pad[i] == 0 and h_out >= (h_in - 1) * stride[i] + k else
                      "SAME" if total // 2 == pad[i] and h_out == h_in * stride[i] else None)
        if len(modes) != 1 or None in modes:
            raise UnsupportedOpError(f"{op.name!r}: ConvTranspose padding {pad} has no TFLite padding mode")
        tfl = _schema()
        x = self.get(op.inputs[0], "nhwc")
        out = self.out(op.name, "nhwc")
        channels = w.shape[1]
        w_idx = self.m.tensor(f"{op.name}.weight", (channels, kh, kw, w.shape[0]), "int8", w.transpose(1, 2, 3, 0),
                              scale=lq.scale, zero_point=np.zeros(channels), axis=0)
        shape_idx = self.m.const_i32(f"{op.name}/output_shape", self.m.tensors[out].shape)
        self.m.op("TRANSPOSE_CONV", [shape_idx, w_idx, x, b_idx], [out], ("TransposeConvOptions", {
            "Padding": tfl.Padding.SAME if modes.pop() == "SAME" else tfl.Padding.VALID,
            "StrideW": stride[1], "StrideH": stride[0], "FusedActivationFunction": _act_code(op.act)}), 4)

    def linear(self, op, lq, b_idx: int) -> None:
        name = op.inputs[0]
        v = self.values.get(name)
        w = lq.q
        if v is not None and v.layout == "flat" and len(v.shape) == 2:
            x = v.tensor
            w = w[:, v.perm]  # the columns in the order the flattened NHWC tensor has them
        else:
            x = self.get(name, "plain")
        in_shape = self.shape(name)
        out = self.out(op.name, "plain")
        channels = w.shape[0]
        w_idx = self.m.tensor(f"{op.name}.weight", w.shape, "int8", w, scale=lq.scale,
                              zero_point=np.zeros(channels), axis=0)
        self.m.op("FULLY_CONNECTED", [x, w_idx, b_idx], [out], ("FullyConnectedOptions", {
            "FusedActivationFunction": _act_code(op.act), "KeepNumDims": len(in_shape) > 2}), 9)

    def binary(self, op) -> None:
        a, b = op.inputs
        layout = self.values[a].layout if a in self.values else "plain"
        if len(self.shape(a)) != len(self.shape(b)):
            layout = "plain"
        xa, xb = self.get(a, layout), self.get(b, layout)
        out = self.out(op.name, layout)
        code, opts = ("ADD", "AddOptions") if op.kind == "add" else ("MUL", "MulOptions")
        self.m.op(code, [xa, xb], [out], (opts, {"FusedActivationFunction": _act_code(op.act)}), 2)

    def pool_avg(self, op) -> None:
        name = op.inputs[0]
        shape = self.shape(name)
        if len(shape) != 4:
            raise UnsupportedOpError(f"{op.name!r}: average pooling of a rank-{len(shape)} tensor has no TFLite form here")
        if op.kind == "gap":
            k, s = tuple(shape[2:]), (1, 1)
        else:
            k, s = op.attrs["kernel"], op.attrs["stride"]
        x = self.get(name, "nhwc")
        t_in, t_out = self.tq(name), self.tq(op.name)
        pooled_shape = self.tfl_shape(self.shape(op.name), "nhwc")
        same = float(t_in.scale) == float(t_out.scale) and self.zp8(t_in) == self.zp8(t_out)
        # TFLite's int8 AVERAGE_POOL_2D averages the stored integers: its output has the input's
        # scale; a different output scale is one QUANTIZE after it
        pooled = self.out(op.name, "nhwc") if same else self.act_tensor(f"{op.name}/avg", pooled_shape, t_in)
        tfl = _schema()
        self.m.op("AVERAGE_POOL_2D", [x], [pooled], ("Pool2DOptions", {
            "Padding": tfl.Padding.VALID, "StrideW": s[1], "StrideH": s[0], "FilterWidth": k[1], "FilterHeight": k[0],
            "FusedActivationFunction": _act_code(None)}), 2)
        if not same:
            out = self.out(op.name, "nhwc")
            self.m.op("QUANTIZE", [pooled], [out], None, 2)

    def concat(self, op) -> None:
        layouts = {self.values[i].layout for i in op.inputs if i in self.values}
        layout = layouts.pop() if len(layouts) == 1 and "flat" not in layouts else \
            self.layout_of(self.shape(op.name))
        t_out = self.tq(op.name)
        xs = [self.requantized(i, layout, t_out, f"to_{op.name}") for i in op.inputs]
        out = self.out(op.name, layout)
        axis = op.attrs["axis"]
        if layout in ("nhwc", "nlc"):
            axes = NHWC if layout == "nhwc" else (0, 3, 2)  # nlc: [N, 1, L, C]
            axis = list(axes).index(axis) if layout == "nhwc" else {0: 0, 1: 3, 2: 2}[axis]
        self.m.op("CONCATENATION", xs, [out], ("ConcatenationOptions", {
            "Axis": axis, "FusedActivationFunction": _act_code(None)}), 2)

    def clamp(self, op) -> None:
        if (op.attrs["lo"], op.attrs["hi"]) != (0.0, 6.0):
            raise UnsupportedOpError(f"{op.name!r}: a clamp to [{op.attrs['lo']}, {op.attrs['hi']}] has no TFLite form here")
        v = self.values[op.inputs[0]]
        x = v.tensor
        out = self.out(op.name, v.layout)
        self.values[op.name].perm, self.values[op.name].source = v.perm, v.source
        self.m.op("RELU6", [x], [out], None, 2)

    def pad(self, x: int, name: str, pads, label: str) -> int:
        t = self.tq(name)
        shape = [d + a + b for d, (a, b) in zip(self.m.tensors[x].shape, pads)]
        idx = self.act_tensor(label, shape, t)
        p = self.m.const_i32(label + "/paddings", np.asarray(pads, np.int32))
        self.m.op("PAD", [x, p], [idx], ("PadOptions", {}), 2)
        return idx

    def move(self, op) -> None:
        if op.quant == "tuple":
            return  # written where a getitem picks one of its tensors
        src = op.inputs[0]
        v = self.values.get(src)
        if op.op_type == "MaxPool":
            return self.maxpool(op)
        if op.op_type == "Relu" and v is not None:
            out = self.out(op.name, v.layout)
            self.values[op.name].perm, self.values[op.name].source = v.perm, v.source
            return self.m.op("RELU", [v.tensor], [out], None, 2)
        if op.op_type in ("Resize", "Upsample") or "interpolate" in str(getattr(op.call, "target", "")):
            return self.resize(op)
        probe, root = self.probe(op)
        in_shape, out_shape = self.shape(root), self.shape(op.name)
        n = int(np.prod(in_shape))
        if probe.size == n and np.array_equal(probe.ravel(), np.arange(n)):
            return self.reshape_op(op, root)
        if probe.min() < 0:  # zero padding: -1 marks a padded element
            return self.pad_op(op, root, probe)
        rank = len(in_shape)
        if probe.ndim == rank:
            for axes in itertools.permutations(range(rank)):
                if np.array_equal(np.arange(n).reshape(in_shape).transpose(axes), probe):
                    return self.transpose_op(op, root, axes)
            box = self.as_slice(probe, in_shape)
            if box is not None:
                return self.slice_op(op, root, *box)
        raise UnsupportedOpError(f"{op.name!r} ({op.op_type}) moves integers in a way the TFLite writer does not map")

    def probe(self, op):
        """The move run on the flat indices of its source (``-1`` where it pads): which source
        element each output element is. A getitem of a split goes back to the split's source."""
        chain = [op]
        root = op.inputs[0]
        while root not in self.values and self.g_op(root) is not None and self.g_op(root).kind == "move":
            chain.append(self.g_op(root))
            root = self.g_op(root).inputs[0]
        shape = self.shape(root)
        value = torch.arange(int(np.prod(shape)), dtype=torch.float64).reshape(shape) + 1
        for o in reversed(chain):
            xs = [value if i == 0 else self.env_torch(name) for i, name in enumerate(o.inputs)]
            value = invoke(o, xs, self.g.modules)
        if isinstance(value, (tuple, list)):
            raise UnsupportedOpError(f"{op.name!r} returns several tensors")
        return np.rint(value.numpy()).astype(np.int64) - 1, root

    def g_op(self, name: str):
        return self.by_name.get(name)

    def env_torch(self, name: str):
        v = self.env[name]
        return torch.from_numpy(v) if isinstance(v, np.ndarray) else v

    def reshape_op(self, op, root: str) -> None:
        v = self.values[root]
        out_shape = self.shape(op.name)
        src_perm = self.perm_of(v.shape, v.layout, v.perm)
        layout = "nhwc" if len(out_shape) == 4 else "plain"
        if np.array_equal(src_perm, self.perm_of(out_shape, layout)):  # the same order: a plain RESHAPE
            self.emit_reshape(v.tensor, self.out(op.name, layout), op.name)
            return
        if len(out_shape) == 2 and v.layout in ("nhwc", "nlc", "flat"):
            out = self.out(op.name, "flat")
            self.values[op.name].perm = src_perm
            self.values[op.name].source = root if v.layout != "flat" else v.source
            self.emit_reshape(v.tensor, out, op.name)
            return
        x = self.get(root, "plain")
        if layout == "plain":
            self.emit_reshape(x, self.out(op.name, "plain"), op.name)
        else:
            r = self.reshape(x, out_shape, op.name + "/torch", self.tq(op.name))
            self.values[op.name] = _Value(r, "plain", out_shape)
            out = self.get(op.name, "nhwc")
            self.values[op.name] = _Value(out, "nhwc", out_shape)

    def transpose_op(self, op, root: str, axes) -> None:
        x = self.get(root, "plain")
        out = self.out(op.name, "plain")
        self.m.op("TRANSPOSE", [x, self.m.const_i32(op.name + "/perm", axes)], [out], ("TransposeOptions", {}), 2)
        if len(self.shape(op.name)) == 4:
            self.values[op.name] = _Value(self.get(op.name, "nhwc"), "nhwc", self.shape(op.name))

    def as_slice(self, probe: np.ndarray, in_shape: tuple):
        """(begin, end, strides) where ``probe`` picks a strided box of the source, else None."""
        idx = np.unravel_index(probe, in_shape)
        begin, end, strides = [], [], []
        for d, coord in enumerate(idx):
            line = np.moveaxis(coord, d, 0)
            first = line[(slice(None),) + (0,) * (coord.ndim - 1)]
            if not np.array_equal(line, np.broadcast_to(first.reshape((-1,) + (1,) * (coord.ndim - 1)), line.shape)):
                return None
            step = int(first[1] - first[0]) if len(first) > 1 else 1
            if step <= 0 or not np.array_equal(first, first[0] + step * np.arange(len(first))):
                return None
            begin.append(int(first[0]))
            end.append(int(first[-1]) + 1)
            strides.append(step)
        return begin, end, strides

    def slice_op(self, op, root: str, begin, end, strides) -> None:
        v = self.values[root]
        layout = v.layout if v.layout in ("nhwc", "plain") else "plain"
        x = self.get(root, layout)
        if layout == "nhwc":
            begin, end, strides = ([s[i] for i in NHWC] for s in (begin, end, strides))
        out = self.out(op.name, layout if len(self.shape(op.name)) == len(v.shape) else "plain")
        ins = [x] + [self.m.const_i32(f"{op.name}/{k}", s) for k, s in (("begin", begin), ("end", end),
                                                                       ("strides", strides))]
        self.m.op("STRIDED_SLICE", ins, [out], ("StridedSliceOptions", {}), 4)

    def pad_op(self, op, root: str, probe: np.ndarray) -> None:
        in_shape, out_shape = self.shape(root), self.shape(op.name)
        if len(in_shape) != len(out_shape):
            raise UnsupportedOpError(f"{op.name!r} pads and reshapes at once")
        inside = np.argwhere(probe >= 0)
        lo, hi = inside.min(0), inside.max(0)
        pads = [(int(lo[d]), int(out_shape[d] - 1 - hi[d])) for d in range(len(in_shape))]
        layout = "nhwc" if len(in_shape) == 4 else "plain"
        x = self.get(root, layout)
        if layout == "nhwc":
            pads = [pads[i] for i in NHWC]
        idx = self.pad(x, root, pads, op.name)
        self.values[op.name] = _Value(idx, layout, out_shape)

    def maxpool(self, op) -> None:
        name = op.inputs[0]
        shape = self.shape(name)
        c = op.call
        if c.how == "module":
            mod = self.g.modules[key(c.target)]
            k, s, p, d, ceil = mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode
        else:
            raise UnsupportedOpError(f"{op.name!r}: max pooling by function has no TFLite form here")
        one_d = len(shape) == 3

        def pair(v, fill):
            v = tuple(v) if isinstance(v, (tuple, list)) else (v,) * (1 if one_d else 2)
            return (fill, v[0]) if one_d else v

        k, s, p, d = pair(k, 1), pair(s if s else k, 1), pair(p, 0), pair(d, 1)
        if d != (1, 1):
            raise UnsupportedOpError(f"{op.name!r}: dilated max pooling has no TFLite form")
        h_w = (1, shape[2]) if one_d else shape[2:]
        out_hw = (1, self.shape(op.name)[2]) if one_d else self.shape(op.name)[2:]
        mode = _padding_mode((h_w[i], k[i], s[i], 1, p[i]) for i in range(2))
        if mode is None or (ceil and tuple(out_hw) != tuple((h_w[i] + 2 * p[i] - k[i]) // s[i] + 1 for i in range(2))):
            raise UnsupportedOpError(f"{op.name!r}: max pooling with padding {p} on {h_w} has no TFLite padding mode")
        layout = "nlc" if one_d else "nhwc"
        x = self.get(name, layout)
        out = self.out(op.name, layout)
        tfl = _schema()
        self.m.op("MAX_POOL_2D", [x], [out], ("Pool2DOptions", {
            "Padding": tfl.Padding.SAME if mode == "SAME" else tfl.Padding.VALID, "StrideW": s[1],
            "StrideH": s[0], "FilterWidth": k[1], "FilterHeight": k[0],
            "FusedActivationFunction": _act_code(None)}), 2)

    def resize(self, op) -> None:
        name = op.inputs[0]
        in_shape, out_shape = self.shape(name), self.shape(op.name)
        probe, _ = self.probe(op)
        if len(in_shape) != 4:
            raise UnsupportedOpError(f"{op.name!r}: resizing a rank-{len(in_shape)} tensor has no TFLite form here")
        (h, w), (oh, ow) = in_shape[2:], out_shape[2:]
        ys = np.minimum(np.floor(np.arange(oh) * np.float32(h / oh)), h - 1).astype(int)
        xs = np.minimum(np.floor(np.arange(ow) * np.float32(w / ow)), w - 1).astype(int)
        grid = np.arange(int(np.prod(in_shape))).reshape(in_shape)[:, :, ys][:, :, :, xs]
        if not np.array_equal(grid, probe):
            raise UnsupportedOpError(f"{op.name!r}: this nearest resize picks other pixels than TFLite's")
        x = self.get(name, "nhwc")
        out = self.out(op.name, "nhwc")
        self.m.op("RESIZE_NEAREST_NEIGHBOR", [x, self.m.const_i32(op.name + "/size", [oh, ow])], [out],
                  ("ResizeNearestNeighborOptions", {"AlignCorners": False, "HalfPixelCenters": False}), 3)

    # -- the graph ----------------------------------------------------------------------------
    def run(self) -> bytes:
        g = self.g
        if "input" not in g.tensors:
            raise UnsupportedModelError("the model's input is not quantized (its first op stays float); "
                                        "a fully int8 TFLite model starts with an int8 input")
        in_shape = self.shape("input")
        layout = _input_layout(g, in_shape)
        idx = self.act_tensor("input", self.tfl_shape(in_shape, layout))
        self.values["input"] = _Value(idx, layout, in_shape)
        floats = [o for o in g.ops if (o.kind == "compute" and not (o.integer and o.op_type in _COMPUTE))
                  or (not o.integer and o.kind not in ("value", "const", "compute"))]
        if floats:
            from collections import Counter

            kinds = Counter(o.op_type for o in floats)
            shown = ", ".join(f"{t} x{n}" for t, n in kinds.most_common())
            raise UnsupportedOpError(f"no int8 TFLite form here for {shown} (e.g. {floats[0].name!r}); "
                                     f"TFLite's int8 kernels written here: {', '.join(sorted(_COMPUTE))} "
                                     f"beside conv, linear, add, mul, pooling, concat and moves")
        handlers = {"conv": self.layer, "convt": self.layer, "linear": self.layer, "add": self.binary,
                    "mul": self.binary, "gap": self.pool_avg, "avgpool": self.pool_avg, "concat": self.concat,
                    "clamp": self.clamp, "move": self.move, "value": lambda op: None, "const": self.const,
                    "compute": self.compute}
        for op in g.ops:
            if op.kind == "matmul":
                raise UnsupportedOpError(f"{op.name!r} (MatMul of two activations) has no int8 TFLite form here")
            handlers[op.kind](op)
        outputs = []
        for name in g.outputs:
            if name not in self.values:
                raise UnsupportedModelError(f"output {name!r} is not an int8 tensor")
            v = self.values[name]
            outputs.append(self.get(name, v.layout if v.layout != "flat" else "plain"))
        for i, name in zip(outputs, g.outputs):
            self.m.tensors[i].name = name if name != "input" else self.m.tensors[i].name
        return self.m.serialize([idx], outputs, "nnshrink int8")

    def compute(self, op) -> None:
        """An op with an int8 TFLite kernel; the integer reference computes it as that kernel does."""
        from nnshrink.techniques.quant import reference as R

        name, kind = op.inputs[0], op.op_type
        v = self.values.get(name)
        if v is None:
            raise UnsupportedOpError(f"{op.name!r} ({kind}) reads a tensor that is not int8")
        shape = self.shape(name)
        layout = v.layout
        if layout == "flat" and kind in ("PRelu", "Softmax"):
            layout = "plain"
        if kind == "Softmax":  # TFLite normalizes the last axis of the tensor as written
            axis = op.attrs.get("axis")
            last = {"nhwc": 1, "nlc": 1}.get(layout, len(shape) - 1)
            if axis is None or axis % len(shape) != last:
                if axis is not None and axis % len(shape) == len(shape) - 1:
                    layout = "plain"
                else:
                    raise UnsupportedOpError(f"{op.name!r}: a softmax over axis {axis} of {shape} has no TFLite form here")
        x = self.get(name, layout)
        t_in, t_out = self.tq(name), self.tq(op.name)
        out = self.out(op.name, layout)
        if layout == v.layout:
            self.values[op.name].perm, self.values[op.name].source = v.perm, v.source
        if kind == "Sigmoid":
            self.m.op("LOGISTIC", [x], [out], None, 2)
        elif kind == "Tanh":
            self.m.op("TANH", [x], [out], None, 2)
        elif kind == "HardSwish":
            if (float(t_in.scale) / 128) / float(t_out.scale) >= 1:
                raise UnsupportedOpError(f"{op.name!r}: TFLite's HARD_SWISH needs an output scale above the input's / 128")
            self.m.op("HARD_SWISH", [x], [out], None, 1)
        elif kind == "LeakyRelu":
            alpha = R.slope(op, self.g.modules, shape)
            self.m.op("LEAKY_RELU", [x], [out], ("LeakyReluOptions", {"Alpha": alpha}), 2)
        elif kind == "PRelu":
            q, scale = R.prelu_alpha(op, self.g.modules, shape)
            channels = q.size
            a_shape = {"nhwc": (1, 1, channels), "nlc": (1, 1, channels)}.get(layout, (1,) * (len(shape) - 2 + 1) + (channels,)
                                                                           if len(shape) == 2 else None)
            if a_shape is None:
                raise UnsupportedOpError(f"{op.name!r}: a PReLU on a rank-{len(shape)} tensor has no TFLite form here")
            alpha = self.m.tensor(f"{op.name}.alpha", a_shape, "int8", q.reshape(a_shape), scale=[scale], zero_point=[0])
            self.m.op("PRELU", [x, alpha], [out], None, 1)
        elif kind == "Softmax":
            self.m.op("SOFTMAX", [x], [out], ("SoftmaxOptions", {"Beta": 1.0}), 2)
        elif kind == "HardSigmoid":  # relu6(x + 3) / 6: the two ops the reference computes
            three = self.m.tensor(f"{op.name}/three", (1,), "int8", np.array([127]), scale=[R.HSIG_THREE.scale],
                                  zero_point=[0])
            mid = self.act_tensor(f"{op.name}/relu6", self.m.tensors[x].shape, R.HSIG_MID)
            self.m.op("ADD", [x, three], [mid], ("AddOptions", {"FusedActivationFunction": _act_code(None)}), 2)
            sixth = self.m.tensor(f"{op.name}/sixth", (1,), "int8", np.array([127]), scale=[R.HSIG_SIXTH.scale],
                                  zero_point=[0])
            self.m.op("MUL", [mid, sixth], [out], ("MulOptions", {"FusedActivationFunction": _act_code(None)}), 2)
        else:
            raise AssertionError(kind)

    def const(self, op) -> None:
        if op.quant not in ("float", "none"):
            raise UnsupportedOpError(f"constant {op.name!r} feeds an integer op; not written here")


# the compute ops written as TFLite int8 kernels (their arithmetic: :mod:`nnshrink.techniques.quant.tflite_kernels`)
_COMPUTE = frozenset({"Sigmoid", "Tanh", "HardSwish", "LeakyRelu", "PRelu", "Softmax", "HardSigmoid"})


def _input_layout(graph: QuantGraph, shape: tuple) -> str:
    """NHWC for an image, [N, 1, L, C] for a 1-D conv's input, else as torch has it."""
    if len(shape) == 4:
        return "nhwc"
    if len(shape) == 3 and any(o.kind == "conv" and o.inputs[:1] == ["input"] and graph.layers[o.name].geometry.get("one_d")
                               for o in graph.ops):
        return "nlc"
    return "plain"


def _graph(model) -> QuantGraph:
    if isinstance(model, QuantGraph):
        graph = model
    elif getattr(model, "is_quant_sim", False):
        if any(q.observing for q in model.aq.values()):
            raise ConfigError("the quantized model is not calibrated")
        graph = freeze(model)
    else:
        raise ConfigError("TFLite export takes a quantized model (the result of a quantize step with target npu)")
    wide = sorted(t.owner for t in {t.owner: t for t in graph.tensors.values()}.values() if t.bits != 8)
    if graph.act_bits != 8 or wide:
        what = f"{graph.act_bits}-bit activations" if graph.act_bits != 8 else \
            f"16-bit activations at {', '.join(wide[:3])}{' ...' if len(wide) > 3 else ''}"
        raise UnsupportedModelError(f"the model has {what}; the TFLite writer takes 8-bit ones")
    return graph


def to_tflite(model, example_input: torch.Tensor | None = None) -> bytes:
    """The int8 TFLite flatbuffer of a quantized model (a calibrated sim or its :class:`QuantGraph`).

    Args:
        model: The result of a ``quantize`` step (``target: npu`` gives full-range int8 weights).
        example_input: One input (batch 1 is written); default: zeros of the shape quantized with.

    Raises:
        UnsupportedOpError: An op with no int8 TFLite form, named with its type.
        UnsupportedModelError: A model that is not fully int8 (a float input, 16-bit activations).
    """
    graph = _graph(model)
    if example_input is None:
        example_input = torch.zeros((1, *graph.example_shape[1:]))
    example_input = example_input[:1]
    return _Writer(graph, example_input).run()


def export_tflite(model, path: str | Path, example_input: torch.Tensor | None = None) -> Path:
    """Write :func:`to_tflite`'s flatbuffer to ``path``, atomically."""
    data = to_tflite(model, example_input)
    target = Path(path)
    atomic_write_bytes(target, data)
    return target


def quantize_input(graph_or_model, x: np.ndarray) -> np.ndarray:
    """Float inputs as the TFLite model's int8 input (NHWC where 4-D, [N, 1, L, C] for a 1-D conv's)."""
    from nnshrink.techniques.quant.reference import IntegerModel

    graph = _graph(graph_or_model)
    t = graph.tensors["input"]
    q = IntegerModel._quantize(np.asarray(x, np.float32), t) - (128 if t.qmin == 0 else 0)
    layout = _input_layout(graph, q.shape)
    if layout == "nhwc":
        q = q.transpose(NHWC)
    elif layout == "nlc":
        q = q.transpose(NLC)[:, None]
    return np.ascontiguousarray(q).astype(np.int8)


def litert_run(data: bytes, x: np.ndarray, reference: bool = True) -> list[np.ndarray]:
    """Run an int8 TFLite model with LiteRT on float inputs ``x`` (torch layout, any batch; one
    sample at a time, as written), and return its outputs dequantized, in torch layout.

    ``reference`` (default): TFLite's reference kernels (``OpResolverType.BUILTIN_REF``), the ones
    the integer reference equals; else LiteRT's default path (XNNPACK), which rounds some
    requantizations differently.
    """
    try:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType
    except ImportError as exc:
        raise ConfigError("running TFLite needs LiteRT: pip install 'nnshrink[tflite]'") from exc
    kind = OpResolverType.BUILTIN_REF if reference else OpResolverType.AUTO
    it = Interpreter(model_content=data, experimental_op_resolver_type=kind, num_threads=1)
    it.allocate_tensors()
    (inp,), outs = it.get_input_details(), it.get_output_details()
    s, z = inp["quantization"]
    x = np.asarray(x, np.float32)
    results: list[list[np.ndarray]] = [[] for _ in outs]
    want = tuple(inp["shape"][1:])
    for i in range(len(x)):
        xi = x[i:i + 1]
        if xi.ndim == 4 and tuple(xi.shape[1:]) != want:
            xi = xi.transpose(NHWC)
        elif xi.ndim == 3 and len(want) == 3 and tuple(xi.shape[1:]) != want:
            xi = xi.transpose(NLC)[:, None]
        q = np.clip(np.rint(xi / np.float32(s)) + z, -128, 127).astype(np.int8)
        it.set_tensor(inp["index"], q.reshape(inp["shape"]))
        it.invoke()
        for k, o in enumerate(outs):
            os_, oz = o["quantization"]
            v = (it.get_tensor(o["index"]).astype(np.float32) - oz) * np.float32(os_)
            results[k].append(v.transpose(0, 3, 1, 2) if v.ndim == 4 else v)
    return [np.concatenate(r) for r in results]
