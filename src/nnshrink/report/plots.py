"""Plots a person would rather see than read, drawn with matplotlib: as PNG files, or as SVG
text for the HTML report (:mod:`nnshrink.report.html`)."""

from __future__ import annotations

import io
import math
import re
from pathlib import Path

from nnshrink.cache import atomic_path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def svg_text(fig, prefix: str) -> str:
    """``fig`` as an ``<svg>`` element to put inline in a page, and closed.

    Text stays text (smaller than glyph outlines; the page's fonts draw it), the output is the
    same for the same figure (no date, a fixed hash salt), and every ``id`` gets ``prefix``:
    matplotlib names clip paths and markers by content, so two figures on one page would
    otherwise share ids."""
    import matplotlib

    plt = _plt()
    fig.tight_layout()
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "nnshrink"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    text = buf.getvalue()
    text = text[text.index("<svg"):]
    ids = set(re.findall(r'\bid="([^"]+)"', text))
    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}{m.group(1)}"', text)
    return re.sub(r"#([A-Za-z_][\w.-]*)", lambda m: f"#{prefix}{m.group(1)}" if m.group(1) in ids else m.group(0), text)


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
    plt = _plt()

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
    return _write_png(quant_sensitivity_figure(sens, title), path)


def quant_sensitivity_figure(sens: dict, title: str = "quantization sensitivity per layer"):
    """The figure of :func:`quant_sensitivity_plot`."""
    import numpy as np

    plt = _plt()

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
    return fig


def _short(name: str, width: int = 28) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


