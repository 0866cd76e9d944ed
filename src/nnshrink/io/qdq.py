"""ONNX with QuantizeLinear/DequantizeLinear pairs from the quantized graph, as ONNX Runtime wants it.

The writer reads the :class:`~nnshrink.techniques.quant.graph.QuantGraph` (the integers derived
once from the calibrated sim) with one handler per op kind (:data:`_WRITE`), each computing its op
in torch on dequantized inputs, with weights as integer constants behind ``DequantizeLinear``
and outputs through ``QuantizeLinear``, written by two custom ops (``nnshrink::quantize_linear``,
``nnshrink::dequantize_linear``) that translate to exactly those ONNX nodes. torch's exporter then
writes every other op (a float island's LayerNorm, an LSTM, an ONNX node kept opaque, the shape
arithmetic of a reshape) as it writes the float model. The layout is the one ONNX Runtime's QDQ
fusions turn into integer kernels (``DQ -> Conv -> Q`` becomes ``QLinearConv``, ``DQ -> Gemm -> Q``
``QGemm``, ``DQ -> MatMul -> Q`` ``QLinearMatMul``, ``DQ -> Add -> Q`` ``QLinearAdd``...):

- every quantized tensor is an 8-bit (or 16-bit) tensor; moves (reshape, transpose, max pooling,
  a standalone ReLU) keep their input's scale (``DQ -> op -> Q`` with one scale, which ONNX
  Runtime runs on the integers: an op applied to the Q output directly stops its fusion of the
  producing layer);
- weights are int8 initializers with per-channel scales behind a ``DequantizeLinear``; for the
  ``ort-x86-u8`` target, weights wider than 7 bits are uint8 (``q + 128``, zero point ``+ 128``:
  the same integers), because ONNX Runtime's u8 x s8 kernels on x86 CPUs without VNNI add two
  products into a saturating int16 and its u8 x u8 kernels do not (see :func:`x86_int8_kernel`);
  biases are int32 at scale ``s_in * s_w`` (computed in float32, as the kernels recompute it);
- a linear layer on a 3-D tensor is written as ``Reshape`` to 2-D, ``Gemm``, ``Reshape`` back
  (each reshape at its input's scale), which ONNX Runtime fuses into ``QGemm``;
- 8-bit activations are written as uint8 by default (``q + 128``, zero point ``+ 128``: the same
  real values): ONNX Runtime's x86 kernels take uint8 activations, and where it converts int8
  Q/DQ pairs itself it skips tensors with two readers, leaving those layers in float.

Why not export the fake-quantized torch model: ``torch.onnx.export`` of fake-quantize ops gives
Q/DQ around every op but no integer bias, and the activation ranges it records differ from ours.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from nnshrink.errors import ConfigError, UnsupportedModelError
from nnshrink.graph import signature
from nnshrink.techniques.quant.graph import QuantGraph, _fill, freeze, invoke, key

_INT_RANGE = {torch.uint8: (0, 255), torch.int8: (-128, 127), torch.int16: (-32768, 32767),
              torch.int32: (-(2**31), 2**31 - 1)}


@torch.library.custom_op("nnshrink::quantize_linear", mutates_args=())
def quantize_linear(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor) -> torch.Tensor:
    """ONNX ``QuantizeLinear`` (per tensor): the integers of ``x`` in ``zero_point``'s dtype."""
    lo, hi = _INT_RANGE[zero_point.dtype]
    return torch.clamp(torch.round(x / scale) + zero_point.float(), lo, hi).to(zero_point.dtype)


@quantize_linear.register_fake
def _(x, scale, zero_point):
    return torch.empty_like(x, dtype=zero_point.dtype)


@torch.library.custom_op("nnshrink::dequantize_linear", mutates_args=())
def dequantize_linear(q: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, axis: int) -> torch.Tensor:
    """ONNX ``DequantizeLinear``: per tensor, or per slice along ``axis`` for a 1-D scale."""
    if scale.dim() == 1:
        shape = [1] * q.dim()
        shape[axis] = -1
        scale, zero_point = scale.reshape(shape), zero_point.reshape(shape)
    return (q.float() - zero_point.float()) * scale


