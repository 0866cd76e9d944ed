"""ONNX nodes nnshrink has no converter for, kept as they are and run by ONNX Runtime.

An importer that refuses a whole model for one operator leaves every conv and matmul around it
uncompressed. Instead such a node becomes an :class:`OpaqueNode` module: in eager mode it runs the
node alone in ONNX Runtime (a one-node model, one session per input signature, cached), and on
export it is written back as the same node (``nnshrink::onnx_node`` and its translation in
:data:`TRANSLATIONS`), attributes and domain included. Its output shapes for tracing come from
the source's shape inference: a fixed size, the size of an input's axis where the source names
the same symbol, or a new dynamic size.

Limits: no gradients flow through an opaque node (training stops at it), its channels are never
pruned, and a node with subgraph attributes (``Loop``, ``Scan``, an ``If`` on a run-time value)
is still refused.
"""

from __future__ import annotations

import hashlib
import threading

import numpy as np
import torch
from torch import nn

_SPECS: dict[str, OpaqueSpec] = {}
_LOCK = threading.Lock()


class OpaqueSpec:
    """One node: its serialized proto, the opsets it needs, and each output's dtype and dims
    (an int, ``(input, axis)`` for a size equal to an input's, or None for unknown)."""

    def __init__(self, node_bytes: bytes, opsets: dict[str, int], outputs: list[tuple[int, list]]) -> None:
        self.node_bytes = node_bytes
        self.opsets = dict(opsets)
        self.outputs = outputs
        self.key = hashlib.sha256(node_bytes + repr(sorted(self.opsets.items())).encode()
                                  + repr(outputs).encode()).hexdigest()[:20]
        self._sessions: dict[tuple, object] = {}

    @property
    def node(self):
        import onnx

        proto = onnx.NodeProto()
        proto.ParseFromString(self.node_bytes)
        return proto

    def run(self, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        import onnxruntime as ort
        from onnx import helper

        arrays = [x.detach().cpu().numpy() for x in xs]
        sig = tuple((a.dtype.str, a.shape) for a in arrays)
        sess = self._sessions.get(sig)
        if sess is None:
            node = self.node
            names = [f"in{i}" for i in range(len(arrays))]
            outs = [f"out{i}" for i in range(len(self.outputs))]
            del node.input[:]
            node.input.extend(names)
            del node.output[:]
            node.output.extend(outs)
            inputs = [helper.make_tensor_value_info(n, helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
                      for n, a in zip(names, arrays)]
            graph = helper.make_graph([node], "opaque", inputs, [helper.make_empty_tensor_value_info(o) for o in outs])
            model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in self.opsets.items()])
            so = ort.SessionOptions()
            so.intra_op_num_threads = max(1, torch.get_num_threads())
            so.log_severity_level = 3
            sess = ort.InferenceSession(model.SerializeToString(), so)
            self._sessions[sig] = sess
        results = sess.run(None, {f"in{i}": a for i, a in enumerate(arrays)})
        return [torch.from_numpy(np.ascontiguousarray(r)) for r in results]


def register(spec: OpaqueSpec) -> str:
    with _LOCK:
        _SPECS.setdefault(spec.key, spec)
    return spec.key


def _dtype(elem_type: int) -> torch.dtype:
    from onnx import helper

    return torch.from_numpy(np.zeros(1, helper.tensor_dtype_to_np_dtype(elem_type))).dtype


@torch.library.custom_op("nnshrink::onnx_node", mutates_args=())
def onnx_node(xs: list[torch.Tensor], key: str) -> list[torch.Tensor]:
    """Run the registered ONNX node ``key`` on ``xs`` in ONNX Runtime."""
    return _SPECS[key].run(xs)


