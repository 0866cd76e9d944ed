"""The quantized graph: one typed op list, lowered once from the traced model, read by every executor.

:func:`lower` folds batch norms (and a constant ``Mul``/``Add`` straight after a conv or linear
layer into it), traces the model with torch.fx and turns each node into an :class:`Op` of one
kind:

- integer arithmetic (own output scale, integer semantics in the reference): ``conv`` (1-D, 2-D,
  grouped), ``convt`` (transposed), ``linear`` (on tensors of any rank), ``matmul`` (of two
  activations), ``add``, ``mul`` (two activations, broadcasting), ``gap``, ``avgpool``,
  ``concat``; a ReLU/ReLU6 whose input only it reads is fused into the op before it;
- integer moves, which keep their input's scale, as TFLite and Ethos-U do: ``move`` (reshape,
  flatten, transpose, squeeze, slicing, split, nearest resize, zero padding, max pooling, a
  standalone ReLU) and ``clamp`` (a standalone ReLU6);
- ``compute``: anything else that makes a tensor (sigmoid, hard-swish, softmax, LayerNorm, GELU,
  PReLU, an LSTM, an ONNX node kept opaque...), computed in float from the dequantized inputs;
  where the target's integer kernels have the op (``Op.integer``) its output is quantized, as a
  lookup table or an integer kernel would give it; where not, it stays float, and only a tensor
  that an integer op reads gets a quantizer at the island border (``DQ`` -> float ops -> ``Q``);
- ``value`` (shape arithmetic: sizes that feed a reshape) and ``const`` (a constant tensor).

The decision per op is the target's (:data:`INTEGER_OPS`), reported by :func:`float_ops` grouped
by op type with a reason, and refused as a whole by ``strict`` before any calibration.

:class:`QuantGraph` is the op list frozen after calibration: every quantized tensor's scale and
zero point, every layer's integer weights, zero points and int32 bias, derived once. The ONNX
QDQ writer (:mod:`nnshrink.io.qdq`) and the integer reference (:mod:`.reference`) read it, each
with one handler per op kind; :class:`~.sim.QuantSim` runs the same op list with fake
quantization. A new executor (an int8 TFLite writer) is one more reader of :class:`QuantGraph`.
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from nnshrink.errors import UnsupportedModelError
from nnshrink.graph.fx import trace
from nnshrink.graph.surgery import fold_batchnorms

KINDS = ("conv", "convt", "linear", "matmul", "add", "mul", "gap", "avgpool", "concat", "move", "clamp",
         "compute", "value", "const")
LAYER_KINDS = ("conv", "convt", "linear")
ARITHMETIC = ("conv", "convt", "linear", "matmul", "add", "mul", "gap", "avgpool", "concat")

# Op types (ONNX names) that each target runs in its integer kernels, beyond the arithmetic kinds
# and moves. ``npu``: TFLite's int8 builtin kernels that Ethos-U and DRP-AI take (Vela's supported
# operator list: LOGISTIC, TANH, HARD_SWISH, LEAKY_RELU, PRELU, SOFTMAX, MEAN, SUB, MAXIMUM,
# MINIMUM, RESIZE_BILINEAR, EXP, ...; a hard-sigmoid and a batch norm lower to its ADD/MUL/RELU6).
# ``ort-*``: the ops ONNX Runtime's CPU QDQ fusions turn into integer kernels (QLinearSigmoid,
# QLinearLeakyRelu, QLinearSoftmax, QLinearAveragePool; measured on this project's graphs). The
# rest (LayerNorm, GELU, an LSTM, PReLU and hard-swish on ONNX Runtime) stays float. ONNX
# Runtime's CPU kernels have no integer ConvTranspose (measured: ``DQ -> ConvTranspose -> Q`` stays
# float), so there it is written with int8 weights and quantized output but counted as float.
INTEGER_OPS = {
    "npu": frozenset({"Sigmoid", "Tanh", "HardSwish", "HardSigmoid", "LeakyRelu", "PRelu", "Softmax", "Elu",
                      "SiLU", "Gelu", "ReduceMean", "AveragePool", "Sub", "Max", "Min", "Abs", "Exp", "Resize",
                      "BatchNormalization", "Add", "Mul", "ConvTranspose"}),
    "ort": frozenset({"Sigmoid", "LeakyRelu", "Softmax", "AveragePool"}),
}


def integer_ops(target: str) -> frozenset[str]:
    return INTEGER_OPS["npu" if target == "npu" else "ort"]


@dataclass(frozen=True)
class In:
    """Placeholder in a :class:`Call`'s arguments for the op's ``i``-th input."""

    i: int


@dataclass
class Call:
    """How to compute a ``move``/``compute``/``value`` op in torch: ``how`` is ``function``,
    ``method`` or ``module`` (``target`` then names a module of the graph's ``modules``)."""

    how: str
    target: object
    args: tuple
    kwargs: dict


@dataclass
class Op:
    """One op of the quantized graph.

    Attributes:
        name: Module name for layers (``layer1.conv1``), else the fx node name.
        kind: One of :data:`KINDS`.
        inputs: Names of the values read (op names, or ``input``).
        act: Fused activation: ``None``, ``relu`` or ``relu6``.
        attrs: Kernel, stride... for pooling; axis for concat; ``lo``/``hi`` for clamp.
        quant: The output's quantization: ``own`` (its own scale), ``shared`` (its input's:
            integer moves), ``float`` (not quantized) or ``none`` (not a tensor).
        call: The torch computation of a ``move``, ``compute`` or ``value`` op.
        op_type: The op's name for people (ONNX's: ``Conv``, ``Sigmoid``, ``LayerNormalization``).
        integer: Whether the target runs it in integer kernels.
        reason: Why it stays float (``integer`` False).
    """

    name: str
    kind: str
    inputs: list[str]
    act: str | None = None
    attrs: dict = field(default_factory=dict)
    quant: str = "own"
    call: Call | None = None
    op_type: str = ""
    integer: bool = True
    reason: str | None = None

    @property
    def quantized_output(self) -> bool:
        return self.quant == "own"


@dataclass
class Lowered:
    """What :func:`lower` returns: the ops, the float layers (copies), the other modules and
    constants the ops call, the graph's outputs (keys, and the structure forward returns)."""

    ops: list[Op]
    layers: dict[str, nn.Module]
    modules: dict[str, nn.Module]
    consts: dict[str, torch.Tensor]
    outputs: list[str]
    output_tree: object
    input_quantized: bool
    aliases: dict[str, str] = field(default_factory=dict)  # fx node name -> the op whose value it is

    @property
    def output(self) -> str:
        return self.outputs[0]

    def __iter__(self):  # ops, layers, output = lower(...)
        return iter((self.ops, self.layers, self.output))


def key(name: str) -> str:
    return name.replace(".", "__")


# -- what an fx node is -------------------------------------------------------------------------
_RELU = {F.relu, torch.relu}
_RELU6 = {F.relu6}
_ADD = {operator.add, torch.add, operator.iadd}
_MUL = {operator.mul, torch.mul, operator.imul}
_MATMUL = {torch.matmul, operator.matmul, torch.bmm}
_CAT = {torch.cat, torch.concat}
_FLATTEN_FUNCS = {torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.squeeze, torch.unsqueeze,
                  torch.split, torch.chunk, torch.narrow, operator.getitem, torch.swapaxes}
_MOVE_METHODS = {"view", "reshape", "flatten", "permute", "transpose", "squeeze", "unsqueeze", "contiguous",
                 "split", "chunk", "expand", "repeat", "narrow", "unflatten", "swapaxes", "__getitem__"}
_MOVE_HELPERS = {"flatten", "reshape", "squeeze", "unsqueeze", "transpose", "slice_", "split", "expand", "tile",
                 "gather"}
_MOVE_MODULES = (nn.Flatten, nn.Unflatten, nn.MaxPool1d, nn.MaxPool2d, nn.ZeroPad2d)
_FUNC_TYPES = {torch.sigmoid: "Sigmoid", F.sigmoid: "Sigmoid", torch.tanh: "Tanh", F.tanh: "Tanh",
               F.hardswish: "HardSwish", F.hardsigmoid: "HardSigmoid", F.silu: "SiLU", F.gelu: "Gelu",
               F.leaky_relu: "LeakyRelu", F.prelu: "PRelu", F.elu: "Elu", torch.softmax: "Softmax",
               F.softmax: "Softmax", F.log_softmax: "LogSoftmax", torch.log_softmax: "LogSoftmax",
               F.layer_norm: "LayerNormalization", F.interpolate: "Resize", torch.exp: "Exp", torch.abs: "Abs",
               operator.sub: "Sub", torch.sub: "Sub", operator.truediv: "Div", torch.div: "Div", torch.mean: "ReduceMean",
               torch.maximum: "Max", torch.minimum: "Min", torch.where: "Where", torch.sqrt: "Sqrt",
               F.batch_norm: "BatchNormalization", F.avg_pool1d: "AveragePool", F.avg_pool2d: "AveragePool",
               F.adaptive_avg_pool1d: "AveragePool", F.adaptive_avg_pool2d: "AveragePool", torch.erf: "Erf"}
_METHOD_TYPES = {"sigmoid": "Sigmoid", "tanh": "Tanh", "softmax": "Softmax", "log_softmax": "LogSoftmax",
                 "mean": "ReduceMean", "sub": "Sub", "div": "Div", "exp": "Exp", "abs": "Abs", "sqrt": "Sqrt",
                 "pow": "Pow", "sum": "ReduceSum"}
_MODULE_TYPES = {nn.Sigmoid: "Sigmoid", nn.Tanh: "Tanh", nn.Hardswish: "HardSwish", nn.Hardsigmoid: "HardSigmoid",
                 nn.SiLU: "SiLU", nn.GELU: "Gelu", nn.LeakyReLU: "LeakyRelu", nn.PReLU: "PRelu", nn.ELU: "Elu",
                 nn.Softmax: "Softmax", nn.LogSoftmax: "LogSoftmax", nn.LayerNorm: "LayerNormalization",
                 nn.BatchNorm1d: "BatchNormalization", nn.BatchNorm2d: "BatchNormalization",
                 nn.GroupNorm: "GroupNormalization", nn.Upsample: "Resize", nn.LSTM: "LSTM", nn.GRU: "GRU",
                 nn.AvgPool1d: "AveragePool", nn.AdaptiveAvgPool1d: "AveragePool",
                 nn.AdaptiveAvgPool2d: "AveragePool", nn.AvgPool2d: "AveragePool"}
_HELPER_TYPES = {"hard_sigmoid": "HardSigmoid", "prelu": "PRelu", "gelu": "Gelu", "layer_norm": "LayerNormalization",
                 "sub": "Sub", "div": "Div", "pow_": "Pow", "where": "Where", "global_pool": "GlobalAveragePool",
                 "reduce": "ReduceMean", "resize": "Resize", "cast": "Cast", "cast_like": "CastLike",
                 "logical_not": "Not", "range_": "Range", "constant_of_shape": "ConstantOfShape", "clip": "Clip",
                 "pad": "Pad"}


def _helper_name(target) -> str | None:
    """The name of an imported graph's run-time helper (:mod:`nnshrink.io.onnx_ops`), else None."""
    if getattr(target, "__module__", None) == "nnshrink.io.onnx_ops":
        return getattr(target, "__name__", None)
    return None


def _is_getitem(target) -> bool:
    """``operator.getitem``, or the importer's item of a multi-output node."""
    return target is operator.getitem or (getattr(target, "__name__", None) == "_getitem"
                                          and getattr(target, "__module__", "").startswith("nnshrink.io"))


def op_type(node: fx.Node, modules: dict) -> str:
    """A node's op type as people know it (ONNX's names)."""
    t = node.target
    if node.op == "call_module":
        mod = modules[t]
        for cls, name in _MODULE_TYPES.items():
            if type(mod) is cls:
                return name
        return getattr(mod, "op_type", None) or getattr(mod, "kind", None) or type(mod).__name__
    if node.op == "call_method":
        return _METHOD_TYPES.get(t, t)
    helper = _helper_name(t)
    if helper is not None:
        if helper == "unary":
            return str(node.args[1]).capitalize()
        if helper == "binary":
            return str(node.args[2]).capitalize()
        if helper == "softmax":
            return "LogSoftmax" if node.args[2] else "Softmax"
        if helper == "reduce":
            return "Reduce" + str(node.args[1]).capitalize()
        return _HELPER_TYPES.get(helper, helper)
    return _FUNC_TYPES.get(t, getattr(t, "__name__", str(t)))


def _nodes_in(a) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(a, lambda n: out.append(n) or n)
    return out


def _template(a, index: dict[fx.Node, int]):
    if isinstance(a, fx.Node):
        return In(index[a])
    if isinstance(a, tuple):
        return tuple(_template(v, index) for v in a)
    if isinstance(a, list):
        return [_template(v, index) for v in a]
    if isinstance(a, dict):
        return {k: _template(v, index) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_template(a.start, index), _template(a.stop, index), _template(a.step, index))
    return a


def _fill(a, xs: list):
    if isinstance(a, In):
        return xs[a.i]
    if isinstance(a, tuple):
        return tuple(_fill(v, xs) for v in a)
    if isinstance(a, list):
        return [_fill(v, xs) for v in a]
    if isinstance(a, dict):
        return {k: _fill(v, xs) for k, v in a.items()}
    if isinstance(a, slice):
        return slice(_fill(a.start, xs), _fill(a.stop, xs), _fill(a.step, xs))
    return a


def invoke(op: Op, xs: list, modules) -> object:
    """Run ``op.call`` on the values ``xs`` (tensors, or shape values) with the graph's modules."""
    c = op.call
    args, kwargs = _fill(c.args, xs), _fill(c.kwargs, xs)
    if c.how == "function":
        return c.target(*args, **kwargs)
    if c.how == "method":
        return getattr(args[0], c.target)(*args[1:], **kwargs)
    return modules[key(c.target)](*args, **kwargs)


# -- lowering ----------------------------------------------------------------------------------------
def lower(model: nn.Module, example_input: torch.Tensor, target: str = "ort-x86") -> Lowered:
    """Fold batch norms, trace, and lower ``model`` to the op list (see the module's docstring).

    Raises:
        UnsupportedModelError: A model torch.fx cannot trace, a second input, or no tensor output.
    """
    folded, _ = fold_batchnorms(model)
    gm = trace(folded)
    gm = copy.deepcopy(gm) if gm is model else gm
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(inputs) != 1:
        raise UnsupportedModelError(f"quantization takes a model with one input; this one has {len(inputs)}")
    return _Lowering(gm, example_input, integer_ops(target)).run()


class _Lowering:
    def __init__(self, gm: fx.GraphModule, example_input: torch.Tensor, integer: frozenset[str]) -> None:
        self.gm, self.integer = gm, integer
        self.modules = dict(gm.named_modules())
        self.values = _run_values(gm, example_input)  # node -> the value it had on the example
        self.ops: list[Op] = []
        self.by_name: dict[str, Op] = {}
        self.alias: dict[fx.Node, str] = {}
        self.layers: dict[str, nn.Module] = {}
        self.mods: dict[str, nn.Module] = {}
        self.consts: dict[str, torch.Tensor] = {}
        self.users: Counter = Counter()

    def is_tensor(self, node) -> bool:
        return isinstance(node, fx.Node) and isinstance(self.values.get(node), torch.Tensor)

    def src(self, a) -> str | None:
        return self.alias.get(a) if isinstance(a, fx.Node) else None

    def add(self, node: fx.Node, op: Op) -> Op:
        self.ops.append(op)
        self.by_name[op.name] = op
        if node is not None:
            self.alias[node] = op.name
        return op

    def generic(self, node: fx.Node, kind: str, typ: str | None = None) -> Op:
        """An op computed by calling the node's own target (moves, computes, values)."""
        ins = list(dict.fromkeys(_nodes_in((node.args, node.kwargs))))
        index = {n: i for i, n in enumerate(ins)}
        how = {"call_function": "function", "call_method": "method", "call_module": "module"}[node.op]
        target = node.target
        if how == "module":
            self.mods[key(target)] = copy.deepcopy(self.modules[target])
        call = Call(how, target, _template(tuple(node.args), index), _template(dict(node.kwargs), index))
        op = Op(node.name, kind, [self.alias[n] for n in ins], call=call, op_type=typ or op_type(node, self.modules))
        if op.op_type == "Softmax":
            op.attrs["axis"] = self.softmax_axis(node, ins)
            if op.attrs["axis"] is None:
                op.op_type = "Softmax (over flattened axes)"
        return self.add(node, op)

    def softmax_axis(self, node: fx.Node, ins: list[fx.Node]) -> int | None:
        """The axis a softmax node normalizes, found from its values on the example."""
        x, y = (self.values.get(ins[0]) if ins else None), self.values.get(node)
        if not isinstance(x, torch.Tensor) or not isinstance(y, torch.Tensor) or x.shape != y.shape:
            return None
        for axis in range(x.dim()):
            if torch.allclose(torch.softmax(x.float(), axis), y.float(), atol=1e-6):
                return axis
        return None

    def fuse_act(self, node: fx.Node, act: str) -> bool:
        prev = node.args[0]
        op = self.by_name.get(self.src(prev))
        if op is not None and op.kind in ARITHMETIC[:6] and op.act is None and len(prev.users) == 1:
            op.act = act
            self.alias[node] = op.name
            return True
        return False

    def fold_const(self, node: fx.Node, how: str) -> bool:
        """A constant Mul/Add right after a conv/linear layer whose output only it reads: folded
        into the layer's weights and bias."""
        a, b = node.args[0], node.args[1] if len(node.args) > 1 else None
        if self.is_tensor(b) and not self.is_tensor(a):
            a, b = b, a
        op = self.by_name.get(self.src(a))
        if op is None or op.kind not in LAYER_KINDS or op.act is not None or len(a.users) != 1:
            return False
        if self.is_tensor(b) and _depends_on_input(b):
            return False
        c = self.values.get(b) if isinstance(b, fx.Node) else b
        if isinstance(c, (int, float)) and not isinstance(c, bool):
            c = torch.tensor(float(c))
        if not isinstance(c, torch.Tensor) or not c.is_floating_point():
            return False
        layer = self.layers[op.name]
        out = self.values[a]
        channels = layer.out_channels if op.kind != "linear" else layer.out_features
        axis = out.dim() - 1 if op.kind == "linear" else 1
        try:
            if c.dim() > out.dim() or torch.broadcast_shapes(c.shape, out.shape) != out.shape:
                return False
        except RuntimeError:
            return False
        cc = torch.broadcast_to(c, out.shape).movedim(axis, 0).reshape(channels, -1)
        if not torch.equal(cc, cc[:, :1].expand_as(cc)):  # it varies along the channel axis only
            return False
        v = cc[:, 0].detach().float()
        with torch.no_grad():
            if how == "mul":
                shape = [1] * layer.weight.dim()
                shape[1 if op.kind == "convt" else 0] = -1
                if op.kind == "convt" and layer.groups != 1:
                    return False
                layer.weight.mul_(v.reshape(shape))
                if layer.bias is not None:
                    layer.bias.mul_(v)
            else:
                if layer.bias is None:
                    layer.bias = nn.Parameter(torch.zeros(channels))
                layer.bias.add_(v)
        self.alias[node] = op.name
        return True

    def run(self) -> Lowered:
        gm = self.gm
        self.alias[next(n for n in gm.graph.nodes if n.op == "placeholder")] = "input"
        output_tree = None
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                continue
            if node.op == "output":
                output_tree = node.args[0]
                continue
            if node.op == "get_attr":
                value = self.values.get(node)
                name = node.name
                if isinstance(value, torch.Tensor):
                    self.consts[key(name)] = value.detach().clone()
                    self.add(node, Op(name, "const", [], quant="float", op_type="Constant"))
                else:
                    self.add(node, Op(name, "const", [], quant="none", op_type="Constant", attrs={"value": value}))
                continue
            self.lower_node(node)
        outputs = [self.alias[n] for n in _nodes_in(output_tree)]
        tensors = [o for o in outputs if self.by_name.get(o) is None or self.by_name[o].quant != "none"]
        if not tensors:
            raise UnsupportedModelError("the model has no tensor output")
        tree = _template(output_tree, {n: i for i, n in enumerate(_nodes_in(output_tree))})
        input_quantized = self.assign()
        aliases = {n.name: name for n, name in self.alias.items() if name is not None}
        return Lowered(self.ops, self.layers, self.mods, self.consts, outputs, tree, input_quantized, aliases)

    def lower_node(self, node: fx.Node) -> None:
        t, mod = node.target, self.modules.get(node.target) if node.op == "call_module" else None
        if not self.is_tensor(node):
            if isinstance(self.values.get(node), (tuple, list)) and any(
                    isinstance(v, torch.Tensor) for v in self.values[node]):
                self.tuple_op(node)
            else:
                self.generic(node, "value").quant = "none"
            return
        a0 = self.src(node.args[0]) if node.args else None
        helper = _helper_name(t) if node.op == "call_function" else None
        method = t if node.op == "call_method" else None
        if mod is not None:
            if isinstance(mod, (nn.Conv1d, nn.Conv2d)) and mod.padding_mode == "zeros" and not isinstance(mod.padding, str):
                self.layers[t] = copy.deepcopy(mod)
                self.add(node, Op(t, "conv", [a0], op_type="Conv"))
            elif isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d)) and mod.padding_mode == "zeros":
                self.layers[t] = copy.deepcopy(mod)
                self.add(node, Op(t, "convt", [a0], op_type="ConvTranspose"))
            elif isinstance(mod, nn.Linear):
                self.layers[t] = copy.deepcopy(mod)
                self.add(node, Op(t, "linear", [a0], op_type="Gemm"))
            elif isinstance(mod, (nn.ReLU, nn.ReLU6)) or (isinstance(mod, nn.Hardtanh) and (mod.min_val, mod.max_val) == (0.0, 6.0)):
                self.activation(node, "relu" if isinstance(mod, nn.ReLU) else "relu6")
            elif isinstance(mod, (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d)):
                self.alias[node] = a0
            elif isinstance(mod, _MOVE_MODULES):
                self.generic(node, "move", "MaxPool" if isinstance(mod, (nn.MaxPool1d, nn.MaxPool2d)) else None)
            elif isinstance(mod, nn.AvgPool2d) and mod.padding in (0, (0, 0)) and mod.divisor_override is None:
                self.add(node, Op(node.name, "avgpool", [a0], attrs=_pool_attrs(mod), op_type="AveragePool"))
            elif isinstance(mod, nn.AdaptiveAvgPool2d) and tuple(self.values[node].shape[2:]) == (1, 1):
                self.add(node, Op(node.name, "gap", [a0], op_type="GlobalAveragePool"))
            else:
                self.generic(node, "compute")
            return
        binary = (t in _ADD or helper == "add" or method == "add" or (helper == "binary" and node.args[2] == "add"),
                  t in _MUL or helper == "mul" or method == "mul" or (helper == "binary" and node.args[2] == "mul"))
        if any(binary):
            a, b = node.args[0], node.args[1]
            how = "add" if binary[0] else "mul"
            if self.is_tensor(a) and self.is_tensor(b) and _depends_on_input(a) and _depends_on_input(b):
                self.add(node, Op(node.name, how, [self.src(a), self.src(b)], op_type=how.capitalize()))
            elif not self.fold_const(node, how):
                self.generic(node, "compute", how.capitalize())
        elif t in _RELU or method == "relu" or (helper == "unary" and node.args[1] == "relu"):
            self.activation(node, "relu")
        elif t in _RELU6 or (t is F.hardtanh and tuple(node.args[1:3]) == (0.0, 6.0)) or \
                (helper == "clip" and tuple(node.args[1:3]) == (0.0, 6.0)) or \
                (t is torch.clamp and tuple(node.args[1:3]) == (0, 6)):
            self.activation(node, "relu6")
        elif t in _MATMUL or method == "matmul" or helper == "matmul":
            self.add(node, Op(node.name, "matmul", [self.src(node.args[0]), self.src(node.args[1])], op_type="MatMul"))
        elif t in _CAT or helper == "cat":
            tensors = node.args[0]
            axis = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            axis = int(axis) % self.values[node].dim()
            if all(isinstance(x, fx.Node) for x in tensors):
                self.add(node, Op(node.name, "concat", [self.src(x) for x in tensors], attrs={"axis": axis},
                                  op_type="Concat"))
            else:
                self.generic(node, "compute", "Concat")
        elif _is_spatial_mean(node, helper, self.values):
            keep = self.values[node].dim() == 4
            if keep:
                self.add(node, Op(node.name, "gap", [a0], op_type="GlobalAveragePool"))
            else:  # mean without keepdim: pooling, then the (batch, channels) view of it
                self.add(None, Op(node.name + "_gap", "gap", [a0], op_type="GlobalAveragePool"))
                self.add(node, Op(node.name, "move", [node.name + "_gap"], op_type="Flatten",
                                  call=Call("method", "flatten", (In(0), 1), {})))
        elif (t in _FLATTEN_FUNCS or _is_getitem(t) or method in _MOVE_METHODS or helper in _MOVE_HELPERS or _is_move(node, helper))\
                and (self.is_tensor(node.args[0]) or (_is_getitem(t) and isinstance(node.args[0], fx.Node))):
            self.generic(node, "move")
        else:
            self.generic(node, "compute")

    def activation(self, node: fx.Node, act: str) -> None:
        if self.fuse_act(node, act):
            return
        if act == "relu":
            self.generic(node, "move", "Relu")
        else:
            self.add(node, Op(node.name, "clamp", [self.src(node.args[0])], attrs={"lo": 0.0, "hi": 6.0}, op_type="Clip"))

    def tuple_op(self, node: fx.Node) -> None:
        """A node that returns several tensors (split, an LSTM): a move of a quantized tensor, or
        a compute; ``getitem`` then picks one."""
        helper = _helper_name(node.target) if node.op == "call_function" else None
        is_move = node.target in (torch.split, torch.chunk) or _is_getitem(node.target) or helper == "split" or \
            (node.op == "call_method" and node.target in ("split", "chunk"))
        self.generic(node, "move" if is_move else "compute").quant = "tuple"

    def assign(self) -> bool:
        """Decide each op's integer form and output quantization; returns whether the model's
        input is quantized."""
        producers = {op.name: op for op in self.ops}
        for op in self.ops:
            if op.kind == "compute":
                op.integer = op.op_type in self.integer
                if not op.integer:
                    op.reason = f"no integer kernel for {op.op_type} on this target"
                if op.quant == "tuple":
                    op.integer, op.reason = False, op.reason or f"{op.op_type} returns several tensors"
            elif op.kind == "const":
                op.integer = False
            elif op.kind == "convt" and op.op_type not in self.integer:
                op.integer = False
                op.reason = "no integer ConvTranspose kernel on this target (runs in float on the int8 weights)"
        needed: set[str] = set()

        def tensor_inputs(op: Op) -> list[str]:
            return [i for i in op.inputs if i == "input" or producers[i].quant not in ("none",)]

        for op in self.ops:
            if op.kind in ARITHMETIC or op.kind == "clamp" or (op.kind == "compute" and op.integer):
                needed.update(tensor_inputs(op))
        # a move of a tensor an integer op needs: its source is quantized instead (shared scale)
        for op in reversed(self.ops):
            if op.kind == "move" and op.name in needed and op.quant != "tuple":
                needed.update(tensor_inputs(op)[:1])
            if op.kind == "move" and op.quant == "tuple" and any(
                    c.kind == "move" and c.inputs[:1] == [op.name] and c.name in needed for c in self.ops):
                needed.update(tensor_inputs(op)[:1])
        state = {"input": "own" if "input" in needed else "float"}
        for op in self.ops:
            if op.quant == "none":
                state[op.name] = "none"
                continue
            first = op.inputs[0] if op.inputs else None
            if op.kind in ARITHMETIC or (op.kind == "compute" and op.integer):
                op.quant = "own"
            elif op.kind in ("move", "clamp"):
                src_state = state.get(first, "float")
                if op.quant == "tuple":
                    op.quant = "tuple" if src_state in ("own", "shared", "tuple") else "float_tuple"
                elif src_state in ("own", "shared", "tuple"):
                    op.quant = "shared"
                    op.integer = True
                else:
                    op.quant = "own" if op.name in needed else "float"
                    op.integer = op.quant == "own" and op.kind != "clamp"
                    if op.quant == "float":
                        op.reason = "moves a float tensor"
            elif op.kind == "compute" and op.quant == "tuple":
                op.quant = "float_tuple"
            else:  # float compute or constant
                op.quant = "own" if op.name in needed else "float"
            state[op.name] = op.quant
        return "input" in needed


