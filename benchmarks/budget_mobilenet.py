"""The budget step on the MobileNetV2-style net: half the MACs and 16x smaller, within 1 point.

Run: ``python benchmarks/budget_mobilenet.py [--seeds 3] [--first-seed 0] [--data mnist]
[--targets "macs=0.5;ratio=16x"] [--steps 600] [--retrained-only]``.

For each seed the zoo's ``mobilenet`` (inverted residuals, depthwise 3x3 convs, batch norms) is
trained on the data (cached), then for each target:

- ``macs=0.5``: the budget over ranks alone (weight SVD of the 1x1 convs and the head; the 3x3
  convs are depthwise and have no rank to cut), over channel groups alone (``channels``: every
  dependency group, residual adds and depthwise convs pruned together), and over both, each
  one-shot; then ranks and channels retrained (``--steps`` of the bundled trainer).
- ``ratio=16x``: the budget's default techniques (per-layer pruning and k-means codebooks,
  priced in container bytes), retrained.

Printed per run: held-out test accuracy against float (points), MACs after / before, float32
bytes / container bytes on disk (the step's estimate against that file), full evaluations and
wall time; then the means over the seeds. Choices are made on the validation split only.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

torch.set_num_threads(2)

import nnshrink as ns  # noqa: E402
from nnshrink import zoo  # noqa: E402
from nnshrink.data import load_dataset  # noqa: E402
from nnshrink.graph import analyze  # noqa: E402
from nnshrink.plan import Plan, compress  # noqa: E402
from nnshrink.search.budget import Budget  # noqa: E402


def file_bytes(model, x) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.nsz"
        ns.save(model, path, x.repeat(2, *([1] * (x.dim() - 1))))
        return path.stat().st_size


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run from this one")
    ap.add_argument("--data", default="mnist")
    ap.add_argument("--targets", default="macs=0.5;ratio=16x", help="budget targets, separated by ';'")
    ap.add_argument("--steps", type=int, default=600, help="retraining steps of the chosen model")
    ap.add_argument("--retrained-only", action="store_true", help="skip the one-shot runs beside a MAC target")
    args = ap.parse_args(argv)
    ds = load_dataset(args.data)
    means: dict[str, list] = {}
    for seed in range(args.first_seed, args.first_seed + args.seeds):
        model = zoo.pretrained("mobilenet", args.data, seed=seed, show_progress=False)
        x = zoo.example_input(model)
        ev, tr = zoo.make_evaluator(ds, "val"), zoo.make_trainer(ds, seed=seed, show_progress=False)
        calib = ds.loader("train", batch_size=64, shuffle=True, seed=seed)
        before = analyze(model, x)
        float_test = zoo.accuracy(model, ds, "test")
        print(f"mobilenet seed {seed}: float test {float_test:.2%}, {before.total_macs:,} MACs, "
              f"float32 {before.total_bytes:,} B", flush=True)
        for target in args.targets.split(";"):
            fractions = "macs" in target or "latency" in target
            runs = [("rank", ("rank",), False), ("channels", ("channels",), False),
                    ("rank+channels", ("rank", "channels"), False), ("rank+channels", ("rank", "channels"), True)] \
                if fractions else [("prune+share", ("prune", "share"), True)]
            if args.retrained_only:
                runs = [r for r in runs if r[2]]
            for label, techniques, retrain in runs:
                steps = dict(prune_steps=args.steps, share_steps=args.steps // 3) if retrain else \
                    dict(prune_steps=0, share_steps=0)
                t = time.perf_counter()
                try:
                    r = compress(model, Plan([Budget(target=target, techniques=techniques, **steps)]), x,
                                 evaluate=ev, train=tr if retrain else None, calib=calib)
                except ns.ConfigError as exc:
                    print(f"  {target} {label}: refused: {exc}", flush=True)
                    continue
                seconds = time.perf_counter() - t
                d = r.steps[0].details
                real = file_bytes(r.model, x)
                test = zoo.accuracy(r.model, ds, "test")
                narrowed = sum(1 for c in d.get("channels", {}).values() if c["kept"] < c["channels"])
                ranked = sum(1 for s in d["layers"].values() if s.get("rank"))
                name = f"{target} {label}{' retrained' if retrain else ' one-shot'}"
                means.setdefault(name, []).append(((test - float_test) * 100, d["mac_ratio"],
                                                   before.total_bytes / real))
                print(f"  {name:34s} test {test:.2%} ({(test - float_test) * 100:+.2f} point), MACs "
                      f"{d['mac_ratio']:.3f}, {before.total_bytes / real:.1f}x (estimate {d['estimate_error']:+.1%}), "
                      f"{ranked} ranked, {narrowed} groups narrowed, {d['evaluations']} evaluations, {seconds:.0f} s",
                      flush=True)
    print(f"\nmeans over {args.seeds} seeds: test against float (points), MACs after / before, float32 / file")
    for name, rows in means.items():
        drop, macs, ratio = np.mean(rows, axis=0)
        print(f"  {name:34s} {drop:+.2f} point  MACs {macs:.3f}  {ratio:.1f}x  (per seed: "
              f"{', '.join(f'{r[0]:+.2f}' for r in rows)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
