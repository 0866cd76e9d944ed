"""Reports: the ``compress`` report (JSON, schema ``nnshrink.report/1``) and rich tables."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nnshrink.cache import atomic_write_bytes
from nnshrink.graph.analysis import Analysis

#: Schema of the ``compress`` report; bump on any breaking change.
REPORT_SCHEMA = "nnshrink.report/1"


def summary(analysis: Analysis, accuracy: float | None, size_bytes: int) -> dict:
    """The ``before`` / ``after`` object: held-out accuracy, MACs, params and bytes."""
    return {"accuracy": accuracy, "macs": analysis.total_macs, "params": analysis.total_params,
            "bytes": size_bytes}


def layer_rows(before: Analysis, after: Analysis, streams: list | None = None) -> list[dict]:
    """Per-layer before/after, matched by name; a layer missing on one side has ``null`` there.

    With ``streams`` (the container's per-weight figures), each ``after`` also says how the
    layer's weight is stored: ``stored_bytes``, ``bits_per_weight``, ``entropy_bits`` (order-0,
    per weight) and ``ratio_to_entropy``.
    """
    by_weight = {s.name: s for s in streams or []}

    def row(info):
        if info is None:
            return None
        out = _layer_dict(info)
        # a QDQ graph holds the integers as ``<layer>.weight_quantized``
        stream = by_weight.get(f"{info.name}.weight") or by_weight.get(f"{info.name}.weight_quantized")
        if stream is not None:
            out["storage"] = {"kind": stream.kind, "stored_bytes": stream.stored_bytes,
                              "bits_per_weight": stream.bits_per_weight, "entropy_bits": stream.entropy_bits,
                              "ratio_to_entropy": stream.ratio_to_entropy, "modes": list(stream.modes),
                              "models": list(stream.models)}
        return out

    after_by_name = {i.name: i for i in after.layers}
    rows = [{"name": i.name, "before": _layer_dict(i), "after": row(after_by_name.pop(i.name, None))}
            for i in before.layers]
    rows += [{"name": n, "before": None, "after": row(i)} for n, i in after_by_name.items()]
    return rows


def _layer_dict(info) -> dict:
    return {"kind": info.kind, "params": info.params, "macs": info.macs, "bytes": info.bytes,
            "weight_shape": list(info.weight_shape)}


def compress_report(model: str, plan: dict, data: str, before: dict, after: dict, layers: list[dict],
                    steps: list[dict], out: str, out_format: str, streams: list | None = None) -> dict:
    def ratio(key):
        b, a = before.get(key), after.get(key)
        return None if not b or a is None else a / b

    return {
        "schema": REPORT_SCHEMA, "model": model, "data": data, "plan": plan,
        "output": {"path": out, "format": out_format},
        "before": before, "after": after,
        "ratios": {"macs": ratio("macs"), "params": ratio("params"), "bytes": ratio("bytes")},
        "sizes": {"float32": before["params"] * 4, "int8": before["params"], "container": after["bytes"]},
        "accuracy_delta": None if before["accuracy"] is None or after["accuracy"] is None
        else after["accuracy"] - before["accuracy"],
        "layers": layers, "steps": steps,
        "streams": [s.to_dict() for s in streams or []],
    }


def write_json(path: str | Path, data: dict) -> None:
    """Write ``data`` as indented JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(data, indent=2, default=_jsonable) + "\n").encode())


def _jsonable(obj):
    if isinstance(obj, (set, tuple)):
        return list(obj)
    return str(obj)


def streams_table(streams: list) -> Table:
    """How each weight is stored in a container, with the entropy bound."""
    table = Table(title="container streams (measured from the file)", show_footer=True)
    table.add_column("weight", footer="total")
    table.add_column("stored as")
    table.add_column("values", justify="right")
    table.add_column("bytes", justify="right", footer=f"{sum(s.stored_bytes for s in streams):,}")
    table.add_column("bits/weight", justify="right")
    table.add_column("entropy bits", justify="right")
    table.add_column("/ entropy", justify="right")
    for s in streams:
        coding = ", ".join(s.modes) + "".join(f"; {m}" for m in s.models)
        table.add_row(s.name, s.kind if s.kind == "raw" else f"{s.kind} ({coding})", f"{s.count:,}",
                      f"{s.stored_bytes:,}", f"{s.bits_per_weight:.3f}",
                      "-" if s.entropy_bits is None else f"{s.entropy_bits:.3f}",
                      "-" if s.ratio_to_entropy is None else f"{s.ratio_to_entropy:.4f}")
    return table


def analysis_table(analysis: Analysis, title: str) -> Table:
    """A rich table of the compressible layers with a totals row."""
    table = Table(title=title, show_footer=True)
    table.add_column("layer", footer="total")
    table.add_column("kind")
    table.add_column("weight shape")
    table.add_column("params", justify="right", footer=f"{analysis.total_params:,}")
    table.add_column("MACs", justify="right", footer=f"{analysis.total_macs:,}")
    table.add_column("bytes (fp32)", justify="right", footer=f"{analysis.total_bytes:,}")
    for i in analysis.layers:
        table.add_row(i.name, i.kind, "x".join(map(str, i.weight_shape)), f"{i.params:,}",
                      f"{i.macs:,}", f"{i.bytes:,}")
    return table


def skipped_table(analysis: Analysis) -> Table | None:
    if not analysis.skipped:
        return None
    table = Table(title="not compressed")
    for col in ("module", "type", "params", "reason"):
        table.add_column(col)
    for s in analysis.skipped:
        table.add_row(s.name, s.type, f"{s.params:,}", s.reason)
    return table


def print_analysis(console: Console, analysis: Analysis, title: str) -> None:
    console.print(analysis_table(analysis, title))
    skipped = skipped_table(analysis)
    if skipped is not None:
        console.print(skipped)
