"""ONNX with QuantizeLinear/DequantizeLinear pairs from a :class:`QuantSim`, as ONNX Runtime wants it.

The graph is written from the sim's op list, not by exporting the fake-quantized torch graph:
the layout is then exactly the one ONNX Runtime's QDQ fusions turn into integer kernels
(``DQ -> Conv -> Q`` becomes ``QLinearConv``, ``DQ -> Gemm -> Q`` ``QGemm``, ``DQ -> Add -> Q``
``QLinearAdd``, ``DQ -> GlobalAveragePool -> Q`` ``QLinearGlobalAveragePool``):

- every quantized tensor is an int8 tensor; max pooling, flattening and standalone ReLUs keep
  their input's scale (``DQ -> MaxPool -> Q`` with one scale, which ONNX Runtime runs on the
  integers);
- weights are int8 initializers with per-channel scales (axis 0) behind a ``DequantizeLinear``;
  for the ``ort-x86-u8`` target, weights wider than 7 bits are uint8 (``q + 128``, zero point
  ``+ 128``: the same integers), because ONNX Runtime's u8 x s8 kernels on x86 CPUs without VNNI
  add two products into a saturating int16 and its u8 x u8 kernels do not (see
  :func:`x86_int8_kernel`); biases are int32 at scale ``s_in * s_w`` (computed in float32, as
  the kernels recompute it);
- a fused ReLU/ReLU6 sits between the layer and its ``QuantizeLinear``; its output range makes
  it redundant, and ONNX Runtime removes it.

The torch exporter was not used: ``torch.onnx.export`` of fake-quantize ops gives Q/DQ around
every op but no integer bias, and the activation ranges it records differ from ours.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from nnshrink.errors import ConfigError
from nnshrink.graph import signature
from nnshrink.techniques.quant.sim import Op

_OPSET = 17


def _f32(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy().astype(np.float32)


class _Writer:
    def __init__(self, sim, act_type: str = "uint8") -> None:
        from onnx import TensorProto, helper, numpy_helper

        self.sim, self.h, self.nh, self.TP = sim, helper, numpy_helper, TensorProto
        self.nodes, self.inits = [], []
        self.qparams: dict[str, tuple[str, float, int]] = {}  # tensor -> (int tensor, scale, zp)
        self.scale_names: dict[str, tuple[str, str]] = {}  # quantizing tensor -> (scale, zero point) names
        self.owner: dict[str, str] = {}  # tensor sharing another's scale -> that tensor
        bits = sim.aq["input"].bits
        # int8 integers are written shifted to uint8 (q + 128, zero point + 128: the same real
        # values): ONNX Runtime's x86 kernels take uint8 activations, and where it converts int8
        # Q/DQ pairs itself it skips tensors with two readers, leaving those layers in float
        self.act_dtype = (np.uint8 if act_type == "uint8" else np.int8) if bits == 8 else np.int16
        self.offset = 128 if self.act_dtype == np.uint8 else 0
        self.n = 0

    def init(self, name: str, array: np.ndarray) -> str:
        self.inits.append(self.nh.from_array(np.array(array, copy=True, order="C"), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, name: str | None = None, **attrs) -> str:
        self.n += 1
        self.nodes.append(self.h.make_node(op, inputs, [output], name=name or f"{op}_{self.n}", **attrs))
        return output

    def act_params(self, tensor_key: str):
        aq = self.sim.aq[tensor_key]
        scale = np.float32(aq.scale.detach())
        zp = self.act_dtype(int(aq.zero_point) + self.offset)
        return scale, zp

    def quantize(self, float_name: str, tensor: str, key: str) -> None:
        scale, zp = self.act_params(key)
        s = self.init(f"{tensor}.act_scale", np.array(scale, np.float32))
        z = self.init(f"{tensor}.act_zero_point", np.array(zp, self.act_dtype))
        q = self.node("QuantizeLinear", [float_name, s, z], f"{tensor}.q", name=f"{tensor}.quantize")
        self.qparams[tensor] = (q, float(scale), int(zp))
        self.scale_names[tensor] = (s, z)

    def dequantize(self, tensor: str) -> str:
        q, _, _ = self.qparams[tensor]
        s, z = self.scale_names[self._owner(tensor)]
        return self.node("DequantizeLinear", [q, s, z], f"{tensor}.dq_{self.n + 1}")

    def _owner(self, tensor: str) -> str:
        return self.owner.get(tensor, tensor)

    def unsigned_weights(self, wq) -> bool:
        """Whether a layer's weights are written as uint8: for ONNX Runtime on x86, where its
        u8 x s8 kernels would saturate (weights beyond +-64 against uint8 activations)."""
        wide = wq.qmin < -64 or wq.qmax > 64
        if not (wide and self.sim.target == "ort-x86-u8"):
            return False
        if self.act_dtype != np.uint8:
            raise ConfigError("the ort-x86-u8 target writes 8-bit weights as uint8, which ONNX Runtime pairs only "
                              "with uint8 activations; export with act_type='uint8', or quantize with "
                              "target 'ort-x86' or 'npu'")
        return True

    # -- ops ------------------------------------------------------------------------------
    def layer(self, op) -> str:
        sim = self.sim
        layer = sim.layer(op.name)
        x = self.dequantize(op.inputs[0])
        if op.name in sim.float_layers:
            w = self.init(f"{op.name}.weight", _f32(layer.weight))
            b = self.init(f"{op.name}.bias", _f32(layer.bias)) if layer.bias is not None else ""
        else:
            wq = sim.weight_quantizer(op.name)
            q = wq.integers(layer.weight).numpy()
            scale = _f32(wq.scale).reshape(-1)
            zp = wq.zero_point.numpy().astype(np.int32).reshape(-1)
            if self.unsigned_weights(wq):
                q, zp = (q + 128).astype(np.uint8), (zp + 128).astype(np.uint8)
            else:
                q, zp = q.astype(np.int8), zp.astype(np.int8)
            per_channel = scale.size > 1
            if not per_channel:
                scale, zp = scale.reshape(()), zp.reshape(())
            qi = self.init(f"{op.name}.weight_quantized", q)
            si = self.init(f"{op.name}.weight_scale", scale)
            zi = self.init(f"{op.name}.weight_zero_point", zp)
            attrs = {"axis": 0} if per_channel else {}
            w = self.node("DequantizeLinear", [qi, si, zi], f"{op.name}.weight", **attrs)
            b = ""
            if layer.bias is not None:
                s_in = np.float32(self.qparams[op.inputs[0]][1])
                bscale = (s_in * _f32(wq.scale).reshape(-1)).astype(np.float32)
                if not per_channel:
                    bscale = np.full(layer.bias.shape, bscale.reshape(-1)[0], np.float32)
                bias = _f32(layer.bias).astype(np.float64) / bscale.astype(np.float64)
                bias_q = np.clip(np.round(bias), -(2**31), 2**31 - 1).astype(np.int32)
                bq = self.init(f"{op.name}.bias_quantized", bias_q)
                bs = self.init(f"{op.name}.bias_scale", bscale)
                bz = self.init(f"{op.name}.bias_zero_point", np.zeros(bscale.shape, np.int32))
                b = self.node("DequantizeLinear", [bq, bs, bz], f"{op.name}.bias", axis=0)
        out = f"{op.name}.out"
        if op.kind == "linear":
            self.node("Gemm", [x, w] + ([b] if b else []), out, name=op.name, transB=1)
        else:
            nd = layer.weight.dim() - 2
            pads = list(layer.padding) * 2
            self.node("Conv", [x, w] + ([b] if b else []), out, name=op.name,
                      kernel_shape=list(layer.kernel_size), strides=list(layer.stride), pads=pads[:2 * nd],
                      dilations=list(layer.dilation), group=layer.groups)
        return out

    def activation(self, op, y: str) -> str:
        if op.act == "relu":
            return self.node("Relu", [y], f"{op.name}.relu")
        if op.act == "relu6":
            lo = self.init(f"{op.name}.clip_min", np.array(0.0, np.float32))
            hi = self.init(f"{op.name}.clip_max", np.array(6.0, np.float32))
            return self.node("Clip", [y, lo, hi], f"{op.name}.relu6")
        return y

    def run(self, int_outputs: list[str] | None = None):
        h, sim = self.h, self.sim
        self.quantize("input", "input", "input")
        for op in sim.ops:
            key = op.name.replace(".", "__")
            if op.kind in ("conv", "linear"):
                y = self.layer(op)
            elif op.kind == "add":
                a, b = self.dequantize(op.inputs[0]), self.dequantize(op.inputs[1])
                y = self.node("Add", [a, b], f"{op.name}.sum", name=op.name)
            elif op.kind in ("gap", "avgpool"):
                x = self.dequantize(op.inputs[0])
                if op.kind == "gap":
                    y = self.node("GlobalAveragePool", [x], f"{op.name}.pooled", name=op.name)
                else:
                    at = op.attrs
                    y = self.node("AveragePool", [x], f"{op.name}.pooled", name=op.name,
                                  kernel_shape=list(at["kernel"]), strides=list(at["stride"]), ceil_mode=int(at["ceil"]))
            elif op.kind == "concat":
                xs = [self.dequantize(i) for i in op.inputs]
                y = self.node("Concat", xs, f"{op.name}.cat", name=op.name, axis=op.attrs["axis"])
            elif op.kind in ("maxpool", "flatten", "relu", "relu6"):
                # integer moves: written DQ -> op -> Q at the input's scale, which ONNX Runtime
                # runs on the integers (an op applied to the int8 tensor directly stops its
                # fusion of the producing layer)
                src = op.inputs[0]
                x = self.dequantize(src)
                _, scale, zp = self.qparams[src]
                if op.kind == "maxpool":
                    at = op.attrs
                    y = self.node("MaxPool", [x], f"{op.name}.out", name=op.name, kernel_shape=list(at["kernel"]),
                                  strides=list(at["stride"]), pads=list(at["padding"]) * 2,
                                  dilations=list(at["dilation"]), ceil_mode=int(at["ceil"]))
                elif op.kind == "flatten":
                    y = self.node("Flatten", [x], f"{op.name}.out", name=op.name, axis=1)
                else:
                    y = self.activation(Op(op.name, "act", [], act=op.kind), x)
                s_name, z_name = self.scale_names[self._owner(src)]
                q = self.node("QuantizeLinear", [y, s_name, z_name], f"{op.name}.q", name=f"{op.name}.quantize")
                self.qparams[op.name] = (q, scale, zp)
                self.owner[op.name] = self._owner(src)
                continue
            else:  # pragma: no cover - the lowering makes only the kinds above
                raise ConfigError(f"no ONNX form for op kind {op.kind!r}")
            y = self.activation(op, y)
            self.quantize(y, op.name, key)
        final = self.dequantize(self.sim.output)
        self.node("Identity", [final], "output", name="output")
        shape = ["batch", *self.sim_input_shape()]
        inputs = [h.make_tensor_value_info("input", self.TP.FLOAT, shape)]
        if int_outputs is None:
            outputs = [h.make_tensor_value_info("output", self.TP.FLOAT, None)]
        else:
            elem = {np.int8: self.TP.INT8, np.uint8: self.TP.UINT8, np.int16: self.TP.INT16}[self.act_dtype]
            outputs = [h.make_tensor_value_info(self.qparams[t][0], elem, None) for t in int_outputs]
        graph = h.make_graph(self.nodes, "nnshrink_qdq", inputs, outputs, self.inits)
        opset = _OPSET if self.act_dtype == np.int8 else 21
        model = h.make_model(graph, opset_imports=[h.make_opsetid("", opset)], producer_name="nnshrink")
        model.ir_version = 8 if opset == _OPSET else 10
        if int_outputs is None:
            signature.apply(model, signature.get(self.sim))
        return model

    def sim_input_shape(self) -> list:
        shape = self.sim.input_shape
        return list(shape) if shape is not None else [None]


def to_qdq_onnx(sim: nn.Module, int_outputs: list[str] | None = None, act_type: str = "uint8"):
    """The ONNX QDQ model (``onnx.ModelProto``) of a :class:`QuantSim`.

    Args:
        sim: The quantized model.
        int_outputs: Instead of the float ``output``, make these tensors' integers the graph
            outputs (op names, or ``input``): for comparing against the integer reference.
        act_type: ``uint8`` (default; what ONNX Runtime's x86 kernels take: ``q + 128``) or
            ``int8`` (as TFLite and Ethos-U hold them) for 8-bit activations.
    """
    if act_type not in ("uint8", "int8"):
        raise ConfigError(f"act_type must be uint8 or int8, got {act_type!r}")
    if not getattr(sim, "is_quant_sim", False):
        raise ConfigError("QDQ export takes a quantized model (the result of a quantize step)")
    if any(q.observing for q in sim.aq.values()):
        raise ConfigError("the model is still calibrating")
    return _Writer(sim, act_type).run(int_outputs)


def x86_int8_kernel() -> str:
    """Which int8 dot product ONNX Runtime's x86 kernels use on this CPU, from CPUID (through
    LLVM, which numba brings): ``vnni`` (AVX512-VNNI or AVX-VNNI: u8 x s8 products summed into
    int32, exact), ``avx2`` (VPMADDUBSW: each two u8 x s8 products summed into a saturating
    int16 first, so full-range int8 weights can differ from exact arithmetic), or ``other``
    (not an AVX2 x86 CPU; not measured here)."""
    import llvmlite.binding as llvm

    features = llvm.get_host_cpu_features()
    if features.get("avx512vnni", False) or features.get("avxvnni", False):
        return "vnni"
    return "avx2" if features.get("avx2", False) else "other"


def int_tensor_names(sim: nn.Module) -> list[str]:
    """Every tensor of the quantized graph that holds integers, in order: ``input`` then the ops."""
    return ["input"] + [op.name for op in sim.ops]
