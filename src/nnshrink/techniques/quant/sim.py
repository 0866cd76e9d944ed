"""The simulated quantized model: the op list of :mod:`.graph` run with fake quantization.

:class:`QuantSim` runs the ops of :func:`~.graph.lower` (one handler per op kind, :data:`_RUN`)
with fake quantization (differentiable, for QAT and AdaRound): weights through per-channel
quantizers, biases rounded to int32 at scale ``s_in * s_w`` as the integer kernels hold them,
every tensor with its own scale through an activation quantizer, moves on their input's grid, and
float ops (``compute`` ops the target has no integer kernel for) in float. After calibration,
:func:`~.graph.freeze` turns it into the :class:`~.graph.QuantGraph` that the ONNX QDQ writer
(``nnshrink.io.qdq``) and the integer reference (:mod:`.reference`) read, so all three compute the
same thing.

Why not ``torch.ao.quantization`` (FX graph mode): its observers, fusion patterns and export are
being deprecated in favour of torchao's PT2E flow, whose QDQ export through the dynamo exporter
did not give ONNX Runtime integer kernels for our models, and neither gives us the op list an
integer reference and an ONNX writer need.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nnshrink.errors import ConfigError, UnsupportedModelError
from nnshrink.techniques.quant.graph import LAYER_KINDS, Lowered, Op, _fill, invoke, key
from nnshrink.techniques.quant.quantizers import ActQuantizer, WeightQuantizer

# Where the integer graph runs, which decides its weight grid, how weights are written and which
# ops run in integers (``Quantize.target``). ONNX Runtime's u8 x s8 kernels on x86 CPUs without
# VNNI add each two products into a saturating int16 (VPMADDUBSW), which weights within +-64 never
# reach: ``ort-x86``: weights capped at 7 bits, int8 (u8 x s8 kernels, exact on every x86 CPU);
# ``ort-x86-u8``: 8-bit weights written as uint8 (zero point + 128: the same integers), which the
# u8 x u8 kernels sum exactly on every CPU, 1.3-3.9x slower (measured, docs/ARCHITECTURE.md);
# ``npu``: integer NPUs and TFLite (Ethos-U, DRP-AI): full-range int8 weights.
TARGETS = ("ort-x86", "ort-x86-u8", "npu")
X86_WEIGHT_BITS = 7  # the widest weight grid ONNX Runtime's u8 x s8 x86 kernels sum exactly

_key = key


class QuantSim(nn.Module):
    """A model whose forward pass is the simulated integer one.

    Attributes:
        ops: The op list, in execution order (:class:`~.graph.Op`).
        layers: Float Conv/ConvTranspose/Linear modules by key (``name`` with dots as ``__``).
        mods: The other modules the ops call (float ops, moves), by key.
        consts: Constant tensors by key.
        wq: Weight quantizers by layer key.
        aq: Activation quantizers by tensor key (``input`` when quantized, and every op whose
            output has its own scale).
        outputs: Names of the tensors the model returns; ``output`` is the first.
        target: Where the integer graph runs (one of ``TARGETS``): how its weights are written.
    """

    is_quant_sim = True

    def __init__(self, lowered: Lowered, input_shape, example_shape, act_bits: int = 8,
                 act_symmetric: bool = False, estimator: str = "mse") -> None:
        super().__init__()
        self.ops = lowered.ops
        self.outputs = lowered.outputs
        self.output_tree = lowered.output_tree
        self.input_shape = input_shape
        self.example_shape = tuple(example_shape)
        self.input_quantized = lowered.input_quantized
        self.aliases = dict(lowered.aliases)  # fx node name -> op name
        self.aq_bits = act_bits
        self._act_config = (act_symmetric, estimator)
        self.layers = nn.ModuleDict({key(k): v for k, v in lowered.layers.items()})
        self.mods = nn.ModuleDict(lowered.modules)
        self.consts = nn.ParameterDict({k: nn.Parameter(v, requires_grad=False) if v.is_floating_point() else v
                                        for k, v in lowered.consts.items()})
        self.wq = nn.ModuleDict()
        self.aq = nn.ModuleDict()
        if self.input_quantized:
            self.aq["input"] = ActQuantizer(act_bits, act_symmetric, estimator)
        for op in self.ops:
            if op.quant == "own":
                aq = self._output_quantizer(op.name, act_bits)
                if op.op_type == "Softmax" and op.integer:
                    # ONNX Runtime's QLinearSoftmax scales by floor(1 / y_scale) and TFLite's
                    # int8 softmax requires 1/256: probabilities on [0, 1) from the lowest integer
                    aq.fixed = (1.0 / 2 ** act_bits, aq.qmin)
                self.aq[key(op.name)] = aq
        self.float_layers: set[str] = set()
        self.bias_quant = True
        self.target = "ort-x86"  # one of TARGETS
        self._index = {op.name: op for op in self.ops}

    @property
    def output(self) -> str:
        return self.outputs[0]

    def set_act_bits(self, bits: dict[str, int]) -> None:
        """Give the named layers' outputs their own activation width (8 or 16), before
        calibration: every op that moves such a tensor (pooling, reshapes) keeps it, and its
        readers take it at that width (ONNX Runtime runs a layer with a 16-bit input or output as
        ``DQ -> float -> Q``; TFLite takes no mix of widths)."""
        for name, b in bits.items():
            op = self._index.get(name)
            if op is None or op.kind not in LAYER_KINDS or key(name) not in self.aq:
                raise ConfigError(f"act_bits names {name!r}, which is not a quantized layer with its own output")
            if b != self.aq[key(name)].bits:
                self.aq[key(name)] = self._output_quantizer(name, b)

    def _output_quantizer(self, name: str, bits: int) -> ActQuantizer:
        """A fresh quantizer for op ``name``'s output. A model output keeps its full range:
        clipping the largest logits makes ties that argmax breaks arbitrarily."""
        symmetric, estimator = self._act_config
        return ActQuantizer(bits, symmetric, "minmax" if name in self.outputs else estimator)

    def act_bits_of(self) -> dict[str, int]:
        """Each layer whose output width differs from the model's (``aq_bits``)."""
        return {op.name: self.aq[key(op.name)].bits for op in self.layer_ops()
                if key(op.name) in self.aq and self.aq[key(op.name)].bits != self.aq_bits}

    # -- naming ---------------------------------------------------------------------------
    def layer(self, name: str) -> nn.Module:
        return self.layers[key(name)]

    def weight_quantizer(self, name: str) -> WeightQuantizer:
        return self.wq[key(name)]

    def owner(self, tensor: str) -> str | None:
        """The tensor whose quantizer fixes ``tensor``'s scale (a move's is its input's); None
        for a float tensor."""
        op = self._index.get(tensor)
        while op is not None and op.quant in ("shared", "tuple"):
            tensor = op.inputs[0]
            op = self._index.get(tensor)
        return tensor if key(tensor) in self.aq else None

    def act_quantizer_of(self, tensor: str) -> ActQuantizer | None:
        """The quantizer that fixes ``tensor``'s scale (an op without its own uses its input's)."""
        owner = self.owner(tensor)
        return self.aq[key(owner)] if owner is not None else None

    def layer_ops(self) -> list[Op]:
        return [op for op in self.ops if op.kind in LAYER_KINDS]

    # -- running --------------------------------------------------------------------------
    def weight(self, op: Op) -> torch.Tensor:
        layer = self.layer(op.name)
        if op.name in self.float_layers:
            return layer.weight
        return self.wq[key(op.name)](layer.weight)

    def bias(self, op: Op) -> torch.Tensor | None:
        """The bias as the integer kernel holds it: int32 at scale ``s_in * s_w``."""
        layer = self.layer(op.name)
        b = layer.bias
        if b is None or op.name in self.float_layers or not self.bias_quant:
            return b
        aq, wq = self.act_quantizer_of(op.inputs[0]), self.wq[key(op.name)]
        if aq is None or not (aq.enabled and wq.enabled) or aq.observing:
            return b
        s = (aq.scale.detach() * wq.scale.detach()).reshape(-1)
        return torch.clamp(torch.round(b / s), -(2**31), 2**31 - 1) * s if s.numel() > 0 else b

    def run_op(self, op: Op, xs: list) -> object:
        """The float computation of ``op`` before its fused activation and output quantizer."""
        return _RUN[op.kind](self, op, xs)

    @staticmethod
    def activation(op: Op, y: torch.Tensor) -> torch.Tensor:
        if op.act == "relu":
            return F.relu(y)
        if op.act == "relu6":
            return F.relu6(y)
        return y

    def forward(self, x: torch.Tensor, capture: dict | None = None, inputs: dict | None = None,
                stop_after: str | None = None):
        """Run the simulated model; ``capture`` (op name -> None) is filled with each named op's
        output before its activation, ``inputs`` with the first tensor it reads. With
        ``stop_after`` the run ends after that op and returns None (for layer-by-layer passes)."""
        env = {"input": self.aq["input"](x) if self.input_quantized else x}
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
        return _fill(self.output_tree, [env[o] for o in self.outputs])

    def store(self, op: Op, y, env: dict) -> None:
        """Apply ``op``'s fused activation and output quantizer to its raw output ``y`` and put
        the result in ``env`` (one step of :meth:`forward`, for passes that go op by op)."""
        if op.act is not None:
            y = self.activation(op, y)
        env[op.name] = self.aq[key(op.name)](y) if op.quant == "own" else y

    # -- switches -------------------------------------------------------------------------
    def set_observing(self, on: bool) -> None:
        for q in self.aq.values():
            q.observing = on

    def quantizers_of(self, name: str) -> tuple[WeightQuantizer | None, ActQuantizer | None]:
        """The weight quantizer and own output quantizer of op ``name``."""
        wq = self.wq[key(name)] if key(name) in self.wq else None
        aq = self.aq[key(name)] if key(name) in self.aq else None
        return wq, aq

    def enable_only(self, names: set[str] | None) -> None:
        """Quantize only the weights and outputs of the ops in ``names`` (None: everything)."""
        if "input" in self.aq:
            self.aq["input"].enabled = names is None
        for op in self.ops:
            on = names is None or op.name in names
            wq, aq = self.quantizers_of(op.name)
            if wq is not None:
                wq.enabled = on
            if aq is not None:
                aq.enabled = on