def _run_values(gm: fx.GraphModule, example_input: torch.Tensor) -> dict[fx.Node, object]:
    """Each node's value on the example input (tensors, tuples, shape values)."""
    from nnshrink.errors import InputShapeError

    values: dict[fx.Node, object] = {}

    class Recorder(fx.Interpreter):
        def run_node(self, n):
            out = super().run_node(n)
            values[n] = out
            return out

    was = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            Recorder(gm).run(example_input)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise InputShapeError(f"the model's forward pass failed on an input of shape "
                              f"{tuple(example_input.shape)}: {first}") from exc
    finally:
        gm.train(was)
    return values


def _depends_on_input(node) -> bool:
    if not isinstance(node, fx.Node):
        return False
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n.op == "placeholder":
            return True
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return False


def _is_move(node: fx.Node, helper: str | None) -> bool:
    """Zero padding, nearest resizing and max pooling: integers moved, never computed."""
    t = node.target
    if t is F.pad or helper == "pad":
        args = list(node.args) + [None] * 4
        mode = node.kwargs.get("mode", args[2] if t is F.pad else args[2])
        value = node.kwargs.get("value", args[3])
        return mode in ("constant", None) and (value in (None, 0, 0.0))
    if t is F.interpolate:
        return node.kwargs.get("mode", node.args[3] if len(node.args) > 3 else "nearest") == "nearest"
    if helper == "resize":
        return node.args[3] == "nearest"
    if helper == "global_pool":
        return node.args[1] == "max"
    return t in (F.max_pool1d, F.max_pool2d, torch.max_pool1d, torch.max_pool2d)


