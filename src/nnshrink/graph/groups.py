"""Producer -> consumer edges and channel dependency groups, from a torch.fx graph.

A structural edit (channel pruning) that removes output channel ``c`` of a conv must also remove
input channel ``c`` of every consumer, the batch-norm entry ``c``, the depthwise filter ``c`` and,
across a residual add, channel ``c`` of every other branch of the add. This module finds those
sets. Each tensor in the graph gets a *layout*: its channel axis (axis 1) as a list of segments,
each segment a run of channels that belongs to one channel space. Ops either pass the layout on
(ReLU, pooling, batch norm, depthwise conv), create a new space (conv, transposed conv, linear),
join spaces (a residual add unites them), or lay segments side by side (concatenation). A Linear
over a token sequence ``(N, T, C)`` puts its channels on the last axis; only elementwise ops, adds
and concatenations along that axis pass them on. A space that reaches an op this module does not
understand is marked not prunable, with the op named as the reason, rather than guessed at.

Attention is followed through its heads: a reshape of a token sequence ``(N, T, C)`` into
``(N, T, h, C/h)`` splits a space into ``h`` heads, transposes and permutes move the head and
head-channel axes, ``q @ k^T`` ties the query and key spaces (their channels are summed over, head
by head), ``scores @ v`` (or ``scaled_dot_product_attention``) ties the value space to them head
by head, softmax and elementwise ops over the scores pass, and the reshape back to ``(N, T, C)``
hands the value channels to the output projection. Such a group is pruned in whole heads
(``block``: the channels of one): every head keeps its own channels, so the query-key scaling and
each head's width stay what the model was trained with, and only the head count in the split and
merge reshapes changes (``rewrites``; :func:`nnshrink.techniques.channels.prune_group` edits them in
the model's torch.fx graph).
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import fx, nn

from nnshrink.graph.analysis import is_compressible
from nnshrink.graph.fx import shape_propagate, trace

# Ops that keep every channel where it is (elementwise over channels, or spatial only).
_PASS_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Sigmoid,
    nn.Tanh, nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.ZeroPad2d,
    nn.ConstantPad1d, nn.ConstantPad2d, nn.ReflectionPad2d, nn.Upsample,
)
_PASS_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish,
    F.hardsigmoid, F.hardtanh, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, torch.clamp,
    torch.clip, F.dropout, F.max_pool1d, F.max_pool2d, F.avg_pool1d, F.avg_pool2d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d, F.pad, F.interpolate,
    torch.abs, torch.neg, torch.exp,
}
_PASS_METHODS = {
    "relu", "relu_", "sigmoid", "tanh", "clamp", "clip", "contiguous", "clone", "detach",
    "float", "to", "abs", "neg", "exp",
}
# Of those, the ones that act on each element alone (they pass channels on the last axis too).
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
    nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.Identity, nn.Dropout, nn.AlphaDropout,
)
_ELEMENTWISE_FUNCTIONS = {
    torch.relu, torch.relu_, F.relu, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu, F.hardswish, F.hardsigmoid,
    F.hardtanh, torch.sigmoid, torch.tanh, F.sigmoid, F.tanh, torch.clamp, torch.clip, F.dropout, torch.abs,
    torch.neg, torch.exp,
}
_ELEMENTWISE_METHODS = _PASS_METHODS
_BINARY = {operator.add, operator.sub, operator.mul, operator.truediv, torch.add, torch.sub,
           torch.mul, torch.div, operator.iadd, operator.imul}
_BINARY_METHODS = {"add", "sub", "mul", "div", "add_", "mul_"}
_CAT = {torch.cat, torch.concat}
_RESHAPE_FUNCTIONS = {torch.flatten, torch.reshape}
_RESHAPE_METHODS = {"flatten", "view", "reshape"}
_REDUCE_FUNCTIONS = {torch.mean, torch.amax, torch.sum}
_REDUCE_METHODS = {"mean", "amax", "sum"}
_SQUEEZE_METHODS = {"squeeze", "unsqueeze"}
_SQUEEZE_FUNCTIONS = {torch.squeeze, torch.unsqueeze}


@dataclass(frozen=True)
class Consumer:
    """A layer reading a channel group: ``layer`` input channels ``offset .. offset+channels``.

    ``width`` is how many input features each channel feeds (the spatial size when a feature
    map is flattened into a linear layer, else 1).
    """

    layer: str
    offset: int
    width: int = 1


@dataclass
class ChannelGroup:
    """Channels that must be removed together.

    Attributes:
        id: Stable index of the group.
        channels: Number of channels in the group.
        producers: ``(layer, offset)`` pairs: output channels ``offset ..`` of that layer.
        consumers: Layers that read the group.
        members: Modules sliced along with the group (batch norms, depthwise convs).
        couplings: Why several layers are tied: ``residual``, ``concat``, ``batchnorm``,
            ``depthwise``, ``grouped``, ``attention``.
        prunable: False when a structural edit must leave the group alone.
        reason: Why the group is not prunable.
        block: Channels removed together: an attention head's (1 for any other group).
        rewrites: ``(kind, node)``: the torch.fx nodes whose sizes change with the head count,
            ``split`` (into heads), ``merge`` (back to a token sequence) or ``parts`` (a fused
            projection's ``split`` into q, k and v).
        products: MACs per sample of the attention products over the group's channels (``q @ k^T``,
            ``scores @ v``), which shrink with the heads kept.
    """

    id: int
    channels: int
    producers: list[tuple[str, int]] = field(default_factory=list)
    consumers: list[Consumer] = field(default_factory=list)
    members: list[str] = field(default_factory=list)
    couplings: set[str] = field(default_factory=set)
    prunable: bool = True
    reason: str | None = None
    block: int = 1
    rewrites: list[tuple[str, str]] = field(default_factory=list)
    products: int = 0

    def to_dict(self) -> dict:
        out = {"id": self.id, "channels": self.channels,
               "producers": [{"layer": n, "offset": o} for n, o in self.producers],
               "consumers": [c.__dict__ for c in self.consumers], "members": self.members,
               "couplings": sorted(self.couplings), "prunable": self.prunable, "reason": self.reason}
        if self.block > 1:
            out["heads"] = self.channels // self.block
            out["head_channels"] = self.block
        return out


@dataclass(frozen=True)
class DependencyGraph:
    """Edges between compressible layers and the channel groups of a model."""

    edges: tuple[tuple[str, str], ...]
    groups: tuple[ChannelGroup, ...]

    def group_of(self, layer: str) -> ChannelGroup | None:
        """The group holding the output channels of ``layer`` (None if it produces none)."""
        for g in self.groups:
            if any(n == layer for n, _ in g.producers):
                return g
        return None

    def to_dict(self) -> dict:
        return {"edges": [list(e) for e in self.edges], "groups": [g.to_dict() for g in self.groups]}


class _Spaces:
    """Union-find over channel spaces, each with a size, members and a blocked reason."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.size: list[int] = []
        self.info: list[dict] = []

    def new(self, size: int, reason: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.size.append(size)
        self.info.append({"producers": [], "consumers": [], "members": [], "couplings": set(),
                          "reason": reason, "rewrites": [], "products": 0, "block": 1})
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int, coupling: str) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            self.info[ra]["couplings"].add(coupling)
            return
        self.parent[rb] = ra
        ia, ib = self.info[ra], self.info[rb]
        for key in ("producers", "consumers", "members", "rewrites"):
            ia[key].extend(ib[key])
        ia["couplings"] |= ib["couplings"] | {coupling}
        ia["reason"] = ia["reason"] or ib["reason"]
        ia["products"] += ib["products"]
        if ia["block"] != ib["block"] and 1 not in (ia["block"], ib["block"]):
            ia["reason"] = ia["reason"] or "joined attention heads differ in width"
        ia["block"] = max(ia["block"], ib["block"])
        if self.size[ra] != self.size[rb]:
            ia["reason"] = ia["reason"] or "joined channel spaces differ in size"

    def get(self, i: int) -> dict:
        return self.info[self.find(i)]

    def block(self, i: int, reason: str) -> None:
        info = self.get(i)
        info["reason"] = info["reason"] or reason