@dequantize_linear.register_fake
def _(q, scale, zero_point, axis):
    return torch.empty_like(q, dtype=torch.float32)


@torch.library.custom_op("nnshrink::global_average_pool", mutates_args=())
def global_average_pool(x: torch.Tensor) -> torch.Tensor:
    """ONNX ``GlobalAveragePool`` (the exporter writes a mean as ``ReduceMean``, which ONNX
    Runtime does not fuse into an integer kernel)."""
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


@global_average_pool.register_fake
def _(x):
    return x.new_empty(tuple(x.shape[:2]) + (1,) * (x.dim() - 2))


def _translations(opset: int) -> dict:
    import onnxscript

    op = getattr(onnxscript, f"opset{opset}")

    def q(x, scale, zero_point):
        return op.QuantizeLinear(x, scale, zero_point)

    def dq(x, scale, zero_point, axis: int):
        return op.DequantizeLinear(x, scale, zero_point, axis=axis)

    def gap(x):
        return op.GlobalAveragePool(x)

    return {torch.ops.nnshrink.quantize_linear.default: q, torch.ops.nnshrink.dequantize_linear.default: dq,
            torch.ops.nnshrink.global_average_pool.default: gap}


class _Writer(nn.Module):
    """The quantized graph as a torch module of ONNX-shaped ops, for the exporter."""

    def __init__(self, graph: QuantGraph, act_type: str, int_outputs: list[str] | None) -> None:
        super().__init__()
        self.graph, self.int_outputs = graph, int_outputs
        self.mods = nn.ModuleDict(dict(graph.modules.items()))
        self.names: dict[str, str] = {}  # buffer -> initializer name in the file
        self.act_dtype = torch.uint8 if act_type == "uint8" else torch.int8  # of the 8-bit activations
        for k, c in graph.consts.items():
            self._buffer(f"const_{k}", c.detach().clone(), k)
        for t in {t.owner: t for t in graph.tensors.values()}.values():
            dtype = self.act_dtype if t.bits == 8 else torch.int16  # each tensor at its own width
            offset = 128 if dtype == torch.uint8 else 0
            self._buffer(f"s_{key(t.owner)}", torch.tensor(np.float32(t.scale)), f"{t.owner}.act_scale")
            self._buffer(f"z_{key(t.owner)}", torch.tensor(t.zp + offset, dtype=dtype), f"{t.owner}.act_zero_point")
        for name, lq in graph.layers.items():
            k = key(name)
            if lq.q is None:
                self._buffer(f"w_{k}", torch.from_numpy(lq.weight.copy()), f"{name}.weight")
                if lq.float_bias is not None:
                    self._buffer(f"b_{k}", torch.from_numpy(lq.float_bias.copy()), f"{name}.bias")
                continue
            q, zp = lq.q, lq.zp
            if self.unsigned_weights(lq):
                q, zp, dtype = q + 128, zp + 128, torch.uint8
            else:
                dtype = torch.int8
            scale = lq.scale if lq.per_channel else lq.scale[:1].reshape(())
            zp = zp if lq.per_channel else zp[:1].reshape(())
            self._buffer(f"wq_{k}", torch.from_numpy(q.astype(np.int64)).to(dtype), f"{name}.weight_quantized")
            self._buffer(f"ws_{k}", torch.from_numpy(np.asarray(scale, np.float32)), f"{name}.weight_scale")
            self._buffer(f"wz_{k}", torch.from_numpy(np.asarray(zp, np.int64)).to(dtype), f"{name}.weight_zero_point")
            if lq.bias is not None:
                self._buffer(f"bq_{k}", torch.from_numpy(lq.bias.astype(np.int32)), f"{name}.bias_quantized")
                self._buffer(f"bs_{k}", torch.from_numpy(lq.bias_scale.astype(np.float32)), f"{name}.bias_scale")
                self._buffer(f"bz_{k}", torch.zeros(lq.bias.shape, dtype=torch.int32), f"{name}.bias_zero_point")

    def _buffer(self, name: str, value: torch.Tensor, file_name: str) -> None:
        self.register_buffer(name, value)
        self.names[name] = file_name

    def unsigned_weights(self, lq) -> bool:
        """Whether a layer's weights are written as uint8: for ONNX Runtime on x86, where its
        u8 x s8 kernels would saturate (weights beyond +-64 against uint8 activations)."""
        if not (lq.bits == 8 and self.graph.target == "ort-x86-u8"):
            return False
        if self.act_dtype != torch.uint8:
            raise ConfigError("the ort-x86-u8 target writes 8-bit weights as uint8, which ONNX Runtime pairs only "
                              "with uint8 activations; export with act_type='uint8', or quantize with "
                              "target 'ort-x86' or 'npu'")
        return True

    # -- reading and writing quantized tensors ---------------------------------------------------
    def q(self, y: torch.Tensor, name: str) -> torch.Tensor:
        owner = key(self.graph.tensors[name].owner)
        return torch.ops.nnshrink.quantize_linear(y, getattr(self, f"s_{owner}"), getattr(self, f"z_{owner}"))

    def f(self, name: str, v):
        """A value as a float op reads it: a quantized tensor behind its own DequantizeLinear."""
        if name not in self.graph.tensors or not isinstance(v, (torch.Tensor, tuple)):
            return v
        owner = key(self.graph.tensors[name].owner)
        s, z = getattr(self, f"s_{owner}"), getattr(self, f"z_{owner}")
        if isinstance(v, tuple):
            return tuple(torch.ops.nnshrink.dequantize_linear(e, s, z, 1) for e in v)
        if v.dtype not in _INT_RANGE:
            return v
        return torch.ops.nnshrink.dequantize_linear(v, s, z, 1)

    def weight(self, name: str):
        k = key(name)
        lq = self.graph.layers[name]
        if lq.q is None:
            return getattr(self, f"w_{k}"), getattr(self, f"b_{k}", None)
        w = torch.ops.nnshrink.dequantize_linear(getattr(self, f"wq_{k}"), getattr(self, f"ws_{k}"),
                                                 getattr(self, f"wz_{k}"), lq.axis)
        b = None
        if lq.bias is not None:
            b = torch.ops.nnshrink.dequantize_linear(getattr(self, f"bq_{k}"), getattr(self, f"bs_{k}"),
                                                     getattr(self, f"bz_{k}"), 0)
        return w, b

    def forward(self, x: torch.Tensor):
        g = self.graph
        env = {"input": self.q(x, "input") if "input" in g.tensors else x}
        for op in g.ops:
            env[op.name] = _WRITE[op.kind](self, op, [env[i] for i in op.inputs])
        if self.int_outputs is not None:
            return tuple(env[n] for n in self.int_outputs)
        return _fill(g.output_tree, [self.f(n, env[n]) for n in g.outputs])


