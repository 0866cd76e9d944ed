"""Lossless weight coding: nnshrink's codec against Vela, zstd and lzma, and the entropy bound.

Run: ``python benchmarks/codec_vs_peers.py`` (peers from ``pip install 'nnshrink[bench]'``;
a missing peer is reported as skipped). Prints, for each weight set, the bytes of every coder,
each as a ratio to the order-0 entropy bound (headers included), and single-thread speeds in the
same process, with our decode speed as a ratio to zstd's.

Peers: zstd level 19, lzma (preset 9, extreme), Vela's codec on the flat tensor
(``mlw_codec.encode``, its best case) and Vela's encoding for the Ethos-U55-128 weight decoder
(``npu_encode_weights``, what Vela writes into a model; the Laplacian has no shape, so it gets
the flat codec there too).

Weight sets: the int8 weights of the four zoo models after PTQ (per-channel symmetric min-max,
as nnshrink's ``quantize_weights`` step makes them), the same 50% and 90% magnitude-pruned, the
same at 4 bits, and a synthetic Laplacian tensor of 1M values.
"""

from __future__ import annotations

import lzma
import os
import sys
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

from nnshrink import zoo  # noqa: E402
from nnshrink.codec import decode, encode, entropy_bits  # noqa: E402
from nnshrink.graph import fold_batchnorms, is_compressible  # noqa: E402


def quantize(w: np.ndarray, bits: int) -> np.ndarray:
    qmax = 2 ** (bits - 1) - 1
    flat = np.abs(w.reshape(w.shape[0], -1)).max(axis=1)
    scale = np.where(flat > 0, flat / qmax, 1.0).reshape((-1,) + (1,) * (w.ndim - 1))
    return np.clip(np.round(w / scale), -qmax, qmax).astype(np.int8)


def prune(q: np.ndarray, sparsity: float) -> np.ndarray:
    out = q.copy()
    if sparsity > 0:
        threshold = np.quantile(np.abs(q.astype(np.int16)), sparsity)
        out[np.abs(q.astype(np.int16)) <= threshold] = 0
    return out


def model_tensors(name: str) -> list[tuple[str, np.ndarray]]:
    model, _ = fold_batchnorms(zoo.pretrained(name, show_progress=False))
    return [(n, m.weight.detach().numpy()) for n, m in model.named_modules() if is_compressible(m)]


def peers():
    """Each peer's encoder, from an integer array to its encoded size in bytes."""
    found = {}
    try:
        import zstandard

        found["zstd-19"] = lambda a: len(zstandard.ZstdCompressor(level=19).compress(a.tobytes()))
    except ImportError:
        print("zstd: skipped (pip install zstandard)")
    found["lzma"] = lambda a: len(lzma.compress(a.tobytes(), preset=9 | lzma.PRESET_EXTREME))
    try:
        from ethosu import mlw_codec

        found["vela"] = lambda a: len(mlw_codec.encode(a.reshape(-1).astype(int).tolist()))
        found["vela-npu"] = lambda a: vela_npu(a) if a.ndim >= 2 else found["vela"](a)
    except ImportError:
        print("vela: skipped (pip install ethos-u-vela)")
    return found


def vela_npu(q: np.ndarray) -> int:
    """Bytes of Vela's weight stream for the Ethos-U55-128 (``npu_encode_weights``: OHWI weights in
    the NPU's brick order, depth-first, OFM blocks of 16), as Vela writes it into a model."""
    from ethosu.vela.api import NpuAccelerator, NpuBlockTraversal, npu_encode_weights

    if q.ndim == 2:  # a fully connected layer is a 1x1 convolution
        ohwi = q[:, None, None, :]
    else:
        ohwi = q.reshape(q.shape[0], q.shape[1], q.shape[2], -1).transpose(0, 2, 3, 1)
    depthwise = q.ndim == 4 and q.shape[1] == 1 and q.shape[0] > 1
    return len(npu_encode_weights(NpuAccelerator.Ethos_U55_128, np.ascontiguousarray(ohwi, dtype=np.int16), (1, 1),
                                  8, 16, depthwise, NpuBlockTraversal.DEPTH_FIRST))


