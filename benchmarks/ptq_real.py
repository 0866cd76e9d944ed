"""Quantization and one-shot pruning of real graphs: the realistic zoo against NNCF and ONNX Runtime.

Run: ``python benchmarks/ptq_real.py [--models crnn,dbnet,...] [--form ts13] [--skip-weights]``.

Every model of the realistic zoo (``nnshrink.zoo.realistic``, trained here on generated data) is
exported as ONNX in the chosen form (default ``ts13``, the TorchScript exporter at opset 13, as most
third-party models arrive), and every method starts from that file and the same 256 unlabelled
training inputs. The task metric (character accuracy, mask IoU, top-1, face score, pitch
accuracy) is on the held-out generated test split. Printed per model:

- **W8A8 PTQ**: ours (``load_model`` then the ``quantize`` step, run by ONNX Runtime from the QDQ
  file we write), NNCF's ``nncf.quantize`` on the ONNX model (its ONNX backend, defaults) and ONNX
  Runtime's ``quantize_static`` (QDQ, per-channel, MinMax), each run by ONNX Runtime; the metric,
  its change relative to float, ours minus each peer with a 95% paired bootstrap interval over the
  test examples, and PTQ wall time as a ratio to ours; which ops stayed float in ours, and whether
  every integer conv/linear/matmul runs on an ONNX Runtime integer kernel;
- **weight-only 4 bit** (per channel): min-max rounding, and MSE scales with GPTQ rounding (per
  group of 32 input columns) from the calibration inputs; **3 bit** with GPTQ; the metric relative
  to float;
- **one-shot pruning** (no retraining): 50% unstructured and 2:4, by magnitude and with SparseGPT
  reconstruction from the calibration inputs; the metric relative to float;
- **mixed precision over weights and activations**: 4 or 8-bit weights and 8 or 16-bit layer
  outputs chosen for a 35 and a 45 dB output SQNR budget; the metric, the measured SQNR, and how
  many outputs went to 16 bits.

A peer that is not installed is reported as skipped. Two threads for torch and ONNX Runtime.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

import numpy as np
import torch

torch.set_num_threads(2)

from nnshrink.io import load_model  # noqa: E402
from nnshrink.io.qdq import to_qdq_onnx  # noqa: E402
from nnshrink.plan import Plan, compress  # noqa: E402
from nnshrink.techniques import Quantize, QuantizeWeights  # noqa: E402
from nnshrink.techniques.quant.graph import float_summary  # noqa: E402
from nnshrink.techniques.sparsity import Sparsify  # noqa: E402
from nnshrink.zoo import realistic as R  # noqa: E402
from nnshrink.zoo.realistic import exports as E  # noqa: E402

CALIB = 256


def _session(proto_or_path, optimized: str | None = None):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    if optimized:
        so.optimized_model_filepath = optimized
    data = proto_or_path if isinstance(proto_or_path, (str, bytes)) else proto_or_path.SerializeToString()
    return ort.InferenceSession(data, so)


class OrtModel(torch.nn.Module):
    """An ONNX Runtime session as a torch module (for the task's metric)."""

    def __init__(self, proto_or_path, optimized: str | None = None) -> None:
        super().__init__()
        self.session = _session(proto_or_path, optimized)
        self.name = self.session.get_inputs()[0].name

    def forward(self, x):
        outs = [torch.from_numpy(o) for o in self.session.run(None, {self.name: x.numpy()})]
        return outs[0] if len(outs) == 1 else tuple(outs)


def _outputs(model, x: torch.Tensor):
    with torch.no_grad():
        return R.run_batched(model.eval(), x)


def _index(out, idx):
    return tuple(o[idx] for o in out) if isinstance(out, tuple) else out[idx]


def paired_interval(t: R.Task, a, b, n: int = 300, seed: int = 0) -> tuple[float, float]:
    """95% bootstrap interval of metric(a) - metric(b) over the same resampled test examples."""
    x, *targets = t.splits["test"]
    gen = np.random.default_rng(seed)
    diffs = []
    for _ in range(n):
        idx = torch.from_numpy(gen.integers(0, len(x), len(x)))
        tg = [v[idx] for v in targets]
        diffs.append(t.score(_index(a, idx), *tg) - t.score(_index(b, idx), *tg))
    return float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))


def nncf_ptq(path: str, calib: np.ndarray, name: str):
    import logging

    import nncf
    import onnx

    logging.getLogger("nncf").setLevel(logging.ERROR)
    model = onnx.load(path)
    data = nncf.Dataset([{name: calib[i:i + 1]} for i in range(len(calib))])
    t0 = time.perf_counter()
    q = nncf.quantize(model, data, subset_size=len(calib))
    return q, time.perf_counter() - t0