def _act(op, y: torch.Tensor) -> torch.Tensor:
    if op.act == "relu":
        return F.relu(y)
    if op.act == "relu6":
        return F.relu6(y)
    return y


def _conv(w: _Writer, op, xs):
    weight, bias = w.weight(op.name)
    geo = w.graph.layers[op.name].geometry
    x = w.f(op.inputs[0], xs[0])
    if op.kind == "conv":
        conv = F.conv1d if geo["one_d"] else F.conv2d
        y = conv(x, weight, bias, geo["stride"], geo["padding"], geo["dilation"], geo["groups"])
    else:
        conv = F.conv_transpose1d if geo["one_d"] else F.conv_transpose2d
        y = conv(x, weight, bias, geo["stride"], geo["padding"], geo["output_padding"], geo["groups"], geo["dilation"])
    return w.q(_act(op, y), op.name)


def _linear(w: _Writer, op, xs):
    weight, bias = w.weight(op.name)
    src = op.inputs[0]
    x = w.f(src, xs[0])
    if x.dim() == 2:
        return w.q(_act(op, F.linear(x, weight, bias)), op.name)
    # on a sequence: Reshape to 2-D, Gemm, Reshape back, each reshape at its input's scale
    lead = x.shape[:-1]
    x2 = w.f(src, w.q(x.reshape(-1, x.shape[-1]), src))
    y = w.f(op.name, w.q(_act(op, F.linear(x2, weight, bias)), op.name))
    return w.q(y.reshape(*lead, y.shape[-1]), op.name)