# -- one handler per op kind ---------------------------------------------------------------------
def _conv(sim: QuantSim, op: Op, xs):
    layer = sim.layer(op.name)
    conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
    return conv(xs[0], sim.weight(op), sim.bias(op), layer.stride, layer.padding, layer.dilation, layer.groups)


def _convt(sim: QuantSim, op: Op, xs):
    layer = sim.layer(op.name)
    conv = F.conv_transpose1d if isinstance(layer, nn.ConvTranspose1d) else F.conv_transpose2d
    return conv(xs[0], sim.weight(op), sim.bias(op), layer.stride, layer.padding, layer.output_padding,
                layer.groups, layer.dilation)


def _linear(sim: QuantSim, op: Op, xs):
    return F.linear(xs[0], sim.weight(op), sim.bias(op))


def _avgpool(sim: QuantSim, op: Op, xs):
    a = op.attrs
    return F.avg_pool2d(xs[0], a["kernel"], a["stride"], 0, a.get("ceil", False))


def _const(sim: QuantSim, op: Op, xs):
    return sim.consts[key(op.name)] if key(op.name) in sim.consts else op.attrs["value"]


def _unknown(sim, op, xs):  # pragma: no cover - the lowering makes only the kinds of _RUN
    raise UnsupportedModelError(f"unknown op kind {op.kind!r}")


_RUN = {
    "conv": _conv,
    "convt": _convt,
    "linear": _linear,
    "matmul": lambda sim, op, xs: torch.matmul(xs[0], xs[1]),
    "add": lambda sim, op, xs: xs[0] + xs[1],
    "mul": lambda sim, op, xs: xs[0] * xs[1],
    "gap": lambda sim, op, xs: xs[0].mean(dim=(2, 3), keepdim=True),
    "avgpool": _avgpool,
    "concat": lambda sim, op, xs: torch.cat(xs, dim=op.attrs["axis"]),
    "clamp": lambda sim, op, xs: torch.clamp(xs[0], op.attrs["lo"], op.attrs["hi"]),
    "move": lambda sim, op, xs: invoke(op, xs, sim.mods),
    "compute": lambda sim, op, xs: invoke(op, xs, sim.mods),
    "value": lambda sim, op, xs: invoke(op, xs, sim.mods),
    "const": _const,
}
