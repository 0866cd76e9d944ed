"""The budget step on the realistic zoo: half the MACs, and 8x smaller, each with its task metric.

Run: ``python benchmarks/budget_zoo.py [--models crnn,dbnet,...] [--steps 300] [--targets "macs=0.5;ratio=8x"]
[--techniques prune,share,rank,channels]``.

For every realistic-zoo model (``nnshrink.zoo.realistic``, trained here on generated data) and
every target, the ``budget`` step chooses per layer among its techniques from measured output
error (validation split, 256 unlabelled training inputs), then retrains the choice with the
task's own trainer for ``--steps`` steps (``--lr-scale`` times the recipe's learning rate, a tenth by default). Printed: the
task metric on the held-out test split before and after (and one-shot, before retraining), its
change relative to float, MACs after / before and float32 bytes / container bytes measured from
the written file, the step's byte estimate against that file, the measurements and full
evaluations, and wall time. One seed; two threads.

- ``macs=0.5`` combines ranks per layer (weight SVD of Linear and of any conv, spatial SVD of
  k x k convs) priced by the graph's MAC counter: the least output error within half the MACs.
- ``ratio=8x`` combines pruning, k-means codebooks and ranks priced in container bytes.
- ``latency=0.7`` (with ``--targets``) chooses ranks priced in ONNX Runtime time (batch 1, one
  thread); printed: the timed latency of the result and the step's estimate, as ratios to the
  original's.
- ``--techniques ...,channels`` adds channel groups (pruned with ThiNet's selection and a
  least-squares refit, residual, concat and depthwise dependencies kept) to the ``macs=`` and
  ``latency=`` targets; a size target alone leaves them out (they buy MACs and time).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

torch.set_num_threads(2)
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import nnshrink as ns  # noqa: E402
from nnshrink.graph import analyze  # noqa: E402
from nnshrink.plan import Plan, compress  # noqa: E402
from nnshrink.search.budget import Budget  # noqa: E402
from nnshrink.zoo import realistic as R  # noqa: E402


def file_bytes(model, x) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "m.nsz"
        ns.save(model, path, x.repeat(2, *([1] * (x.dim() - 1))))
        return path.stat().st_size


def run(name: str, target: str, steps: int, techniques: tuple[str, ...], lr_scale: float = 0.1) -> dict:
    model, t = R.pretrained(name, show_progress=False)
    x = t.splits["train"][0][:1]
    calib = t.calibration(256)

    def train(m, n):
        return R.fit(m, t, steps=n, lr=t.lr * lr_scale, show_progress=False)

    macs_target = "ratio" not in target and "size" not in target  # macs= or latency= alone: nothing to share
    if "macs" not in target and "latency" not in target:
        techniques = tuple(t for t in techniques if t != "channels")
    budget = Budget(target=target, prune_steps=steps, share_steps=0 if macs_target else steps // 3, samples=256,
                    techniques=techniques)
    started = time.perf_counter()
    one_shot = compress(model, Plan([budget]), x, evaluate=lambda m: t.evaluate(m, "val"), calib=calib)
    mid = time.perf_counter()
    result = compress(model, Plan([budget]), x, evaluate=lambda m: t.evaluate(m, "val"), train=train, calib=calib)
    done = time.perf_counter()
    d = result.steps[0].details
    before, after = analyze(model, x), analyze(result.model, x)
    real = file_bytes(result.model, x)
    f = t.evaluate(model)
    ranked = sum(1 for s in d["layers"].values() if s.get("rank"))
    narrowed = sum(1 for c in d.get("channels", {}).values() if c["kept"] < c["channels"])
    return {"model": name, "target": target, "metric": t.metric_name, "float": f,
            "one_shot": t.evaluate(one_shot.model), "after": t.evaluate(result.model),
            "mac_ratio": after.total_macs / before.total_macs, "ratio": before.total_bytes / real,
            "estimate": d["bytes_estimated"] / real - 1, "measurements": d["measurements"],
            "evaluations": d["evaluations"] + one_shot.steps[0].details["evaluations"], "ranked": ranked, "narrowed": narrowed,
            "groups": {k: f"{c['kept']}/{c['channels']}" for k, c in d.get("channels", {}).items() if c["kept"] < c["channels"]},
            "layers": len(d["layers"]), "seconds_one_shot": mid - started, "seconds": done - mid,
            "latency_ratio": d.get("latency_ratio"), "latency_estimated": d.get("latency_estimated_s"),
            "latency_before": d.get("latency_before_s")}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(R.NAMES))
    ap.add_argument("--targets", default="macs=0.5;ratio=8x", help="budget targets, separated by ';'")
    ap.add_argument("--steps", type=int, default=300, help="retraining steps after the choice")
    ap.add_argument("--lr-scale", type=float, default=0.1, help="retraining learning rate, times the recipe's")
    ap.add_argument("--techniques", default="prune,share,rank", help="the budget's techniques, comma-joined")
    args = ap.parse_args(argv)
    rows = []
    print(f"{'model':12} {'target':10} {'metric':28} {'float':>7} {'1-shot':>7} {'after':>7} {'rel':>7} "
          f"{'MACs':>6} {'ratio':>6} {'est':>6} {'ranked':>7} {'groups':>6} {'meas':>5} {'evals':>5} {'s':>6} {'latency':>8} {'l-est':>6}")
    for name in args.models.split(","):
        for target in args.targets.split(";"):
            try:
                r = run(name, target, args.steps, tuple(args.techniques.split(",")), args.lr_scale)
            except ns.ConfigError as exc:
                print(f"{name:12} {target:10} refused: {exc}")
                continue
            rows.append(r)
            rel = r["after"] / r["float"] - 1
            print(f"{name:12} {target:10} {r['metric'][:28]:28} {r['float']:7.4f} {r['one_shot']:7.4f} "
                  f"{r['after']:7.4f} {rel:+7.2%} {r['mac_ratio']:6.3f} {r['ratio']:6.2f} {r['estimate']:+6.1%} "
                  f"{r['ranked']:>3}/{r['layers']:<3} {r['narrowed']:6d} {r['measurements']:5d} {r['evaluations']:5d} "
                  f"{r['seconds_one_shot'] + r['seconds']:6.0f}"
                  + (f" {r['latency_ratio']:8.3f} {r['latency_estimated'] / r['latency_before']:6.3f}"
                     if r["latency_ratio"] is not None else ""), flush=True)
            if r["groups"]:
                print(f"{'':12} groups narrowed (kept/channels): " + ", ".join(f"{k} {v}" for k, v in r["groups"].items()),
                      flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
