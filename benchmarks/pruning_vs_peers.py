"""70% unstructured magnitude pruning with the same retraining budget: nnshrink, NNCF, torch.

Run: ``python benchmarks/pruning_vs_peers.py [--steps 800] [--sparsity 0.7]``. Every method
starts from the same trained zoo model, prunes to the same sparsity and retrains for the same
number of steps with the same bundled trainer (AdamW, one-cycle, lr 1e-3, batch 64); accuracy is
on the same 1,000 held-out digits. nnshrink prunes gradually (cubic schedule over the first 60% of
the steps); ``torch.nn.utils.prune`` and NNCF (``nncf.prune``, global magnitude) prune one-shot
and retrain with their masks in place. A peer that is not installed is reported as skipped.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch

torch.set_num_threads(2)

from nnshrink import Plan, compress, zoo  # noqa: E402
from nnshrink.data import load_dataset  # noqa: E402
from nnshrink.techniques import Sparsify, sparsity_of  # noqa: E402
from nnshrink.techniques.sparsity import prunable_layers  # noqa: E402


def ours(model, data, sparsity, steps, x):
    trainer = zoo.make_trainer(data, show_progress=False)
    return compress(model, Plan([Sparsify(sparsity=sparsity, steps=steps)]), x, train=trainer).model


def torch_prune(model, data, sparsity, steps, x):
    import torch.nn.utils.prune as tprune

    model = copy.deepcopy(model)
    params = [(m, "weight") for m in prunable_layers(model).values()]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=sparsity)
    zoo.make_trainer(data, show_progress=False)(model, steps)
    for m, name in params:
        tprune.remove(m, name)
    return model


def nncf_prune(model, data, sparsity, steps, x):
    import nncf

    model = nncf.prune(copy.deepcopy(model), nncf.PruneMode.UNSTRUCTURED_MAGNITUDE_GLOBAL, ratio=sparsity,
                       examples_inputs=x)
    zoo.make_trainer(data, show_progress=False)(model, steps)
    return nncf.strip(model, strip_format=nncf.StripFormat.IN_PLACE, example_input=x)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--models", default="lenet300,lenet5,resnet8")
    args = parser.parse_args()
    data = load_dataset("mnist")
    methods = {"nnshrink": ours, "torch.nn.utils.prune": torch_prune, "nncf": nncf_prune}
    print(f"{args.sparsity:.0%} sparsity, {args.steps} retraining steps each; held-out accuracy (sparsity measured)")
    print(f"{'model':10s} {'float':>7s} " + " ".join(f"{m:>26s}" for m in methods))
    for name in args.models.split(","):
        model = zoo.pretrained(name, "mnist", show_progress=False)
        x = torch.zeros(1, *data.input_shape)
        cells = []
        for method in methods.values():
            start = time.perf_counter()
            try:
                pruned = method(model, data, args.sparsity, args.steps, x)
            except ImportError as exc:
                cells.append(f"{'skipped (' + exc.name + ')':>26s}")
                continue
            took = time.perf_counter() - start
            cells.append(f"{zoo.accuracy(pruned, data):>8.2%} ({sparsity_of(pruned):.3f}, {took:4.0f} s)")
        print(f"{name:10s} {zoo.accuracy(model, data):>7.2%} " + " ".join(f"{c:>26s}" for c in cells), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
