"""The budget step on LeNet-5 and LeNet-300-100: the smallest model within 0.2 point, and the most
accurate at 20x, 50x and 100x beside single-technique plans of equal or larger size.

Run: ``python benchmarks/budget.py [--seeds 3] [--first-seed 0] [--data mnist10k]
[--models lenet5,lenet300] [--techniques prune,share,astc]`` (``astc``: ASTC footprints as one
more per-layer choice).

- **Within a drop**: ``budget`` with ``max_drop`` (0.2 point on validation); the container's
  ratio to float32 and its held-out test accuracy against float, means over the seeds.
- **At a size**: ``budget`` with ``ratio=20x|50x|100x`` beside three single-technique plans, each
  the smallest of its family whose container is at or above the searched one's bytes:
  ``uniform`` (one sparsity and one codebook size for every layer, the same retraining steps);
  ``sweep`` (the per-layer plan of :mod:`nnshrink.search.sensitivity`: each layer pruned and shared
  alone, one-shot, on validation, its settings the harshest within a tolerated drop; tolerances
  0.1 to 20 points; the same retraining steps); ``bits`` (``quantize_weights`` at one width, 2 to
  8 bits, for every layer: MSE scales, GPTQ rounding from calibration inputs; weight-only integer
  quantization has no retraining step, so it is one-shot). ``--baselines`` picks among them.
- Every result is a real ``.nsz``, sized on disk; the step's byte estimate against the file;
  full evaluations and wall time per run.

The validation split is where choices are made; ``mnist10k`` has 1,000 validation digits (0.1
point each) where the bundled ``mnist`` has 500 (0.2 point: one digit would be the whole budget).
A Pareto plot of every verified point per model goes to ``benchmarks/out/budget_<model>.png``.
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
from nnshrink.search.sensitivity import layer_sensitivity, per_layer_plan  # noqa: E402
from nnshrink.techniques import ShareWeights, Sparsify  # noqa: E402
from nnshrink.techniques.weights import QuantizeWeights  # noqa: E402

OUT = Path(__file__).resolve().parent / "out"
UNIFORM = [(s, b) for s in (0.5, 0.7, 0.8, 0.9, 0.95, 0.97, 0.98, 0.99) for b in (3, 4, 5)]
TOLERANCES = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2)  # the sweep's tolerated one-shot drops per layer
BASELINES = ("uniform", "sweep", "bits")


def file_bytes(model, x, folder) -> int:
    path = Path(folder) / "m.nsz"
    ns.save(model, path, x.repeat(2, *([1] * (x.dim() - 1))))
    return path.stat().st_size


def uniform_bytes(model, x, calib, folder) -> dict:
    """Bytes of each uniform (sparsity, bits) plan one-shot: retraining keeps the masks and the
    codebook sizes, so the file after retraining is within a few bytes of this."""
    out = {}
    for s, b in UNIFORM:
        m = compress(model, Plan([Sparsify(sparsity=s, scope="layer"), ShareWeights(bits=b)]), x).model
        out[(s, b)] = file_bytes(m, x, folder)
    return out


def family_bytes(model, x, calib, ev, folder, which: str) -> tuple[dict, object]:
    """Bytes of each plan of a baseline family one-shot (retraining keeps masks, codebook sizes
    and widths, so the file after it is within a few bytes), and what building them needs."""
    if which == "uniform":
        return uniform_bytes(model, x, calib, folder), None
    if which == "sweep":
        sens = layer_sensitivity(model, ev, show_progress=False)
        return {t: file_bytes(compress(model, per_layer_plan(sens, t, 0, 0), x).model, x, folder)
                for t in TOLERANCES}, sens
    return {b: file_bytes(bits_model(model, x, calib, b), x, folder) for b in range(2, 9)}, None


def bits_model(model, x, calib, bits):
    return compress(model, Plan([QuantizeWeights(bits=bits, scales="mse", rounding="gptq")]), x, calib=calib).model


def baseline(which: str, key, extra, model, x, calib, tr, args):
    """The family's plan ``key`` built as the comparison runs it (retrained where it can be)."""
    if which == "uniform":
        s, b = key
        plan = Plan([Sparsify(sparsity=s, scope="layer", steps=args.prune_steps),
                     ShareWeights(bits=b, steps=args.share_steps)])
        return compress(model, plan, x, train=tr).model, f"uniform {s:.0%}/{b} bits"
    if which == "sweep":
        return (compress(model, per_layer_plan(extra, key, args.prune_steps, args.share_steps), x, train=tr).model,
                f"sweep within {key * 100:g} point per layer")
    return bits_model(model, x, calib, key), f"{key}-bit weights"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--first-seed", type=int, default=0, help="seeds run from this one")
    ap.add_argument("--data", default="mnist10k")
    ap.add_argument("--models", default="lenet5,lenet300")
    ap.add_argument("--ratios", default="20,50,100", help="size targets (x float32) compared with uniform plans")
    ap.add_argument("--compare", default="lenet5", help="models for the size-target comparison")
    ap.add_argument("--max-drop", type=float, default=0.002)
    ap.add_argument("--skip-drop", action="store_true", help="only the size targets")
    ap.add_argument("--prune-steps", type=int, default=Budget.prune_steps, help="retraining steps with masks held")
    ap.add_argument("--share-steps", type=int, default=Budget.share_steps, help="retraining steps with codebooks held")
    ap.add_argument("--no-uniform", action="store_true", help="size targets without the single-technique plans beside them")
    ap.add_argument("--baselines", default=",".join(BASELINES), help="single-technique families beside a size target")
    ap.add_argument("--techniques", default="",
                    help="the budget's techniques, comma-joined (prune,share,rank,astc; default: the step's)")
    args = ap.parse_args(argv)
    techniques = tuple(t for t in args.techniques.split(",") if t)
    families = () if args.no_uniform else tuple(b for b in args.baselines.split(",") if b)
    if set(families) - set(BASELINES):
        ap.error(f"--baselines are chosen from {', '.join(BASELINES)}")
    steps = {"prune_steps": args.prune_steps, "share_steps": args.share_steps}
    ds = load_dataset(args.data)
    OUT.mkdir(exist_ok=True)
    summary: dict = {}
    for name in args.models.split(","):
        rows = summary.setdefault(name, {"drop": [], "sizes": {}})
        all_points = []
        for seed in range(args.first_seed, args.first_seed + args.seeds):
            model = zoo.pretrained(name, args.data, seed=seed, show_progress=False)
            x = zoo.example_input(model)
            ev, tr = zoo.make_evaluator(ds, "val"), zoo.make_trainer(ds, seed=seed, show_progress=False)
            calib = ds.loader("train", batch_size=64, shuffle=True, seed=seed)
            float_test = zoo.accuracy(model, ds, "test")
            float32 = analyze(model, x).total_bytes
            print(f"{name} seed {seed}: float test {float_test:.2%}, float32 {float32:,} B", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                if not args.skip_drop:
                    t = time.perf_counter()
                    r = compress(model, Plan([Budget(max_drop=args.max_drop, techniques=techniques, **steps)]), x, evaluate=ev, train=tr, calib=calib)
                    d = r.steps[0].details
                    real = file_bytes(r.model, x, tmp)
                    test = zoo.accuracy(r.model, ds, "test")
                    rows["drop"].append((float32 / real, test - float_test))
                    all_points += [(p["bytes"], p["val_metric"]) for p in d["frontier"]]
                    print(f"  within {args.max_drop * 100:.1f} point on validation: {float32 / real:.1f}x "
                          f"({real:,} B, estimate {d['bytes_estimated']:,} B, {d['estimate_error']:+.2%}), "
                          f"test {test:.2%} ({(test - float_test) * 100:+.2f} point), {d['evaluations']} evaluations, "
                          f"{time.perf_counter() - t:.0f} s", flush=True)
                    print(f"    layers: {d['layers']}", flush=True)
                if name not in args.compare.split(","):
                    continue
                built = {f: family_bytes(model, x, calib, ev, tmp, f) for f in families}
                for ratio in (float(v) for v in args.ratios.split(",")):
                    t = time.perf_counter()
                    r = compress(model, Plan([Budget(target=f"ratio={ratio:g}x", techniques=techniques, **steps)]), x, evaluate=ev, train=tr,
                                 calib=calib)
                    searched = file_bytes(r.model, x, tmp)
                    s_test = zoo.accuracy(r.model, ds, "test")
                    seconds = time.perf_counter() - t
                    beside, texts = {}, []
                    for f, (sizes, extra) in built.items():
                        larger = sorted((v, str(k), k) for k, v in sizes.items() if v >= searched)
                        if not larger:
                            texts.append(f"{f}: none that large (largest {float32 / max(sizes.values()):.1f}x)")
                            continue
                        u, label = baseline(f, larger[0][2], extra, model, x, calib, tr, args)
                        u_bytes, u_test = file_bytes(u, x, tmp), zoo.accuracy(u, ds, "test")
                        beside[f] = (float32 / u_bytes, u_test)
                        texts.append(f"{label}: {float32 / u_bytes:.1f}x test {u_test:.2%}")
                    rows["sizes"].setdefault(ratio, []).append((float32 / searched, s_test, s_test - float_test, beside))
                    print(f"  ratio={ratio:g}x: searched {float32 / searched:.1f}x test {s_test:.2%} "
                          f"({(s_test - float_test) * 100:+.2f} point) ({r.steps[0].details['evaluations']} "
                          f"evaluations, {seconds:.0f} s); "
                          + ("; ".join(texts) or "no plans beside it"), flush=True)
        if all_points:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt

            fig, ax = plt.subplots(figsize=(6, 4))
            b, v = zip(*[(p, q) for p, q in all_points if q is not None])
            ax.scatter(np.array(b) / 1000, np.array(v) * 100, s=12)
            ax.set_xscale("log")
            ax.set_xlabel("container kB")
            ax.set_ylabel("validation accuracy (%)")
            ax.set_title(f"{name}: every candidate the budget step evaluated")
            fig.tight_layout()
            fig.savefig(OUT / f"budget_{name}.png", dpi=120)
            plt.close(fig)
    print("\nmeans over seeds (test accuracy against float, points)")
    for name, rows in summary.items():
        if rows["drop"]:
            ratio, drop = np.mean(rows["drop"], axis=0)
            print(f"{name}: within {args.max_drop * 100:.1f} point on validation: {ratio:.1f}x, "
                  f"test {drop * 100:+.2f} point")
        for target, vals in rows["sizes"].items():
            arr = np.array([[a, b, c] for a, b, c, _ in vals], float)
            m = arr.mean(axis=0)
            beside = []
            for f in families:
                got = [v[3][f] for v in vals if f in v[3]]
                if got:
                    g = np.mean(got, axis=0)
                    beside.append(f"{f} {g[0]:.1f}x {g[1]:.2%}" + ("" if len(got) == len(vals) else f" ({len(got)} seeds)"))
            print(f"  ratio={target:g}x: searched {m[0]:.1f}x {m[1]:.2%} ({m[2] * 100:+.2f} point against float; per "
                  f"seed {', '.join(f'{v * 100:+.2f}' for v in arr[:, 2])})  |  {'; '.join(beside) or 'nothing beside it'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
