"""What a model's ONNX interface looked like when it was imported, so what nnshrink writes back
drops in where the source ran: input and output names, symbolic dimensions, opset and
``metadata_props`` (where OCR models keep their vocabulary, detectors their labels).

The signature rides on the model: in ``GraphModule.meta`` for imported graphs (which
``copy.deepcopy`` keeps, unlike plain attributes) and as an attribute (which ``torch.save``
keeps, unlike ``meta``), and as an attribute of other modules (a quantized model built from an
imported one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

KEY = "nnshrink_onnx_signature"
Dim = int | str | None  # a fixed size, a named symbolic one, or an unnamed dynamic one


@dataclass(frozen=True)
class Signature:
    inputs: tuple[tuple[str, tuple[Dim, ...] | None], ...]
    outputs: tuple[tuple[str, tuple[Dim, ...] | None], ...]
    opset: int
    metadata: tuple[tuple[str, str], ...] = field(default=())

    def dynamic_axes(self, index: int = 0) -> list[int]:
        """Axes of input ``index`` that are not a fixed size."""
        dims = self.inputs[index][1]
        return [] if dims is None else [i for i, d in enumerate(dims) if not isinstance(d, int)]


def _dims(value_info) -> tuple[Dim, ...] | None:
    t = value_info.type.tensor_type
    if not t.HasField("shape"):
        return None
    out = []
    for d in t.shape.dim:
        if d.HasField("dim_value") and d.dim_value > 0:
            out.append(int(d.dim_value))
        else:
            out.append(d.dim_param or None)
    return tuple(out)


def from_proto(proto, inputs) -> Signature:
    """The signature of ``proto`` (its graph inputs ``inputs``: initializers left out)."""
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 13)
    return Signature(tuple((i.name, _dims(i)) for i in inputs),
                     tuple((o.name, _dims(o)) for o in proto.graph.output), opset,
                     tuple((p.key, p.value) for p in proto.metadata_props))


def attach(model: nn.Module, sig: Signature | None) -> None:
    if sig is None:
        return
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict):
        meta[KEY] = sig
    setattr(model, KEY, sig)  # torch.save keeps attributes of a GraphModule, but not its meta


def get(model: nn.Module) -> Signature | None:
    meta = getattr(model, "meta", None)
    if isinstance(meta, dict) and KEY in meta:
        return meta[KEY]
    return getattr(model, KEY, None)


def apply(proto, sig: Signature | None) -> None:
    """Give an exported ``proto`` the source's names, symbolic dimension names and metadata.

    Names are applied where the counts match; a symbolic dimension of the export takes the
    source's name for that axis (the exporter calls them ``s0``, ``2*s1 + 2``...), a fixed one
    stays fixed.
    """
    if sig is None:
        return
    g = proto.graph
    real_inputs = [i for i in g.input if i.name not in {t.name for t in g.initializer}]
    renames = {}
    for ours, (name, dims) in zip(real_inputs, sig.inputs) if len(real_inputs) == len(sig.inputs) else ():
        renames[ours.name] = name
        _name_dims(ours, dims)
    for ours, (name, dims) in zip(g.output, sig.outputs) if len(g.output) == len(sig.outputs) else ():
        renames[ours.name] = name
        _name_dims(ours, dims)
    if renames:
        _rename(g, renames)
    existing = {p.key for p in proto.metadata_props}
    for key, value in sig.metadata:
        if key not in existing:
            entry = proto.metadata_props.add()
            entry.key, entry.value = key, value


def _name_dims(value_info, dims) -> None:
    if dims is None or not value_info.type.tensor_type.HasField("shape"):
        return
    ours = value_info.type.tensor_type.shape.dim
    if len(ours) != len(dims):
        return
    for d, src in zip(ours, dims):
        if isinstance(src, str) and not d.HasField("dim_value"):
            d.dim_param = src
        elif src is None and not d.HasField("dim_value"):
            d.ClearField("dim_param")


def _rename(g, renames: dict[str, str]) -> None:
    for vi in list(g.input) + list(g.output) + list(g.value_info):
        if vi.name in renames:
            vi.name = renames[vi.name]
    for node in g.node:
        for i, name in enumerate(node.input):
            if name in renames:
                node.input[i] = renames[name]
        for i, name in enumerate(node.output):
            if name in renames:
                node.output[i] = renames[name]
