"""ONNX -> torch.fx conversion for the operators CNN exports use.

Why our own converter: the maintained converters (onnx2torch, onnx2pytorch) import torchvision,
which does not import beside the CPU torch 2.13 this project pins. Converting to a torch.fx
``GraphModule`` (instead of wrapping ONNX Runtime behind an adapter) means every technique,
training included, is written once against torch: Conv and Gemm/MatMul nodes with constant
weights become real ``nn.Conv1d/2d`` and ``nn.Linear`` modules with ``nn.Parameter`` weights,
BatchNormalization becomes ``nn.BatchNorm``, pooling becomes pooling modules, and the rest become
calls to the helpers in :mod:`nnshrink.io.onnx_ops`.

Messy third-party exports are handled: weights in ``Constant`` nodes, weights computed from
constants (Transpose, DequantizeLinear, Identity of an initializer: folded at import time),
``MatMul`` + ``Add`` pairs (one Linear with bias), initializers listed as graph inputs (old
opsets), dynamic batch and spatial dimensions (shape arithmetic is kept as Python ints at run
time). Operators without a converter are all listed in a single :class:`UnsupportedOpError`.
"""

from __future__ import annotations

import ast
import re
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import fx, nn

from nnshrink.errors import FormatError, UnsupportedOpError
from nnshrink.io import onnx_ops as ops
from nnshrink.graph import signature
from nnshrink.io.onnx_rnn import OnnxRNN, reorder

_SMALL_INT = 64  # int constants up to this many elements become Python literals


@dataclass
class _Value:
    """A value during conversion: a constant (numpy), a tensor node, or a shape-list node."""

    kind: str  # "const" | "tensor" | "shape" | "bad"
    const: np.ndarray | None = None
    node: fx.Node | None = None


def _onnx():
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - depends on the install
        from nnshrink.errors import ConfigError

        raise ConfigError("ONNX support needs the 'onnx' extra: pip install 'nnshrink[onnx]'") from exc
    return onnx


def read_onnx(path: str | Path):
    """Parse an ONNX file, raising :class:`FormatError` if it is not one."""
    onnx = _onnx()
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError, onnx raises others on external data
        raise FormatError(f"{path}: not an ONNX model ({type(exc).__name__}: {exc})") from exc
    if not model.graph.node and not model.graph.output:
        raise FormatError(f"{path}: not an ONNX model (no graph found)")
    return model


def load_onnx(path: str | Path, constant_inputs: dict | None = None) -> fx.GraphModule:
    """Read an ``.onnx`` file and convert it to a torch.fx ``GraphModule``.

    ``constant_inputs`` pins graph inputs that are constant in use (``{"sr": 16000}``, a sample
    rate that chooses an ``If`` branch): they become constants, so the branch they choose is
    converted, and the imported model no longer takes them.

    Raises:
        FileNotFoundError: The file does not exist.
        FormatError: The file is not ONNX.
        UnsupportedOpError: The graph holds operators with no converter (all are listed).
    """
    return onnx_to_torch(read_onnx(path), constant_inputs)


def _sanitize(name: str, fallback: str, keep_dots: bool = False) -> str:
    if keep_dots and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*", name):
        return name
    name = name.strip("/")
    name = re.sub(r"/(Conv|Gemm|MatMul|BatchNormalization|MaxPool|AveragePool)$", "", name)
    name = re.sub(r"[^0-9a-zA-Z_]+", "_", name).strip("_")
    if not name or name[0].isdigit():
        name = f"{fallback}_{name}" if name else fallback
    return name