def _binary(fn):
    def write(w: _Writer, op, xs):
        a, b = (w.f(n, v) for n, v in zip(op.inputs, xs))
        return w.q(_act(op, fn(a, b)), op.name)
    return write


def _gap(w: _Writer, op, xs):
    return w.q(torch.ops.nnshrink.global_average_pool(w.f(op.inputs[0], xs[0])), op.name)


def _avgpool(w: _Writer, op, xs):
    a = op.attrs
    return w.q(F.avg_pool2d(w.f(op.inputs[0], xs[0]), a["kernel"], a["stride"], 0, a.get("ceil", False)), op.name)


def _concat(w: _Writer, op, xs):
    return w.q(torch.cat([w.f(n, v) for n, v in zip(op.inputs, xs)], dim=op.attrs["axis"]), op.name)


def _clamp(w: _Writer, op, xs):
    return w.q(torch.clamp(w.f(op.inputs[0], xs[0]), op.attrs["lo"], op.attrs["hi"]), op.name)


def _call(w: _Writer, op, xs):
    """Moves, float ops and shape values: the op itself on dequantized inputs, then quantized
    (at its input's scale for a move, its own where it has one) or left float."""
    y = invoke(op, [w.f(n, v) for n, v in zip(op.inputs, xs)], w.mods)
    if op.name not in w.graph.tensors:
        return y
    if isinstance(y, (tuple, list)):
        return tuple(w.q(e, op.name) for e in y)
    return w.q(y, op.name)


def _const(w: _Writer, op, xs):
    if key(op.name) not in w.graph.consts:
        return op.attrs["value"]
    c = getattr(w, f"const_{key(op.name)}")
    return w.q(c, op.name) if op.name in w.graph.tensors else c


_WRITE = {
    "conv": _conv,
    "convt": _conv,
    "linear": _linear,
    "matmul": _binary(torch.matmul),
    "add": _binary(torch.add),
    "mul": _binary(torch.mul),
    "gap": _gap,
    "avgpool": _avgpool,
    "concat": _concat,
    "clamp": _clamp,
    "move": _call,
    "compute": _call,
    "value": _call,
    "const": _const,
}