def main() -> int:
    coders = peers()
    sets: dict[str, list[np.ndarray]] = {}
    for name in zoo.NAMES:
        tensors = model_tensors(name)
        sets[f"{name} int8"] = [quantize(w, 8) for _, w in tensors]
        sets[f"{name} int8 50% pruned"] = [prune(q, 0.5) for q in sets[f"{name} int8"]]
        sets[f"{name} int8 90% pruned"] = [prune(q, 0.9) for q in sets[f"{name} int8"]]
        sets[f"{name} int4"] = [quantize(w, 4) for _, w in tensors]
    rng = np.random.default_rng(0)
    sets["laplacian 1M"] = [np.clip(np.round(rng.laplace(0, 12, 1_000_000)), -127, 127).astype(np.int8)]

    names = ["nnshrink"] + list(coders)
    print(f"\n{'weight set':28s} {'entropy B':>10s} " + " ".join(f"{n:>16s}" for n in names))
    worst_dense, worst_pruned, small_excess = 0.0, 0.0, -1e9
    categories = {"int8": lambda label: label.endswith("int8"), "50% pruned": lambda label: "50%" in label,
                  "90% pruned": lambda label: "90%" in label, "int4": lambda label: label.endswith("int4"),
                  "every set": lambda label: True}
    cat_totals = {c: {n: 0 for n in [*names, "entropy"]} for c in categories}
    per_model: dict[str, list[tuple[float, str]]] = {peer: [] for peer in coders}
    for label, arrays in sets.items():
        ent = sum(entropy_bits(a) for a in arrays) / 8
        row = {}
        for a in arrays:
            data = encode(a)
            assert np.array_equal(decode(data), a)
            row["nnshrink"] = row.get("nnshrink", 0) + len(data)
            if a.size >= 16_384:
                ratio = len(data) / (entropy_bits(a) / 8)
                if "pruned" in label and "50%" in label:
                    worst_pruned = max(worst_pruned, ratio)
                elif "pruned" not in label:
                    worst_dense = max(worst_dense, ratio)
            if a.size < 1024:
                small_excess = max(small_excess, len(data) - a.size)
            for peer, size in coders.items():
                row[peer] = row.get(peer, 0) + size(a)
        for c, member in categories.items():
            if member(label):
                for n in names:
                    cat_totals[c][n] += row[n]
                cat_totals[c]["entropy"] += ent
        for peer in coders:
            per_model[peer].append((1 - row["nnshrink"] / row[peer], label))
        cells = " ".join(f"{row[n]:>8,d} ({row[n] / ent:5.3f})" for n in names)
        print(f"{label:28s} {ent:>10,.0f} {cells}")

    print("\nbars:")
    print(f"  dense tensors >= 16K weights: worst {worst_dense:.4f} x entropy (bar 1.01)")
    print(f"  50%-pruned tensors >= 16K weights: worst {worst_pruned:.4f} x entropy (bar 1.02)")
    print(f"  tensors under 1K weights: at most {small_excess} bytes above 8 bits per weight (bar 16)")
    print("  whole models (sums over the 4 zoo models; 'every set' adds the Laplacian), how much smaller"
          " nnshrink is than each peer:")
    for c, totals in cat_totals.items():
        ours = totals["nnshrink"]
        vs = ", ".join(f"{peer} {(1 - ours / totals[peer]) * 100:+5.1f}%" for peer in coders)
        print(f"    {c:11s} {ours:>10,d} B = {ours / totals['entropy']:.4f} x entropy; {vs}")
    print("  each whole model (every row above), how much smaller nnshrink is than each peer:")
    for peer, rows in per_model.items():
        worst, label = min(rows)
        wins = sum(1 for r, _ in rows if r > 0)
        print(f"    {peer:8s} smaller on {wins} of {len(rows)} rows; least {100 * worst:+5.1f}% ({label}), "
              f"median {100 * float(np.median([r for r, _ in rows])):+5.1f}%")

    big = sets["laplacian 1M"][0]
    raw = big.tobytes()
    t_enc = _best(lambda: encode(big))
    data = encode(big)
    t_dec = _best(lambda: decode(data))
    mb = big.nbytes / 1e6
    print(f"\nspeed, one thread, 1M int8 Laplacian: encode {mb / t_enc:6.1f} MB/s (bar 10), "
          f"decode {mb / t_dec:6.1f} MB/s (bar 50)")
    if "zstd-19" in coders:
        import zstandard

        z = zstandard.ZstdCompressor(level=19).compress(raw)
        t_zdec = _best(lambda: zstandard.ZstdDecompressor().decompress(z))
        print(f"  zstd decode {mb / t_zdec:6.1f} MB/s; ours / zstd decode speed = {t_zdec / t_dec:.3f}")
    model = sum((sets[f"{n} int8"] for n in zoo.NAMES), [])
    size = sum(a.nbytes for a in model) / 1e6
    streams = [encode(a) for a in model]
    t_model_enc = _best(lambda: [encode(a) for a in model])
    t_model_dec = _best(lambda: [decode(s) for s in streams])
    print(f"  all zoo int8 tensors ({len(model)} tensors, {size:.2f} MB): encode {size / t_model_enc:6.1f} MB/s, "
          f"decode {size / t_model_dec:6.1f} MB/s")
    return 0


def _best(fn, repeat: int = 3) -> float:
    fn()  # warm up (numba compiles or loads its cache)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


if __name__ == "__main__":
    sys.exit(main())
