"""Latency as a cost the decision engine can price: ONNX Runtime timings of a model and of its layers.

A budget with a ``latency=`` target needs, per unit and setting, what that setting changes in the
model's latency, and those changes must add, as the solver sums them. Timing a model per (layer,
setting) would be hundreds of exports; instead a few *variants* are timed: the model as it is,
and variants in which every unit takes its k-th setting at once. ONNX Runtime's profiler gives
each node's kernel time, and each node is charged to the unit whose weights it reads (through
the graph ORT actually runs, after its fusions), so one profile prices every unit at once. Per-node
times are trimmed means over repeated runs (the profiler counts whole microseconds), on one
thread (an edge CPU's view; stable on a shared machine). End-to-end latency is timed separately, without the profiler, and a chosen model is
verified by timing it whole.

Why not ``torch.profiler`` or wall-clock of torch modules: the deployed artifact runs in ONNX
Runtime, whose kernels and fusions decide what a decomposition saves.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnshrink.errors import ConfigError


def _session(proto_bytes: bytes, threads: int, profile: str | None = None, optimized: str | None = None):
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise ConfigError("a latency target times the model in ONNX Runtime, which is not installed: "
                          "pip install 'nnshrink[onnx]'") from exc

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    if profile is not None:
        so.enable_profiling = True
        so.profile_file_prefix = profile
    if optimized is not None:
        so.optimized_model_filepath = optimized
    return ort.InferenceSession(proto_bytes, so, providers=["CPUExecutionProvider"])


def _feed(sess, example: torch.Tensor) -> dict:
    return {sess.get_inputs()[0].name: example[:1].detach().cpu().numpy().astype(np.float32)}


def model_latency(model: nn.Module, example: torch.Tensor, runs: int = 200, threads: int = 1) -> float:
    """Seconds of one inference of ``model`` (batch 1) in ONNX Runtime: the least of five block
    medians over ``runs`` runs in all, after warm-up (a small model's single run is tens of
    microseconds, and a shared CPU adds more than that now and then)."""
    from nnshrink.io.onnx_export import to_onnx

    sess = _session(to_onnx(model, example[:1]).SerializeToString(), threads)
    feed = _feed(sess, example)
    for _ in range(20):
        sess.run(None, feed)
    blocks = []
    for _ in range(5):
        times = []
        for _ in range(max(1, runs // 5)):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append(time.perf_counter() - t0)
        blocks.append(statistics.median(times))
    return min(blocks)


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    """Whether two models hold the same parameters and buffers (a plan's untouched original)."""
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].shape == sb[k].shape and torch.equal(sa[k], sb[k]) for k in sa)


def unit_latencies(model: nn.Module, example: torch.Tensor, units: list[str], runs: int = 30,
                   threads: int = 1) -> tuple[dict[str, float], float]:
    """Kernel seconds per inference of each unit's nodes (a trimmed mean over ``runs``, summed
    over the nodes that read the unit's weights: ``unit.weight``, or a decomposed unit's
    ``unit.0.weight``/``unit.1.weight``), and the kernel seconds of every node. A unit no node
    reads is absent. The profiler's own overhead inflates every node alike, so callers use the
    figures as shares of the total."""
    import onnx

    from nnshrink.io.onnx_export import to_onnx

    proto = to_onnx(model, example[:1])
    with tempfile.TemporaryDirectory() as tmp:
        optimized = os.path.join(tmp, "optimized.onnx")
        sess = _session(proto.SerializeToString(), threads, profile=os.path.join(tmp, "profile"), optimized=optimized)
        feed = _feed(sess, example)
        for _ in range(runs + 3):
            sess.run(None, feed)
        path = sess.end_profiling()
        events = json.loads(Path(path).read_text())
        graph = onnx.load(optimized, load_external_data=False).graph
    owner = _owners(proto.graph, graph, units)
    per_node: dict[str, list[float]] = defaultdict(list)
    for e in events:
        if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time"):
            per_node[e["name"][:-len("_kernel_time")]].append(float(e["dur"]) * 1e-6)
    out: dict[str, float] = defaultdict(float)
    every = 0.0
    for node, times in per_node.items():
        # the first runs warm caches and allocate; profiler durations are whole microseconds, so a
        # trimmed mean of the rest (it resolves less than one)
        kept = sorted(times[3:] if len(times) > 3 else times)
        cut = len(kept) // 5
        t = float(np.mean(kept[cut:len(kept) - cut] if len(kept) > 2 * cut else kept))
        every += t
        if node in owner:
            out[owner[node]] += t
    return dict(out), every


def _owners(source, optimized, units: list[str]) -> dict[str, str]:
    """Node name in the graph ORT runs -> the unit whose weights it reads. A node that reads them
    directly is charged to them; one the NCHWc layout pass rewrote reads renamed weights
    (``reorder_token_N``) but is named after the value it computes (``<value>_nchwc``), so that
    value is traced back through the source graph's producers (the activation fused into the
    conv, then the conv) to the weights it reads."""
    ordered = sorted(units, key=len, reverse=True)  # "conv1" must not claim "conv10"'s nodes

    def unit_of(names) -> str | None:
        for name in names:
            unit = next((u for u in ordered if name.startswith(u + ".")), None)
            if unit is not None:
                return unit
        return None

    producer = {out: node for node in source.node for out in node.output}
    weights = {i.name for i in source.initializer}
    out = {}
    for node in optimized.node:
        unit = unit_of(node.input)
        if unit is None and node.name.endswith("_nchwc"):
            value = node.name[:-len("_nchwc")]
            for _ in range(4):  # the conv, and up to three fused ops after it
                p = producer.get(value)
                if p is None:
                    break
                unit = unit_of(p.input)
                if unit is not None:
                    break
                data = [i for i in p.input if i and i not in weights]
                if len(data) != 1:
                    break
                value = data[0]
        if unit is not None:
            out[node.name] = unit
    return out