def _is_spatial_mean(node: fx.Node, helper: str | None, values: dict) -> bool:
    """A mean over the two spatial axes of a 4-D tensor (``x.mean((2, 3))``, ONNX ReduceMean,
    GlobalAveragePool, ``adaptive_avg_pool2d(x, 1)``)."""
    x = node.args[0] if node.args else None
    xv = values.get(x) if isinstance(x, fx.Node) else None
    if not isinstance(xv, torch.Tensor) or xv.dim() != 4:
        return False
    if helper == "global_pool":
        return node.args[1] == "avg"
    if node.target is F.adaptive_avg_pool2d:
        size = node.args[1] if len(node.args) > 1 else node.kwargs.get("output_size")
        return size in (1, (1, 1), [1, 1])
    if helper == "reduce":
        op, axes = node.args[1], node.args[2]
    elif (node.op == "call_method" and node.target == "mean") or (node.op == "call_function" and node.target is torch.mean):
        op, axes = "mean", node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
    else:
        return False
    axes = [axes] if isinstance(axes, int) else list(axes or [])
    return op == "mean" and sorted(a % 4 for a in axes) == [2, 3]


def _pool_attrs(mod: nn.Module) -> dict:
    def pair(v):
        return tuple(v) if isinstance(v, (tuple, list)) else (v, v)

    stride = mod.stride if mod.stride is not None else mod.kernel_size
    return {"kernel": pair(mod.kernel_size), "stride": pair(stride), "ceil": bool(mod.ceil_mode)}


