"""Plots a person would rather see than read: the accuracy-vs-size frontier."""

from __future__ import annotations

from pathlib import Path

from nnshrink.cache import atomic_path


def _write_png(fig, path: str | Path) -> Path:
    """Lay out ``fig``, write it as PNG atomically, and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return target


def frontier_plot(points: list, front: list, float_bytes: int, float_accuracy: float, path: str | Path,
                  title: str = "accuracy against compression", chosen=None) -> Path:
    """Held-out accuracy against compression ratio (log scale) with a frontier joined.

    ``points`` and ``front`` are :class:`nnshrink.search.Point` lists (pass the frontier of the
    plotted accuracy, ``pareto(points, "test_accuracy")``); ``chosen`` (circled) is the point
    picked on validation. The float model is the reference line. Written atomically as PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def acc(p):
        return 100 * (p.test_accuracy if p.test_accuracy is not None else p.val_accuracy)

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    ax.scatter([float_bytes / p.bytes for p in points], [acc(p) for p in points], color="0.6",
               label="configurations")
    ax.plot([float_bytes / p.bytes for p in front], [acc(p) for p in front], "o-", color="tab:blue",
            label="frontier")
    for p in front:
        ax.annotate(p.label, (float_bytes / p.bytes, acc(p)), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.axhline(100 * float_accuracy, color="tab:green", linestyle="--", label=f"float32 ({100 * float_accuracy:.1f}%)")
    if chosen is not None:
        ax.scatter([float_bytes / chosen.bytes], [acc(chosen)], s=160, facecolors="none", edgecolors="tab:red",
                   linewidths=2, label=f"chosen: {float_bytes / chosen.bytes:.1f}x")
    ax.set_xscale("log")
    from matplotlib.ticker import FuncFormatter

    ratio = FuncFormatter(lambda v, _: f"{v:g}x")
    ax.xaxis.set_major_formatter(ratio)
    ax.xaxis.set_minor_formatter(ratio)
    ax.tick_params(axis="x", which="minor", labelsize=7)
    ax.set_xlabel("compression ratio against float32 (container bytes on disk)")
    ax.set_ylabel("held-out accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    return _write_png(fig, path)


def quant_sensitivity_plot(sens: dict, path: str | Path, title: str = "quantization sensitivity per layer") -> Path:
    """Bars of the accuracy lost with only each layer quantized, and recovered with all but it.

    ``sens`` is ``QuantSensitivity.to_dict()``. Written atomically as PNG.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = sens["layers"]
    names = [r["layer"] for r in rows]
    f, q = sens["float_accuracy"], sens["quantized_accuracy"]
    drop_only = [100 * (f - r["only_this_quantized"]) for r in rows]
    gain = [100 * (r["all_but_this_quantized"] - q) for r in rows]
    y = np.arange(len(names))
    fig, ax = plt.subplots(figsize=(7.5, 0.35 * len(names) + 1.6), dpi=120)
    ax.barh(y - 0.2, drop_only, 0.4, color="tab:red", label="drop with only this layer quantized")
    ax.barh(y + 0.2, gain, 0.4, color="tab:green", label="recovered with this layer kept in float")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.axvline(0, color="0.3", linewidth=0.8)
    ax.set_xlabel(f"accuracy points (float {100 * f:.2f}%, all quantized {100 * q:.2f}%)")
    ax.set_title(title)
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(True, axis="x", alpha=0.3)
    return _write_png(fig, path)
