"""Run-time helpers that the ONNX importer places in the torch.fx graph.

Each helper implements one ONNX operator with ONNX's semantics where they differ from torch's
(Reshape's 0, Flatten's 2-D result, Gather on shapes...). Values computed from tensor shapes
(``Shape -> Gather -> Concat -> Reshape``, as exporters emit for a dynamic batch) are kept as
Python lists of ints, so the graph stays traceable by ``torch.export`` with symbolic sizes.

``_nnshrink_channel_rule`` tells :mod:`nnshrink.graph.groups` how a helper treats the channel
axis: ``pass`` (keeps channels), ``elementwise`` (keeps them on any axis: a token sequence's
last too), ``binary`` (broadcasting elementwise op), ``reshape`` (checked
from shapes), ``reduce`` (checked from shapes), ``shape`` (no tensor out); ``transpose``,
``softmax``, ``matmul`` and ``split`` are followed where attention's heads go through them.
Helpers without a rule are treated as unknown, which makes the channels they touch unprunable.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _rule(name: str):
    def mark(fn):
        fn._nnshrink_channel_rule = name
        return fn

    return mark


def _is_shape(v: object) -> bool:
    return isinstance(v, (list, tuple, int))


def _as_list(v: object) -> list:
    return list(v) if isinstance(v, (list, tuple)) else [v]


@_rule("binary")
def add(a, b):
    if _is_shape(a) and _is_shape(b):
        return _elementwise_list(a, b, lambda x, y: x + y)
    return a + b


@_rule("binary")
def sub(a, b):
    if _is_shape(a) and _is_shape(b):
        return _elementwise_list(a, b, lambda x, y: x - y)
    return a - b


@_rule("binary")
def mul(a, b):
    if _is_shape(a) and _is_shape(b):
        return _elementwise_list(a, b, lambda x, y: x * y)
    return a * b


@_rule("binary")
def div(a, b):
    if _is_shape(a) and _is_shape(b):
        return _elementwise_list(a, b, lambda x, y: x // y)
    if not a.is_floating_point() and not b.is_floating_point():
        return torch.div(a, b, rounding_mode="trunc")
    return a / b


def _elementwise_list(a, b, op):
    la, lb = _as_list(a), _as_list(b)
    if len(la) == 1:
        la = la * len(lb)
    if len(lb) == 1:
        lb = lb * len(la)
    out = [op(x, y) for x, y in zip(la, lb)]
    return out[0] if isinstance(a, int) and isinstance(b, int) else out


@_rule("binary")
def pow_(a, b):
    return torch.pow(a, b)


@_rule("elementwise")
def hard_sigmoid(x, alpha: float, beta: float):
    return torch.clamp(alpha * x + beta, 0.0, 1.0)


@_rule("elementwise")
def clip(x, lo, hi):
    return torch.clamp(x, lo, hi)


@_rule("elementwise")
def unary(x, op: str):
    return getattr(torch, op)(x)


@_rule("pass")
def global_pool(x, kind: str):
    dims = tuple(range(2, x.dim()))
    return x.mean(dim=dims, keepdim=True) if kind == "avg" else x.amax(dim=dims, keepdim=True)


@_rule("pass")
def pad(x, pads: list, mode: str, value: float):
    # ONNX: [x1_begin, x2_begin, ..., x1_end, x2_end]; torch: last axis first, (begin, end) pairs.
    n = len(pads) // 2
    torch_pads = []
    for axis in reversed(range(2, n)):
        torch_pads += [pads[axis], pads[axis + n]]
    mode = {"constant": "constant", "reflect": "reflect", "edge": "replicate"}[mode]
    return F.pad(x, torch_pads, mode=mode, value=value if mode == "constant" else None)


@_rule("reshape")
def flatten(x, axis: int):
    if axis < 0:
        axis += x.dim()
    if axis == 0:
        return x.reshape(1, -1)
    return x.reshape(*x.shape[:axis], -1) if axis == 1 else x.reshape(x.shape[:axis].numel(), -1)


@_rule("reshape")
def reshape(x, shape, allowzero: int = 0):
    if _is_shape(x):  # a shape value reshaped (scalar <-> 1-element list): stays a list
        return _as_list(x)
    dims = list(_as_list(shape))
    if not allowzero:
        dims = [x.shape[i] if d == 0 else d for i, d in enumerate(dims)]
    return x.reshape(dims)


@_rule("reshape")
def squeeze(x, axes):
    if _is_shape(x):
        return _as_list(x)[0] if isinstance(x, (list, tuple)) else x
    if axes is None:
        return x.squeeze()
    axes = sorted((a + x.dim()) % x.dim() for a in _as_list(axes))
    for a in reversed(axes):
        x = x.squeeze(a)
    return x


@_rule("reshape")
def unsqueeze(x, axes):
    if _is_shape(x):
        return _as_list(x)
    out_rank = x.dim() + len(_as_list(axes))
    for a in sorted((a + out_rank) % out_rank for a in _as_list(axes)):
        x = x.unsqueeze(a)
    return x


@_rule("reduce")
def reduce(x, op: str, axes, keepdims: int):
    dims = tuple(range(x.dim())) if axes is None else tuple(_as_list(axes))
    if op == "mean":
        return x.mean(dim=dims, keepdim=bool(keepdims))
    if op == "sum":
        return x.sum(dim=dims, keepdim=bool(keepdims))
    if op == "max":
        return x.amax(dim=dims, keepdim=bool(keepdims))
    return x.amin(dim=dims, keepdim=bool(keepdims))


@_rule("shape")
def shape(x, start: int = 0, end: int | None = None):
    return list(x.shape[start:end])


@_rule("shape")
def concat_shapes(*parts):
    out: list = []
    for p in parts:
        out += _as_list(p)
    return out


def gather(data, indices, axis: int):
    if _is_shape(data):
        items = _as_list(data)
        if isinstance(indices, int):
            return items[indices]
        return [items[i] for i in _as_list(indices)]
    if isinstance(indices, int):
        return data.select(axis, indices)
    idx = torch.as_tensor(indices, dtype=torch.long, device=data.device)
    idx = torch.where(idx < 0, idx + data.shape[axis], idx)
    out = data.index_select(axis, idx.reshape(-1))
    return out.reshape(*data.shape[:axis], *idx.shape, *data.shape[axis + 1:])


def slice_(x, starts, ends, axes, steps):
    big = 2 ** 62  # INT64_MAX / INT64_MIN stand for "to the end"
    starts = [None if s <= -big else s for s in _as_list(starts)]
    ends = [None if e >= big else e for e in _as_list(ends)]
    if _is_shape(x):
        return _as_list(x)[starts[0]:ends[0]:steps[0]]
    index = [slice(None)] * x.dim()
    for s, e, a, st in zip(starts, ends, axes, steps):
        index[a] = slice(s, e, st)
    return x[tuple(index)]


@_rule("transpose")
def transpose(x, perm):
    return x.permute(*perm)


@_rule("softmax")
def softmax(x, axis: int, log: bool, legacy: bool):
    if axis < 0:
        axis += x.dim()
    if legacy and axis < x.dim() - 1:  # opset < 13: coerce to 2-D at `axis`, softmax over the tail
        flat = x.flatten(axis) if axis else x.reshape(1, -1)
        out = torch.log_softmax(flat, dim=axis) if log else torch.softmax(flat, dim=axis)
        return out.reshape(x.shape)
    return torch.log_softmax(x, dim=axis) if log else torch.softmax(x, dim=axis)


@_rule("split")
def split(x, sizes: list, axis: int):
    return tuple(torch.split(x, sizes, dim=axis))


def cast(x, dtype: torch.dtype):
    return x if _is_shape(x) else x.to(dtype)


def constant_of_shape(shape, value: float, dtype: torch.dtype):
    return torch.full(_as_list(shape), value, dtype=dtype)


@_rule("matmul")
def matmul(a, b):
    return torch.matmul(a, b)


def conv_functional(x, w, b, stride, padding, dilation, groups):
    fn = F.conv1d if w.dim() == 3 else F.conv2d
    return fn(x, w, b, stride, padding, dilation, groups)


@_rule("pass")
def expand(x, shape):
    """ONNX Expand: broadcast ``x`` and ``shape`` against each other (numpy rules)."""
    if isinstance(x, (int, float)):
        x = torch.tensor(x)
    return x.expand(torch.broadcast_shapes(tuple(x.shape), tuple(_as_list(shape))))


@_rule("pass")
def cast_like(x, like):
    return x.to(like.dtype) if isinstance(like, torch.Tensor) else x


_INT_RANGES = {"int8": (-128, 127), "uint8": (0, 255), "int16": (-32768, 32767), "uint16": (0, 65535)}


def _per_axis(t, x, axis: int):
    if isinstance(t, (list, tuple)):
        t = torch.tensor(t, dtype=torch.float32)
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    shape = [1] * x.dim()
    shape[axis % x.dim()] = -1
    return t.reshape(shape)


@_rule("pass")
def quantize_linear(x, scale, zero_point, axis: int, int_type: str):
    """ONNX QuantizeLinear; the integers are held in a float tensor (exactly), so pooling and
    reshaping run on them as the integer ops would."""
    lo, hi = _INT_RANGES[int_type]
    scale, zero_point = _per_axis(scale, x, axis), _per_axis(zero_point, x, axis)
    return torch.clamp(torch.round(x / scale) + zero_point, lo, hi)


@_rule("pass")
def dequantize_linear(q, scale, zero_point, axis: int):
    """ONNX DequantizeLinear of integers held in a float tensor."""
    scale, zero_point = _per_axis(scale, q, axis), _per_axis(zero_point, q, axis)
    return (q - zero_point) * scale


@_rule("binary")
def binary(a, b, op: str):
    """Elementwise ``torch.<op>(a, b)`` for the comparison and min/max operators (shape lists
    included, as shape arithmetic uses them)."""
    if _is_shape(a) and _is_shape(b):
        fn = {"maximum": max, "minimum": min, "eq": lambda x, y: int(x == y), "lt": lambda x, y: int(x < y),
              "gt": lambda x, y: int(x > y), "le": lambda x, y: int(x <= y), "ge": lambda x, y: int(x >= y),
              "fmod": lambda x, y: x % y}[op]
        return _elementwise_list(a, b, fn)
    if not isinstance(a, torch.Tensor):
        a = torch.as_tensor(a, dtype=b.dtype if isinstance(b, torch.Tensor) else None)
    return getattr(torch, op)(a, b)


@_rule("binary")
def where(cond, a, b):
    return torch.where(cond.bool() if isinstance(cond, torch.Tensor) else torch.as_tensor(cond).bool(), a, b)


@_rule("pass")
def logical_not(x):
    return torch.logical_not(x)


@_rule("pass")
def prelu(x, slope):
    """ONNX PRelu with a slope that broadcasts from the last axis (not the channel axis)."""
    return torch.where(x >= 0, x, x * slope)


@_rule("elementwise")
def gelu(x, approximate: str):
    return F.gelu(x, approximate=approximate)


@_rule("pass")
def layer_norm(x, axis: int, weight, bias, eps: float):
    """ONNX LayerNormalization over the axes from ``axis`` to the last."""
    if axis < 0:
        axis += x.dim()
    return F.layer_norm(x, tuple(x.shape[axis:]), weight, bias, eps)


@_rule("pass")
def resize(x, scales, sizes, mode: str, align_corners: bool | None):
    """ONNX Resize of the spatial axes, as F.interpolate computes it (the importer checks that the
    coordinate and rounding modes are ones torch has)."""
    if sizes is not None:
        size = [int(s) for s in _as_list(sizes)[2:]]
        return F.interpolate(x, size=size, mode=mode, align_corners=align_corners)
    factors = [float(s) for s in _as_list(scales)[2:]]
    return F.interpolate(x, scale_factor=factors, mode=mode, align_corners=align_corners,
                         recompute_scale_factor=False)


def tile(x, repeats):
    return x.repeat(*[int(r) for r in _as_list(repeats)])


def range_(start, limit, delta):
    if all(isinstance(v, int) for v in (start, limit, delta)):
        return list(range(start, limit, delta))
    return torch.arange(start, limit, delta)


# -- leaves for torch.fx --------------------------------------------------------------------------
# torch.load of a GraphModule traces its generated code again (fx's KeepModules tracer); these
# helpers run Python logic on shapes and cannot be traced through, so each one, called with an fx
# Proxy, records itself as one call instead (what torch.fx.wrap does for a module's globals,
# which does not reach the globals of a GraphModule's generated code).
def _leaf(fn):
    import functools

    from torch import fx

    @functools.wraps(fn)
    def helper(*args, **kwargs):
        for a in (*args, *kwargs.values(), *(x for a in args if isinstance(a, (list, tuple)) for x in a)):
            if isinstance(a, fx.Proxy):
                return a.tracer.create_proxy("call_function", helper, args, kwargs)
        return fn(*args, **kwargs)

    return helper


def _wrap_helpers(names: dict) -> None:
    import types

    for key, value in list(names.items()):
        if isinstance(value, types.FunctionType) and value.__module__ == __name__ and not key.startswith("_"):
            names[key] = _leaf(value)


_wrap_helpers(globals())