# -- what stayed float ---------------------------------------------------------------------------
def float_ops(ops: list[Op]) -> list[dict]:
    """The ops that stay float, grouped by op type and reason, with counts and a few names."""
    groups: dict[tuple[str, str], list[str]] = {}
    for op in ops:
        if op.kind in ("value", "const", "move") or op.integer:
            continue  # a move of a float tensor carries no arithmetic: its source is listed
        groups.setdefault((op.op_type, op.reason or "kept in float"), []).append(op.name)
    return [{"op_type": t, "count": len(names), "reason": r, "examples": names[:3]}
            for (t, r), names in sorted(groups.items(), key=lambda kv: -len(kv[1]))]


def float_summary(ops: list[Op]) -> str:
    """One line: ``LayerNormalization x5, Gelu x2 (no integer kernel on this target)``."""
    return ", ".join(f"{g['op_type']} x{g['count']} ({g['reason']})" for g in float_ops(ops))


# -- the frozen graph ------------------------------------------------------------------------------
@dataclass
class TensorQ:
    """A quantized tensor: ``real = (q - zp) * scale``; ``owner`` is the tensor whose
    quantizer fixes it (itself, or the source of a move)."""

    scale: np.float32
    zp: int
    bits: int
    qmin: int
    qmax: int
    owner: str


