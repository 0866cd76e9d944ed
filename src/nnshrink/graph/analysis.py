"""Per-layer analysis: which layers can be compressed, their parameters, MACs and bytes.

MACs are counted from a real forward pass (forward hooks record each layer's output shape), so
what is counted is what runs: a layer called twice counts twice, a layer never called counts zero
and is reported as skipped. Work that no compressible layer does is counted too, so that a MAC
target is a fraction of what the model really computes: transposed and 3-D convolutions and
recurrent layers (from their shapes, by module hooks), and the products of two activations
(``matmul``/``@``, ``bmm``, ``einsum``, scaled dot-product and multi-head attention, or a
functional ``linear``/``conv`` outside any counted module), seen by a ``TorchFunctionMode`` and
credited to the module whose forward made them. torch's ``FlopCounterMode`` was not used: it has
no formula for the fused recurrent kernels, and it counts every aten op, so the weight a
parametrization or a fake-quant wrapper computes before a layer runs would count as the layer's.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from nnshrink.errors import InputShapeError

#: Schema name and version of :meth:`Analysis.to_dict`; bump the version on any breaking change.
ANALYSIS_SCHEMA = "nnshrink.analysis/2"

FLOAT32_BYTES = 4

_COMPRESSIBLE = (nn.Conv1d, nn.Conv2d, nn.Linear)
_NORMALIZATION = (
    nn.modules.batchnorm._BatchNorm,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.modules.instancenorm._InstanceNorm,
)


@dataclass(frozen=True)
class LayerInfo:
    """One compressible layer as measured in a forward pass.

    Attributes:
        name: Qualified module name (``features.0``).
        kind: ``linear``, ``conv1d``, ``conv2d``, ``conv2d-depthwise`` or ``conv2d-grouped``
            (likewise for conv1d).
        weight_shape: Shape of the weight tensor.
        params: Parameters of the layer (weight and bias).
        macs: Multiply-accumulates per sample, summed over all calls in the forward pass.
        bytes: Parameter bytes at float32.
        groups: Convolution groups (1 for linear layers).
        in_shape: Input shape of the first call, batch dimension removed.
        out_shape: Output shape of the first call, batch dimension removed.
        calls: How often the layer ran in the forward pass.
    """

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    params: int
    macs: int
    bytes: int
    groups: int
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    calls: int


@dataclass(frozen=True)
class SkippedLayer:
    """A module holding parameters that nnshrink does not compress, with the reason."""

    name: str
    type: str
    params: int
    reason: str


@dataclass(frozen=True)
class OtherMacs:
    """MACs that no compressible layer does, per module and kind.

    Attributes:
        name: The module that did them (its qualified name; ``<root>`` for the model's own forward).
        kind: ``conv-transpose2d``, ``conv3d``, ``lstm``, ``gru``, ``rnn``, ``matmul``, ``einsum``,
            ``attention``, ``linear`` or ``conv`` (a functional call outside any counted module).
        macs: Multiply-accumulates per sample, summed over all calls.
        calls: How often it happened in the forward pass.
    """

    name: str
    kind: str
    macs: int
    calls: int


@dataclass(frozen=True)
class Analysis:
    """Result of :func:`analyze`.

    Attributes:
        input_shape: Shape of the example input, batch dimension included.
        layers: Compressible layers in execution order.
        skipped: Modules with parameters that are not compressed, each with its reason.
        total_macs: MACs per sample of the whole forward pass: the compressible layers' and
            ``other``'s.
        total_params: Parameters of the whole model (every ``nn.Parameter``).
        total_bytes: ``total_params`` at float32.
        compressible_params: Parameters held by the compressible layers.
    """

    input_shape: tuple[int, ...]
    layers: tuple[LayerInfo, ...]
    skipped: tuple[SkippedLayer, ...]
    total_macs: int
    total_params: int
    total_bytes: int
    compressible_params: int = field(default=0)
    other: tuple[OtherMacs, ...] = field(default=())

    @property
    def compressible_macs(self) -> int:
        """MACs per sample of the compressible layers alone."""
        return sum(i.macs for i in self.layers)

    def layer(self, name: str) -> LayerInfo:
        """Return the layer called ``name``."""
        for info in self.layers:
            if info.name == name:
                return info
        raise KeyError(f"no compressible layer named {name!r}; known: {[i.name for i in self.layers]}")

    def to_dict(self) -> dict:
        """JSON-ready form following the documented schema ``nnshrink.analysis/2``."""
        return {
            "schema": ANALYSIS_SCHEMA,
            "input_shape": list(self.input_shape),
            "totals": {
                "macs": self.total_macs,
                "compressible_macs": self.compressible_macs,
                "params": self.total_params,
                "bytes": self.total_bytes,
                "compressible_params": self.compressible_params,
                "layers": len(self.layers),
            },
            "layers": [
                {**asdict(i), "weight_shape": list(i.weight_shape), "in_shape": list(i.in_shape),
                 "out_shape": list(i.out_shape)}
                for i in self.layers
            ],
            "skipped": [asdict(s) for s in self.skipped],
            "other_macs": [asdict(o) for o in self.other],
        }


def layer_kind(module: nn.Module) -> str:
    """Name the kind of a compressible module (``conv2d-depthwise`` and so on)."""
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        base = "conv1d" if isinstance(module, nn.Conv1d) else "conv2d"
        if module.groups == 1:
            return base
        if module.groups == module.in_channels == module.out_channels:
            return f"{base}-depthwise"
        return f"{base}-grouped"
    raise TypeError(f"{type(module).__name__} is not a compressible layer")


def is_compressible(module: nn.Module) -> bool:
    """True for the layer types nnshrink compresses (Conv1d, Conv2d, Linear)."""
    return isinstance(module, _COMPRESSIBLE) and not isinstance(module, nn.LazyLinear)


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


def _layer_macs(module: nn.Module, out: torch.Tensor, batch: int) -> int:
    per_sample_out = out.numel() // batch
    if isinstance(module, nn.Linear):
        return per_sample_out * module.in_features
    kernel = math.prod(module.kernel_size)
    return per_sample_out * (module.in_channels // module.groups) * kernel


def _skip_reason(module: nn.Module) -> str:
    if isinstance(module, _NORMALIZATION):
        return "normalization layer: folded into the preceding conv or kept in float"
    if isinstance(module, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        narrows = "; its channels narrow with their groups" if module.groups == 1 and module.weight.dim() < 5 else ""
        return ("transposed convolution: compressed by the budget step with a byte target (its weight as a unit) "
                f"and by weight-only quantization{narrows}")
    if isinstance(module, nn.Conv3d):
        return "Conv3d is not supported yet"
    if isinstance(module, (nn.RNNBase,)):
        return "recurrent layer: compressed by the budget step (its matrices as units) and weight-only quantization"
    if isinstance(module, nn.Embedding):
        return "embeddings are not supported yet"
    return f"{type(module).__name__} is not a compressible layer type (Conv1d, Conv2d, Linear)"


def run_forward(model: nn.Module, example_input: torch.Tensor | tuple) -> object:
    """Run ``model`` on ``example_input`` without gradients, turning shape errors into ours."""
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    try:
        with torch.no_grad():
            return model(*args)
    except (RuntimeError, ValueError, IndexError, TypeError) as exc:
        shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputShapeError(f"the model's forward pass failed on an input of shape {shapes}: {first}") from exc


_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
#: Modules counted by their own formula rather than as compressible layers.
_COUNTED = _TRANSPOSED + (nn.Conv3d, nn.RNNBase)


def _counted_kind(module: nn.Module) -> str:
    if isinstance(module, _TRANSPOSED):
        return f"conv-transpose{module.weight.dim() - 2}d"
    if isinstance(module, nn.Conv3d):
        return "conv3d"
    return {"LSTM": "lstm", "GRU": "gru"}.get(module.mode, "rnn")


def _counted_macs(module: nn.Module, inputs: tuple, out, batch: int) -> int:
    """Per-sample MACs of a transposed or 3-D conv or a recurrent layer."""
    if isinstance(module, _TRANSPOSED):  # every input element reaches out/groups x kernel outputs
        return inputs[0].numel() // batch * (module.out_channels // module.groups) * math.prod(module.kernel_size)
    if isinstance(module, nn.Conv3d):
        return _layer_macs(module, out, batch)
    x = inputs[0]
    data = x.data if isinstance(x, nn.utils.rnn.PackedSequence) else x
    positions = data.numel() // module.input_size  # time steps x sequences
    gates = {"LSTM": 4, "GRU": 3}.get(module.mode, 1)
    hidden, proj = module.hidden_size, getattr(module, "proj_size", 0) or 0
    width = proj or hidden  # what each step emits and reads back
    dirs = 2 if module.bidirectional else 1
    macs, reads = 0, module.input_size
    for _ in range(module.num_layers):
        macs += dirs * (gates * hidden * (reads + width) + (hidden * proj if proj else 0))
        reads = dirs * width
    return positions * macs // batch


_MATMULS = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__,
            torch.bmm, torch.Tensor.bmm, torch.mm, torch.Tensor.mm}
_ATTENTION = {F.multi_head_attention_forward, torch._native_multi_head_attention}
_FUNCTIONAL = {F.linear: "linear", F.conv1d: "conv", F.conv2d: "conv", F.conv3d: "conv",
               F.conv_transpose1d: "conv", F.conv_transpose2d: "conv", F.conv_transpose3d: "conv"}


def _function_macs(func, args: tuple, kwargs: dict, out) -> tuple[str, int] | None:
    """(kind, MACs over the whole batch) of one torch call that multiplies, or None."""
    def arg(i: int, key: str):
        return args[i] if len(args) > i else kwargs.get(key)

    if not isinstance(out, torch.Tensor) and func not in _ATTENTION:
        return None
    if func in _MATMULS:
        a, b = (args[1], args[0]) if func is torch.Tensor.__rmatmul__ else (args[0], args[1])
        return "matmul", out.numel() * a.shape[-1]
    if func in (torch.baddbmm, torch.addmm, torch.addbmm, torch.Tensor.baddbmm, torch.Tensor.addmm):
        k = arg(1, "batch1" if "bmm" in func.__name__ else "mat1").shape[-1]
        return "matmul", (out.numel() * k * (arg(1, "batch1").shape[0] if func is torch.addbmm else 1))
    if func is torch.einsum:
        equation, operands = args[0], args[1:]
        if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
            operands = operands[0]
        sizes: dict[str, int] = {}
        for letters, t in zip(equation.replace(" ", "").split("->")[0].split(","), operands):
            shape = list(t.shape)
            if "..." in letters:  # the ellipsis's dimensions count once, as one size
                at, named = letters.index("..."), len(letters) - 3
                spread = t.dim() - named
                sizes["..."] = max(sizes.get("...", 1), math.prod(shape[at:at + spread]))
                letters, shape = letters.replace("...", ""), shape[:at] + shape[at + spread:]
            sizes.update(zip(letters, shape))
        return ("einsum", math.prod(sizes.values())) if len(operands) > 1 else None
    if func is F.scaled_dot_product_attention:
        q, k, v = args[0], arg(1, "key"), arg(2, "value")
        return "attention", math.prod(q.shape[:-1]) * k.shape[-2] * (q.shape[-1] + v.shape[-1])
    if func in _ATTENTION:  # projections and attention; (L, N, E) or (L, E), or (N, L, E) on the fast path
        q, k = args[0], args[1]
        if func is F.multi_head_attention_forward:
            length, source, n = q.shape[0], k.shape[0], (q.shape[1] if q.dim() == 3 else 1)
        else:
            length, source, n = q.shape[-2], k.shape[-2], (q.shape[0] if q.dim() == 3 else 1)
        dim = q.shape[-1]
        return "attention", n * ((2 * length + 2 * source) * dim * dim + 2 * length * source * dim)
    kind = _FUNCTIONAL.get(func)
    if kind is None:
        return None
    weight = arg(1, "weight")
    if kind == "linear":
        return kind, out.numel() * weight.shape[-1]
    if func in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
        return kind, args[0].numel() * weight[0].numel()
    return kind, out.numel() * weight[0].numel()


class _ProductCounter(TorchFunctionMode):
    """Counts the MACs of torch calls made outside any counted module, by the running module."""

    def __init__(self, stack: list[str], counted: list[int], found: dict[tuple[str, str], list[int]]) -> None:
        super().__init__()
        self.stack, self.counted, self.found = stack, counted, found

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.counted[0]:
            try:
                hit = _function_macs(func, args, kwargs, out)
            except (AttributeError, IndexError, TypeError, ValueError):  # an unusual call form: not counted
                hit = None
            if hit is not None and hit[1] > 0:
                rec = self.found.setdefault((self.stack[-1] if self.stack else "<root>", hit[0]), [0, 0])
                rec[0] += hit[1]
                rec[1] += 1
        return out


def analyze(model: nn.Module, example_input: torch.Tensor | tuple) -> Analysis:
    """Measure every compressible layer of ``model`` in one forward pass.

    Args:
        model: Any ``torch.nn.Module``; it is run in eval mode and restored afterwards.
        example_input: A tensor (or tuple of tensors) the model accepts; its first dimension is
            the batch, and MACs are reported per sample.

    Returns:
        The per-layer table and totals; ``other`` holds the MACs no compressible layer does.

    Raises:
        InputShapeError: The model cannot run on ``example_input``.
    """
    args = example_input if isinstance(example_input, tuple) else (example_input,)
    if not args or not isinstance(args[0], torch.Tensor) or args[0].dim() == 0:
        raise InputShapeError("the example input must be a tensor with a batch dimension")
    batch = args[0].shape[0]
    names = {m: n for n, m in model.named_modules()}
    records: dict[str, dict] = {}
    order: list[str] = []
    found: dict[tuple[str, str], list[int]] = {}  # (module, kind) -> [MACs over the batch, calls]
    stack: list[str] = []
    counted = [0]  # depth inside compressible or counted modules: their calls are theirs

    def hook(module: nn.Module, inputs: tuple, output: torch.Tensor) -> None:
        name = names[module]
        rec = records.get(name)
        macs = _layer_macs(module, output, batch)
        if rec is None:
            order.append(name)
            records[name] = {"macs": macs, "calls": 1,
                             "in": tuple(inputs[0].shape[1:]), "out": tuple(output.shape[1:])}
        else:
            rec["macs"] += macs
            rec["calls"] += 1

    def other_hook(module: nn.Module, inputs: tuple, kwargs: dict, output) -> None:
        x = inputs[0] if inputs else kwargs.get("input")  # an RNN may be called as rnn(input=x)
        if x is None:
            return
        rec = found.setdefault((names[module], _counted_kind(module)), [0, 0])
        rec[0] += _counted_macs(module, (x,), output, batch) * batch
        rec[1] += 1

    def enter(module: nn.Module, inputs: tuple) -> None:
        stack.append(names.get(module, type(module).__name__))
        if is_compressible(module) or isinstance(module, _COUNTED):
            counted[0] += 1

    def leave(module: nn.Module, inputs: tuple, output) -> None:
        stack.pop()
        if is_compressible(module) or isinstance(module, _COUNTED):
            counted[0] -= 1

    handles = [m.register_forward_hook(hook) for m in model.modules() if is_compressible(m)]
    handles += [m.register_forward_hook(other_hook, with_kwargs=True) for m in model.modules() if isinstance(m, _COUNTED)]
    for m in model.modules():
        if isinstance(m, torch.jit.ScriptModule):  # takes no hooks; what it runs is opaque to the counter too
            continue
        handles.append(m.register_forward_pre_hook(enter))
        handles.append(m.register_forward_hook(leave, always_call=True))
    was_training = model.training
    model.eval()
    try:
        with _ProductCounter(stack, counted, found):
            run_forward(model, example_input)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)

    layers = []
    for name in order:
        module = model.get_submodule(name)
        rec = records[name]
        params = _own_params(module)
        layers.append(LayerInfo(
            name=name, kind=layer_kind(module), weight_shape=tuple(module.weight.shape),
            params=params, macs=rec["macs"], bytes=params * FLOAT32_BYTES,
            groups=getattr(module, "groups", 1), in_shape=rec["in"], out_shape=rec["out"],
            calls=rec["calls"]))
    other = tuple(OtherMacs(name or "<root>", kind, macs // batch, calls)
                  for (name, kind), (macs, calls) in found.items())
    skipped = []
    for name, module in model.named_modules():
        params = _own_params(module)
        if is_compressible(module) and name not in records:
            skipped.append(SkippedLayer(name, type(module).__name__, params,
                                        "not called in the forward pass"))
        elif not is_compressible(module) and params:
            skipped.append(SkippedLayer(name or "<root>", type(module).__name__, params,
                                        _skip_reason(module)))
    total_params = sum(p.numel() for p in model.parameters())
    return Analysis(
        input_shape=tuple(args[0].shape), layers=tuple(layers), skipped=tuple(skipped),
        total_macs=sum(i.macs for i in layers) + sum(o.macs for o in other), total_params=total_params,
        total_bytes=total_params * FLOAT32_BYTES,
        compressible_params=sum(i.params for i in layers), other=other)