def metric_figure(frontier: dict, axis: str, metric: str, percent: bool):
    """The report's metric against ``axis`` (``bytes``, ``macs`` or ``latency_us``) for every point of its
    ``frontier`` object; the chosen point circled, the original model's metric a dashed line."""
    plt = _plt()
    scale = 100 if percent else 1
    pts = [p for p in frontier["points"] if p.get(axis) and p.get("metric") is not None]
    original = [p for p in pts if p.get("original")]
    pts = [p for p in pts if not p.get("original")]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=100)
    xs = [p[axis] for p in pts]
    ys = [scale * p["metric"] for p in pts]
    if frontier["source"] == "budget":
        ax.scatter(xs, ys, color="0.55", s=18, label="verified candidates", zorder=2)
        front, best = [], -math.inf
        for p in sorted(pts, key=lambda p: p[axis]):  # the Pareto front: more metric for more cost
            if p["metric"] > best:
                front.append(p)
                best = p["metric"]
        ax.plot([p[axis] for p in front], [scale * p["metric"] for p in front], "-", color="tab:blue",
                label="frontier", zorder=1)
    else:
        ax.plot(xs, ys, "o-", color="tab:blue", label="before -> after", zorder=2)
        for p in pts:
            ax.annotate(p["label"], (p[axis], scale * p["metric"]), textcoords="offset points", xytext=(5, 5),
                        fontsize=8)
    for p in pts:
        if p.get("chosen"):
            ax.scatter([p[axis]], [scale * p["metric"]], s=170, facecolors="none", edgecolors="tab:red",
                       linewidths=2, label=f"chosen ({p['label']})", zorder=3)
    for p in original:
        ax.scatter([p[axis]], [scale * p["metric"]], marker="s", color="tab:green", s=40, zorder=3,
                   label="original model")
        xs.append(p[axis])
    if frontier.get("reference") is not None:
        ax.axhline(scale * frontier["reference"], color="tab:green", linestyle="--", linewidth=1)
    if len(set(xs)) > 1 and max(xs) / max(1, min(xs)) > 8:
        ax.set_xscale("log")
    ax.set_xlabel({"bytes": "bytes (container on disk; float32 for the original)", "macs": "MACs per inference",
                   "latency_us": "microseconds per inference (ONNX Runtime, batch 1, one thread)"}[axis])
    ax.set_ylabel(f"{metric.split(' (')[0]}, {frontier['metric']} split" + (" (%)" if percent else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def heatmap_figure(table: dict, title: str):
    """A sensitivity table (layers x settings, :func:`nnshrink.search.engine.sensitivity_table`)
    as a heatmap of log10 of the measured error; unmeasured cells blank, the per-cell setting
    written in where a column means a different setting per layer."""
    import numpy as np

    plt = _plt()
    names = list(table["layers"])
    cols = table["settings"]
    data = np.array([[np.nan if v is None else v for v in table["layers"][n]] for n in names], dtype=float)
    shown = np.log10(np.clip(data, 1e-9, None))
    shown[np.isnan(data)] = np.nan
    width = min(11.5, 2.6 + 0.42 * len(cols))
    fig, ax = plt.subplots(figsize=(width, min(40.0, 2.2 + 0.32 * max(3, len(names)))), dpi=100)
    image = ax.imshow(np.ma.masked_invalid(shown), aspect="auto", cmap="magma_r")
    ax.set_xticks(range(len(cols)), cols, rotation=90 if len(cols) > 12 else 40,
                  ha="center" if len(cols) > 12 else "right", fontsize=6 if len(cols) > 24 else 7)
    ax.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=7)
    labels = table.get("labels")
    if labels and len(names) * len(cols) <= 400:
        for i, n in enumerate(names):
            for j, text in enumerate(labels.get(n, [])[:len(cols)]):
                if text:
                    dark = np.isfinite(shown[i, j]) and shown[i, j] > np.nanmean(shown)
                    ax.text(j, i, text.split(" ", 1)[-1], ha="center", va="center", fontsize=6,
                            color="white" if dark else "black")
    bar = fig.colorbar(image, ax=ax, fraction=0.05)
    bar.set_label("log10 of the error", fontsize=7)
    ax.set_title(title, fontsize=10)
    return fig


def bytes_figure(streams: list[dict], file_bytes: int):
    """Where the container's bytes go: one stacked bar per layer, one colour per stream kind
    (and the file's own structure, the graph and headers, as one bar)."""
    import numpy as np

    plt = _plt()
    per: dict[str, dict[str, int]] = {}
    for s in streams:
        layer, _, what = s["name"].rpartition(".")
        layer = layer or s["name"]
        kind = s["kind"] if what.startswith("weight") else f"{s['kind']} ({what})" if what else s["kind"]
        per.setdefault(layer, {})
        per[layer][kind] = per[layer].get(kind, 0) + int(s["stored_bytes"])
    rest = file_bytes - sum(int(s["stored_bytes"]) for s in streams)
    if rest > 0:
        per["(graph and headers)"] = {"structure": rest}
    order = sorted(per, key=lambda n: -sum(per[n].values()))[:40]
    kinds = sorted({k for n in order for k in per[n]})
    fig, ax = plt.subplots(figsize=(5.5, min(30.0, 1.6 + 0.28 * len(order))), dpi=100)
    left = np.zeros(len(order))
    for k in kinds:
        vals = np.array([per[n].get(k, 0) for n in order], dtype=float)
        ax.barh(range(len(order)), vals, left=left, label=k)
        left += vals
    ax.set_yticks(range(len(order)), [_short(n) for n in order], fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(f"bytes stored (file: {file_bytes:,} B)")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return fig


def macs_figure(layers: list[dict]):
    """MACs per layer before and after, side by side."""
    import numpy as np

    plt = _plt()
    rows = [r for r in layers if (r.get("before") or r.get("after"))][:60]
    names = [_short(r["name"]) for r in rows]

    def macs(side):
        return [(r.get(side) or {}).get("macs") or 0 for r in rows]
    y = np.arange(len(rows))
    fig, ax = plt.subplots(figsize=(5.5, min(30.0, 1.6 + 0.3 * len(rows))), dpi=100)
    ax.barh(y - 0.2, macs("before"), 0.4, color="0.6", label="before")
    ax.barh(y + 0.2, macs("after"), 0.4, color="tab:blue", label="after")
    ax.set_yticks(y, names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("MACs per inference")
    ax.grid(True, axis="x", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return fig