@dataclass
class LayerQ:
    """A layer's integers: weights ``q`` (per channel along ``axis``: ``scale``, ``zp``), the
    int32 ``bias`` at scale ``bias_scale = s_in * scale``; or, for a layer kept in float, its
    float ``weight`` and ``float_bias``."""

    kind: str
    q: np.ndarray | None
    scale: np.ndarray | None
    zp: np.ndarray | None
    axis: int
    bits: int
    bias: np.ndarray | None
    bias_scale: np.ndarray | None
    weight: np.ndarray | None
    float_bias: np.ndarray | None
    geometry: dict
    per_channel: bool = True


@dataclass
class QuantGraph:
    """The quantized graph after calibration, read by the QDQ writer and the integer reference.

    Attributes:
        ops: The op list (shared with the sim it was frozen from).
        tensors: Every quantized tensor (``input`` and op outputs) by name.
        layers: Every layer's integers by op name.
        modules, consts: What ``move``/``compute`` ops call, and constant tensors, by key.
        outputs, output_tree: The output names and the structure the model returns.
        input_shape, example_shape: The model's input shape (None: any size) and an example's.
        target, act_bits: As quantized.
        signature: An imported model's ONNX interface, or None.
    """

    ops: list[Op]
    tensors: dict[str, TensorQ]
    layers: dict[str, LayerQ]
    modules: dict
    consts: dict
    outputs: list[str]
    output_tree: object
    input_shape: tuple
    example_shape: tuple
    target: str
    act_bits: int
    signature: object = None

    def int_tensor_names(self) -> list[str]:
        """Every tensor that holds integers, in order: ``input`` (when quantized), then the ops."""
        names = ["input"] if "input" in self.tensors else []
        return names + [op.name for op in self.ops if op.name in self.tensors]


