"""What compression buys on Arm Ethos-U, in Vela's own numbers.

Run: ``python benchmarks/ethos_u.py [--models lenet5,lenet300] [--quick]``. For each trained zoo
model and each plan (dense W8A8; 70% gradual pruning; 70% pruning plus 16-value weight sharing;
2:4 pruning along each row's flattened inputs and along input channels (Ethos-U85's form); each then quantized W8A8 for ``target: npu``), it writes the ``.nsz`` container,
reads it back into the int8 TFLite file (``nnshrink export --tflite``), runs that file in LiteRT's
reference kernels on the 1,000 test digits, and compiles it with Vela for Ethos-U55-128 and
Ethos-U85-256. Printed per row: test accuracy (container and TFLite), nnshrink's container
bytes, the TFLite file's int8 weight bytes, Vela's encoded weight bytes and NPU cycles, each as
a ratio to the dense row; and LiteRT's default (XNNPACK) path against the reference kernels:
the share of output integers that differ and the largest difference.

The weight-shared rows quantize per tensor (one scale per layer keeps 16 distinct integers per
layer; per-channel scales would spread them over up to 16 x channels values, which Vela's
palette mode cannot hold).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(2)

from nnshrink import Plan, zoo  # noqa: E402
from nnshrink.data import load_dataset  # noqa: E402
from nnshrink.deploy import ethos_u  # noqa: E402
from nnshrink.io import load, read_onnx_from_container, save  # noqa: E402
from nnshrink.io.qdq import graph_from_qdq  # noqa: E402
from nnshrink.io.tflite import litert_run, to_tflite  # noqa: E402
from nnshrink.techniques import ShareWeights, Sparsify  # noqa: E402
from nnshrink.techniques.quant import Quantize  # noqa: E402


def _weight_bytes(graph) -> int:
    return sum(lq.q.size for lq in graph.layers.values() if lq.q is not None)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="lenet5,lenet300")
    parser.add_argument("--quick", action="store_true", help="shorter retraining")
    args = parser.parse_args()
    data = load_dataset("mnist")
    prune_steps, share_steps = (300, 100) if args.quick else (1500, 300)
    xt, yt = data.tensors("test")
    for name in args.models.split(","):
        model = zoo.pretrained(name, "mnist", show_progress=False)
        x = torch.zeros(2, *data.input_shape)
        train = zoo.make_trainer(data, show_progress=False)
        calib = data.loader("train", batch_size=64, shuffle=True, seed=0)
        f32_acc = zoo.accuracy(model, data, "test")
        plans = {
            "dense": [Quantize(target="npu")],
            "70%": [Sparsify(sparsity=0.7, steps=prune_steps), Quantize(target="npu")],
            "70% + 16 values": [Sparsify(sparsity=0.7, steps=prune_steps), ShareWeights(bits=4, steps=share_steps),
                                Quantize(target="npu", per_channel=False)],
            "2:4 (rows)": [Sparsify(sparsity=0.5, pattern="2:4", steps=prune_steps), Quantize(target="npu")],
            "2:4 (channels)": [Sparsify(sparsity=0.5, pattern="2:4", nm_groups="channels", steps=prune_steps),
                               Quantize(target="npu")],
        }
        print(f"\n{name}: float32 test accuracy {f32_acc:.2%}")
        head = (f"{'plan':16s} {'container':>9s} {'tflite':>7s} {'nsz B':>8s} {'int8 w B':>9s} "
                f"{'U55 enc B':>10s} {'x':>5s} {'U55 cyc':>9s} {'x':>5s} {'U85 enc B':>10s} {'x':>5s} "
                f"{'U85 cyc':>9s} {'x':>5s} {'xnnpack diff':>13s}")
        print(head)
        base = None
        for label, steps in plans.items():
            start = time.perf_counter()
            from nnshrink.plan import compress

            result = compress(model, Plan(steps), x, evaluate=zoo.make_evaluator(data, "val"), train=train,
                              calib=calib)
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / f"{name}.nsz"
                save(result.model, path, x)
                acc_nsz = zoo.accuracy(load(path), data, "test")
                graph = graph_from_qdq(read_onnx_from_container(path), x[:1])
                tfl = to_tflite(graph, x[:1])
                nsz_bytes = path.stat().st_size
            ref = litert_run(tfl, xt.numpy())[0]
            fast = litert_run(tfl, xt.numpy(), reference=False)[0]
            acc_tfl = float((ref.argmax(1) == yt.numpy()).mean())
            scale = float(graph.tensors[graph.outputs[0]].scale)
            steps_off = np.rint(np.abs(ref - fast) / scale)
            u55 = ethos_u.compile_for(tfl, "ethos-u55-128", name=name)
            u85 = ethos_u.compile_for(tfl, "ethos-u85-256", name=name)
            row = (u55["weight_bytes_encoded"], u55["cycles_npu"], u85["weight_bytes_encoded"], u85["cycles_npu"])
            base = base or row
            r = [b / v for b, v in zip(base, row)]
            print(f"{label:16s} {acc_nsz:>9.2%} {acc_tfl:>7.2%} {nsz_bytes:>8,d} {_weight_bytes(graph):>9,d} "
                  f"{row[0]:>10,d} {r[0]:>4.1f}x {row[1]:>9,d} {r[1]:>4.1f}x {row[2]:>10,d} {r[2]:>4.1f}x "
                  f"{row[3]:>9,d} {r[3]:>4.1f}x {(steps_off > 0).mean():>6.2%} {int(steps_off.max()):>2d} LSB"
                  f"  ({time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