@onnx_node.register_fake
def _(xs, key):
    spec = _SPECS[key]
    ctx = torch.library.get_ctx()
    outs = []
    for elem, dims in spec.outputs:
        shape = []
        for d in dims:
            if isinstance(d, int):
                shape.append(d)
            elif isinstance(d, (list, tuple)):
                shape.append(xs[d[0]].shape[d[1]])
            else:
                shape.append(ctx.new_dynamic_size())
        outs.append(xs[0].new_empty(shape, dtype=_dtype(elem)))
    return outs


def _schema(node, n_in: int, n_out: int, version: int):
    """The node's ONNX schema, or one made for it (any tensor types; its attributes) when ONNX
    has none (an ONNX Runtime contrib op), which the exporter needs to write a node."""
    import onnx
    from onnx import defs

    try:
        return defs.get_schema(node.op_type, version, node.domain)
    except Exception:  # noqa: BLE001 - onnx raises SchemaError (not exported) for unknown ops
        pass
    types = [f"tensor({t})" for t in ("float", "double", "float16", "bfloat16", "int64", "int32", "int16",
                                      "int8", "uint64", "uint32", "uint16", "uint8", "bool", "string")]
    kinds = {onnx.AttributeProto.FLOAT: "FLOAT", onnx.AttributeProto.INT: "INT", onnx.AttributeProto.STRING: "STRING",
             onnx.AttributeProto.FLOATS: "FLOATS", onnx.AttributeProto.INTS: "INTS",
             onnx.AttributeProto.STRINGS: "STRINGS", onnx.AttributeProto.TENSOR: "TENSOR"}
    return defs.OpSchema(
        node.op_type, node.domain, version, "",
        inputs=[defs.OpSchema.FormalParameter(f"i{k}", f"T{k}") for k in range(n_in)],
        outputs=[defs.OpSchema.FormalParameter(f"o{k}", f"U{k}") for k in range(n_out)],
        type_constraints=[(f"T{k}", types, "") for k in range(n_in)] + [(f"U{k}", types, "") for k in range(n_out)],
        attributes=[defs.OpSchema.Attribute(a.name, getattr(defs.OpSchema.AttrType, kinds[a.type]), "")
                    for a in node.attribute])


def _translate(xs, key: str):
    from onnx import helper
    from onnxscript import values

    spec = _SPECS[key]
    node = spec.node
    version = spec.opsets.get(node.domain, 1)
    op = values.Op(values.Opset(node.domain, version), node.op_type, _schema(node, len(xs), len(spec.outputs), version))
    attrs = {}
    for a in node.attribute:
        v = helper.get_attribute_value(a)
        attrs[a.name] = v.decode() if isinstance(v, bytes) else [s.decode() if isinstance(s, bytes) else s for s in v] \
            if isinstance(v, list) and v and isinstance(v[0], bytes) else v
    out = op(*xs, **attrs)
    return list(out) if isinstance(out, (list, tuple)) else [out]


TRANSLATIONS = {torch.ops.nnshrink.onnx_node.default: _translate}


class OpaqueNode(nn.Module):
    """One ONNX node run by ONNX Runtime (see the module's docstring); returns a tensor, or a
    tuple for a node with several outputs."""

    def __init__(self, spec: OpaqueSpec) -> None:
        super().__init__()
        self.op_type = spec.node.op_type if not spec.node.domain else f"{spec.node.domain}.{spec.node.op_type}"
        self.node_bytes, self.opsets, self.outputs = spec.node_bytes, spec.opsets, spec.outputs
        self.key = register(spec)

    def __setstate__(self, state) -> None:  # unpickled (torch.load): register the node again
        super().__setstate__(state)
        self.key = register(OpaqueSpec(self.node_bytes, self.opsets, self.outputs))

    def forward(self, *xs):
        if self.key not in _SPECS:
            self.key = register(OpaqueSpec(self.node_bytes, self.opsets, self.outputs))
        outs = torch.ops.nnshrink.onnx_node(list(xs), self.key)
        return outs[0] if len(outs) == 1 else tuple(outs)

    def extra_repr(self) -> str:
        return f"{self.op_type}, run by ONNX Runtime"
