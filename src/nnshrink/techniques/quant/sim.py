"""The quantized model: a small op list built from the traced, batch-norm-folded model.

The model is traced with torch.fx and lowered to ops an integer NPU runs: ``conv`` and ``linear``
(with a fused ReLU/ReLU6 when the layer's output feeds only that activation), ``add`` (residual,
also with a fused activation), ``maxpool``, ``avgpool``/``gap``, ``flatten``, ``concat``. Each
op's output gets an activation quantizer, except ops that move integers without arithmetic
(max pooling, flattening), whose output keeps its input's scale, as TFLite and Ethos-U do. Weights
get per-channel quantizers, biases are rounded to int32 at scale ``s_in * s_w`` as the integer
kernels hold them.

:class:`QuantSim` runs the op list with fake quantization (differentiable, for QAT and AdaRound);
the ONNX QDQ writer (``nnshrink.io.qdq``) and the integer reference (:mod:`.reference`) read the
same op list, so all three compute the same thing.

Why not ``torch.ao.quantization`` (FX graph mode): its observers, fusion patterns and export are
being deprecated in favour of torchao's PT2E flow, whose QDQ export through the dynamo exporter
did not give ONNX Runtime integer kernels for our models, and neither gives us the op list an
integer reference and an ONNX writer need. The lowering here is a few hundred lines.
"""

from __future__ import annotations

import copy
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from nnshrink.errors import UnsupportedModelError
from nnshrink.graph.fx import shape_propagate, trace
from nnshrink.graph.surgery import fold_batchnorms
from nnshrink.techniques.quant.quantizers import ActQuantizer, WeightQuantizer

# Where the integer graph runs, which decides its weight grid and how weights are written
# (``Quantize.target``). ONNX Runtime's u8 x s8 kernels on x86 CPUs without VNNI add each two
# products into a saturating int16 (VPMADDUBSW), which weights within +-64 never reach:
# ``ort-x86``: weights capped at 7 bits, int8 (u8 x s8 kernels, exact on every x86 CPU);
# ``ort-x86-u8``: 8-bit weights written as uint8 (zero point + 128: the same integers), which the
# u8 x u8 kernels sum exactly on every CPU, 1.3-3.9x slower (measured, docs/ARCHITECTURE.md);
# ``npu``: integer NPUs and TFLite (Ethos-U, DRP-AI): full-range int8 weights.
TARGETS = ("ort-x86", "ort-x86-u8", "npu")
X86_WEIGHT_BITS = 7  # the widest weight grid ONNX Runtime's u8 x s8 x86 kernels sum exactly

_RELU_FUNCS = {F.relu, torch.relu, torch.nn.functional.relu}
_RELU6_FUNCS = {F.relu6}
_ADD_FUNCS = {operator.add, torch.add, operator.iadd}


@dataclass
class Op:
    """One op of the quantized graph.

    Attributes:
        name: Module name for layers (``layer1.conv1``), else the fx node name.
        kind: conv | linear | add | maxpool | avgpool | gap | flatten | concat, or relu | relu6
            on their own (after a pooling, say: a clamp of the integers, sharing the input's scale).
        inputs: Names of the tensors read (op names, or ``input``).
        act: Fused activation: ``None``, ``relu`` or ``relu6``.
        attrs: Kernel, stride, padding... for pooling; axis for concat.
        quantized_output: Whether the op's output gets its own quantizer (False: shares its input's).
    """

    name: str
    kind: str
    inputs: list[str]
    act: str | None = None
    attrs: dict = field(default_factory=dict)
    quantized_output: bool = True


def _key(name: str) -> str:
    return name.replace(".", "__")


