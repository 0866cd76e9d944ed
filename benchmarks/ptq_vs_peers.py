"""W8A8 post-training quantization: nnshrink against NNCF and ONNX Runtime's quantize_static.

Run: ``python benchmarks/ptq_vs_peers.py [--models lenet300,lenet5,resnet8,mobilenet] [--w4]``.

Every method starts from the same trained zoo model and calibrates on the same 256 training
images; accuracy is on the same 1,000 held-out digits. Printed per model:

- float accuracy, and ours: the simulated model, and ONNX Runtime running our exported QDQ model
  (its integer kernels); with the pieces switched on one by one (nothing, + CLE, + bias
  correction), also with per-tensor weight scales, where equalization matters most;
- NNCF (``nncf.quantize``, its default: per-channel int8 weights, int8 activations) evaluated as
  the torch model it returns;
- ONNX Runtime ``quantize_static`` on our float ONNX export (QDQ, per-channel, uint8
  activations) with its MinMax and Percentile calibrators, run by ONNX Runtime;
- PTQ wall time of each (one process, two threads), and ONNX Runtime latency of our int8 model
  against the float model (batch 1 and 64, ratio).

``--w4`` adds W4A8 on LeNet-5: nearest rounding, AdaRound, and QAT (LSQ, 600 steps), averaged
over seeds 0-2. A peer that is not installed is reported as skipped.
"""

from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

torch.set_num_threads(2)

from nnshrink import Plan, compress, export_onnx, zoo  # noqa: E402
from nnshrink.data import load_dataset  # noqa: E402
from nnshrink.io.qdq import to_qdq_onnx  # noqa: E402
from nnshrink.techniques import Quantize  # noqa: E402

CALIB = 256


def _ort(path_or_bytes):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.inter_op_num_threads = 1
    so.log_severity_level = 3
    return ort.InferenceSession(path_or_bytes, so, providers=["CPUExecutionProvider"])


def _ort_accuracy(sess, x, y) -> float:
    pred = np.concatenate([sess.run(None, {sess.get_inputs()[0].name: x[i:i + 500]})[0].argmax(1)
                           for i in range(0, len(x), 500)])
    return float((pred == y).mean())


def _latency(sess, x, repeats: int) -> float:
    name = sess.get_inputs()[0].name
    sess.run(None, {name: x})
    t = time.perf_counter()
    for _ in range(repeats):
        sess.run(None, {name: x})
    return (time.perf_counter() - t) / repeats


def calib_batches(data, n=CALIB):
    x = data.tensors("train")[0]
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(len(x), generator=g)[:n]
    return [x[idx[i:i + 64]] for i in range(0, n, 64)]


def ours(model, data, calib, **cfg):
    x = data.tensors("val", 2)[0]
    t = time.perf_counter()
    sim = compress(model, Plan([Quantize(calib_samples=CALIB, **cfg)]), x, calib=calib).model
    return sim, time.perf_counter() - t


def nncf_ptq(model, data, calib):
    import logging

    import nncf

    logging.getLogger("nncf").setLevel(logging.ERROR)
    t = time.perf_counter()
    q = nncf.quantize(copy.deepcopy(model).eval(), nncf.Dataset(calib), subset_size=CALIB)
    return q, time.perf_counter() - t


def ort_static(model, data, calib, method: str, folder: str):
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    src = os.path.join(folder, "float.onnx")
    dst = os.path.join(folder, f"ort_{method}.onnx")
    export_onnx(model, src, data.tensors("val", 2)[0])

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.items = iter([{"input": b.numpy()} for b in calib])

        def get_next(self):
            return next(self.items, None)

    t = time.perf_counter()
    quantize_static(src, dst, Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=getattr(CalibrationMethod, method))
    return dst, time.perf_counter() - t


def torch_accuracy(model, x, y) -> float:
    with torch.no_grad():
        pred = torch.cat([model(x[i:i + 500]).argmax(1) for i in range(0, len(x), 500)])
    return float((pred == y).float().mean())


