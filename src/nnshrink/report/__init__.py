"""Reports: the ``compress`` report (JSON, schema ``nnshrink.report/2``), its HTML page
(:mod:`.html`) and rich tables."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from nnshrink import __version__
from nnshrink.cache import atomic_write_bytes
from nnshrink.errors import ConfigError
from nnshrink.graph.analysis import Analysis

#: Schema of the ``compress`` report; bump on any breaking change.
REPORT_SCHEMA = "nnshrink.report/2"
#: Schemas :func:`read_report` reads (older ones are brought up to the current one).
READABLE_SCHEMAS = ("nnshrink.report/1", REPORT_SCHEMA)


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
                    steps: list[dict], out: str, out_format: str, streams: list | None = None,
                    run: dict | None = None) -> dict:
    """The ``compress`` report: what was measured, then what :func:`derive` reads off the steps.

    ``run`` adds to the ``run`` object (the command line, the seed, ...)."""
    def ratio(key):
        b, a = before.get(key), after.get(key)
        return None if not b or a is None else a / b

    doc = {
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
    doc["run"] = {"nnshrink": __version__,
                  "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **(run or {})}
    return derive(doc)  # which adds what was asked (model, data, plan, target, metric) to run


def _run_of(doc: dict) -> dict:
    """What was asked: the model, the data, the plan, the budget's target and the metric."""
    budget = [s["budget"] for s in doc.get("plan", {}).get("steps", []) if isinstance(s, dict) and "budget" in s]
    target = None
    if budget:
        target = {"target": budget[-1].get("target") or None, "max_drop": budget[-1].get("max_drop")}
    metric = (doc.get("before", {}).get("metric") or {}).get("name")
    return {"model": doc.get("model"), "data": doc.get("data"), "plan": doc.get("plan"), "target": target,
            "metric": metric or ("top-1 accuracy" if doc.get("before", {}).get("accuracy") is not None else None)}


def derive(doc: dict) -> dict:
    """The parts of schema ``/2`` that are read off the steps' details (also for a ``/1`` file):

    - ``run``: the model, data, plan, budget target and metric (kept where present);
    - per layer, ``settings`` (step -> what it chose for that layer) and ``skipped`` (reasons);
    - ``skipped``: every layer a step left alone, with the step and the reason;
    - ``frontier``: the budget step's verified candidates (bytes, MACs, validation metric), the
      chosen one marked, or else the model before and after;
    - ``sensitivity``: every per-layer table a step measured (layers x settings);
    - ``quant_sensitivity``: a quantize step's per-layer table, where it measured one.
    """
    doc = dict(doc)
    steps = doc.get("steps") or []
    doc["run"] = {**_run_of(doc), **(doc.get("run") or {})}
    skipped = [{"layer": s.get("layer"), "step": r["step"], "reason": s.get("reason")}
               for r in steps for s in r.get("skipped") or [] if isinstance(s, dict)]
    doc["skipped"] = skipped
    rows = []
    for row in doc.get("layers") or []:
        row = dict(row)
        row["settings"] = {r["step"]: _settings_of(row["name"], r["details"]["layers"]) for r in steps
                           if isinstance((r.get("details") or {}).get("layers"), dict)
                           and _settings_of(row["name"], r["details"]["layers"]) is not None}
        row["skipped"] = [f"{s['step']}: {s['reason']}" for s in skipped
                          if row["name"] in [p.strip() for p in str(s["layer"]).split(",")]]
        rows.append(row)
    doc["layers"] = rows
    doc["frontier"] = _frontier(doc)
    doc["sensitivity"] = [{"step": r["step"], **t} for r in steps for t in _tables(r.get("details") or {})]
    quant = [r["details"]["quant_sensitivity"] for r in steps if (r.get("details") or {}).get("quant_sensitivity")]
    doc["quant_sensitivity"] = quant[-1] if quant else None
    doc["schema"] = REPORT_SCHEMA
    return doc


def _tables(details: dict) -> list[dict]:
    """The sensitivity tables in one step's details, nested ones (a budget's steps) included."""
    found = [details["sensitivity"]] if isinstance(details.get("sensitivity"), dict) else []
    for v in details.values():
        if isinstance(v, dict) and v is not details.get("sensitivity") and v is not details.get("layers"):
            found += _tables(v)
    return found


def _owner(name: str, layers: dict) -> str | None:
    """The key of ``layers`` that layer ``name`` of the written model came from: itself, or the
    layer it is a factor of (``conv2.0`` of a decomposed ``conv2``)."""
    while name:
        if name in layers:
            return name
        name = name.rpartition(".")[0]
    return None