def to_qdq_onnx(sim, int_outputs: list[str] | None = None, act_type: str = "uint8"):
    """The ONNX QDQ model (``onnx.ModelProto``) of a quantized model.

    Args:
        sim: The quantized model (a :class:`~nnshrink.techniques.quant.QuantSim`, or its
            :class:`~nnshrink.techniques.quant.graph.QuantGraph`).
        int_outputs: Instead of the model's outputs, make these tensors' integers the graph
            outputs (:func:`int_tensor_names`): for comparing against the integer reference.
        act_type: ``uint8`` (default; what ONNX Runtime's x86 kernels take: ``q + 128``) or
            ``int8`` (as TFLite and Ethos-U hold them) for 8-bit activations.
    """
    from nnshrink.io import onnx_opaque, onnx_rnn
    from nnshrink.progress import quiet_exporter

    if act_type not in ("uint8", "int8"):
        raise ConfigError(f"act_type must be uint8 or int8, got {act_type!r}")
    if getattr(sim, "is_quant_sim", False):
        if any(q.observing for q in sim.aq.values()):
            raise ConfigError("the model is still calibrating")
        graph = freeze(sim)
    elif isinstance(sim, QuantGraph):
        graph = sim
    else:
        raise ConfigError("QDQ export takes a quantized model (the result of a quantize step)")
    writer = _Writer(graph, act_type, int_outputs).eval()
    sig = graph.signature
    shape = list(graph.example_shape)
    shape[0] = max(2, shape[0])
    axes = {0} | {i + 1 for i, d in enumerate(graph.input_shape or ()) if d is None}
    if sig is not None and len(sig.inputs) == 1:
        axes |= set(sig.dynamic_axes(0))
    example = torch.randn(shape)
    for a in axes:  # a size-1 axis would be made a constant 1
        if example.shape[a] == 1:
            example = torch.cat([example, example], dim=a)
    wide = any(t.bits == 16 for t in graph.tensors.values())  # int16 Q/DQ are opset 21
    opset = 21 if wide else max(18, sig.opset if sig is not None else 18)
    opset = min(opset, 21)
    names = [n for n, _ in sig.inputs] if sig is not None and len(sig.inputs) == 1 else ["input"]
    if int_outputs is not None:
        outputs = [f"{n}.q" for n in int_outputs]
    elif sig is not None and len(sig.outputs) == len(graph.outputs):
        outputs = [n for n, _ in sig.outputs]
    else:
        outputs = ["output"] if len(graph.outputs) == 1 else [f"output_{i}" for i in range(len(graph.outputs))]
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), \
                contextlib.redirect_stderr(io.StringIO()), quiet_exporter(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                writer, (example,), dynamo=True, dynamic_shapes=({a: torch.export.Dim.AUTO for a in sorted(axes)},),
                opset_version=opset, input_names=names, output_names=outputs, external_data=False, verbose=False,
                custom_translation_table={**onnx_rnn.TRANSLATIONS, **onnx_opaque.TRANSLATIONS, **_translations(opset)})
    except Exception as exc:  # the exporter raises a wide variety of internal errors
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnsupportedModelError(f"QDQ export failed: {first}") from exc
    for node in program.model.graph.all_nodes():
        node.metadata_props.clear()
    proto = program.model_proto
    _rename_initializers(proto, writer.names)
    _unshare_integers(proto)
    _name_layers(proto)
    proto.producer_name = "nnshrink"
    if int_outputs is None:
        signature.apply(proto, sig)
    return proto


def _rename_initializers(proto, names: dict[str, str]) -> None:
    """Give the exporter's initializers (named after the writer's buffers) their names in the
    file: ``conv1.weight_quantized``, ``conv1.act_scale``..."""
    renames = {i.name: names[i.name] for i in proto.graph.initializer if i.name in names}
    for init in proto.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for node in proto.graph.node:
        for i, n in enumerate(node.input):
            if n in renames:
                node.input[i] = renames[n]
    for vi in list(proto.graph.input) + list(proto.graph.value_info):
        if vi.name in renames:
            vi.name = renames[vi.name]


def _unshare_integers(proto) -> None:
    """One int8/int32 initializer per reader. The exporter merges equal constants (the all-zero
    weight zero points of two layers with as many channels); ONNX Runtime on x86 CPUs without
    VNNI converts each layer's int8 weights and zero point to uint8 in place and fails on a
    shared one ("Attempt to replace the existing tensor"; measured on an emulated Zen 2)."""
    from onnx import TensorProto

    inits = {i.name: i for i in proto.graph.initializer
             if i.data_type in (TensorProto.INT8, TensorProto.INT32)}
    seen: dict[str, int] = {}
    for node in proto.graph.node:
        for k, name in enumerate(node.input):
            if name not in inits:
                continue
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                copy = proto.graph.initializer.add()
                copy.CopyFrom(inits[name])
                copy.name = f"{name}.{seen[name] - 1}"
                node.input[k] = copy.name


def _name_layers(proto) -> None:
    """Name each layer's node after its layer (``conv1``, not the exporter's ``node_conv2d``), so
    what is read back from the file reports the same layers."""
    made_by = {o: n for n in proto.graph.node for o in n.output}
    for node in proto.graph.node:
        if node.op_type not in ("Conv", "ConvTranspose", "Gemm", "MatMul") or len(node.input) < 2:
            continue
        w = node.input[1]
        src = made_by.get(w)
        if src is not None and src.op_type == "DequantizeLinear" and src.input[0].endswith(".weight_quantized"):
            node.name = src.input[0][: -len(".weight_quantized")]
        elif w.endswith(".weight"):
            node.name = w[: -len(".weight")]


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