# A layout: the channel axis as segments (space id, length), plus the features per channel;
# ``last``: the channels are the last axis (a Linear over a token sequence, ``(N, T, C)``), not axis 1.
# ``heads`` > 0: the channels split into that many attention heads, on axis ``head_axis``, each
# head's channels on axis ``dim_axis`` (None: summed over, as in attention scores).
@dataclass(frozen=True)
class _Layout:
    segments: tuple[tuple[int, int], ...]
    width: int = 1
    last: bool = False
    heads: int = 0
    head_axis: int = -1
    dim_axis: int | None = None
    parts_axis: int | None = None  # a fused q/k/v projection split into heads: the axis of its parts (segments)


def _target_name(node: fx.Node) -> str:
    t = node.target
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


def build_dependency_graph(model: nn.Module, example_input: torch.Tensor | tuple) -> DependencyGraph:
    """Find producer -> consumer edges and channel groups of ``model``.

    Raises:
        UnsupportedModelError: torch.fx cannot trace the model.
        InputShapeError: The model cannot run on ``example_input``.
    """
    gm = trace(model)
    shape_propagate(gm, example_input)
    spaces = _Spaces()
    layouts: dict[fx.Node, _Layout | None] = {}
    modules = dict(gm.named_modules())

    def layout_of(arg: object) -> _Layout | None:
        return layouts.get(arg) if isinstance(arg, fx.Node) else None

    def block_layout(lay: _Layout | tuple | None, reason: str) -> None:
        for one in (lay if isinstance(lay, tuple) else (lay,)):  # (the pieces of a split)
            if one is not None:
                for sid, _ in one.segments:
                    spaces.block(sid, reason)

    def fresh(node: fx.Node, reason: str | None, last: bool = False) -> _Layout | None:
        shape = node.meta.get("shape")
        if not shape or len(shape) < 2:
            return None
        last = last and len(shape) > 2
        channels = shape[-1] if last else shape[1]
        return _Layout(((spaces.new(channels, reason), channels),), last=last)

    made: dict[str, int] = {}  # layer -> the space its first call made
    read: dict[str, _Layout] = {}  # layer -> what its first call read

    def produce(layer: str, out: _Layout) -> None:
        """A layer's output channels; a layer called again makes the same channels (pruning it
        prunes every call): its spaces are one."""
        sid = out.segments[0][0]
        if layer in made:
            spaces.union(made[layer], sid, "shared")
        else:
            made[layer] = sid
            spaces.get(sid)["producers"].append((layer, 0))

    def consume(layer: str, lay: _Layout | None, node: fx.Node) -> None:
        if lay is None:
            shape = _shape(node.args[0])
            channels = shape[1] if shape and len(shape) > 1 else 0
            sid = spaces.new(channels, "input channels come from an op that is not tracked")
            lay = _Layout(((sid, channels),))
        offset = 0
        for sid, length in lay.segments:
            spaces.get(sid)["consumers"].append(Consumer(layer, offset * lay.width, lay.width))
            offset += length
        # a layer called again reads the same input channels: narrowing one call's narrows them all
        seen = read.setdefault(layer, lay)
        if seen is not lay:
            if [n for _, n in seen.segments] == [n for _, n in lay.segments] and seen.width == lay.width:
                for (a, _), (b, _) in zip(seen.segments, lay.segments):
                    spaces.union(a, b, "shared")
            else:
                block_layout(seen, f"{layer}: called on differently split channels")
                block_layout(lay, f"{layer}: called on differently split channels")

    for node in gm.graph.nodes:
        shape = node.meta.get("shape")
        if node.op == "placeholder":
            layouts[node] = fresh(node, "channels of the model input")
            continue
        if node.op == "get_attr":
            layouts[node] = None
            continue
        if node.op == "output":
            for arg in node.all_input_nodes:
                block_layout(layout_of(arg), "channels of the model output")
            continue
        pieces = layout_of(node.args[0]) if node.args else None
        if isinstance(pieces, tuple):  # the pieces of a split: an index picks one, anything else blocks them
            if node.target is operator.getitem and isinstance(node.args[1], int):
                layouts[node] = pieces[node.args[1]]
            else:
                block_layout(pieces, f"{_target_name(node)}: the pieces of a split reach an op that is not tracked")
                layouts[node] = None
            continue
        for arg in node.all_input_nodes[1:]:
            if isinstance(layouts.get(arg), tuple):
                block_layout(layouts[arg], f"{_target_name(node)}: the pieces of a split reach an op that is not tracked")
                layouts[arg] = None
        inputs = [layout_of(a) for a in node.all_input_nodes]
        first = layout_of(node.args[0]) if node.args else None
        rule = _rule(node, modules)
        if first is not None and first.last and not first.heads and (
                _method(node, "split", "chunk") or node.target in (torch.split, torch.chunk) or rule == "split"):
            layouts[node] = _split_last(node, first, spaces)
            if layouts[node] is None:
                block_layout(first, f"{_target_name(node)}: channels on the last axis reach an op that is not tracked there")
            continue
        if any(lay is not None and lay.heads for lay in inputs):
            layouts[node] = _attention(node, rule, layouts, spaces, block_layout, modules)
            continue
        if first is not None and first.last and rule == "reshape":
            layouts[node] = _split_heads(node, first, spaces)
            if layouts[node] is None:
                block_layout(first, f"{_target_name(node)}: channels on the last axis reach an op that is not tracked there")
            continue
        if first is not None and first.last and rule not in ("compressible", "binary", "cat", "elementwise", "shape"):
            # channels on the last axis: only what leaves that axis alone passes them on (a
            # batch norm, a pooling, a reshape read axis 1 as channels, or mix the last); every
            # input of such an op (attention's query, key and value) is blocked
            for lay in inputs:
                block_layout(lay, f"{_target_name(node)}: channels on the last axis reach an op that is not tracked there")
            layouts[node] = None
            continue
        if rule == "compressible":
            mod = modules[node.target]
            kind_in = first
            if isinstance(mod, nn.Linear) and first is not None and first.width == 1 and not first.last:
                in_shape = node.args[0].meta.get("shape")
                if in_shape is not None and len(in_shape) != 2:
                    block_layout(first, f"{node.target}: linear layer over a non-channel axis")
                    kind_in = None
            elif not isinstance(mod, nn.Linear) and first is not None and first.last:
                block_layout(first, f"{node.target}: a conv reads axis 1 as channels, which come on the last axis")
                kind_in = first = None
            if isinstance(mod, nn.Linear):  # a Linear over a token sequence: its channels are the last axis
                consume(node.target, kind_in, node)
                out = fresh(node, None, last=True)
                if out is not None:
                    produce(node.target, out)
                layouts[node] = out
                continue
            groups = getattr(mod, "groups", 1)
            if groups > 1 and groups == mod.in_channels == mod.out_channels and first is not None:
                for sid, _ in first.segments:
                    info = spaces.get(sid)
                    info["members"].append(node.target)
                    info["couplings"].add("depthwise")
                layouts[node] = first
                continue
            consume(node.target, kind_in, node)
            if groups > 1 and first is not None:
                for sid, _ in first.segments:
                    spaces.get(sid)["couplings"].add("grouped")
                    spaces.block(sid, f"{node.target}: grouped conv (groups={groups}) input")
            out = fresh(node, None)
            if out is not None:
                produce(node.target, out)
                if groups > 1:
                    spaces.get(out.segments[0][0])["couplings"].add("grouped")
                    spaces.block(out.segments[0][0], f"{node.target}: grouped conv (groups={groups}) output")
            layouts[node] = out
        elif rule in ("batchnorm", "prelu"):
            if first is not None:
                if len(first.segments) > 1:  # one module's per-channel values over a concatenation
                    block_layout(first, f"{node.target}: per-channel values over concatenated groups are not tracked")
                for sid, _ in first.segments:
                    info = spaces.get(sid)
                    info["members"].append(node.target)
                    info["couplings"].add(rule)
            layouts[node] = first
        elif rule in ("pass", "elementwise"):
            layouts[node] = first
        elif rule == "transposed":  # ConvTranspose: reads input channels (weight axis 0), makes its own
            consume(node.target, first, node)
            out = fresh(node, None)
            if out is not None:
                produce(node.target, out)
            layouts[node] = out
        elif rule == "binary":
            layouts[node] = _binary(node, layouts, spaces, block_layout)
        elif rule == "cat":
            layouts[node] = _concat(node, layouts, spaces, block_layout)
        elif rule == "reshape":
            layouts[node] = _reshape(node, first, block_layout)
        elif rule == "reduce":
            in_shape = _shape(node.args[0])
            layouts[node] = first if (shape and len(shape) >= 2 and in_shape and shape[1] == in_shape[1]
                                      and shape[0] == in_shape[0]) else None
            if layouts[node] is None:
                block_layout(first, f"reduction over channels in {_target_name(node)}")
        elif rule == "shape":  # a size; a tensor attribute (x.T, x.mT) is not tracked
            if shape is not None:
                for lay in inputs:
                    block_layout(lay, f"{_target_name(node)}: passes through an op that is not tracked")
            layouts[node] = None
        else:
            for lay in inputs:
                block_layout(lay, f"passes through an op that is not tracked: {_target_name(node)}")
            layouts[node] = None

    for i, info in enumerate(spaces.info):  # a fused projection split into parts: its output used whole too?
        if info.get("parts") and (spaces.find(i) != i or info["consumers"] or info["members"] or info["reason"]
                                  or info["producers"]):
            for piece in info["parts"]:
                spaces.block(piece, "the fused projection's output is also used whole")
        elif info.get("parts") and len({spaces.find(p) for p in info["parts"]}) > 1:
            # one slice of the layer, one split or reshape: its parts must lose the same channels
            for piece in info["parts"]:
                spaces.block(piece, "the parts of a fused projection end in different groups")
    return _collect(spaces)