def _settings_of(name: str, layers: dict) -> str | None:
    """Layer ``name``'s setting in a step's ``layers`` (see :func:`_owner`), or, for a layer whose
    parameters were settings of their own (a recurrent layer's matrices, ``rnn.weight_ih_l0``),
    each of those, named."""
    key = _owner(name, layers)
    if key is not None:
        return _brief(layers[key])
    own = [k for k in layers if k.startswith(name + ".") and "." not in k[len(name) + 1:]]
    return "; ".join(f"{k[len(name) + 1:]}: {_brief(layers[k])}" for k in own) or None


def _brief(setting) -> str:
    """One layer's setting in a step, as a short text: ``sparsity=0.7, bits=4``."""
    if not isinstance(setting, dict):
        return f"{setting:g}" if isinstance(setting, float) else str(setting)
    parts = []
    for k, v in setting.items():
        if v is None or isinstance(v, (dict, list)) or k in _NOT_A_SETTING:
            continue
        parts.append(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}")
    return ", ".join(parts)


# measurements and bookkeeping a step keeps per layer beside what it chose
_NOT_A_SETTING = {"bytes", "output_error", "predicted_loss", "trained_max_diff", "blocks", "origin", "layout_note",
                  "output_order", "distinct_values", "macs_change"}


def _latency_us(seconds) -> dict:
    """``{"latency_us": ...}`` where a budget with a latency target timed the point, else nothing."""
    return {} if seconds is None else {"latency_us": round(seconds * 1e6, 2)}


def _frontier(doc: dict) -> dict:
    """Points of metric against bytes and MACs: the last budget step's verified candidates
    (validation metric), or the model before and after (test metric)."""
    budgets = [r for r in doc.get("steps") or [] if r.get("step") == "budget"]
    if budgets and budgets[-1]["details"].get("frontier"):
        d = budgets[-1]["details"]
        chosen = d.get("bytes_file")
        points = [{"label": f"{p.get('ratio', 0):g}x", "bytes": p["bytes"], "macs": p.get("macs"),
                   "metric": p.get("val_metric"), "chosen": p.get("chosen", p["bytes"] == chosen),
                   "layers": p.get("layers"), **_latency_us(p.get("latency_s"))} for p in d["frontier"]]
        before = doc.get("before") or {}
        points.append({"label": "float32", "bytes": before.get("bytes"), "macs": before.get("macs"),
                       "metric": d.get("val_before"), "chosen": False, "original": True,
                       **_latency_us(d.get("latency_before_s"))})
        return {"source": "budget", "metric": "validation", "reference": d.get("val_before"), "points": points}
    before, after = doc.get("before") or {}, doc.get("after") or {}

    points = [{"label": "original (float32)", "bytes": before.get("bytes"), "macs": before.get("macs"),
               "metric": metric_value(before), "chosen": False},
              {"label": "compressed", "bytes": after.get("bytes"), "macs": after.get("macs"),
               "metric": metric_value(after), "chosen": True}]
    return {"source": "run", "metric": "test", "reference": metric_value(before), "points": points}


def metric_value(side: dict):
    """The metric of a report's ``before`` or ``after`` (its ``metric.value``; a ``/1`` file
    without one has only ``accuracy``)."""
    return (side.get("metric") or {}).get("value", side.get("accuracy"))


def read_report(path: str | Path) -> dict:
    """A ``compress`` report from disk, any readable schema, as the current one (:func:`derive`).

    Raises:
        ConfigError: not JSON, not a ``compress`` report, or a schema this version cannot read.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"report {path} does not exist")
    try:
        doc = json.loads(path.read_text())
    except (UnicodeDecodeError, ValueError) as e:
        raise ConfigError(f"report {path} is not JSON: {e}") from None
    schema = doc.get("schema") if isinstance(doc, dict) else None
    if schema not in READABLE_SCHEMAS:
        raise ConfigError(f"report {path} has schema {schema!r}; this nnshrink reads {', '.join(READABLE_SCHEMAS)} "
                          "(the reports of 'nnshrink compress')")
    for key in ("before", "after", "layers", "steps"):
        if key not in doc:
            raise ConfigError(f"report {path} has no {key!r}: not a whole 'nnshrink compress' report")
    return derive(doc)


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
    """A rich table of the compressible layers, then the MACs no such layer does, with a totals row."""
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
    for o in analysis.other:
        table.add_row(o.name, f"{o.kind} (not compressed)", "-", "-", f"{o.macs:,}", "-", style="dim")
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