def int_tensor_names(sim) -> list[str]:
    """Every tensor of the quantized graph that holds integers, in order: ``input`` (when
    quantized), then the ops (tuples of a split excluded: their items are listed)."""
    graph = freeze(sim) if getattr(sim, "is_quant_sim", False) else sim
    tuples = {op.name for op in graph.ops if op.quant == "tuple"}
    return [n for n in graph.int_tensor_names() if n not in tuples]


def graph_from_qdq(proto, example_input: torch.Tensor | None = None, target: str = "npu") -> QuantGraph:
    """The :class:`QuantGraph` of a QDQ ONNX model this writer wrote (the graph an ``.nsz``
    container of a quantized model holds), with the file's integers: the inverse of
    :func:`to_qdq_onnx`, so a container deploys (:mod:`nnshrink.io.tflite`) without the sim it
    was saved from.

    The Q/DQ pairs are taken out (each activation's scale and zero point kept by the value it
    quantizes), weights dequantized in place under their layers' names, the float graph imported
    and lowered as any model is; then every quantizer is set from the file, and every layer's
    int8 weights, scales and int32 bias are the file's, exactly.

    Raises:
        UnsupportedModelError: A graph this writer did not write, or a tensor the target computes
            in integers that the file holds in float (a float island of an ``ort-x86`` file).
    """
    import onnx
    from onnx import numpy_helper

    from nnshrink.io.onnx_import import onnx_to_torch
    from nnshrink.techniques.quant.ptq import build_sim

    g = proto.graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    readers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)

    def qparams(n):
        scale = inits.get(n.input[1])
        zp = inits.get(n.input[2]) if len(n.input) > 2 and n.input[2] else np.zeros((), np.uint8)
        if scale is None or zp is None:
            raise UnsupportedModelError(f"{n.op_type} node {n.name or n.output[0]!r} has a scale that is not a constant")
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        return scale, zp, axis

    act: dict[str, tuple[np.float32, int, int]] = {}  # float value -> scale, zero point (int8 grid), bits
    layers: dict[str, dict] = {}
    rename: dict[str, str] = {}
    dropped: set[int] = set()
    new_inits = []
    for k, n in enumerate(g.node):
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            q, (scale, zp, axis) = inits[n.input[0]], qparams(n)
            base = n.input[0].split(".weight_quantized")[0].split(".bias_quantized")[0]
            shape = [1] * q.ndim
            if q.ndim and scale.size > 1:
                shape[axis] = -1
            real = (q.astype(np.int64) - zp.astype(np.int64).reshape(shape)).astype(np.float32) * \
                scale.astype(np.float32).reshape(shape)
            if ".weight_quantized" in n.input[0]:
                name = f"{base}.weight"
                off = 128 if q.dtype == np.uint8 else 0
                layers.setdefault(base, {}).update(q=q.astype(np.int64) - off, zp=np.broadcast_to(
                    zp.astype(np.int64) - off, scale.shape).reshape(-1), scale=scale.astype(np.float32).reshape(-1),
                    axis=axis)
            elif ".bias_quantized" in n.input[0]:
                name = f"{base}.bias"
                layers.setdefault(base, {}).update(bias=q.astype(np.int64), bias_scale=scale.astype(np.float32))
            else:
                name = n.output[0]
            new_inits.append(numpy_helper.from_array(real.astype(np.float32), name))
            rename[n.output[0]] = name
            dropped.add(k)
        elif n.op_type == "QuantizeLinear":
            scale, zp, _ = qparams(n)
            off = 128 if zp.dtype == np.uint8 else 0
            bits = 16 if zp.dtype in (np.int16, np.uint16) else 8
            act[n.input[0]] = (np.float32(scale.reshape(-1)[0]), int(zp.reshape(-1)[0]) - off, bits)
            dropped.add(k)
            for r in readers.get(n.output[0], []):
                if r.op_type != "DequantizeLinear":
                    raise UnsupportedModelError(f"QuantizeLinear {n.name or n.output[0]!r} feeds a {r.op_type}, "
                                                f"not a DequantizeLinear; not a graph nnshrink wrote")
                rename[r.output[0]] = n.input[0]
            dropped.update(i for i, m in enumerate(g.node) if m.op_type == "DequantizeLinear" and m.input[0] == n.output[0])
    if not act:
        raise UnsupportedModelError("the model has no QuantizeLinear nodes: it is not a quantized graph")

    def resolved(name: str) -> str:
        seen = set()
        while name in rename and name not in seen:
            seen.add(name)
            name = rename[name]
        return name

    float_proto = onnx.ModelProto()
    float_proto.CopyFrom(proto)
    fg = float_proto.graph
    del fg.node[:]
    for k, n in enumerate(g.node):
        if k in dropped:
            continue
        m = fg.node.add()
        m.CopyFrom(n)
        for i, name in enumerate(m.input):
            m.input[i] = resolved(name)
    for o in fg.output:
        o.name = resolved(o.name)
    used = {i for n in fg.node for i in n.input} | {o.name for o in fg.output}
    keep = [i for i in fg.initializer if i.name in used]
    del fg.initializer[:]
    fg.initializer.extend(keep + [i for i in new_inits if i.name in used])
    del fg.value_info[:]
    model = onnx_to_torch(float_proto)
    if example_input is None:
        dims = getattr(model, "input_shape", None)
        if not dims or not all(isinstance(d, int) for d in dims):
            raise UnsupportedModelError("the quantized graph's input has symbolic sizes; give an example input "
                                        "(--input-shape)")
        example_input = torch.zeros((1, *dims))
    sim = build_sim(model, example_input[:1], target=target)
    for op in sim.layer_ops():
        rec = layers.get(op.name)
        if rec is None or "q" not in rec:
            raise UnsupportedModelError(f"layer {op.name!r} has no int8 weights in the file")
        wq = sim.weight_quantizer(op.name)
        wq.scale = nn.Parameter(torch.from_numpy(rec["scale"].copy()), requires_grad=False)
        wq.zero_point = torch.from_numpy(rec["zp"].astype(np.float32))
    onnx_of = getattr(model, "onnx_values", {})
    found: dict[str, tuple] = {}
    for fx_name, op_name in sim.aliases.items():
        for v in onnx_of.get(fx_name, []):
            if v in act:
                found[op_name] = act[v]
    if "input" in sim.aq:
        inputs = [i.name for i in g.input if i.name not in inits]
        found.setdefault("input", act.get(inputs[0]) if inputs else None)
    names = {key(op.name): op.name for op in sim.ops}
    for k, aq in sim.aq.items():
        name = names.get(k, k)
        params = found.get(name)
        if params is None:
            raise UnsupportedModelError(f"{name!r} is integer on the {target} target, but the file keeps it in float "
                                        f"(quantize with target {target})")
        scale, zp, bits = params
        if bits != aq.bits:
            raise UnsupportedModelError(f"{name!r} has {bits}-bit activations in the file")
        aq.set(float(scale), zp)
        aq.observing = False
    graph = freeze(sim)
    for name, lq in graph.layers.items():
        rec = layers[name]
        lq.q = rec["q"].reshape(lq.q.shape)
        lq.scale = np.broadcast_to(rec["scale"], lq.scale.shape).astype(np.float32)  # one scale per tensor: per channel
        lq.zp = np.broadcast_to(rec["zp"], lq.zp.shape).astype(np.int64)
        if "bias" in rec:
            lq.bias = rec["bias"].reshape(-1)
            lq.bias_scale = np.broadcast_to(rec["bias_scale"].reshape(-1), lq.bias.shape).astype(np.float32)
    return graph