def ort_ptq(path: str, calib: np.ndarray, name: str, folder: str):
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{name: calib[i:i + 1]} for i in range(len(calib))])

        def get_next(self):
            return next(self.items, None)

    pre, dst = os.path.join(folder, "pre.onnx"), os.path.join(folder, "ort_q.onnx")
    t0 = time.perf_counter()
    try:
        quant_pre_process(path, pre)
    except Exception:  # noqa: BLE001 - the pre-processing is optional; quantize the file as it is
        pre = path
    # quantize_static leaves temporaries (*.data, sym_shape_infer_temp.onnx) in the working directory
    with contextlib.chdir(folder):
        quantize_static(pre, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return dst, time.perf_counter() - t0


def _integer_kernels(sim, optimized: str) -> str:
    import collections

    import onnx

    kernels = collections.Counter(n.op_type for n in onnx.load(optimized).graph.node)
    layers = [op for op in sim.ops if op.kind in ("conv", "linear", "matmul") and op.integer]
    fused = kernels["QLinearConv"] + kernels["QGemm"] + kernels["QLinearMatMul"]
    left = sum(kernels[k] for k in ("Conv", "Gemm", "MatMul"))
    return f"{fused}/{len(layers)} integer conv/linear/matmul kernels, {left} float left"


def run(name: str, form: str, weights: bool, folder: str) -> None:
    import onnx

    model, t = R.pretrained(name, show_progress=False)
    path = os.path.join(folder, f"{name}.onnx")
    onnx.save(E.export(model.eval(), t, form), path)
    xs = t.splits["test"][0]
    calib = t.calibration(CALIB)
    src = OrtModel(path)
    f_out = _outputs(src, xs)
    f = t.score(f_out, *t.splits["test"][1:])
    print(f"\n== {name} ({form}): float {t.metric_name} {f:.4f} (ONNX Runtime on the source)")

    def rel(v: float) -> str:
        return f"{v:.4f} ({(v - f) / f:+.2%})"

    # -- W8A8 ---------------------------------------------------------------------------------
    t0 = time.perf_counter()
    imported = load_model(path)
    sim = compress(imported, Plan([Quantize()]), calib[:2], calib=[calib]).model
    ours_s = time.perf_counter() - t0
    opt = os.path.join(folder, f"{name}_ours_opt.onnx")
    ours = OrtModel(to_qdq_onnx(sim), opt)
    o_out = _outputs(ours, xs)
    o = t.score(o_out, *t.splits["test"][1:])
    print(f"  W8A8 ours (ONNX Runtime, our QDQ): {rel(o)}  PTQ {ours_s:.1f} s; {_integer_kernels(sim, opt)}")
    print(f"     stayed float: {float_summary(sim.ops) or 'nothing'}")
    name_in = src.name
    peers = []
    try:
        q, secs = nncf_ptq(path, calib.numpy(), name_in)
        peers.append(("NNCF nncf.quantize", OrtModel(q), secs))
    except ImportError:
        print("  NNCF: skipped (not installed)")
    except Exception as exc:  # noqa: BLE001 - a peer failing on a model is a result
        print(f"  NNCF: failed ({str(exc).splitlines()[0][:160]})")
    try:
        dst, secs = ort_ptq(path, calib.numpy(), name_in, folder)
        peers.append(("ORT quantize_static", OrtModel(dst), secs))
    except Exception as exc:  # noqa: BLE001
        print(f"  ORT quantize_static: failed ({str(exc).splitlines()[0][:160]})")
    for label, m, secs in peers:
        out = _outputs(m, xs)
        v = t.score(out, *t.splits["test"][1:])
        lo, hi = paired_interval(t, o_out, out)
        print(f"  W8A8 {label}: {rel(v)}  PTQ {secs:.1f} s (ours / theirs: {ours_s / secs:.2f}x); "
              f"ours - theirs {o - v:+.4f} [95% paired {lo:+.4f}, {hi:+.4f}]")
    if not weights:
        return
    # -- weight-only low bit and one-shot pruning (the torch model; no training) --------------------
    base = load_model(path)

    def metric(step) -> float:
        return t.evaluate(compress(base, Plan([step]), calib[:2], calib=[calib]).model)

    rows = [("W4 min-max, nearest", QuantizeWeights(bits=4)),
            ("W4 MSE scales, GPTQ, groups of 32", QuantizeWeights(bits=4, scales="mse", rounding="gptq", group_size=32)),
            ("W3 MSE scales, GPTQ, groups of 32", QuantizeWeights(bits=3, scales="mse", rounding="gptq", group_size=32)),
            ("50% unstructured, magnitude", Sparsify(sparsity=0.5, scope="layer")),
            ("50% unstructured, SparseGPT", Sparsify(sparsity=0.5, scope="layer", reconstruct="sparsegpt")),
            ("50% unstructured, SparseGPT, per-layer fractions from sensitivity",
             Sparsify(sparsity=0.5, scope="sensitivity", reconstruct="sparsegpt")),
            ("2:4, magnitude", Sparsify(pattern="2:4")),
            ("2:4, SparseGPT", Sparsify(pattern="2:4", reconstruct="sparsegpt"))]
    for label, step in rows:
        try:
            print(f"  {label}: {rel(metric(step))}")
        except Exception as exc:  # noqa: BLE001
            print(f"  {label}: failed ({str(exc).splitlines()[0][:160]})")
    # mixed precision over weights and activations: a fidelity budget W8A8 cannot meet
    for db in (35, 45):
        try:
            r = compress(base, Plan([Quantize(mixed_bits=(4, 8), mixed_act_bits=(8, 16), min_sqnr_db=db)]),
                         calib[:2], calib=[calib])
            mp = r.steps[0].details["mixed_precision"]
            wide = sum(b == 16 for b in mp["act_bits"].values())
            print(f"  mixed W4/W8 x A8/A16 at {db} dB: {rel(t.evaluate(r.model))}; measured {mp['sqnr_db']} dB, "
                  f"{mp['weight_bits']} mean weight bits, {wide} of {len(mp['act_bits'])} layer outputs at 16 bits")
        except Exception as exc:  # noqa: BLE001
            print(f"  mixed W4/W8 x A8/A16 at {db} dB: failed ({str(exc).splitlines()[0][:160]})")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(R.NAMES))
    p.add_argument("--form", default="ts13", choices=E.FORMS)
    p.add_argument("--skip-weights", action="store_true", help="only W8A8")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            run(name, args.form, not args.skip_weights, folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
