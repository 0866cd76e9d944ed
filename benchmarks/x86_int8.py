"""ONNX Runtime's int8 results on x86 CPUs with and without VNNI, per quantize target.

Run: ``python benchmarks/x86_int8.py [--models lenet300,lenet5,resnet8,mobilenet] [--images 256]``.
Needs ``qemu-x86_64`` (Debian's ``qemu-user``) for the CPU without VNNI.

Each trained zoo model is quantized (W8A8 PTQ, the default settings, 256 training images) for
each ``target`` of the ``quantize`` step: ``ort-x86`` (the default: 7-bit int8 weights, u8 x s8
kernels), ``ort-x86-u8`` (8-bit weights written as uint8, u8 x u8 kernels) and ``npu``
(full-range int8 weights, u8 x s8 kernels). Its QDQ model, with every integer
tensor made an output, runs in ONNX Runtime twice on the same held-out digits: natively on this
CPU, and on an AMD EPYC Zen 2 (AVX2, no VNNI) emulated by QEMU, which answers CPUID as that CPU
does, so ONNX Runtime picks the kernels it would pick there. Printed per model and layout:
elements of all integer tensors that differ from nnshrink's integer reference (``float`` mode),
the largest difference in LSB, the first layer that differs and its share, and the accuracy of
ONNX Runtime's output. ``--latency`` adds this CPU's ONNX Runtime latency of each layout as a
ratio against the default (two threads; emulated timings mean nothing and are not taken).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

torch.set_num_threads(2)

from nnshrink import Plan, compress, zoo  # noqa: E402
from nnshrink.data import load_dataset  # noqa: E402
from nnshrink.io.qdq import int_tensor_names, to_qdq_onnx, x86_int8_kernel  # noqa: E402
from nnshrink.techniques import Quantize  # noqa: E402
from nnshrink.techniques.quant.reference import IntegerModel  # noqa: E402

LAYOUTS = {"ort-x86 (default, 7-bit int8 weights)": {}, "ort-x86-u8 (8-bit uint8 weights)": {"target": "ort-x86-u8"},
           "npu (8-bit int8 weights)": {"target": "npu"}}

_RUNNER = """
import sys, numpy as np, onnxruntime as ort
folder, names = sys.argv[1], sys.argv[2:]
x = np.load(folder + "/x.npy")
out = {}
for name in names:
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.log_severity_level = 3
    sess = ort.InferenceSession(f"{folder}/{name}.onnx", so, providers=["CPUExecutionProvider"])
    for i, o in enumerate(sess.run(None, {"input": x})):
        out[f"{name}/{i}"] = o
np.savez(folder + "/out.npz", **out)
"""


def _run(folder: str, names: list[str], emulate: str | None) -> dict:
    cmd = [sys.executable, "-c", _RUNNER, folder, *names]
    if emulate:
        cmd = [emulate, "-cpu", "EPYC-Rome", *cmd]
    subprocess.run(cmd, check=True, stderr=subprocess.DEVNULL)
    return dict(np.load(os.path.join(folder, "out.npz")))


def _latency(path: str, x: np.ndarray, repeats: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    sess.run(None, {"input": x})
    t = time.perf_counter()
    for _ in range(repeats):
        sess.run(None, {"input": x})
    return (time.perf_counter() - t) / repeats


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="lenet300,lenet5,resnet8,mobilenet")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--latency", action="store_true")
    args = parser.parse_args()
    qemu = shutil.which("qemu-x86_64")
    print(f"this CPU: {x86_int8_kernel()}; emulated: {'EPYC-Rome (avx2)' if qemu else 'skipped (no qemu-x86_64)'}")
    data = load_dataset("mnist")
    x, y = data.tensors("test", args.images)
    g = torch.Generator().manual_seed(0)
    xt = data.tensors("train")[0]
    calib = list(xt[torch.randperm(len(xt), generator=g)[:256]].split(64))
    with tempfile.TemporaryDirectory() as folder:
        np.save(os.path.join(folder, "x.npy"), x.numpy())
        for name in args.models.split(","):
            model = zoo.pretrained(name, "mnist", show_progress=False)
            refs, files = {}, {}
            for i, (label, cfg) in enumerate(LAYOUTS.items()):
                sim = compress(model, Plan([Quantize(**cfg)]), x[:2], calib=calib).model
                names = int_tensor_names(sim)
                files[label] = f"m{i}"
                with open(os.path.join(folder, f"m{i}.onnx"), "wb") as f:
                    f.write(to_qdq_onnx(sim, int_outputs=names).SerializeToString())
                env = IntegerModel(sim, "float").run(x.numpy())
                refs[label] = (names, [env[n] for n in names], sim)
            runs = {"native": _run(folder, list(files.values()), None)}
            if qemu:
                runs["avx2 emulated"] = _run(folder, list(files.values()), qemu)
            print(f"\n{name} ({args.images} test digits): integer tensors differing from the reference")
            print(f"  {'target':38s} {'CPU':14s} {'differ':>16s} {'max LSB':>8s}  {'first layer that differs':32s} {'ORT acc':>8s}")
            for label, (names, want, sim) in refs.items():
                for cpu, out in runs.items():
                    got = [out[f"{files[label]}/{i}"].astype(np.int64) - 128 for i in range(len(names))]
                    bad = sum(int((g != w).sum()) for g, w in zip(got, want))
                    total = sum(w.size for w in want)
                    lsb = max(int(np.abs(g - w).max()) for g, w in zip(got, want))
                    first = next((f"{n} ({100 * (g != w).mean():.0f}%)" for n, g, w in zip(names, got, want)
                                  if (g != w).any()), "-")
                    t = refs[label][2].aq[refs[label][2].output.replace(".", "__")]
                    logits = (got[names.index(sim.output)] - int(t.zero_point)) * float(t.scale)
                    acc = float((logits.argmax(1) == y.numpy()).mean())
                    print(f"  {label:38s} {cpu:14s} {f'{bad:,}/{total:,}':>16s} {lsb:8d}  {first:32s} {100 * acc:7.2f}%")
            if args.latency:
                base = None
                for label, (names, _, sim) in refs.items():
                    path = os.path.join(folder, "lat.onnx")
                    with open(path, "wb") as f:
                        f.write(to_qdq_onnx(sim).SerializeToString())
                    lat = [_latency(path, x.numpy()[:b], r) for b, r in ((1, 300), (64, 30))]
                    base = base or lat
                    print(f"  latency {label:38s} batch 1 {1e3 * lat[0]:.3f} ms ({lat[0] / base[0]:.2f}x), "
                          f"batch 64 {1e3 * lat[1]:.3f} ms ({lat[1] / base[1]:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