def freeze(sim) -> QuantGraph:
    """The :class:`QuantGraph` of a calibrated :class:`~.sim.QuantSim`: every integer derived once."""
    from nnshrink.graph import signature

    tensors: dict[str, TensorQ] = {}

    def tq(name: str) -> TensorQ:
        aq = sim.aq[key(name)]
        return TensorQ(np.float32(aq.scale.detach()), int(aq.zero_point), aq.bits, aq.qmin, aq.qmax, name)

    if sim.input_quantized:
        tensors["input"] = tq("input")
    for op in sim.ops:
        if op.quant == "own":
            tensors[op.name] = tq(op.name)
        elif op.quant in ("shared", "tuple") and op.inputs and op.inputs[0] in tensors:
            tensors[op.name] = tensors[op.inputs[0]]
    layers = {}
    for op in sim.layer_ops():
        layers[op.name] = _layer_q(sim, op, tensors)
    return QuantGraph(sim.ops, tensors, layers, sim.mods, dict(sim.consts.items()), sim.outputs, sim.output_tree,
                      sim.input_shape, sim.example_shape, sim.target, sim.aq_bits, signature.get(sim))


def _layer_q(sim, op: Op, tensors: dict[str, TensorQ]) -> LayerQ:
    layer = sim.layer(op.name)
    geo: dict = {}
    if op.kind in ("conv", "convt"):
        one_d = layer.weight.dim() == 3
        geo = {"stride": tuple(layer.stride), "padding": tuple(layer.padding), "dilation": tuple(layer.dilation),
               "groups": layer.groups, "one_d": one_d}
        if op.kind == "convt":
            geo["output_padding"] = tuple(layer.output_padding)
    fb = layer.bias.detach().numpy().astype(np.float32) if layer.bias is not None else None
    if op.name in sim.float_layers:
        return LayerQ(op.kind, None, None, None, 0, 32, None, None, layer.weight.detach().numpy().astype(np.float32),
                      fb, geo)
    wq = sim.weight_quantizer(op.name)
    q = wq.integers(layer.weight).numpy().astype(np.int64)
    channels = q.shape[wq.axis]
    scale = np.broadcast_to(wq.scale.detach().numpy().astype(np.float32).reshape(-1), (channels,)).copy()
    zp = np.broadcast_to(wq.zero_point.numpy().astype(np.int64).reshape(-1), (channels,)).copy()
    bias = bscale = None
    if layer.bias is not None:
        s_in = tensors[op.inputs[0]].scale
        bscale = (np.float32(s_in) * scale).astype(np.float32)  # as the integer kernels recompute it
        bias = np.clip(np.round(fb.astype(np.float64) / bscale.astype(np.float64)), -(2**31), 2**31 - 1).astype(np.int64)
    return LayerQ(op.kind, q, scale, zp, wq.axis, wq.bits, bias, bscale, None, fb, geo, wq.scale.numel() > 1)