def run_model(name, data, folder):
    model = zoo.pretrained(name, data.name, show_progress=False)
    x, y = data.tensors("test")
    calib = calib_batches(data)
    xn, yn = x.numpy(), y.numpy()
    rows = [("float32", torch_accuracy(model, x, y), None, None)]
    sim, secs = ours(model, data, calib)
    sess = _ort(to_qdq_onnx(sim).SerializeToString())
    rows.append(("nnshrink W8A8 (CLE + bias corr.)", torch_accuracy(sim, x, y), _ort_accuracy(sess, xn, yn), secs))
    for label, cfg in (("  no CLE, no bias corr.", {"cle": False, "bias_correction": False}),
                       ("  + CLE", {"bias_correction": False}),
                       ("  per-tensor weights, plain", {"per_channel": False, "cle": False, "bias_correction": False}),
                       ("  per-tensor + CLE", {"per_channel": False, "bias_correction": False}),
                       ("  per-tensor + CLE + bias corr.", {"per_channel": False}),
                       ("  + AdaRound (per-channel)", {"adaround": True})):
        s, t = ours(model, data, calib, **cfg)
        rows.append((label, torch_accuracy(s, x, y), None, t))
    try:
        q, t = nncf_ptq(model, data, calib)
        rows.append(("NNCF quantize (torch)", torch_accuracy(q, x, y), None, t))
    except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
        rows.append((f"NNCF skipped ({type(exc).__name__}: {str(exc)[:60]})", None, None, None))
    for method in ("MinMax", "Percentile"):
        try:
            path, t = ort_static(model, data, calib, method, folder)
            rows.append((f"ORT quantize_static {method}", None, _ort_accuracy(_ort(path), xn, yn), t))
        except Exception as exc:  # noqa: BLE001
            rows.append((f"ORT {method} skipped ({type(exc).__name__})", None, None, None))
    float_path = os.path.join(folder, "float.onnx")
    export_onnx(model, float_path, x[:2])
    fsess = _ort(float_path)
    lat = {}
    for batch, reps in ((1, 300), (64, 30)):
        xb = xn[:batch]
        lat[batch] = (_latency(fsess, xb, reps), _latency(sess, xb, reps))
    return rows, lat


def w4_lenet5(data):
    model = zoo.pretrained("lenet5", data.name, show_progress=False)
    x, y = data.tensors("test")
    calib = calib_batches(data)
    f = torch_accuracy(model, x, y)
    out = {"nearest": [], "AdaRound": [], "QAT (LSQ, 600 steps)": []}
    for seed in range(3):
        cal = calib_batches(data) if seed == 0 else [b.roll(seed * 7, 0) for b in calib]
        s, _ = ours(model, data, cal, weight_bits=4, adaround=False)
        out["nearest"].append(torch_accuracy(s, x, y))
        s, _ = ours(model, data, cal, weight_bits=4, adaround=True)
        out["AdaRound"].append(torch_accuracy(s, x, y))
        trainer = zoo.make_trainer(data, seed=seed, show_progress=False)
        s = compress(model, Plan([Quantize(weight_bits=4, qat_steps=600)]), x[:2], calib=cal, train=trainer).model
        out["QAT (LSQ, 600 steps)"].append(torch_accuracy(s, x, y))
    print(f"\nLeNet-5 W4A8 (float {100 * f:.2f}%), held-out, seeds 0-2:")
    for k, v in out.items():
        print(f"  {k:24s} mean {100 * statistics.mean(v):6.2f}%  ({', '.join(f'{100 * a:.1f}' for a in v)})"
              f"  delta {100 * (statistics.mean(v) - f):+.2f}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="lenet300,lenet5,resnet8,mobilenet")
    parser.add_argument("--w4", action="store_true")
    args = parser.parse_args()
    data = load_dataset("mnist")
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            rows, lat = run_model(name, data, folder)
            print(f"\n{name}: held-out accuracy (1,000 digits), calibration on {CALIB} training images")
            print(f"  {'method':44s} {'torch':>8s} {'ORT':>8s} {'PTQ s':>7s}")
            for label, acc_t, acc_o, secs in rows:
                fmt = (lambda a: f"{100 * a:7.2f}%" if a is not None else "       -")  # noqa: E731
                print(f"  {label:44s} {fmt(acc_t)} {fmt(acc_o)} {secs if secs is not None else float('nan'):7.1f}")
            for batch, (f_lat, q_lat) in lat.items():
                print(f"  ORT latency batch {batch:3d}: float {1e3 * f_lat:.3f} ms, int8 {1e3 * q_lat:.3f} ms, "
                      f"int8/float {q_lat / f_lat:.2f}")
    if args.w4:
        w4_lenet5(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