class QuantSim(nn.Module):
    """A model whose forward pass is the simulated integer one.

    Attributes:
        ops: The op list, in execution order.
        layers: Float Conv/Linear modules by key (``name`` with dots as ``__``).
        wq: Weight quantizers by layer key.
        aq: Activation quantizers by tensor key (``input`` and every op with its own output).
        output: Name of the op whose output is the model's output.
        target: Where the integer graph runs (one of ``TARGETS``): how its weights are written.
    """

    is_quant_sim = True

    def __init__(self, ops: list[Op], layers: dict[str, nn.Module], output: str, input_shape, act_bits: int = 8,
                 act_symmetric: bool = False, estimator: str = "mse") -> None:
        super().__init__()
        self.ops = ops
        self.output = output
        self.input_shape = input_shape
        self.layers = nn.ModuleDict({_key(k): v for k, v in layers.items()})
        self.wq = nn.ModuleDict()
        self.aq = nn.ModuleDict({"input": ActQuantizer(act_bits, act_symmetric, estimator)})
        for op in ops:
            if op.quantized_output:
                # the model's output keeps its full range: clipping the largest logits makes ties
                # that argmax breaks arbitrarily
                est = "minmax" if op.name == output else estimator
                self.aq[_key(op.name)] = ActQuantizer(act_bits, act_symmetric, est)
        self.float_layers: set[str] = set()
        self.bias_quant = True
        self.target = "ort-x86"  # one of TARGETS
        self._index = {op.name: op for op in ops}

    # -- naming ---------------------------------------------------------------------------
    def layer(self, name: str) -> nn.Module:
        return self.layers[_key(name)]

    def weight_quantizer(self, name: str) -> WeightQuantizer:
        return self.wq[_key(name)]

    def act_quantizer_of(self, tensor: str) -> ActQuantizer:
        """The quantizer that fixes ``tensor``'s scale (an op without its own uses its input's)."""
        op = self._by_name().get(tensor)
        while op is not None and not op.quantized_output:
            tensor = op.inputs[0]
            op = self._by_name().get(tensor)
        return self.aq[_key(tensor)]

    def _by_name(self) -> dict[str, Op]:
        return self._index

    def layer_ops(self) -> list[Op]:
        return [op for op in self.ops if op.kind in ("conv", "linear")]

    # -- running --------------------------------------------------------------------------
    def weight(self, op: Op) -> torch.Tensor:
        layer = self.layer(op.name)
        if op.name in self.float_layers:
            return layer.weight
        return self.wq[_key(op.name)](layer.weight)

    def bias(self, op: Op) -> torch.Tensor | None:
        """The bias as the integer kernel holds it: int32 at scale ``s_in * s_w``."""
        layer = self.layer(op.name)
        b = layer.bias
        if b is None or op.name in self.float_layers or not self.bias_quant:
            return b
        aq, wq = self.act_quantizer_of(op.inputs[0]), self.wq[_key(op.name)]
        if not (aq.enabled and wq.enabled) or aq.observing:
            return b
        s = (aq.scale.detach() * wq.scale.detach()).reshape(-1)
        return torch.clamp(torch.round(b / s), -(2**31), 2**31 - 1) * s if s.numel() > 0 else b

    def run_op(self, op: Op, xs: list[torch.Tensor]) -> torch.Tensor:
        """The float computation of ``op`` before its fused activation and output quantizer."""
        k = op.kind
        if k in ("conv", "linear"):
            layer = self.layer(op.name)
            w, b = self.weight(op), self.bias(op)
            if k == "linear":
                y = F.linear(xs[0], w, b)
            else:
                conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
                y = conv(xs[0], w, b, layer.stride, layer.padding, layer.dilation, layer.groups)
        elif k == "add":
            y = xs[0] + xs[1]
        elif k == "maxpool":
            a = op.attrs
            y = F.max_pool2d(xs[0], a["kernel"], a["stride"], a["padding"], a.get("dilation", 1), a.get("ceil", False))
        elif k == "avgpool":
            a = op.attrs
            y = F.avg_pool2d(xs[0], a["kernel"], a["stride"], 0, a.get("ceil", False))
        elif k == "gap":
            y = xs[0].mean(dim=(2, 3), keepdim=True)
        elif k == "flatten":
            y = xs[0].flatten(1)
        elif k == "concat":
            y = torch.cat(xs, dim=op.attrs["axis"])
        elif k == "relu":
            y = F.relu(xs[0])
        elif k == "relu6":
            y = F.relu6(xs[0])
        else:  # pragma: no cover - the lowering only makes the kinds above
            raise UnsupportedModelError(f"unknown op kind {k!r}")
        return y

    @staticmethod
    def activation(op: Op, y: torch.Tensor) -> torch.Tensor:
        if op.act == "relu":
            return F.relu(y)
        if op.act == "relu6":
            return F.relu6(y)
        return y

    def forward(self, x: torch.Tensor, capture: dict | None = None, inputs: dict | None = None,
                stop_after: str | None = None) -> torch.Tensor | None:
        """Run the simulated model; ``capture`` (op name -> None) is filled with each named op's
        output before its activation, ``inputs`` with the first tensor it reads. With
        ``stop_after`` the run ends after that op and returns None (for layer-by-layer passes)."""
        env = {"input": self.aq["input"](x)}
        for op in self.ops:
            xs = [env[i] for i in op.inputs]
            if inputs is not None and op.name in inputs:
                inputs[op.name] = xs[0]
            y = self.run_op(op, xs)
            if capture is not None and op.name in capture:
                capture[op.name] = y
            self.store(op, y, env)
            if op.name == stop_after:
                return None
        return env[self.output]

    def store(self, op: Op, y: torch.Tensor, env: dict) -> None:
        """Apply ``op``'s fused activation and output quantizer to its raw output ``y`` and put
        the result in ``env`` (one step of :meth:`forward`, for passes that go op by op)."""
        y = self.activation(op, y)
        env[op.name] = self.aq[_key(op.name)](y) if op.quantized_output else y

    # -- switches -------------------------------------------------------------------------
    def set_observing(self, on: bool) -> None:
        for q in self.aq.values():
            q.observing = on

    def quantizers_of(self, name: str) -> tuple[WeightQuantizer | None, ActQuantizer | None]:
        """The weight quantizer and own output quantizer of op ``name``."""
        wq = self.wq[_key(name)] if _key(name) in self.wq else None
        aq = self.aq[_key(name)] if _key(name) in self.aq else None
        return wq, aq

    def enable_only(self, names: set[str] | None) -> None:
        """Quantize only the weights and outputs of the ops in ``names`` (None: everything)."""
        self.aq["input"].enabled = names is None
        for op in self.ops:
            on = names is None or op.name in names
            wq, aq = self.quantizers_of(op.name)
            if wq is not None:
                wq.enabled = on
            if aq is not None:
                aq.enabled = on


