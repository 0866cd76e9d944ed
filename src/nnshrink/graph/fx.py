"""torch.fx capture with errors a user can act on."""

from __future__ import annotations

import linecache
import traceback

import torch
from torch import fx, nn

from nnshrink.errors import InputShapeError, UnsupportedModelError


def _user_frame(exc: BaseException) -> str | None:
    """The innermost traceback frame outside torch and nnshrink: the user's failing line."""
    frames = traceback.extract_tb(exc.__traceback__)
    for frame in reversed(frames):
        path = frame.filename.replace("\\", "/")
        if "/torch/" in path or "/nnshrink/graph/" in path or path.startswith("<"):
            continue
        line = (frame.line or linecache.getline(frame.filename, frame.lineno)).strip()
        return f"{frame.filename}:{frame.lineno} in {frame.name}: {line}"
    return None


def concrete_args(model: nn.Module) -> dict | None:
    """``forward``'s arguments after the first, at their defaults (a ``forward(x, flag=False)``
    traces as ``flag=False``, the branch the model runs when called as ``model(x)``, as every
    technique and the exporter call it); None if it takes one input.

    To compress the model as it runs with other values, wrap it in a module whose ``forward(x)``
    passes them: the trace and every call then agree.
    """
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    out = {}
    for p in params[1:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if p.default is not p.empty:
            out[p.name] = p.default
    return out or None


def trace(model: nn.Module) -> fx.GraphModule:
    """Capture ``model`` as a torch.fx graph.

    Arguments of ``forward`` after the first are traced as constants, at their defaults
    (:func:`concrete_args`).

    A model that already is a ``GraphModule`` (an imported ONNX model, say) is returned as it is,
    except that calls of an ``nn.Sequential`` which a structural edit put into it (Spatial SVD's
    two convs) are shown as calls of its layers, as tracing the torch module shows them.

    Raises:
        UnsupportedModelError: fx cannot trace the model; the message names the failing
            operation and the line of the model's code where it happened.
    """
    if isinstance(model, fx.GraphModule):
        return _inline_sequentials(model)
    try:
        return fx.symbolic_trace(model, concrete_args=concrete_args(model))
    except Exception as exc:  # fx raises many types (TraceError, TypeError, RuntimeError, ...)
        where = _user_frame(exc)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        msg = f"torch.fx cannot trace {type(model).__name__}: {first}"
        if where:
            msg += f" (at {where})"
        raise UnsupportedModelError(msg) from exc


def _inline_sequentials(gm: fx.GraphModule) -> fx.GraphModule:
    modules = dict(gm.named_modules())

    def container(node: fx.Node) -> bool:
        return node.op == "call_module" and isinstance(modules.get(node.target), nn.Sequential)

    if not any(container(n) for n in gm.graph.nodes):
        return gm
    graph, env = fx.Graph(), {}

    def expand(target: str, value):
        for child, mod in modules[target].named_children():
            name = f"{target}.{child}"
            value = expand(name, value) if isinstance(mod, nn.Sequential) else graph.call_module(name, (value,))
        return value

    for node in gm.graph.nodes:
        if container(node) and len(node.args) == 1 and not node.kwargs:
            env[node] = expand(node.target, env[node.args[0]])
        else:
            env[node] = graph.node_copy(node, lambda n: env[n])
    out = fx.GraphModule(gm, graph)
    out.meta.update(gm.meta)
    for attr in ("input_shape",):
        if hasattr(gm, attr):
            setattr(out, attr, getattr(gm, attr))
    return out


def shape_propagate(gm: fx.GraphModule, example_input: torch.Tensor | tuple) -> None:
    """Record each node's output shape in ``node.meta['shape']`` (None where not a tensor)."""
    from torch.fx.passes.shape_prop import ShapeProp

    args = example_input if isinstance(example_input, tuple) else (example_input,)
    was_training = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*args)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        shapes = ", ".join(str(tuple(a.shape)) for a in args if isinstance(a, torch.Tensor))
        raise InputShapeError(f"the model's forward pass failed on an input of shape {shapes}: {first}") from exc
    finally:
        gm.train(was_training)
    for node in gm.graph.nodes:
        tm = node.meta.get("tensor_meta")
        node.meta["shape"] = tuple(tm.shape) if hasattr(tm, "shape") else None