def _partition(spaces: _Spaces, lay: _Layout, sizes: list[int]) -> list[int] | None:
    """Split the one space of ``lay`` (a fused projection's output, used by nothing else yet) into
    spaces of ``sizes`` channels, each produced by the layer at its offset; None if it cannot be."""
    if len(lay.segments) != 1 or lay.width != 1:
        return None
    sid = lay.segments[0][0]
    info = spaces.info[sid]
    if spaces.find(sid) != sid or len(info["producers"]) != 1 or info["consumers"] or info["members"] \
            or info["reason"] or info.get("parts") or sum(sizes) != spaces.size[sid]:
        return None
    layer, offset = info["producers"].pop()
    pieces, start = [], 0
    for size in sizes:
        piece = spaces.new(size)
        spaces.info[piece]["producers"].append((layer, offset + start))
        pieces.append(piece)
        start += size
    info["parts"] = pieces
    return pieces


def _split_last(node: fx.Node, first: _Layout, spaces: _Spaces) -> tuple | None:
    """``split``/``chunk`` of a token sequence along its channels (a fused q/k/v projection cut
    into its parts): one layout per piece."""
    shape = _shape(node.args[0])
    if not shape:
        return None
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    if not isinstance(dim, int) or dim % len(shape) != len(shape) - 1:
        return None
    total = shape[-1]
    arg = node.args[1] if len(node.args) > 1 else node.kwargs.get("split_size_or_sections", node.kwargs.get("chunks"))
    if _target_name(node) == "chunk":
        if not isinstance(arg, int) or arg < 1:
            return None
        size = -(-total // arg)
        sizes = [min(size, total - i) for i in range(0, total, size)]
    elif isinstance(arg, int) and arg > 0:
        sizes = [min(arg, total - i) for i in range(0, total, arg)]
    elif isinstance(arg, (list, tuple)) and all(isinstance(v, int) for v in arg):
        sizes = list(arg)
    else:
        return None
    if len(set(sizes)) != 1:  # parts of unequal widths cannot be one group of heads
        return None
    pieces = _partition(spaces, first, sizes)
    if pieces is None:
        return None
    if _target_name(node) == "split":  # its sizes change with the heads kept
        for piece in pieces:
            spaces.info[piece]["rewrites"].append(("parts", node.name))
    return tuple(_Layout(((p, n),), last=True) for p, n in zip(pieces, sizes))


_MATMULS = {torch.matmul, operator.matmul}
_SOFTMAX = {torch.softmax, F.softmax, torch.log_softmax, F.log_softmax}
_TRANSPOSE = {torch.transpose, torch.permute, torch.swapaxes}


def _shape(arg: object) -> tuple | None:
    return arg.meta.get("shape") if isinstance(arg, fx.Node) else None


def _channel_axes(lay: _Layout, nd: int) -> list[int]:
    """The axes of a rank-``nd`` tensor along which ``lay``'s channels lie: axis 1, the last axis
    of a token sequence, or the head and head-channel axes of channels split into heads."""
    if lay.heads:
        return [a for a in (lay.head_axis, lay.dim_axis) if a is not None]
    return [nd - 1 if lay.last else 1]


def _varies_along(shape: tuple, nd: int, axes: list[int]) -> bool:
    """Whether an operand of ``shape``, broadcast (right-aligned) to rank ``nd``, holds more than
    one value along any of ``axes``: a per-channel (per-head) operand, which pruning would have
    to slice too."""
    return any(0 <= (k := axis - (nd - len(shape))) < len(shape) and shape[k] > 1 for axis in axes)


def reshape_sizes(node: fx.Node):
    """``(sizes, write)``: the sizes a reshape node asks for, as a list, and a function that puts
    new ones in their place: ``x.reshape(...)``/``x.view(...)`` (varargs, one sequence or a
    keyword), ``torch.reshape`` and the ONNX importer's Reshape with a constant shape. None where
    the node is no reshape, or its sizes are not a list in the graph (a shape tensor)."""
    name = _target_name(node)
    if node.op == "call_method" and name in ("reshape", "view"):
        rest = list(node.args[1:])
        if not rest:
            key = next((k for k in ("shape", "size") if k in node.kwargs), None)
            if key is None or not isinstance(node.kwargs[key], (list, tuple)):
                return None

            def write_kw(sizes):
                node.kwargs = {**node.kwargs, key: tuple(sizes)}

            return list(node.kwargs[key]), write_kw
        if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
            def write_one(sizes):
                node.args = (node.args[0], tuple(sizes))

            return list(rest[0]), write_one
        if len(rest) == 1 and isinstance(rest[0], fx.Node):  # x.reshape(shape_tensor)
            return None

        def write_var(sizes):
            node.args = (node.args[0], *sizes)

        return rest, write_var
    if node.op == "call_function" and name == "reshape" and (
            node.target is torch.reshape or getattr(node.target, "_nnshrink_channel_rule", None) == "reshape"):
        shape = node.args[1] if len(node.args) > 1 else node.kwargs.get("shape")
        if not isinstance(shape, (list, tuple)):
            return None

        def write_fn(sizes):
            new = list(sizes) if isinstance(shape, list) else tuple(sizes)
            if len(node.args) > 1:
                node.args = (node.args[0], new, *node.args[2:])
            else:
                node.kwargs = {**node.kwargs, "shape": new}

        return list(shape), write_fn
    return None


def _sizes(node: fx.Node) -> list | None:
    """The sizes of a reshape node, one per axis of its output (else None: not rewritable)."""
    found = reshape_sizes(node)
    shape = node.meta.get("shape")
    return found[0] if found and shape is not None and len(found[0]) == len(shape) else None


def _into_heads(spaces: _Spaces, sid: int, node: fx.Node, width: int) -> None:
    """Record that ``node`` splits space ``sid`` into heads of ``width`` channels."""
    info = spaces.get(sid)
    info["rewrites"].append(("split", node.name))
    if info["block"] not in (1, width):
        spaces.block(sid, "the same channels split into heads of different widths")
    info["block"] = width
    info["couplings"].add("attention")


def _split_heads(node: fx.Node, first: _Layout, spaces: _Spaces) -> _Layout | None:
    """A token sequence ``(.., C)`` reshaped to ``(.., h, C/h)``: one space split into heads; or
    a fused projection's ``(.., 3C)`` to ``(.., 3, h, C/h)``: its parts, each split into heads."""
    in_shape, out_shape = _shape(node.args[0]), node.meta.get("shape")
    if in_shape and out_shape and len(out_shape) == len(in_shape) + 2 and _sizes(node) is not None \
            and tuple(out_shape[:-3]) == tuple(in_shape[:-1]) and out_shape[-3] >= 2 and out_shape[-2] >= 2 \
            and math.prod(out_shape[-3:]) == in_shape[-1]:
        parts = out_shape[-3]
        pieces = _partition(spaces, first, [in_shape[-1] // parts] * parts)
        if pieces is None:
            return None
        for piece in pieces:
            _into_heads(spaces, piece, node, out_shape[-1])
        nd = len(out_shape)
        return _Layout(tuple((p, in_shape[-1] // parts) for p in pieces), heads=out_shape[-2], head_axis=nd - 2,
                       dim_axis=nd - 1, parts_axis=nd - 3)
    if not in_shape or not out_shape or len(first.segments) != 1 or first.width != 1 \
            or len(out_shape) != len(in_shape) + 1 or tuple(out_shape[:-2]) != tuple(in_shape[:-1]) \
            or _sizes(node) is None or out_shape[-2] < 2 or out_shape[-2] * out_shape[-1] != in_shape[-1]:
        return None
    _into_heads(spaces, first.segments[0][0], node, out_shape[-1])
    nd = len(out_shape)
    return _Layout(first.segments, heads=out_shape[-2], head_axis=nd - 2, dim_axis=nd - 1)


def _attention(node: fx.Node, rule: str, layouts: dict, spaces: _Spaces, block_layout,
               modules: dict[str, nn.Module]) -> _Layout | None:
    """An op on channels split into attention heads (see the module's docstring)."""
    lays = [layouts.get(a) for a in node.all_input_nodes]
    name = _target_name(node)
    target = node.target
    first = layouts.get(node.args[0]) if node.args and isinstance(node.args[0], fx.Node) else None
    out_shape = node.meta.get("shape")

    def stop(why: str) -> None:
        for lay in lays:
            block_layout(lay, f"{name}: {why}")

    if rule == "shape":  # a size; a tensor attribute (k.mT) is not tracked
        return stop("heads of attention reach an op that is not tracked") if out_shape is not None else None
    if first is not None and first.parts_axis is not None:  # a fused projection's parts, split into heads
        return _parts(node, first, stop, rule)
    if rule == "elementwise" and first is not None:
        return first
    if _method(node, "masked_fill") and first is not None and len(node.args) > 1:  # a mask: as an operand of a binary
        mask = _shape(node.args[1])
        if mask and out_shape and _varies_along(mask, len(out_shape), _channel_axes(first, len(out_shape))):
            return stop("a per-head mask is not tracked")
        return first
    if first is not None and first.heads and _moves_axes(node, rule):
        where = _axis_map(node, rule)
        if where is None:
            return stop("a transpose whose axes are not read")
        return _Layout(first.segments, heads=first.heads, head_axis=where[first.head_axis],
                       dim_axis=None if first.dim_axis is None else where[first.dim_axis],
                       parts_axis=None if first.parts_axis is None else where[first.parts_axis])
    if rule == "softmax" or target in _SOFTMAX or _method(node, "softmax", "log_softmax"):
        if rule == "softmax" and node.op == "call_module":  # nn.Softmax
            dim = modules[target].dim
        else:  # (the ONNX importer's softmax(x, axis, log, legacy): legacy flattens from the axis on)
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            if rule == "softmax" and len(node.args) > 3 and node.args[3] and out_shape and isinstance(dim, int) \
                    and dim % len(out_shape) != len(out_shape) - 1:
                return stop("softmax over a flattened tail")
        if first is None or not isinstance(dim, int) or not out_shape:
            return stop("softmax over an axis that is not tracked")
        dim %= len(out_shape)
        if dim in (first.head_axis, first.dim_axis):
            return stop("softmax across heads or a head's channels")
        return first
    if target in _MATMULS or _method(node, "matmul") or rule == "matmul" or target is F.scaled_dot_product_attention:
        return _attention_product(node, layouts, spaces, stop)
    if rule == "binary":
        return _binary(node, layouts, spaces, block_layout)
    if rule == "reshape" and first is not None and first.heads and first.dim_axis is not None:
        in_shape = _shape(node.args[0])
        nd = len(in_shape) if in_shape else 0
        if out_shape and first.head_axis == nd - 2 and first.dim_axis == nd - 1 and len(out_shape) == nd - 1 \
                and tuple(out_shape[:-1]) == tuple(in_shape[:-2]) and out_shape[-1] == in_shape[-2] * in_shape[-1]:
            if _sizes(node) is not None:
                spaces.get(first.segments[0][0])["rewrites"].append(("merge", node.name))
            elif _target_name(node) != "flatten":  # (a flatten takes its size from its input)
                return stop("the merge of heads takes its sizes from elsewhere")
            return _Layout(first.segments, last=True)
    return stop("heads of attention reach an op that is not tracked")


def _method(node: fx.Node, *names: str) -> bool:
    return node.op == "call_method" and node.target in names


def _moves_axes(node: fx.Node, rule: str) -> bool:
    return node.target in _TRANSPOSE or _method(node, "transpose", "permute", "swapaxes") or rule == "transpose"


def _axis_map(node: fx.Node, rule: str) -> dict[int, int] | None:
    """Old axis -> new axis of a transpose or permute (an ONNX Transpose: a perm), None where its
    axes are not plain integers covering every axis."""
    out_shape = node.meta.get("shape")
    nd = len(out_shape) if out_shape else 0
    swap = node.target in (torch.transpose, torch.swapaxes) or _method(node, "transpose", "swapaxes")
    if swap:
        dims = list(node.args[1:3]) + [node.kwargs[k] for k in ("dim0", "dim1") if k in node.kwargs]
        if len(dims) != 2 or not all(isinstance(d, int) for d in dims) or not nd:
            return None
        a, b = (d % nd for d in dims)
        order = list(range(nd))
        order[a], order[b] = order[b], order[a]
    else:
        dims = list(node.args[1:]) or [node.kwargs.get("dims", node.kwargs.get("perm"))]
        order = list(dims[0]) if len(dims) == 1 and isinstance(dims[0], (tuple, list)) else dims
        if not nd or not all(isinstance(d, int) for d in order) or sorted(d % nd for d in order) != list(range(nd)):
            return None
        order = [d % nd for d in order]
    return {old: new for new, old in enumerate(order)}


def _parts(node: fx.Node, first: _Layout, stop, rule: str = "") -> _Layout | tuple | None:
    """An op on a fused projection's parts, split into heads: a transpose or permute (their axes
    move), ``unbind`` along the parts (one layout per part), an index of the parts axis when it
    leads, an elementwise op; anything else blocks them."""
    target = node.target
    if rule == "elementwise":
        return first
    if _moves_axes(node, rule):
        where = _axis_map(node, rule)
        if where is None:
            return stop("a transpose whose axes are not read")
        return _Layout(first.segments, heads=first.heads, head_axis=where[first.head_axis],
                       dim_axis=where[first.dim_axis], parts_axis=where[first.parts_axis])

    def piece(i: int) -> _Layout:
        down = lambda a: a - 1 if a > first.parts_axis else a  # noqa: E731
        return _Layout((first.segments[i],), heads=first.heads, head_axis=down(first.head_axis),
                       dim_axis=down(first.dim_axis))

    if _method(node, "unbind") or target is torch.unbind:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        nd = len(_shape(node.args[0]) or ())
        if isinstance(dim, int) and nd and dim % nd == first.parts_axis:
            return tuple(piece(i) for i in range(len(first.segments)))
    if target is operator.getitem and isinstance(node.args[1], int) and first.parts_axis == 0:
        return piece(node.args[1])
    return stop("the parts of a fused projection reach an op that is not tracked")


def _attention_product(node: fx.Node, layouts: dict, spaces: _Spaces, stop) -> _Layout | None:
    """``q @ k^T`` (channels contracted head by head: q and k tied), ``scores @ v`` (v tied to the
    scores head by head), or ``scaled_dot_product_attention(q, k, v)``."""
    args = [a for a in node.args[:3] if isinstance(a, fx.Node)]
    lays = [layouts.get(a) for a in args]
    shapes = [_shape(a) for a in args]
    out_shape = node.meta.get("shape")
    if any(lay is None or not lay.heads for lay in lays) or not out_shape or any(s is None for s in shapes) \
            or len({(lay.heads, lay.head_axis) for lay in lays}) != 1 or lays[0].head_axis >= len(out_shape) - 2:
        return stop("attention product of operands that are not all split into the same heads")
    nd = len(out_shape)
    per_sample = math.prod(out_shape[1:])

    def tie(others: list[_Layout], macs: int) -> None:  # one space, with the product's MACs
        for lay in others:
            spaces.union(lays[0].segments[0][0], lay.segments[0][0], "attention")
        spaces.get(lays[0].segments[0][0])["products"] += macs

    if node.target is F.scaled_dot_product_attention:
        if len(lays) != 3 or any(lay.dim_axis != nd - 1 for lay in lays):
            return stop("scaled_dot_product_attention of operands whose channels are not last")
        mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
        mask_shape = _shape(mask)
        if mask_shape is not None and (_varies_along(mask_shape, nd, [lays[0].head_axis]) or layouts.get(mask) is not None):
            return stop("a per-head attention mask is not tracked")  # ((N, h, T, S), broadcast)
        tie(lays[1:], 2 * per_sample * shapes[1][-2])  # q k^T and scores v, each (T x S) per head and channel
        return lays[2]
    a, b = lays
    if a.dim_axis == nd - 1 and b.dim_axis == nd - 2:  # q @ k^T: channels summed over
        tie([b], per_sample * shapes[0][-1])
        return _Layout(a.segments, heads=a.heads, head_axis=a.head_axis, dim_axis=None)
    if a.dim_axis is None and b.dim_axis == nd - 1:  # scores @ v: v's channels go on, head by head
        tie([b], per_sample * shapes[0][-1])
        return b
    return stop("attention product over axes that are not tracked")


def _rule(node: fx.Node, modules: dict[str, nn.Module]) -> str:
    if node.op == "call_module":
        mod = modules[node.target]
        if is_compressible(mod):
            return "compressible"
        if isinstance(mod, nn.modules.batchnorm._BatchNorm):
            return "batchnorm"
        if isinstance(mod, nn.PReLU) and mod.num_parameters > 1:  # a slope per channel: sliced with them
            return "prelu"
        if isinstance(mod, _ELEMENTWISE_MODULES):
            return "elementwise"
        if isinstance(mod, _PASS_MODULES):
            return "pass"
        if isinstance(mod, (nn.ConvTranspose1d, nn.ConvTranspose2d)) and mod.groups == 1:
            return "transposed"
        if isinstance(mod, nn.Flatten):
            return "reshape"
        if isinstance(mod, (nn.Softmax, nn.LogSoftmax)):
            return "softmax"
        return "unknown"
    target = node.target
    if node.op == "call_function":
        custom = getattr(target, "_nnshrink_channel_rule", None)
        if custom:
            return custom
        if target in _ELEMENTWISE_FUNCTIONS:
            return "elementwise"
        if target in _PASS_FUNCTIONS:
            return "pass"
        if target in _BINARY:
            return "binary"
        if target in _CAT:
            return "cat"
        if target in _RESHAPE_FUNCTIONS:
            return "reshape"
        if target in _REDUCE_FUNCTIONS:
            return "reduce"
        if target in _SQUEEZE_FUNCTIONS:
            return "reshape"
        if target is getattr:
            return "shape"
        return "unknown"
    if node.op == "call_method":
        if target in _ELEMENTWISE_METHODS:
            return "elementwise"
        if target in _BINARY_METHODS:
            return "binary"
        if target in _RESHAPE_METHODS or target in _SQUEEZE_METHODS:
            return "reshape"
        if target in _REDUCE_METHODS:
            return "reduce"
        if target in ("size", "dim"):
            return "shape"
    return "unknown"


def _binary(node: fx.Node, layouts: dict, spaces: _Spaces, block_layout) -> _Layout | None:
    out_shape = node.meta.get("shape")
    tensor_args = [a for a in node.args[:2] if isinstance(a, fx.Node) and a.meta.get("shape") is not None]
    lays = [(a, layouts.get(a)) for a in tensor_args]
    with_layout = [lay for _, lay in lays if lay is not None]
    if not with_layout:
        return None
    base = with_layout[0]
    for arg, lay in lays:
        if lay is None:
            shape = arg.meta.get("shape")
            # a broadcast operand with its own value per channel would need slicing too (shapes
            # broadcast right-aligned: a (C,) scale on (N, T, C), a (C, 1, 1) one on (N, C, H, W);
            # per head, or per head and channel, where the channels are split into heads)
            if shape and out_shape and _varies_along(shape, len(out_shape), _channel_axes(base, len(out_shape))):
                block_layout(base, f"per-channel operand in {_target_name(node)} is not tracked")
            continue
        if lay is base:
            continue
        if [n for _, n in lay.segments] == [n for _, n in base.segments] and lay.width == base.width \
                and lay.last == base.last and (lay.heads, lay.head_axis, lay.dim_axis) == (base.heads, base.head_axis, base.dim_axis):
            for (a, _), (b, _) in zip(base.segments, lay.segments):
                spaces.union(a, b, "residual")
        else:
            block_layout(base, f"{_target_name(node)} joins differently split channels")
            block_layout(lay, f"{_target_name(node)} joins differently split channels")
    return base


def _concat(node: fx.Node, layouts: dict, spaces: _Spaces, block_layout) -> _Layout | None:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    lays = [layouts.get(t) if isinstance(t, fx.Node) else None for t in tensors]
    out_shape = node.meta.get("shape")
    if out_shape is not None and dim < 0:
        dim += len(out_shape)
    last = bool(lays) and all(lay is not None and lay.last for lay in lays)
    axis = len(out_shape) - 1 if last and out_shape is not None else 1
    if dim != axis or any(lay is None or lay.width != 1 or lay.last != last for lay in lays):
        for lay in lays:
            block_layout(lay, f"concatenation along axis {dim} is not tracked")
        return None
    segments = tuple(seg for lay in lays for seg in lay.segments)
    for sid, _ in segments:
        spaces.get(sid)["couplings"].add("concat")
    return _Layout(segments, last=last)


def _reshape(node: fx.Node, first: _Layout | None, block_layout) -> _Layout | None:
    in_node = node.args[0]
    in_shape = _shape(in_node)
    out_shape = node.meta.get("shape")
    if first is None or not in_shape or not out_shape:
        return None
    if len(in_shape) >= 2 and len(out_shape) == 2 and out_shape[0] == in_shape[0] \
            and out_shape[1] == math.prod(in_shape[1:]):
        return _Layout(first.segments, first.width * math.prod(in_shape[2:]))
    if len(out_shape) >= 2 and out_shape[:2] == in_shape[:2] and \
            math.prod(out_shape[2:]) == math.prod(in_shape[2:]):
        return first  # spatial-only reshape, squeeze or unsqueeze after the channel axis
    block_layout(first, f"reshape {tuple(in_shape)} -> {tuple(out_shape)} mixes channels")
    return None


def _collect(spaces: _Spaces) -> DependencyGraph:
    roots: dict[int, ChannelGroup] = {}
    for i in range(len(spaces.parent)):
        r = spaces.find(i)
        if r in roots:
            continue
        info = spaces.info[r]
        if not info["producers"] and not info["consumers"]:
            continue
        reason = info["reason"]
        if not info["producers"] and reason is None:
            reason = "no layer produces these channels"
        block = info["block"]
        if reason is None and block > 1 and spaces.size[r] // block < 2:
            reason = "a single attention head"
        if reason is None and block > 1 and info["members"]:
            reason = "per-channel values over attention heads are not tracked"
        roots[r] = ChannelGroup(
            id=len(roots), channels=spaces.size[r], producers=list(info["producers"]),
            consumers=list(info["consumers"]), members=list(dict.fromkeys(info["members"])),
            couplings=set(info["couplings"]), prunable=reason is None, reason=reason, block=block,
            rewrites=list(dict.fromkeys(info["rewrites"])), products=info["products"])
    edges = []
    for g in roots.values():
        for producer, _ in g.producers:
            for c in g.consumers:
                if (producer, c.layer) not in edges:
                    edges.append((producer, c.layer))
    return DependencyGraph(edges=tuple(edges), groups=tuple(roots.values()))
