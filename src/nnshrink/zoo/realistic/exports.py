"""The realistic zoo exported to ONNX the ways third-party models arrive.

- ``ts11``, ``ts13``, ``ts17``: torch's TorchScript exporter at those opsets (decomposed
  LayerNorm and GELU below 17, ``Upsample``-era ``Resize`` at 11, ``Gemm`` for 2-D Linear,
  ``MatMul`` with a transposed initializer for Linear on sequences, shape arithmetic for reshapes);
- ``dynamo18``: torch's ``torch.export``-based exporter at opset 18;
- ``quirks``: the ``ts13`` file edited as hand-written and converted models are: conv weights in
  ``Constant`` nodes, ``Gemm`` split into ``MatMul`` with a transposed initializer plus ``Add``,
  and the first node wrapped in an ``If`` on a condition that is constant.

Every form keeps the batch and the task's varying axes symbolic and carries ``metadata_props``
(a vocabulary, as OCR models keep theirs), so that a drop-in replacement can be checked for them.
"""

from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import torch
from torch import nn

from nnshrink.progress import quiet_exporter
from nnshrink.zoo.realistic import Task

FORMS = ("ts11", "ts13", "ts17", "dynamo18", "quirks")
OUTPUTS = {"pnet": ["prob", "box"]}
METADATA = {"crnn": {"vocabulary": "0123456789", "blank": "0"}}


def example(t: Task, batch: int = 2) -> torch.Tensor:
    return t.inputs[:batch].clone()


def _output_axes(t: Task) -> dict[int, str]:
    if t.name == "crnn":
        return {0: "batch", 1: "time"}
    if t.name in ("dbnet", "pnet"):
        return {0: "batch", 2: "out_height", 3: "out_width"}
    return {0: "batch"}


def export(model: nn.Module, t: Task, form: str):
    """``model`` (of task ``t``) as an ``onnx.ModelProto`` in export form ``form``."""
    import onnx

    if form not in FORMS:
        raise ValueError(f"unknown export form {form!r}; choose one of {', '.join(FORMS)}")
    model = model.eval()
    x = example(t)
    outputs = OUTPUTS.get(t.name, ["output"])
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), quiet_exporter():
        warnings.simplefilter("ignore")
        if form == "dynamo18":
            dims = {0: torch.export.Dim.DYNAMIC, **{k: torch.export.Dim.DYNAMIC for k in t.dynamic}}
            program = torch.onnx.export(model, (x,), dynamo=True, dynamic_shapes=(dims,),
                                        opset_version=18, input_names=["input"], output_names=outputs,
                                        verbose=False)
            proto = program.model_proto
            _name_dims(proto, {0: "batch", **t.dynamic})
        else:
            opset = 13 if form == "quirks" else int(form[2:])
            buf = io.BytesIO()
            axes = {"input": {0: "batch", **t.dynamic}, **{o: _output_axes(t) for o in outputs}}
            torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=opset, input_names=["input"],
                              output_names=outputs, dynamic_axes=axes)
            proto = onnx.load_from_string(buf.getvalue())
            if form == "quirks":
                _quirks(proto)
    for key, value in METADATA.get(t.name, {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    return proto


def _name_dims(proto, names: dict[int, str]) -> None:
    """Give the dynamo exporter's symbolic input dims (``s0``...) the task's names."""
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    for axis, name in names.items():
        if not dims[axis].HasField("dim_value"):
            dims[axis].dim_param = name


def _quirks(proto) -> None:
    from onnx import helper, numpy_helper

    g = proto.graph
    inits = {i.name: i for i in g.initializer}
    nodes = list(g.node)
    new_nodes = []
    moved = set()
    for node in nodes:
        if node.op_type == "Conv" and node.input[1] in inits and node.input[1] not in moved:
            # the weight as a Constant node's output, as converters from other frameworks write it
            t = inits[node.input[1]]
            new_nodes.append(helper.make_node("Constant", [], [t.name], value=t, name=f"{t.name}_const"))
            moved.add(t.name)
        if node.op_type == "Gemm" and node.input[1] in inits and \
                any(a.name == "transB" and a.i == 1 for a in node.attribute) and \
                all(a.name in ("transB", "alpha", "beta") for a in node.attribute) and \
                all(a.f == 1.0 for a in node.attribute if a.name in ("alpha", "beta")):
            w = numpy_helper.to_array(inits[node.input[1]])
            wt = numpy_helper.from_array(np.ascontiguousarray(w.T), node.input[1] + "_t")
            g.initializer.append(wt)
            mm = node.output[0] + "_mm"
            new_nodes.append(helper.make_node("MatMul", [node.input[0], wt.name], [mm], name=node.name + "_matmul"))
            new_nodes.append(helper.make_node("Add", [mm, node.input[2]], list(node.output), name=node.name + "_add"))
            continue
        new_nodes.append(node)
    used = {i for n in new_nodes for i in n.input}
    keep = [i for i in g.initializer if i.name not in moved and i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep)
    # the first compute node behind an If on a condition that always folds to true
    first = next(i for i, n in enumerate(new_nodes) if n.op_type != "Constant")
    taken = new_nodes[first]
    one = helper.make_node("Constant", [], ["quirk_one"], value=numpy_helper.from_array(np.array(1, np.int64)))
    cond = helper.make_node("Equal", ["quirk_one", "quirk_one"], ["quirk_cond"])
    outs = [helper.make_empty_tensor_value_info(o) for o in taken.output]
    branch = helper.make_graph([taken], "then", [], outs)
    other = helper.make_node("Identity", [taken.input[0]], [o + "_else" for o in taken.output[:1]])
    else_graph = helper.make_graph([other], "else", [], [helper.make_empty_tensor_value_info(taken.output[0] + "_else")])
    if len(taken.output) == 1:
        if_node = helper.make_node("If", ["quirk_cond"], list(taken.output), then_branch=branch,
                                   else_branch=else_graph, name="quirk_if")
        new_nodes[first:first + 1] = [one, cond, if_node]
    del g.node[:]
    g.node.extend(new_nodes)