def lower(model: nn.Module, example_input: torch.Tensor) -> tuple[list[Op], dict[str, nn.Module], str]:
    """Fold batch norms, trace, and lower ``model`` to the op list.

    Returns:
        The ops, the Conv/Linear modules by name (copies), and the output op's name.

    Raises:
        UnsupportedModelError: An operation an integer NPU graph cannot hold (listed by name), a
            batch norm that cannot be folded, or a model torch.fx cannot trace.
    """
    folded, _ = fold_batchnorms(model)
    gm = trace(folded)
    gm = copy.deepcopy(gm) if gm is model else gm
    shape_propagate(gm, example_input)
    modules = dict(gm.named_modules())
    ops: list[Op] = []
    layers: dict[str, nn.Module] = {}
    alias: dict[fx.Node, str] = {}
    by_name: dict[str, Op] = {}
    bad: list[str] = []
    output = None

    def src(a) -> str | None:
        return alias.get(a) if isinstance(a, fx.Node) else None

    def fuse_act(node: fx.Node, act: str) -> bool:
        """Fuse ``act`` into the op producing the node's input when only it reads that output."""
        prev = node.args[0]
        name = src(prev)
        op = by_name.get(name)
        if op is not None and op.kind in ("conv", "linear", "add") and op.act is None and len(prev.users) == 1:
            op.act = act
            alias[node] = name
            return True
        if name is not None:  # a standalone activation on integers: a clamp at the zero point
            add(node, Op(node.name, act, [name], quantized_output=False))
            return True
        return False

    def add(node: fx.Node, op: Op) -> None:
        if any(i is None for i in op.inputs):
            bad.append(f"{node.name} (reads a value that is not a tensor of the graph)")
            return
        ops.append(op)
        by_name[op.name] = op
        alias[node] = op.name

    for node in gm.graph.nodes:
        shape = node.meta.get("shape")
        if node.op == "placeholder":
            if alias:
                bad.append(f"{node.name} (a second input)")
            alias[node] = "input"
            continue
        if node.op == "output":
            out = node.args[0]
            output = src(out) if isinstance(out, fx.Node) else None
            if output is None:
                bad.append("output (not a single tensor)")
            continue
        if node.op == "get_attr":
            bad.append(f"{node.name} (a constant tensor)")
            continue
        target = node.target
        mod = modules.get(target) if node.op == "call_module" else None
        a0 = src(node.args[0]) if node.args else None
        if mod is not None:
            if isinstance(mod, (nn.Conv2d, nn.Conv1d)) and mod.padding_mode == "zeros" and not isinstance(mod.padding, str):
                layers[target] = copy.deepcopy(mod)
                add(node, Op(target, "conv", [a0]))
            elif isinstance(mod, nn.Linear) and shape is not None and len(shape) == 2:
                layers[target] = copy.deepcopy(mod)
                add(node, Op(target, "linear", [a0]))
            elif isinstance(mod, (nn.ReLU, nn.ReLU6)):
                act = "relu" if isinstance(mod, nn.ReLU) else "relu6"
                if not fuse_act(node, act):
                    bad.append(f"{target} ({type(mod).__name__} not directly after a conv, linear or add)")
            elif isinstance(mod, (nn.Identity, nn.Dropout)):
                alias[node] = a0
            elif isinstance(mod, nn.Flatten) and mod.start_dim == 1 and mod.end_dim == -1:
                add(node, Op(node.name, "flatten", [a0], quantized_output=False))
            elif isinstance(mod, nn.MaxPool2d) and not mod.return_indices:
                add(node, Op(node.name, "maxpool", [a0], attrs=_pool_attrs(mod), quantized_output=False))
            elif isinstance(mod, nn.AvgPool2d) and mod.padding in (0, (0, 0)) and mod.divisor_override is None:
                add(node, Op(node.name, "avgpool", [a0], attrs=_pool_attrs(mod)))
            elif isinstance(mod, nn.AdaptiveAvgPool2d) and shape is not None and tuple(shape[2:]) == (1, 1):
                add(node, Op(node.name, "gap", [a0]))
            else:
                bad.append(f"{target} ({type(mod).__name__})")
            continue
        # functions and methods; an imported ONNX model's helpers say what they do to channels
        name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
        rule = getattr(target, "_nnshrink_channel_rule", None) if node.op == "call_function" else None
        if rule == "shape" or (node.op == "call_function" and shape is None and rule is not None):
            continue  # shape arithmetic of an imported graph: plain Python values
        if rule == "pass" and name == "global_pool" and node.args[1:2] == ("avg",):
            add(node, Op(node.name, "gap", [a0]))
        elif _is_spatial_mean(node, rule, name):
            in_shape = node.args[0].meta.get("shape")
            keep = shape is not None and len(shape) == len(in_shape)
            if keep:
                add(node, Op(node.name, "gap", [a0]))
            else:  # mean without keepdim: pooling, then the (batch, channels) view of it
                ops.append(Op(node.name + "_gap", "gap", [a0]))
                by_name[node.name + "_gap"] = ops[-1]
                add(node, Op(node.name, "flatten", [node.name + "_gap"], quantized_output=False))
        elif rule == "reshape":
            in_shape = node.args[0].meta.get("shape") if isinstance(node.args[0], fx.Node) else None
            if shape is not None and in_shape is not None and len(shape) == 2 and shape[0] == in_shape[0]:
                add(node, Op(node.name, "flatten", [a0], quantized_output=False))
            else:
                bad.append(f"{node.name} ({name} other than flattening to (batch, features))")
        elif (node.op == "call_function" and (target in _ADD_FUNCS or (rule == "binary" and name == "add"))) \
                or node.op == "call_method" and target == "add":
            b = node.args[1] if len(node.args) > 1 else None
            if isinstance(b, fx.Node):
                add(node, Op(node.name, "add", [a0, src(b)]))
            else:
                bad.append(f"{node.name} (add of a constant)")
        elif (node.op == "call_function" and target in _RELU_FUNCS) or (node.op == "call_method" and target == "relu"):
            if not fuse_act(node, "relu"):
                bad.append(f"{node.name} (relu not directly after a conv, linear or add)")
        elif node.op == "call_function" and target in _RELU6_FUNCS:
            if not fuse_act(node, "relu6"):
                bad.append(f"{node.name} (relu6 not directly after a conv, linear or add)")
        elif (node.op == "call_function" and target is torch.flatten) or \
                (node.op == "call_method" and target in ("view", "reshape", "flatten")):
            in_shape = node.args[0].meta.get("shape") if isinstance(node.args[0], fx.Node) else None
            if shape is not None and in_shape is not None and len(shape) == 2 and shape[0] == in_shape[0]:
                add(node, Op(node.name, "flatten", [a0], quantized_output=False))
            else:
                bad.append(f"{node.name} ({name} other than flattening to (batch, features))")
        elif node.op == "call_function" and target is torch.cat:
            tensors = node.args[0]
            axis = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if shape is not None and axis < 0:
                axis += len(shape)
            add(node, Op(node.name, "concat", [src(t) for t in tensors], attrs={"axis": int(axis)}))
        elif node.op == "call_method" and target in ("size", "dim") or \
                node.op == "call_function" and target is getattr and shape is None:
            continue  # shape queries feed view/reshape, which is checked from shapes
        elif node.op == "call_function" and target is operator.getitem and shape is None:
            continue
        else:
            bad.append(f"{node.name} ({name})")
    if bad:
        raise UnsupportedModelError("cannot quantize for an integer NPU: " + "; ".join(bad))
    if output is None:
        raise UnsupportedModelError("the model has no output")
    return ops, layers, output


def _is_spatial_mean(node: fx.Node, rule: str | None, name: str) -> bool:
    """A mean over the two spatial axes of a 4-D tensor (``x.mean((2, 3))``, ONNX ReduceMean)."""
    x = node.args[0] if node.args else None
    in_shape = x.meta.get("shape") if isinstance(x, fx.Node) else None
    if in_shape is None or len(in_shape) != 4:
        return False
    if rule == "reduce" and name == "reduce":
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
    attrs = {"kernel": pair(mod.kernel_size), "stride": pair(stride), "ceil": bool(mod.ceil_mode)}
    if isinstance(mod, nn.MaxPool2d):
        attrs["padding"] = pair(mod.padding)
        attrs["dilation"] = pair(mod.dilation)
    return attrs