class _Converter:
    def __init__(self, model, constant_inputs: dict | None = None) -> None:
        self.constant_inputs = dict(constant_inputs or {})
        onnx = _onnx()
        self.onnx = onnx
        self.numpy_helper = onnx.numpy_helper
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 13)
        try:
            model = onnx.shape_inference.infer_shapes(model)
        except Exception:  # shape inference is a help for ranks, never a requirement
            pass
        if any(n.domain not in ("", "ai.onnx") or not hasattr(self, f"op_{n.op_type}") for n in model.graph.node
               if n.op_type != "Constant"):
            model = _ort_shapes(model)  # nodes kept as they are need output shapes ONNX may not infer
        self.model = model
        self.graph = fx.Graph()
        self.root: dict[str, nn.Module | torch.Tensor] = {}  # qualified name -> module or buffer
        self.env: dict[str, _Value] = {}
        self.buffers: dict[str, fx.Node] = {}
        self.used_names: set[str] = set()
        self.unsupported: dict[str, list[str]] = defaultdict(list)
        self.ranks: dict[str, int] = {}
        self.static_shapes: dict[str, tuple[int, ...]] = {}
        self.partial_shapes: dict[str, tuple[int | None, ...]] = {}  # None: a dynamic dim
        self.elem_types: dict[str, int] = {}
        self.zeros: set[str] = set()  # outputs of ConstantOfShape with value 0
        self.opaque: Counter = Counter()  # op type -> nodes kept as they are
        self.dim_names: dict[str, tuple] = {}  # value -> dims: int, symbol name, or None
        for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
            t = vi.type.tensor_type
            if t.elem_type:
                self.elem_types[vi.name] = t.elem_type
            if t.HasField("shape"):
                self.ranks[vi.name] = len(t.shape.dim)
                dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
                self.partial_shapes[vi.name] = tuple(dims)
                self.dim_names[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                                                for d in t.shape.dim)
                if all(d is not None for d in dims):
                    self.static_shapes[vi.name] = tuple(dims)
        self.uses = Counter(i for n in model.graph.node for i in n.input if i)
        for o in model.graph.output:
            self.uses[o.name] += 1

    # -- naming and values ------------------------------------------------------------------
    def unique(self, base: str) -> str:
        """A qualified name not yet taken, neither as a name nor as a parent of one."""
        name, i = base, 1
        while self._clashes(name):
            i += 1
            name = f"{base}_{i}"
        self.used_names.add(name)
        return name

    def _clashes(self, name: str) -> bool:
        if name in self.used_names:
            return True
        parts = name.split(".")
        if any(".".join(parts[:k]) in self.used_names for k in range(1, len(parts))):
            return True
        return any(u.startswith(name + ".") for u in self.used_names)

    def add_module(self, onnx_node, module: nn.Module, fallback: str) -> str:
        base = (_name_from_weight(onnx_node, module) or _torch_scope(onnx_node, module)
                or (_sanitize(onnx_node.name, fallback) if onnx_node.name else fallback))
        name = self.unique(base)
        self.root[name] = module
        return name

    def arg(self, name: str):
        """An fx argument for ONNX value ``name``: node, literal list/scalar, or buffer."""
        v = self.env[name]
        if v.kind in ("tensor", "shape"):
            return v.node
        arr = v.const
        if arr.dtype.kind in "iub" and arr.size <= _SMALL_INT:
            return arr.item() if arr.ndim == 0 else arr.tolist()
        return self._const_tensor(name)

    def const(self, name: str) -> np.ndarray | None:
        if not name:
            return None
        v = self.env.get(name)
        return v.const if v is not None and v.kind == "const" else None

    def attrs(self, node) -> dict:
        return {a.name: self.onnx.helper.get_attribute_value(a) for a in node.attribute}

    # -- conversion -------------------------------------------------------------------------
    def run(self) -> fx.GraphModule:
        g = self.model.graph
        for init in g.initializer:
            self.env[init.name] = _Value("const", const=self.numpy_helper.to_array(init))
        names = {i.name for i in g.input}
        unknown = sorted(set(self.constant_inputs) - names)
        if unknown:
            raise FormatError(f"constant_inputs names {', '.join(unknown)}, which the graph has no input called "
                              f"(its inputs: {', '.join(sorted(names - set(self.env)))})")
        for name, value in self.constant_inputs.items():
            elem = self.elem_types.get(name)
            dtype = self.onnx.helper.tensor_dtype_to_np_dtype(elem) if elem else None
            self.env[name] = _Value("const", const=np.asarray(value, dtype=dtype))
        inputs = [i for i in g.input if i.name not in self.env]
        for inp in inputs:
            node = self.graph.placeholder(self.unique(_sanitize(inp.name, "input")))
            self.env[inp.name] = _Value("tensor", node=node)
        for node in g.node:
            self.convert(node)
        if self.unsupported:
            parts = []
            for op, names in self.unsupported.items():
                shown = ", ".join(repr(n) for n in names[:3]) + (", ..." if len(names) > 3 else "")
                parts.append(f"{op} ({len(names)} node{'s' if len(names) > 1 else ''}: {shown})")
            raise UnsupportedOpError(
                f"{len(self.unsupported)} ONNX operator type(s) cannot be converted: " + "; ".join(parts))
        outs = [self._const_tensor(o.name) if self.env[o.name].kind == "const" else self.arg(o.name)
                for o in g.output]
        self.graph.output(outs[0] if len(outs) == 1 else tuple(outs))
        gm = fx.GraphModule(self.root, self.graph, class_name="OnnxModel")
        gm.input_shape = self._input_shape(inputs[0]) if inputs else None
        gm.onnx_input_names = [i.name for i in inputs]
        # fx node name -> the ONNX values it computes (a quantized graph read back finds each
        # tensor's scale by them: nnshrink.io.qdq.graph_from_qdq)
        gm.onnx_values = {}
        for onnx_name, v in self.env.items():
            if v.kind == "tensor" and v.node is not None:
                gm.onnx_values.setdefault(v.node.name, []).append(onnx_name)
        signature.attach(gm, signature.from_proto(self.model, inputs))
        gm.nnshrink_opaque = dict(self.opaque)
        if self.opaque:
            import warnings

            warnings.warn(f"kept as they are, run by ONNX Runtime (not compressed, no gradients): {opaque_summary(gm)}",
                          stacklevel=3)
        gm.eval()
        return gm

    def _const_tensor(self, name: str) -> fx.Node:
        """A buffer holding constant ``name`` (one buffer per constant, made on first use)."""
        if name not in self.buffers:
            buf = self.unique("const_" + _sanitize(name, "c").replace(".", "_"))
            self.root[buf] = torch.from_numpy(np.ascontiguousarray(self.env[name].const).copy())
            self.buffers[name] = self.graph.get_attr(buf)
        return self.buffers[name]

    @staticmethod
    def _input_shape(inp) -> tuple | None:
        t = inp.type.tensor_type
        if not t.HasField("shape"):
            return None
        dims = [d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None for d in t.shape.dim]
        return tuple(dims[1:])

    def convert(self, node) -> None:
        convertible = node.domain in ("", "ai.onnx") and (
            node.op_type == "Constant" or hasattr(self, f"op_{node.op_type}"))
        if any(i and self.env.get(i, _Value("bad")).kind == "bad" for i in node.input):
            if not convertible:  # list every operator without a converter, downstream ones too
                self._unsupported(node, node.op_type if node.domain in ("", "ai.onnx")
                                  else f"{node.domain}.{node.op_type}")
            for o in node.output:
                self.env[o] = _Value("bad")
            return
        if node.domain not in ("", "ai.onnx"):
            if not self._opaque(node):
                self._unsupported(node, f"{node.domain}.{node.op_type}")
            return
        if node.op_type == "Constant":
            self.env[node.output[0]] = _Value("const", const=self._constant(node))
            return
        ins = [i for i in node.input]
        all_const = all(self.const(i) is not None for i in ins if i) and any(ins)
        handler = getattr(self, f"op_{node.op_type}", None)
        if all_const and node.op_type not in ("Shape",):
            folded = self._fold(node)
            if folded is not None:
                for o, arr in zip(node.output, folded):
                    self.env[o] = _Value("const", const=arr)
                return
        if handler is None:
            if not self._opaque(node):
                self._unsupported(node, node.op_type)
            return
        handler(node, self.attrs(node))

    def _opaque(self, node) -> bool:
        """Keep a node without a converter as it is, run by ONNX Runtime (:mod:`onnx_opaque`);
        False where that cannot be done (subgraph attributes, shape values, unknown ranks)."""
        onnx = self.onnx
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            return False
        names = list(node.input)
        while names and not names[-1]:
            names.pop()
        if any(not n for n in names) or any(self.env[n].kind == "shape" for n in names):
            return False
        in_dims = [self.dim_names.get(n) for n in names]
        outputs = []
        for o in node.output:
            dims = self.dim_names.get(o)
            if dims is None:
                return False
            meta = []
            for d in dims:
                if isinstance(d, int):
                    meta.append(d)
                    continue
                hit = next(((i, j) for i, ds in enumerate(in_dims) if ds for j, e in enumerate(ds)
                            if isinstance(d, str) and e == d), None)
                meta.append(list(hit) if hit else None)
            elem = self.elem_types.get(o) or (self.elem_types.get(names[0]) if names else 1) or 1
            outputs.append((int(elem), meta))
        opsets = {o.domain or "": o.version for o in self.model.opset_import}
        opsets.setdefault(node.domain, 1)
        from nnshrink.io.onnx_opaque import OpaqueNode, OpaqueSpec

        module = OpaqueNode(OpaqueSpec(node.SerializeToString(), opsets, outputs))
        args = [self._const_tensor(n) if self.env[n].kind == "const" else self.arg(n) for n in names]
        name = self.unique(_sanitize(node.name, "opaque") if node.name else "opaque")
        self.root[name] = module
        out = self.graph.call_module(name, tuple(args))
        if len(node.output) == 1:
            self.env[node.output[0]] = _Value("tensor", node=out)
        else:
            for i, o in enumerate(node.output):
                self.env[o] = _Value("tensor", node=self.graph.call_function(_getitem, (out, i)))
        self.opaque[module.op_type] += 1
        return True

    def _unsupported(self, node, op: str) -> None:
        self.unsupported[op].append(node.name or node.output[0])
        for o in node.output:
            self.env[o] = _Value("bad")

    def _constant(self, node) -> np.ndarray:
        a = self.attrs(node)
        if "value" in a:
            return self.numpy_helper.to_array(a["value"])
        for key, dtype in (("value_float", np.float32), ("value_floats", np.float32),
                           ("value_int", np.int64), ("value_ints", np.int64)):
            if key in a:
                return np.asarray(a[key], dtype=dtype)
        raise FormatError(f"Constant node {node.name!r} has no supported value attribute")

    def _fold(self, node) -> list[np.ndarray] | None:
        """Evaluate a node whose inputs are all constant with ONNX's reference evaluator."""
        from onnx.reference import ReferenceEvaluator

        helper = self.onnx.helper
        feeds = {i: self.const(i) for i in node.input if i}
        inputs = [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                  for i, a in feeds.items()]
        outputs = [helper.make_empty_tensor_value_info(o) for o in node.output if o]
        graph = helper.make_graph([node], "fold", inputs, outputs)
        # The reference evaluator implements only some versions of some operators; the newest
        # version computes the same for constant inputs of the operators met in weight paths.
        for opset in dict.fromkeys((self.opset, self.onnx.defs.onnx_opset_version())):
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
            try:
                return [np.asarray(r) for r in ReferenceEvaluator(model).run(None, feeds)]
            except Exception:  # noqa: PERF203 - an unimplemented op is an expected outcome
                continue
        return None

    def emit(self, node, fn, *args, kind: str = "tensor", **kwargs) -> fx.Node:
        out = self.graph.call_function(fn, tuple(args), kwargs)
        self.env[node.output[0]] = _Value(kind, node=out)
        return out

    def module(self, node, module: nn.Module, fallback: str, *args) -> fx.Node:
        name = self.add_module(node, module, fallback)
        out = self.graph.call_module(name, tuple(args))
        self.env[node.output[0]] = _Value("tensor", node=out)
        return out

    def is_shape(self, name: str) -> bool:
        v = self.env.get(name)
        if v is None:
            return False
        if v.kind == "shape":
            return True
        return v.kind == "const" and v.const.dtype.kind in "iu" and v.const.size <= _SMALL_INT

    # -- operators: layers with weights -----------------------------------------------------
    def op_Conv(self, node, a) -> None:
        w, b = self.const(node.input[1]), self.const(node.input[2] if len(node.input) > 2 else "")
        if w is None or w.ndim not in (3, 4):
            spatial = "non-constant weight" if w is None else f"{w.ndim - 2} spatial dims"
            self._unsupported(node, f"Conv ({spatial})")
            return
        nd = w.ndim - 2
        strides = a.get("strides", [1] * nd)
        dilations = a.get("dilations", [1] * nd)
        pads = list(a.get("pads", [0] * 2 * nd))
        kernel = list(w.shape[2:])
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            shape = self.static_shapes.get(node.input[0])
            if shape is None:
                self._unsupported(node, "Conv (auto_pad SAME with unknown input size)")
                return
            pads = _same_pads(shape[2:], kernel, strides, dilations, auto == "SAME_UPPER")
        elif auto == "VALID":
            pads = [0] * 2 * nd
        groups = a.get("group", 1)
        x = self.arg(node.input[0])
        begin, end = pads[:nd], pads[nd:]
        if begin != end:
            x = self.graph.call_function(ops.pad, (x, [0, 0] + begin + [0, 0] + end, "constant", 0.0))
            begin = [0] * nd
        cls = nn.Conv1d if nd == 1 else nn.Conv2d
        conv = cls(w.shape[1] * groups, w.shape[0], kernel, stride=strides, padding=begin,
                   dilation=dilations, groups=groups, bias=b is not None)
        with torch.no_grad():
            conv.weight.copy_(_tensor(w))
            if b is not None:
                conv.bias.copy_(_tensor(b))
        self.module(node, conv, "conv", x)

    def _linear(self, node, weight: np.ndarray, bias: np.ndarray | None, x) -> None:
        lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
        with torch.no_grad():
            lin.weight.copy_(_tensor(weight))
            if bias is not None:
                lin.bias.copy_(_tensor(np.broadcast_to(bias, (weight.shape[0],))))
        self.module(node, lin, "linear", x)

    def op_Gemm(self, node, a) -> None:
        b = self.const(node.input[1])
        c = self.const(node.input[2]) if len(node.input) > 2 else None
        if b is None or a.get("transA", 0) or b.ndim != 2:
            self._unsupported(node, "Gemm (non-constant or transposed-A operands)")
            return
        alpha, beta = a.get("alpha", 1.0), a.get("beta", 1.0)
        weight = (b if a.get("transB", 0) else b.T) * alpha
        bias = None
        if c is not None:
            if c.size not in (1, weight.shape[0]) or (c.ndim == 2 and c.shape[0] != 1):
                self._unsupported(node, "Gemm (bias not broadcast over rows)")
                return
            bias = c.reshape(-1) * beta
        self._linear(node, weight, bias, self.arg(node.input[0]))

    def op_MatMul(self, node, a) -> None:
        b = self.const(node.input[1])
        if b is not None and b.ndim == 2:
            self._linear(node, b.T, None, self.arg(node.input[0]))
            return
        self.emit(node, ops.matmul, self.arg(node.input[0]), self.arg(node.input[1]))

    def op_BatchNormalization(self, node, a) -> None:
        scale, bias, mean, var = (self.const(i) for i in node.input[1:5])
        if any(v is None for v in (scale, bias, mean, var)) or len(node.output) > 1 and any(node.output[1:]):
            self._unsupported(node, "BatchNormalization (training mode or non-constant statistics)")
            return
        rank = self.ranks.get(node.input[0], 4)
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d}.get(rank, nn.BatchNorm2d)
        bn = cls(len(scale), eps=a.get("epsilon", 1e-5), momentum=1 - a.get("momentum", 0.9))
        with torch.no_grad():
            for p, v in ((bn.weight, scale), (bn.bias, bias), (bn.running_mean, mean), (bn.running_var, var)):
                p.copy_(_tensor(v))
        self.module(node, bn.eval(), "bn", self.arg(node.input[0]))

    # -- operators: elementwise ---------------------------------------------------------------
    def _binary(self, node, fn) -> None:
        kind = "shape" if self.is_shape(node.input[0]) and self.is_shape(node.input[1]) else "tensor"
        if fn is ops.add and kind == "tensor" and self._fold_bias(node):
            return
        self.emit(node, fn, self.arg(node.input[0]), self.arg(node.input[1]), kind=kind)

    def _fold_bias(self, node) -> bool:
        """MatMul followed by Add of a constant vector: give the Linear a bias instead."""
        for i, j in ((0, 1), (1, 0)):
            v, c = self.env.get(node.input[i]), self.const(node.input[j])
            if v is None or v.kind != "tensor" or c is None or v.node.op != "call_module":
                continue
            mod = self.root[v.node.target]
            if (isinstance(mod, nn.Linear) and mod.bias is None and self.uses[node.input[i]] == 1
                    and c.size == mod.out_features and c.shape[-1] == mod.out_features):
                mod.bias = nn.Parameter(_tensor(c.reshape(-1)))
                self.env[node.output[0]] = v
                return True
        return False

    def op_Add(self, node, a) -> None:
        self._binary(node, ops.add)

    def op_Sub(self, node, a) -> None:
        self._binary(node, ops.sub)

    def op_Mul(self, node, a) -> None:
        self._binary(node, ops.mul)

    def op_Div(self, node, a) -> None:
        self._binary(node, ops.div)

    def op_Pow(self, node, a) -> None:
        self.emit(node, ops.pow_, self.arg(node.input[0]), self.arg(node.input[1]))

    def op_Relu(self, node, a) -> None:
        self.emit(node, torch.relu, self.arg(node.input[0]))

    def op_Sigmoid(self, node, a) -> None:
        self.emit(node, torch.sigmoid, self.arg(node.input[0]))

    def op_Tanh(self, node, a) -> None:
        self.emit(node, torch.tanh, self.arg(node.input[0]))

    def op_LeakyRelu(self, node, a) -> None:
        self.module(node, nn.LeakyReLU(a.get("alpha", 0.01)), "leaky_relu", self.arg(node.input[0]))

    def op_Elu(self, node, a) -> None:
        self.module(node, nn.ELU(a.get("alpha", 1.0)), "elu", self.arg(node.input[0]))

    def op_HardSigmoid(self, node, a) -> None:
        self.emit(node, ops.hard_sigmoid, self.arg(node.input[0]), a.get("alpha", 0.2), a.get("beta", 0.5))

    def op_HardSwish(self, node, a) -> None:
        self.module(node, nn.Hardswish(), "hardswish", self.arg(node.input[0]))

    def op_Softplus(self, node, a) -> None:
        self.module(node, nn.Softplus(), "softplus", self.arg(node.input[0]))

    def _unary(self, node, name: str) -> None:
        self.emit(node, ops.unary, self.arg(node.input[0]), name)

    def op_Exp(self, node, a) -> None:
        self._unary(node, "exp")

    def op_Sqrt(self, node, a) -> None:
        self._unary(node, "sqrt")

    def op_Erf(self, node, a) -> None:
        self._unary(node, "erf")

    def op_Neg(self, node, a) -> None:
        self._unary(node, "neg")

    def op_Abs(self, node, a) -> None:
        self._unary(node, "abs")

    def op_Reciprocal(self, node, a) -> None:
        self._unary(node, "reciprocal")

    def op_Clip(self, node, a) -> None:
        if self.opset >= 11:
            lo = self.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
            hi = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
            if (len(node.input) > 1 and node.input[1] and lo is None) or \
                    (len(node.input) > 2 and node.input[2] and hi is None):
                self._unsupported(node, "Clip (non-constant bounds)")
                return
            lo = None if lo is None else float(lo)
            hi = None if hi is None else float(hi)
        else:
            lo, hi = a.get("min"), a.get("max")
        x = self.arg(node.input[0])
        if lo == 0.0 and hi == 6.0:
            self.module(node, nn.ReLU6(), "relu6", x)
        else:
            self.emit(node, ops.clip, x, lo, hi)

    # -- quantization: integers flow as exact values in float tensors -------------------------
    def _qparams(self, node):
        scale = self.const(node.input[1])
        zp = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None or (len(node.input) > 2 and node.input[2] and zp is None):
            return None
        return scale, zp

    def op_QuantizeLinear(self, node, a) -> None:
        params = self._qparams(node)
        if params is None:
            self._unsupported(node, "QuantizeLinear (non-constant scale)")
            return
        scale, zp = params
        int_type = str(zp.dtype) if zp is not None else "uint8"
        if int_type not in ops._INT_RANGES:
            self._unsupported(node, f"QuantizeLinear (to {int_type})")
            return
        zp_arg = self.arg(node.input[2]) if zp is not None else 0
        self.emit(node, ops.quantize_linear, self.arg(node.input[0]), self.arg(node.input[1]), zp_arg,
                  a.get("axis", 1), int_type)

    def op_DequantizeLinear(self, node, a) -> None:
        params = self._qparams(node)
        if params is None:
            self._unsupported(node, "DequantizeLinear (non-constant scale)")
            return
        zp_arg = self.arg(node.input[2]) if len(node.input) > 2 and node.input[2] else 0
        self.emit(node, ops.dequantize_linear, self.arg(node.input[0]), self.arg(node.input[1]), zp_arg,
                  a.get("axis", 1))

    def op_Identity(self, node, a) -> None:
        self.env[node.output[0]] = self.env[node.input[0]]

    def op_Dropout(self, node, a) -> None:
        if len(node.output) > 1 and node.output[1] and self.uses[node.output[1]]:
            self._unsupported(node, "Dropout (mask output used)")
            return
        self.env[node.output[0]] = self.env[node.input[0]]

    # -- operators: pooling ---------------------------------------------------------------------
    def _pool(self, node, a, kind: str) -> None:
        kernel = a["kernel_shape"]
        nd = len(kernel)
        if nd not in (1, 2):
            self._unsupported(node, f"{node.op_type} ({nd}-D)")
            return
        strides = a.get("strides", [1] * nd)
        pads = list(a.get("pads", [0] * 2 * nd))
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            shape = self.static_shapes.get(node.input[0])
            if shape is None:
                self._unsupported(node, f"{node.op_type} (auto_pad SAME with unknown input size)")
                return
            pads = _same_pads(shape[2:], kernel, strides, [1] * nd, auto == "SAME_UPPER")
        x = self.arg(node.input[0])
        begin, end = pads[:nd], pads[nd:]
        ceil = bool(a.get("ceil_mode", 0))
        if begin != end or any(p > k // 2 for p, k in zip(begin, kernel)):
            fill = float("-inf") if kind == "max" else 0.0
            x = self.graph.call_function(ops.pad, (x, [0, 0] + begin + [0, 0] + end, "constant", fill))
            begin = [0] * nd
        if kind == "max":
            if any(d != 1 for d in a.get("dilations", [1] * nd)):
                cls = nn.MaxPool1d if nd == 1 else nn.MaxPool2d
                pool = cls(kernel, strides, begin, dilation=a["dilations"], ceil_mode=ceil)
            else:
                cls = nn.MaxPool1d if nd == 1 else nn.MaxPool2d
                pool = cls(kernel, strides, begin, ceil_mode=ceil)
        else:
            cls = nn.AvgPool1d if nd == 1 else nn.AvgPool2d
            pool = cls(kernel, strides, begin, ceil_mode=ceil,
                       count_include_pad=bool(a.get("count_include_pad", 0)))
        self.module(node, pool, f"{kind}pool", x)

    def op_MaxPool(self, node, a) -> None:
        if len(node.output) > 1 and node.output[1]:
            self._unsupported(node, "MaxPool (indices output)")
            return
        self._pool(node, a, "max")

    def op_AveragePool(self, node, a) -> None:
        self._pool(node, a, "avg")

    def op_GlobalAveragePool(self, node, a) -> None:
        self.emit(node, ops.global_pool, self.arg(node.input[0]), "avg")

    def op_GlobalMaxPool(self, node, a) -> None:
        self.emit(node, ops.global_pool, self.arg(node.input[0]), "max")

    def _reduce(self, node, a, op: str) -> None:
        axes = a.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            c = self.const(node.input[1])
            if c is None:
                self._unsupported(node, f"{node.op_type} (non-constant axes)")
                return
            axes = c.tolist()
        if axes is None and a.get("noop_with_empty_axes", 0):
            self.env[node.output[0]] = self.env[node.input[0]]
            return
        self.emit(node, ops.reduce, self.arg(node.input[0]), op, axes, a.get("keepdims", 1))

    def op_ReduceMean(self, node, a) -> None:
        self._reduce(node, a, "mean")

    def op_ReduceSum(self, node, a) -> None:
        self._reduce(node, a, "sum")

    def op_ReduceMax(self, node, a) -> None:
        self._reduce(node, a, "max")

    def op_ReduceMin(self, node, a) -> None:
        self._reduce(node, a, "min")

    # -- operators: shapes and layout -----------------------------------------------------------
    def op_Flatten(self, node, a) -> None:
        self.emit(node, ops.flatten, self.arg(node.input[0]), a.get("axis", 1))

    def op_Reshape(self, node, a) -> None:
        if not self.is_shape(node.input[1]):
            self._unsupported(node, "Reshape (shape from a tensor value)")
            return
        kind = "shape" if self.env[node.input[0]].kind == "shape" else "tensor"
        if kind == "tensor" and self._flattens(node):
            # written with the feature count as a number ([-1, 800], or [batch, 800] from shape
            # arithmetic); as a flatten it follows the channels a structural edit removes, where
            # the number would break the graph
            self.emit(node, ops.flatten, self.arg(node.input[0]), 1)
            return
        self.emit(node, ops.reshape, self.arg(node.input[0]), self.arg(node.input[1]), a.get("allowzero", 0),
                  kind=kind)

    def _flattens(self, node) -> bool:
        """Whether ``Reshape`` is ``(N, C, ...) -> (N, C * ...)``: from ONNX's inferred output
        shape (``(N, features)``: then the rows can only be the batch), else from a constant
        target shape."""
        dims = self.partial_shapes.get(node.input[0])
        if dims is None or len(dims) < 3 or any(d is None for d in dims[1:]):
            return False
        features = int(np.prod(dims[1:]))
        inferred = self.partial_shapes.get(node.output[0])
        if inferred is not None and len(inferred) == 2 and inferred[1] is not None:
            return inferred[1] == features
        target = self.env.get(node.input[1])
        if target is None or target.kind != "const":
            return False
        out = [int(v) for v in target.const.reshape(-1)]
        if len(out) != 2:
            return False
        batch_ok = out[0] in (-1, 0) or (dims[0] is not None and out[0] == dims[0])
        return (out[1] == features and batch_ok) or (out[1] == -1 and (out[0] == 0 or out[0] == dims[0]))

    def op_Shape(self, node, a) -> None:
        start, end = a.get("start", 0), a.get("end")
        static = self.static_shapes.get(node.input[0])
        v = self.env[node.input[0]]
        if v.kind == "const":
            static = v.const.shape
        if static is not None:
            self.env[node.output[0]] = _Value("const", const=np.asarray(static[start:end], dtype=np.int64))
            return
        self.emit(node, ops.shape, self.arg(node.input[0]), start, end, kind="shape")

    def op_Gather(self, node, a) -> None:
        idx = self.const(node.input[1])
        if idx is None:
            self._unsupported(node, "Gather (non-constant indices)")
            return
        kind = "shape" if self.is_shape(node.input[0]) else "tensor"
        indices = idx.item() if idx.ndim == 0 else idx.tolist()
        self.emit(node, ops.gather, self.arg(node.input[0]), indices, a.get("axis", 0), kind=kind)

    def _axes(self, node, a) -> list | None:
        if "axes" in a:
            return list(a["axes"])
        if len(node.input) > 1 and node.input[1]:
            c = self.const(node.input[1])
            return None if c is None else c.reshape(-1).tolist()
        return None

    def op_Unsqueeze(self, node, a) -> None:
        axes = self._axes(node, a)
        if axes is None:
            self._unsupported(node, "Unsqueeze (non-constant axes)")
            return
        kind = "shape" if self.is_shape(node.input[0]) else "tensor"
        self.emit(node, ops.unsqueeze, self.arg(node.input[0]), axes, kind=kind)

    def op_Squeeze(self, node, a) -> None:
        axes = self._axes(node, a)
        kind = "shape" if self.is_shape(node.input[0]) else "tensor"
        self.emit(node, ops.squeeze, self.arg(node.input[0]), axes, kind=kind)

    def op_Concat(self, node, a) -> None:
        names = [i for i in node.input if i]
        if all(self.is_shape(i) for i in names):
            self.emit(node, ops.concat_shapes, *[self.arg(i) for i in names], kind="shape")
            return
        self.emit(node, torch.cat, [self.arg(i) for i in names], a.get("axis", 0))

    def op_Transpose(self, node, a) -> None:
        perm = a.get("perm")
        if perm is None:
            rank = self.ranks.get(node.input[0])
            if rank is None:
                self._unsupported(node, "Transpose (no perm and unknown rank)")
                return
            perm = list(reversed(range(rank)))
        self.emit(node, ops.transpose, self.arg(node.input[0]), list(perm))

    def op_Cast(self, node, a) -> None:
        if self.is_shape(node.input[0]) and self.env[node.input[0]].kind == "shape":
            self.env[node.output[0]] = self.env[node.input[0]]
            return
        np_dtype = self.onnx.helper.tensor_dtype_to_np_dtype(a["to"])
        dtype = torch.from_numpy(np.zeros(1, dtype=np_dtype)).dtype
        self.emit(node, ops.cast, self.arg(node.input[0]), dtype)

    def op_Slice(self, node, a) -> None:
        if self.opset < 10:
            starts, ends = a["starts"], a["ends"]
            axes = a.get("axes", list(range(len(starts))))
            steps = [1] * len(starts)
        else:
            vals = []
            for i in range(1, 5):
                name = node.input[i] if len(node.input) > i else ""
                c = self.const(name)
                if not name:
                    vals.append(None)
                elif c is not None:
                    vals.append(c.reshape(-1).tolist())
                elif self.is_shape(name):  # bounds computed from a shape at run time
                    vals.append(self.arg(name))
                else:
                    self._unsupported(node, "Slice (bounds from a tensor value)")
                    return
            starts, ends = vals[0], vals[1]
            if (vals[2] is not None and not isinstance(vals[2], list)) or \
                    (vals[3] is not None and not isinstance(vals[3], list)):
                self._unsupported(node, "Slice (axes or steps from a tensor value)")
                return
            n = len(starts) if isinstance(starts, list) else len(vals[2] or [0])
            axes = vals[2] if vals[2] is not None else list(range(n))
            steps = vals[3] if vals[3] is not None else [1] * n
        kind = "shape" if self.env[node.input[0]].kind == "shape" else "tensor"
        self.emit(node, ops.slice_, self.arg(node.input[0]), starts, ends, axes, steps, kind=kind)

    def op_Pad(self, node, a) -> None:
        mode = a.get("mode", b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if self.opset < 11:
            pads, value = a["pads"], a.get("value", 0.0)
        else:
            p = self.const(node.input[1])
            v = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros(())
            if p is None or v is None or (len(node.input) > 3 and node.input[3]):
                self._unsupported(node, "Pad (non-constant pads or axes)")
                return
            pads, value = p.tolist(), float(v)
        n = len(pads) // 2
        if mode not in ("constant", "reflect", "edge") or any(pads[i] or pads[i + n] for i in range(min(2, n))):
            self._unsupported(node, f"Pad (mode {mode} or padding of batch/channel axes)")
            return
        self.emit(node, ops.pad, self.arg(node.input[0]), pads, mode, float(value))

    def op_Softmax(self, node, a) -> None:
        self.emit(node, ops.softmax, self.arg(node.input[0]), a.get("axis", -1 if self.opset >= 13 else 1),
                  False, self.opset < 13)

    def op_LogSoftmax(self, node, a) -> None:
        self.emit(node, ops.softmax, self.arg(node.input[0]), a.get("axis", -1 if self.opset >= 13 else 1),
                  True, self.opset < 13)

    def op_Split(self, node, a) -> None:
        sizes = a.get("split")
        if sizes is None and len(node.input) > 1 and node.input[1]:
            c = self.const(node.input[1])
            sizes = None if c is None else c.tolist()
        axis = a.get("axis", 0)
        if sizes is None:
            shape = self.static_shapes.get(node.input[0])
            if shape is None:
                self._unsupported(node, "Split (unknown sizes)")
                return
            sizes = [shape[axis] // len(node.output)] * len(node.output)
        out = self.graph.call_function(ops.split, (self.arg(node.input[0]), list(sizes), axis))
        for i, name in enumerate(node.output):
            self.env[name] = _Value("tensor", node=self.graph.call_function(_getitem, (out, i)))

    def op_Expand(self, node, a) -> None:
        if not self.is_shape(node.input[1]):
            self._unsupported(node, "Expand (shape from a tensor value)")
            return
        self.emit(node, ops.expand, self.arg(node.input[0]), self.arg(node.input[1]))

    def op_CastLike(self, node, a) -> None:
        c, like_type = self.const(node.input[0]), self.elem_types.get(node.input[1])
        if c is not None and like_type:  # a constant cast to a run-time tensor's known type
            self.env[node.output[0]] = _Value("const", const=c.astype(
                self.onnx.helper.tensor_dtype_to_np_dtype(like_type)))
            return
        if self.env[node.input[0]].kind == "shape":
            self.env[node.output[0]] = self.env[node.input[0]]
            return
        self.emit(node, ops.cast_like, self.arg(node.input[0]), self.arg(node.input[1]))

    def op_ConstantOfShape(self, node, a) -> None:
        value = a.get("value")
        arr = self.numpy_helper.to_array(value) if value is not None else np.zeros(1, np.float32)
        dtype = torch.from_numpy(arr.reshape(-1)[:1].copy()).dtype
        if float(arr.reshape(-1)[0]) == 0.0:
            self.zeros.add(node.output[0])
        self.emit(node, ops.constant_of_shape, self.arg(node.input[0]), float(arr.reshape(-1)[0]), dtype)

    # -- operators: comparisons and selection (mostly in shape arithmetic) ---------------------
    def _compare(self, node, op: str) -> None:
        kind = "shape" if self.is_shape(node.input[0]) and self.is_shape(node.input[1]) else "tensor"
        self.emit(node, ops.binary, self.arg(node.input[0]), self.arg(node.input[1]), op, kind=kind)

    def op_Equal(self, node, a) -> None:
        self._compare(node, "eq")

    def op_Less(self, node, a) -> None:
        self._compare(node, "lt")

    def op_Greater(self, node, a) -> None:
        self._compare(node, "gt")

    def op_LessOrEqual(self, node, a) -> None:
        self._compare(node, "le")

    def op_GreaterOrEqual(self, node, a) -> None:
        self._compare(node, "ge")

    def op_Max(self, node, a) -> None:
        self._variadic(node, "maximum")

    def op_Min(self, node, a) -> None:
        self._variadic(node, "minimum")

    def _variadic(self, node, op: str) -> None:
        names = [i for i in node.input if i]
        kind = "shape" if all(self.is_shape(i) for i in names) else "tensor"
        out = self.arg(names[0])
        for name in names[1:]:
            out = self.graph.call_function(ops.binary, (out, self.arg(name), op))
        self.env[node.output[0]] = _Value(kind, node=out) if names[1:] else self.env[names[0]]

    def op_Sum(self, node, a) -> None:
        names = [i for i in node.input if i]
        out = self.arg(names[0])
        for name in names[1:]:
            out = self.graph.call_function(ops.add, (out, self.arg(name)))
        self.env[node.output[0]] = _Value("tensor", node=out) if names[1:] else self.env[names[0]]

    def op_Where(self, node, a) -> None:
        self.emit(node, ops.where, *[self.arg(i) for i in node.input])

    def op_Not(self, node, a) -> None:
        self.emit(node, ops.logical_not, self.arg(node.input[0]))

    def op_Log(self, node, a) -> None:
        self._unary(node, "log")

    def op_Floor(self, node, a) -> None:
        self._unary(node, "floor")

    def op_Ceil(self, node, a) -> None:
        self._unary(node, "ceil")

    def op_Sin(self, node, a) -> None:
        self._unary(node, "sin")

    def op_Cos(self, node, a) -> None:
        self._unary(node, "cos")

    def op_Tile(self, node, a) -> None:
        self.emit(node, ops.tile, self.arg(node.input[0]), self.arg(node.input[1]))

    def op_Range(self, node, a) -> None:
        kind = "shape" if all(self.is_shape(i) for i in node.input) else "tensor"
        self.emit(node, ops.range_, *[self.arg(i) for i in node.input], kind=kind)

    # -- operators: activations with parameters -------------------------------------------------
    def op_PRelu(self, node, a) -> None:
        slope = self.const(node.input[1])
        if slope is None:
            self._unsupported(node, "PRelu (non-constant slope)")
            return
        rank = self.ranks.get(node.input[0])
        squeezed = slope.reshape(slope.shape[next((i for i, d in enumerate(slope.shape) if d != 1), slope.ndim):]) \
            if slope.ndim else slope.reshape(1)
        # torch's exporter writes nn.PReLU(C) as a (C, 1, 1) slope; ONNX broadcasts from the last
        # axis, so only a slope whose trailing axes are 1 is a per-channel one
        per_channel = (rank is not None and slope.size > 1 and squeezed.ndim == rank - 1
                       and all(d == 1 for d in squeezed.shape[1:]))
        if slope.size == 1 or per_channel:
            prelu = nn.PReLU(slope.size)
            with torch.no_grad():
                prelu.weight.copy_(_tensor(slope.reshape(-1)))
            self.module(node, prelu, "prelu", self.arg(node.input[0]))
            return
        self.emit(node, ops.prelu, self.arg(node.input[0]), self._const_tensor(node.input[1]))

    def op_Gelu(self, node, a) -> None:
        approx = a.get("approximate", b"none")
        approx = approx.decode() if isinstance(approx, bytes) else approx
        self.module(node, nn.GELU(approximate=approx), "gelu", self.arg(node.input[0]))

    def op_LayerNormalization(self, node, a) -> None:
        if len(node.output) > 1 and any(self.uses[o] for o in node.output[1:] if o):
            self._unsupported(node, "LayerNormalization (mean or inverse deviation outputs used)")
            return
        scale = self.const(node.input[1])
        bias = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        axis, eps = a.get("axis", -1), a.get("epsilon", 1e-5)
        rank = self.ranks.get(node.input[0])
        last = axis == -1 or (rank is not None and axis == rank - 1)
        if scale is not None and scale.ndim == 1 and last and (bias is None or bias.shape == scale.shape):
            ln = nn.LayerNorm(scale.shape[0], eps=eps, bias=bias is not None)
            with torch.no_grad():
                ln.weight.copy_(_tensor(scale))
                if bias is not None:
                    ln.bias.copy_(_tensor(bias))
            self.module(node, ln, "layernorm", self.arg(node.input[0]))
            return
        args = [self.arg(i) if i else None for i in list(node.input[1:3]) + [""] * (3 - len(node.input))]
        self.emit(node, ops.layer_norm, self.arg(node.input[0]), axis, args[0], args[1], eps)

    # -- operators: resampling and transposed convolution -----------------------------------------
    def op_Resize(self, node, a) -> None:
        self._resize(node, a, scales_at=2 if self.opset >= 11 else 1, sizes_at=3)

    def op_Upsample(self, node, a) -> None:
        self._resize(node, {**a, "coordinate_transformation_mode": b"asymmetric", "nearest_mode": b"floor"},
                     scales_at=1, sizes_at=None)

    def _resize(self, node, a, scales_at: int, sizes_at: int | None) -> None:
        def text(key, default):
            v = a.get(key, default)
            return v.decode() if isinstance(v, bytes) else v

        mode = text("mode", "nearest")
        coord = text("coordinate_transformation_mode", "half_pixel")
        nearest = text("nearest_mode", "round_prefer_floor")
        inputs = list(node.input) + [""] * 4
        scales = inputs[scales_at] if inputs[scales_at] else None
        sizes = inputs[sizes_at] if sizes_at is not None and inputs[sizes_at] else None
        if scales is not None and self.const(scales) is not None and self.const(scales).size == 0:
            scales = None
        rank = self.ranks.get(node.input[0], 4)
        if "scales" in a and scales is None and sizes is None:  # opset 7-9 Upsample attribute
            factors = list(a["scales"])
            scale_arg = factors
        else:
            scale_arg = None
            if scales is not None:
                c = self.const(scales)
                if c is None:
                    self._unsupported(node, "Resize (scales from a tensor value)")
                    return
                scale_arg = c.astype(float).tolist()
        if sizes is not None and not self.is_shape(sizes):
            self._unsupported(node, "Resize (sizes from a tensor value)")
            return
        if a.get("antialias", 0) or text("keep_aspect_ratio_policy", "stretch") != "stretch" or "axes" in a:
            self._unsupported(node, "Resize (antialias, axes or aspect-ratio policy)")
            return
        if scale_arg is not None and any(float(s) != 1.0 for s in scale_arg[:2]):
            self._unsupported(node, "Resize (of the batch or channel axis)")
            return
        spatial = rank - 2
        if mode == "nearest":
            # torch's nearest is ONNX's asymmetric + floor; integer upscaling with half_pixel and
            # round_prefer_floor or _ceil picks the same pixels ((i + 0.5) / s - 0.5 never ties)
            upscale = scale_arg is not None and all(float(s).is_integer() and s >= 1 for s in scale_arg[2:])
            ok = (coord == "asymmetric" and nearest == "floor") or (
                upscale and coord in ("half_pixel", "pytorch_half_pixel") and nearest.startswith("round_prefer"))
            torch_mode, align = "nearest", None
        elif mode in ("linear", "cubic"):
            ok = coord in ("half_pixel", "pytorch_half_pixel", "align_corners") and spatial in (1, 2) and (
                mode == "linear" or (spatial == 2 and float(a.get("cubic_coeff_a", -0.75)) == -0.75))
            torch_mode = {("linear", 1): "linear", ("linear", 2): "bilinear", ("cubic", 2): "bicubic"}.get(
                (mode, spatial), "bilinear")
            align = coord == "align_corners"
        else:
            ok = False
        if not ok:
            self._unsupported(node, f"Resize ({mode}, {coord}, {nearest})")
            return
        self.emit(node, ops.resize, self.arg(node.input[0]), scale_arg,
                  self.arg(sizes) if sizes is not None else None, torch_mode, align)

    def op_ConvTranspose(self, node, a) -> None:
        w = self.const(node.input[1])
        b = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if w is None or w.ndim not in (3, 4) or "output_shape" in a:
            self._unsupported(node, "ConvTranspose (non-constant weight, 3-D or output_shape)")
            return
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else auto
        if auto not in ("NOTSET", "VALID"):
            self._unsupported(node, f"ConvTranspose (auto_pad {auto})")
            return
        nd = w.ndim - 2
        groups = a.get("group", 1)
        strides = a.get("strides", [1] * nd)
        dilations = a.get("dilations", [1] * nd)
        pads = list(a.get("pads", [0] * 2 * nd))
        out_pad = list(a.get("output_padding", [0] * nd))
        begin, end = pads[:nd], pads[nd:]
        sym = [min(p, q) for p, q in zip(begin, end)]
        cls = nn.ConvTranspose1d if nd == 1 else nn.ConvTranspose2d
        conv = cls(w.shape[0], w.shape[1] * groups, list(w.shape[2:]), stride=strides, padding=sym,
                   output_padding=out_pad, groups=groups, bias=b is not None, dilation=dilations)
        with torch.no_grad():
            conv.weight.copy_(_tensor(w))
            if b is not None:
                conv.bias.copy_(_tensor(b))
        out = self.module(node, conv, "convtranspose", self.arg(node.input[0]))
        if begin != end:  # crop what the symmetric padding left on one side
            starts = [p - s for p, s in zip(begin, sym)]
            ends = [-(q - s) if q > s else None for q, s in zip(end, sym)]
            self.env[node.output[0]] = _Value("tensor", node=self.graph.call_function(
                ops.slice_, (out, starts, ends, list(range(2, 2 + nd)), [1] * nd)))

    # -- operators: recurrent layers -----------------------------------------------------------
    def op_LSTM(self, node, a) -> None:
        self._rnn(node, a, "LSTM")

    def op_GRU(self, node, a) -> None:
        self._rnn(node, a, "GRU")

    def _rnn(self, node, a, kind: str) -> None:
        inputs = list(node.input) + [""] * 8
        w, r = self.const(inputs[1]), self.const(inputs[2])
        b = self.const(inputs[3]) if inputs[3] else None
        direction = a.get("direction", b"forward")
        direction = direction.decode() if isinstance(direction, bytes) else direction
        acts = [v.decode() if isinstance(v, bytes) else v for v in a.get("activations", [])]
        default_acts = ["Sigmoid", "Tanh", "Tanh"] if kind == "LSTM" else ["Sigmoid", "Tanh"]
        problems = []
        if w is None or r is None or (inputs[3] and b is None):
            problems.append("non-constant weights")
        if inputs[4] and self.const(inputs[4]) is None:
            problems.append("sequence lengths from a tensor")
        if kind == "LSTM" and inputs[7]:
            problems.append("peepholes")
        if acts and acts != default_acts * (2 if direction == "bidirectional" else 1):
            problems.append(f"activations {acts}")
        if "clip" in a or a.get("input_forget", 0):
            problems.append("clip or coupled input-forget gate")
        if kind == "GRU" and not a.get("linear_before_reset", 0):
            problems.append("linear_before_reset=0")
        if direction == "reverse":
            problems.append("reverse-only direction")
        if problems:
            self._unsupported(node, f"{kind} ({', '.join(problems)})")
            return
        hidden = int(a["hidden_size"])
        dirs = 2 if direction == "bidirectional" else 1
        gates = 4 if kind == "LSTM" else 3
        layout = a.get("layout", 0)
        cls = nn.LSTM if kind == "LSTM" else nn.GRU
        rnn = cls(w.shape[2], hidden, bidirectional=dirs == 2, batch_first=True, bias=True)
        with torch.no_grad():
            for d in range(dirs):
                sfx = "_reverse" if d else ""
                bias = b[d] if b is not None else np.zeros(2 * gates * hidden, np.float32)
                getattr(rnn, f"weight_ih_l0{sfx}").copy_(_tensor(reorder(w[d], kind, "torch")))
                getattr(rnn, f"weight_hh_l0{sfx}").copy_(_tensor(reorder(r[d], kind, "torch")))
                getattr(rnn, f"bias_ih_l0{sfx}").copy_(_tensor(reorder(bias[: gates * hidden], kind, "torch")))
                getattr(rnn, f"bias_hh_l0{sfx}").copy_(_tensor(reorder(bias[gates * hidden:], kind, "torch")))
        # zero initial states (exporters write ConstantOfShape zeros) are torch's default: leave
        # them out, so the LSTM exports back without fixing the sequence length
        states = [self.arg(i) if i and i not in self.zeros else None
                  for i in (inputs[5], inputs[6] if kind == "LSTM" else "")]
        while states and states[-1] is None:
            states.pop()
        name = self.add_module(node, OnnxRNN(rnn, layout), kind.lower())
        out = self.graph.call_module(name, (self.arg(node.input[0]), *states))
        for i, o in enumerate(node.output):
            if o:
                self.env[o] = _Value("tensor", node=self.graph.call_function(_getitem, (out, i)))

    # -- operators: control flow ---------------------------------------------------------------
    def op_If(self, node, a) -> None:
        cond = self.const(node.input[0])
        if cond is None:
            # an input that is constant in use can be pinned: load_model(path, constant_inputs={...})
            self._unsupported(node, "If (condition from a tensor value; pin an input that is constant in use "
                                    "with constant_inputs)")
            return
        branch = a["then_branch"] if bool(np.asarray(cond).reshape(-1)[0]) else a["else_branch"]
        for init in branch.initializer:
            self.env[init.name] = _Value("const", const=self.numpy_helper.to_array(init))
        for inner in branch.node:
            self.uses.update(i for i in inner.input if i)
        for inner in branch.node:
            self.convert(inner)
        for out, inner in zip(node.output, branch.output):
            self.env[out] = self.env[inner.name]


def _name_from_weight(onnx_node, module: nn.Module) -> str | None:
    """``layer1.conv1`` when the node's weight initializer is ``layer1.conv1.weight``, as torch's
    exporter names them."""
    if not isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)):
        return None
    weight = onnx_node.input[1] if len(onnx_node.input) > 1 else ""
    if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*\.weight", weight):
        return weight[: -len(".weight")]
    return None


def _torch_scope(onnx_node, module: nn.Module) -> str | None:
    """The torch module name recorded by torch's exporter, when it names a module of this type.

    (A Conv that the exporter fused with its BatchNorm carries the batch norm's scope, so the
    recorded class must match the module we build.)
    """
    meta = {p.key: p.value for p in onnx_node.metadata_props}
    try:
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "None"))
        classes = ast.literal_eval(meta.get("pkg.torch.onnx.class_hierarchy", "None"))
    except (ValueError, SyntaxError):
        return None
    if not scopes or not classes or len(scopes) < 2 or len(classes) < 2:
        return None
    if not classes[-2].endswith("." + type(module).__name__):
        return None
    return _sanitize(_dynamo_path(scopes[-2]), "m", keep_dots=True)


