"""Deep Compression on LeNet-300-100 and LeNet-5: prune, share weights, entropy-code.

Run: ``python benchmarks/deep_compression.py [--quick]``. For each model, sweeps sparsity x
codebook bits for the whole model, and per-layer settings derived from one-shot layer
sensitivity at three tolerated drops (``layer 2%``...), each with retraining on the training
split; writes every result as a real
``.nsz`` container, and prints container bytes, compression against float32 and held-out
accuracy on the same 1,000 test images as the float model. The configuration is chosen on the
validation split (the smallest within 0.2 point of float); the frontier plot goes to
``benchmarks/out/``. One seed: differences of 0.1 point are one image.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

torch.set_num_threads(2)

from nnshrink import Plan, zoo  # noqa: E402
from nnshrink.data import load_dataset  # noqa: E402
from nnshrink.report.plots import frontier_plot  # noqa: E402
from nnshrink.search import layer_sensitivity, pareto, per_layer_plan, smallest_within, sweep  # noqa: E402
from nnshrink.techniques import ShareWeights, Sparsify  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a 2x2 grid with short retraining")
    args = parser.parse_args()
    data = load_dataset("mnist")
    out = Path(__file__).resolve().parent / "out"
    sparsities = (0.9, 0.95) if args.quick else (0.9, 0.92, 0.95, 0.97)
    bits_grid = (3, 4) if args.quick else (2, 3, 4)
    prune_steps, share_steps = (400, 150) if args.quick else (800, 300)
    for name in ("lenet300", "lenet5"):
        model = zoo.pretrained(name, "mnist", show_progress=False)
        x = torch.zeros(1, *data.input_shape)
        f32 = sum(p.numel() for p in model.parameters()) * 4
        val0, test0 = zoo.accuracy(model, data, "val"), zoo.accuracy(model, data, "test")
        plans = {f"{s:.0%}/{b}b": Plan([Sparsify(sparsity=s, steps=prune_steps), ShareWeights(bits=b, steps=share_steps)])
                 for s in sparsities for b in bits_grid}
        # per-layer settings from one-shot sensitivity on the validation split
        sens = layer_sensitivity(model, zoo.make_evaluator(data, "val"), show_progress=False)
        for drop in (0.01, 0.02, 0.05):
            plans[f"layer {drop:.0%}"] = per_layer_plan(sens, drop, prune_steps, share_steps)
        start = time.perf_counter()
        points = sweep(model, plans, x, zoo.make_evaluator(data, "val"), zoo.make_evaluator(data, "test"),
                       zoo.make_trainer(data, show_progress=False), show_progress=False)
        took = time.perf_counter() - start
        front = pareto(points, "test_accuracy")
        print(f"\n{name}: float32 {f32:,} B, val {val0:.2%}, test {test0:.2%}; {len(points)} configs in {took:.0f} s")
        print(f"{'config':10s} {'bytes':>9s} {'ratio':>7s} {'val':>7s} {'test':>7s} {'test - float':>12s}")
        for p in sorted(points, key=lambda p: p.bytes):
            mark = " *" if p in front else ""
            print(f"{p.label:10s} {p.bytes:>9,d} {f32 / p.bytes:>6.1f}x {p.val_accuracy:>7.2%} {p.test_accuracy:>7.2%} "
                  f"{100 * (p.test_accuracy - test0):>+11.1f}{mark}")
        chosen = smallest_within(points, val0, 0.002)
        if chosen:
            print(f"smallest within 0.2 point (chosen on validation): {chosen.label}, {chosen.bytes:,} B = "
                  f"{f32 / chosen.bytes:.1f}x, test {chosen.test_accuracy:.2%} ({100 * (chosen.test_accuracy - test0):+.1f})")
        within1 = [p for p in points if p.test_accuracy >= test0 - 0.01]
        if within1:
            best = min(within1, key=lambda p: p.bytes)
            print(f"frontier within 1 point (test): {best.label}, {f32 / best.bytes:.1f}x")
        plot = frontier_plot(points, front, f32, test0, out / f"frontier_{name}.png",
                             f"{name}: Deep Compression on bundled MNIST", chosen)
        print(f"plot: {plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
