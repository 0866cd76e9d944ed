"""The realistic zoo through nnshrink, as a new user's third-party models would go.

Run: ``python benchmarks/realistic.py [--models crnn,dbnet,...] [--forms ts11,...] [--no-speed]``.

For every realistic-zoo model (trained by its recipe, cached) and every export form
(:mod:`nnshrink.zoo.realistic.exports`: TorchScript exporter at opsets 11/13/17, dynamo at 18,
hand-written quirks) it prints:

- ``import``: the ONNX file converts to torch (nothing refused);
- ``max|d|``: the imported model's outputs against ONNX Runtime's on the source, over test inputs
  at the example's shape and the task's other shapes (batch sizes, widths, lengths);
- ``drop-in``: the container of int8 weights, decoded to ONNX, has the source's input/output
  names, symbolic dims and metadata, and runs in ONNX Runtime at every one of those shapes;
- ``ratio``: source file bytes over container bytes (int8 weights, entropy-coded);
- the task metric of float and of the decoded int8-weight model, and the relative change.

Then the speed of nnshrink's own work on the zoo's largest model and on a 25M-parameter
ResNet-50-shaped export, each as a ratio against ``torch.onnx.export`` (dynamo) plus creating an
ONNX Runtime session of the same model, timed in this process (two threads).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
from torch import nn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

THREADS = 2


def _session(proto_or_path):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    so.log_severity_level = 3
    data = proto_or_path if isinstance(proto_or_path, (str, bytes)) else proto_or_path.SerializeToString()
    return ort.InferenceSession(data, so)


def _io(proto):
    def dims(vi):
        return [d.dim_param or d.dim_value for d in vi.type.tensor_type.shape.dim]

    return ([(i.name, dims(i)) for i in proto.graph.input], [(o.name, dims(o)) for o in proto.graph.output],
            sorted((p.key, p.value) for p in proto.metadata_props))


def _outs(out):
    return [o.detach().numpy() for o in (out if isinstance(out, (tuple, list)) else (out,))]


def model_rows(name: str, forms, workdir: str) -> None:
    import nnshrink as ns
    from nnshrink.io import read_onnx_from_container
    from nnshrink.io.onnx_import import onnx_to_torch
    from nnshrink.plan import Plan
    from nnshrink.techniques import QuantizeWeights
    from nnshrink.zoo import realistic as R
    from nnshrink.zoo.realistic import exports as E

    model, t = R.pretrained(name, show_progress=sys.stderr.isatty())
    base = t.evaluate(model)
    print(f"\n{name}: {sum(p.numel() for p in model.parameters()):,} parameters, {t.metric_name} "
          f"{base:.4f} (float, test)")
    print(f"  {'form':9s} {'import':6s} {'max|d|':>8s} {'drop-in':7s} {'ratio':>6s} {'int8 w':>7s} {'rel.':>7s}")
    gen = torch.Generator().manual_seed(0)
    for form in forms:
        src = E.export(model, t, form)
        path = os.path.join(workdir, f"{name}-{form}.onnx")
        with open(path, "wb") as f:
            f.write(src.SerializeToString())
        try:
            gm = ns.load_model(path)
        except ns.NnshrinkError as exc:
            print(f"  {form:9s} {'NO':6s} {str(exc)[:80]}")
            continue
        sess = _session(src)
        shapes = [(8, *t.inputs.shape[1:]), *t.example_shapes]
        inputs = [t.inputs[:8]] + [torch.rand(s, generator=gen) for s in t.example_shapes]
        worst = 0.0
        for x in inputs:
            with torch.no_grad():
                got = _outs(gm(x))
            ref = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
            worst = max(worst, *(float(np.abs(g - r).max()) for g, r in zip(got, ref)))
        res = ns.compress(gm, Plan([QuantizeWeights(bits=8)]), E.example(t))
        nsz = os.path.join(workdir, f"{name}-{form}.nsz")
        ns.save(res.model, nsz, E.example(t))
        decoded = read_onnx_from_container(nsz)
        ok = _io(decoded) == _io(src)
        dsess = _session(decoded)
        for x in inputs:
            try:
                dsess.run(None, {"input": x.numpy()})
            except Exception:  # noqa: BLE001 - any failure to run is a failed drop-in
                ok = False
        metric = t.evaluate(ns.load(nsz))
        ratio = os.path.getsize(path) / os.path.getsize(nsz)
        rel = (metric - base) / max(base, 1e-9)
        print(f"  {form:9s} {'ok':6s} {worst:8.1e} {'ok' if ok else 'NO':7s} {ratio:6.2f} {metric:7.4f} {rel:+7.2%}"
              f"   ({len(shapes)} input shape{'s' if len(shapes) > 1 else ''})")


def _resnet50_shaped() -> nn.Module:
    """ResNet-50's layout (bottlenecks 3-4-6-3, 64 to 2048 channels, 1000 classes): 25.6M parameters."""

    class Bottleneck(nn.Module):
        def __init__(self, c_in, mid, stride):
            super().__init__()
            out = mid * 4
            self.body = nn.Sequential(
                nn.Conv2d(c_in, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(),
                nn.Conv2d(mid, out, 1, bias=False), nn.BatchNorm2d(out))
            self.down = nn.Sequential(nn.Conv2d(c_in, out, 1, stride, bias=False), nn.BatchNorm2d(out)) \
                if stride != 1 or c_in != out else nn.Identity()

        def forward(self, x):
            return torch.relu(self.body(x) + self.down(x))

    layers, c = [nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(3, 2, 1)], 64
    for mid, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
        for i in range(blocks):
            layers.append(Bottleneck(c, mid, stride if i == 0 else 1))
            c = mid * 4
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 1000)]
    return nn.Sequential(*layers).eval()


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def speed_rows(label: str, model: nn.Module, example: torch.Tensor, workdir: str) -> None:
    import nnshrink as ns
    from nnshrink.io import read_onnx_from_container, to_onnx

    src = os.path.join(workdir, f"{label}.onnx")
    ns.export_onnx(model, src, example)  # the exporter's first call in a process loads a lot: not timed
    _, t_export = _timed(lambda: ns.export_onnx(model, src, example))
    _, t_session = _timed(lambda: _session(src))
    baseline = t_export + t_session
    gm, t_load_model = _timed(lambda: ns.load_model(src))
    _, t_analyze = _timed(lambda: ns.analyze(gm, example))
    nsz = os.path.join(workdir, f"{label}.nsz")
    _, t_save = _timed(lambda: ns.save(gm, nsz, example))
    _, t_load = _timed(lambda: ns.load(nsz))
    _, t_decode = _timed(lambda: read_onnx_from_container(nsz).SerializeToString())
    _, t_to_onnx = _timed(lambda: to_onnx(gm, example))
    params = sum(p.numel() for p in model.parameters())
    print(f"\nspeed, {label} ({params / 1e6:.1f}M parameters): baseline torch.onnx.export {t_export:.2f} s"
          f" + ORT session {t_session:.2f} s = {baseline:.2f} s")
    for what, secs in (("analyze", t_analyze), ("load_model", t_load_model), ("save", t_save),
                       ("  of which export", t_to_onnx), ("load", t_load), ("decode", t_decode)):
        print(f"  {what:18s} {secs:7.2f} s  {secs / baseline:5.2f}x baseline")


def main() -> None:
    from nnshrink.zoo import realistic as R
    from nnshrink.zoo.realistic import exports as E

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(R.NAMES))
    ap.add_argument("--forms", default=",".join(E.FORMS))
    ap.add_argument("--no-speed", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(THREADS)
    with tempfile.TemporaryDirectory() as workdir:
        for name in args.models.split(","):
            model_rows(name, args.forms.split(","), workdir)
        if not args.no_speed:
            largest = max(R.NAMES, key=lambda n: sum(p.numel() for p in R.task(n, scale=0.01).build().parameters()))
            t = R.task(largest, scale=0.01)
            torch.manual_seed(0)
            speed_rows(largest, t.build().eval(), E.example(t), workdir)
            speed_rows("resnet50-shaped", _resnet50_shaped(), torch.rand(2, 3, 224, 224), workdir)


if __name__ == "__main__":
    main()