def _dynamo_path(scope: str) -> str:
    """``getattr(getattr(L['self'].blocks, '0').block, '3')`` -> ``blocks.0.block.3``.

    (torch.export spells submodules whose names are numbers this way when the exported model is
    itself a GraphModule, as an imported ONNX model is.)
    """
    pattern = re.compile(r"getattr\(([^()]*?), '([^']*)'\)")
    while True:
        new = pattern.sub(r"\1.\2", scope)
        if new == scope:
            break
        scope = new
    return re.sub(r"^L\['self'\]\.", "", scope)


def _tensor(arr: np.ndarray) -> torch.Tensor:
    """A float32 torch copy of a numpy array (ONNX arrays may be read-only views)."""
    return torch.from_numpy(np.array(arr, dtype=np.float32, copy=True))


@ops._leaf
def _getitem(seq, i: int):
    return seq[i]


def _same_pads(size, kernel, strides, dilations, upper: bool) -> list[int]:
    begin, end = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations):
        out = -(-n // s)
        total = max(0, (out - 1) * s + (k - 1) * d + 1 - n)
        small, large = total // 2, total - total // 2
        begin.append(small if upper else large)
        end.append(large if upper else small)
    return begin + end


def _ort_shapes(model):
    """Shapes from ONNX Runtime's symbolic shape inference, which knows its contrib operators
    (``com.microsoft``) as ONNX's does not; the model unchanged where it cannot run."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True, guess_output_rank=True)
    except Exception:  # noqa: BLE001 - a help, never a requirement
        return model
    return inferred if inferred is not None else model


def opaque_summary(model) -> str:
    """``Einsum (2 nodes), com.microsoft.Gelu (1 node)``: the nodes an import kept as they are."""
    kept = getattr(model, "nnshrink_opaque", {}) or {}
    return ", ".join(f"{op} ({n} node{'s' if n > 1 else ''})" for op, n in sorted(kept.items()))


def onnx_to_torch(model, constant_inputs: dict | None = None) -> fx.GraphModule:
    """Convert an in-memory ``onnx.ModelProto`` to a ``GraphModule`` (see :func:`load_onnx`)."""
    return _Converter(model, constant_inputs).run()
