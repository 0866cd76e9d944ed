"""The report as one self-contained HTML page: no network, no server, plots inline as SVG.

Written from a ``compress`` report (schema ``nnshrink.report/2``, or ``/1`` brought up by
:func:`nnshrink.report.derive`): the run (model, data, plan, target), before and after, the
frontier of metric against bytes and MACs, the per-layer sensitivity tables the steps measured,
where the bytes go, MACs per layer, the quantization sensitivity and Vela's figures when there
are any, and a sortable per-layer table. The charts are matplotlib's; the page's only script
sorts the tables (a few lines, so no library is shipped inside every report).
"""

from __future__ import annotations

import html
import json
import re
from pathlib import Path

from nnshrink.cache import atomic_write_bytes
from nnshrink.report import metric_value, plots

#: Largest page :func:`write_html` writes; a bigger one points at a report too big to share.
MAX_BYTES = 2_000_000

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0;color:#1d232b;background:#f6f7f9}
main{max-width:1180px;margin:0 auto;padding:18px 22px 60px}
h1{font-size:22px;margin:6px 0 2px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #d6dae0;padding-bottom:4px}
.sub{color:#5b6570;margin:0 0 14px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:8px 12px;min-width:150px}
.card b{display:block;font-size:18px}.card span{color:#5b6570;font-size:12px}
.good{color:#137333}.bad{color:#b3261e}
table{border-collapse:collapse;background:#fff;font-size:12.5px;width:100%}
th,td{border:1px solid #dde1e6;padding:3px 7px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;background:#eef1f4;user-select:none;white-space:nowrap}
table.sortable th[aria-sort=ascending]::after{content:" \\25B2"}table.sortable th[aria-sort=descending]::after{content:" \\25BC"}
.plots{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:0;background:#fff;border:1px solid #dde1e6;border-radius:6px;padding:6px;max-width:100%;box-sizing:border-box}
figure svg{max-width:100%;height:auto;display:block}figcaption{font-size:12px;color:#5b6570;padding:2px 4px}
pre{background:#fff;border:1px solid #dde1e6;padding:8px;overflow:auto;font-size:12px;max-height:420px}
.muted{color:#5b6570}
"""

# Sorting the tables: click a header; numbers sort as numbers (data-v holds the raw value).
_JS = """
document.querySelectorAll('table.sortable').forEach(function(t){
  t.querySelectorAll('th').forEach(function(th,i){
    th.addEventListener('click',function(){
      var asc=th.getAttribute('aria-sort')!=='ascending';
      t.querySelectorAll('th').forEach(function(h){h.removeAttribute('aria-sort');});
      th.setAttribute('aria-sort',asc?'ascending':'descending');
      var body=t.tBodies[0],rows=Array.prototype.slice.call(body.rows);
      rows.sort(function(a,b){
        var x=a.cells[i].getAttribute('data-v'),y=b.cells[i].getAttribute('data-v');
        var nx=parseFloat(x),ny=parseFloat(y),c;
        if(!isNaN(nx)&&!isNaN(ny)){c=nx-ny;}else{c=String(x).localeCompare(String(y));}
        return asc?c:-c;});
      rows.forEach(function(r){body.appendChild(r);});
    });
  });
});
"""


def _e(text) -> str:
    return html.escape("" if text is None else str(text))


def _num(v, fmt: str = ",") -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and fmt == ",":
        return f"{v:,.4g}"
    return format(v, fmt)


def _cell(v, fmt: str = ",") -> str:
    """A numeric cell that sorts by its raw value."""
    raw = "" if v is None else v
    return f'<td class="n" data-v="{_e(raw)}">{_e(_num(v, fmt))}</td>'


def _text_cell(v) -> str:
    return f'<td data-v="{_e(v)}">{_e(v)}</td>'


def _table(headers: list[str], rows: list[str], sortable: bool = True, id_: str = "") -> str:
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    cls = ' class="sortable"' if sortable else ""
    ident = f' id="{id_}"' if id_ else ""
    return f"<table{cls}{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


class _Figures:
    """The page's plots, each an inline SVG in a captioned figure with a stable id."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, fig, caption: str, name: str) -> str:
        self.count += 1
        svg = plots.svg_text(fig, f"f{self.count}-")
        # the figure as wide as its plot (the caption wraps under it), so two fit side by side
        width = re.search(r'<svg[^>]*\bwidth="([0-9.]+)pt"', svg)
        style = f' style="width:{float(width.group(1)) * 4 / 3 + 14:.0f}px"' if width else ""
        return (f'<figure class="plot" data-plot="{_e(name)}"{style}>{svg}'
                f"<figcaption>{_e(caption)}</figcaption></figure>")


def render(doc: dict) -> str:
    """The page for ``doc`` (a report :func:`nnshrink.report.derive` has been through)."""
    run, before, after = doc.get("run") or {}, doc.get("before") or {}, doc.get("after") or {}
    labelled = before.get("accuracy") is not None
    metric = run.get("metric") or "metric"
    figure = _Figures()
    parts = [f"<h1>nnshrink report: {_e(run.get('model') or doc.get('model'))}</h1>",
             f'<p class="sub">{_e(_run_line(doc))}</p>', _cards(doc, labelled)]

    parts.append("<h2>Trade-off</h2><div class=\"plots\">")
    frontier = doc.get("frontier") or {"points": []}
    if any(p.get("metric") is not None for p in frontier["points"]):
        what = "every verified candidate of the budget search" if frontier["source"] == "budget" else \
            "the model before and after"
        parts.append(figure(plots.metric_figure(frontier, "bytes", metric, labelled),
                            f"{metric} against container bytes: {what}", "metric-bytes"))
        parts.append(figure(plots.metric_figure(frontier, "macs", metric, labelled),
                            f"{metric} against MACs: {what}", "metric-macs"))
        if any(p.get("latency_us") for p in frontier["points"]):
            parts.append(figure(plots.metric_figure(frontier, "latency_us", metric, labelled),
                                f"{metric} against ONNX Runtime latency (batch 1, one thread): {what}", "metric-latency"))
    else:
        parts.append('<p class="muted">No metric was measured, so there is no trade-off to draw.</p>')
    parts.append("</div>")

    parts.append("<h2>Where the bytes go</h2><div class=\"plots\">")
    if doc.get("streams"):
        parts.append(figure(plots.bytes_figure(doc["streams"], int(after.get("bytes") or 0)),
                            "stored bytes per layer and stream kind, read from the container", "bytes"))
    parts.append(figure(plots.macs_figure(doc.get("layers") or []), "MACs per layer, before and after", "macs"))
    parts.append("</div>")

    tables = doc.get("sensitivity") or []
    quant = doc.get("quant_sensitivity")
    if tables or quant:
        parts.append("<h2>Sensitivity per layer</h2><div class=\"plots\">")
        for t in tables:
            parts.append(figure(plots.heatmap_figure(t, f"{t['step']}: {t['measure']}"),
                                f"{t['step']}: each layer alone at each setting ({len(t['layers'])} layers x "
                                f"{len(t['settings'])} settings)", "sensitivity"))
        if quant:
            parts.append(figure(plots.quant_sensitivity_figure(quant), "quantization: each layer quantized alone, "
                                "and each kept float alone (validation metric)", "quant-sensitivity"))
        parts.append("</div>")

    if doc.get("deploy"):
        parts.append("<h2>Deployment (Vela)</h2>" + _vela(doc["deploy"]))

    parts.append("<h2>Per layer</h2>" + _layers(doc))
    if doc.get("skipped"):
        rows = [f"<tr>{_text_cell(s['layer'])}{_text_cell(s['step'])}{_text_cell(s['reason'])}</tr>"
                for s in doc["skipped"]]
        parts.append("<h2>Left alone</h2>" + _table(["layer", "step", "why"], rows, id_="skipped"))
    parts.append("<h2>Plan and steps</h2>")
    parts.append(f"<details><summary>plan</summary><pre>{_e(json.dumps(run.get('plan') or doc.get('plan'), indent=2))}"
                 "</pre></details>")
    for r in doc.get("steps") or []:
        parts.append(f"<details><summary>{_e(r['step'])}" + (" (skipped layers: "
                     f"{len(r.get('skipped') or [])})" if r.get("skipped") else "") + "</summary><pre>"
                     f"{_e(json.dumps(_without_tables(r.get('details')), indent=1, default=str)[:60000])}</pre></details>")
    title = f"nnshrink report: {run.get('model') or doc.get('model')}"
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width,initial-scale=1\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body><main>{''.join(parts)}"
            f'<p class="muted">schema {_e(doc.get("schema"))}; nnshrink {_e(run.get("nnshrink", "?"))}</p>'
            f"</main><script>{_JS}</script></body></html>\n")


def _without_tables(details):
    """A step's details for the page's raw view: the bulky lists cut (they are plotted above)."""
    if not isinstance(details, dict):
        return details
    out = {}
    for k, v in details.items():
        if k in ("sensitivity", "frontier") and v:
            out[k] = f"({len(v.get('layers', v)) if isinstance(v, dict) else len(v)} entries, plotted above)"
        else:
            out[k] = _without_tables(v)
    return out


def _run_line(doc: dict) -> str:
    run = doc.get("run") or {}
    target = run.get("target") or {}
    bits = [f"data: {run.get('data')}", f"metric: {run.get('metric')}"]
    if target.get("target") or target.get("max_drop") is not None:
        bits.append("target: " + ", ".join(f"{k}={v}" for k, v in target.items() if v is not None))
    steps = [next(iter(s)) if isinstance(s, dict) else str(s) for s in (run.get("plan") or {}).get("steps", [])]
    if steps:
        bits.append("plan: " + " -> ".join(steps))
    if run.get("created"):
        bits.append(f"run {run['created']}")
    output = doc.get("output") or {}
    if output.get("path"):
        bits.append(f"output: {output['path']}" + (f" (sha256 {doc['container_sha256'][:12]}...)"
                                                    if doc.get("container_sha256") else ""))
    return "; ".join(bits)


def _cards(doc: dict, labelled: bool) -> str:
    before, after = doc.get("before") or {}, doc.get("after") or {}

    def shown(v):
        if v is None:
            return "-"
        return f"{100 * v:.2f}%" if labelled else f"{v:.4g}"
    b, a = metric_value(before), metric_value(after)
    delta = "" if a is None or b is None else f"{100 * (a - b):+.2f} points" if labelled else f"{a - b:+.4g}"
    tone = "" if a is None or b is None else "good" if a >= b else "bad"
    ratio = before.get("bytes") / after["bytes"] if after.get("bytes") else None
    macs = after.get("macs") / before["macs"] if before.get("macs") else None
    cards = [("metric", f"{shown(b)} -> {shown(a)}", f'<span class="{tone}">{delta}</span>'),
             ("bytes", f"{_num(before.get('bytes'))} -> {_num(after.get('bytes'))}",
              f"<span>{ratio:.1f}x smaller than float32</span>" if ratio else ""),
             ("MACs", f"{_num(before.get('macs'))} -> {_num(after.get('macs'))}",
              f"<span>{macs:.1%} of before</span>" if macs is not None else ""),
             ("params", f"{_num(before.get('params'))} -> {_num(after.get('params'))}", "")]
    dep = doc.get("deploy")
    if dep:
        cards.append(("Ethos-U", f"{dep.get('inference_ms', float('nan')):.3f} ms",
                      f"<span>{_e(dep.get('target'))}, {dep.get('npu_operators')} ops on the NPU</span>"))
    return '<div class="cards">' + "".join(
        f'<div class="card" data-card="{_e(k)}"><span>{_e(k)}</span><b>{_e(v)}</b>{extra}</div>'
        for k, v, extra in cards) + "</div>"


def _layers(doc: dict) -> str:
    headers = ["layer", "kind", "params", "MACs before", "MACs after", "stored as", "stored bytes", "bits/weight",
               "/ entropy", "settings", "left alone"]
    rows = []
    for r in doc.get("layers") or []:
        b, a = r.get("before") or {}, r.get("after") or {}
        st = a.get("storage") or {}
        settings = "; ".join(f"{k}: {v}" for k, v in (r.get("settings") or {}).items() if v)
        rows.append("<tr>" + _text_cell(r["name"]) + _text_cell(a.get("kind") or b.get("kind"))
                    + _cell(a.get("params", b.get("params"))) + _cell(b.get("macs")) + _cell(a.get("macs"))
                    + _text_cell(st.get("kind", "-" if not a else "float"))
                    + _cell(st.get("stored_bytes")) + _cell(st.get("bits_per_weight"), ".3f" if st else ",")
                    + _cell(st.get("ratio_to_entropy"), ".4f" if st.get("ratio_to_entropy") is not None else ",")
                    + _text_cell(settings) + _text_cell("; ".join(r.get("skipped") or [])) + "</tr>")
    return _table(headers, rows, id_="layers")


def _vela(d: dict) -> str:
    keys = [("target", "target"), ("system config", "system_config"), ("memory mode", "memory_mode"),
            ("Vela", "vela"), ("compiler", "compiler"), ("operators on the NPU", "npu_operators"),
            ("operators on the CPU", "cpu_operators"), ("NPU cycles", "cycles_npu"),
            ("inference (ms)", "inference_ms"), ("inferences per second", "inferences_per_second"),
            ("SRAM bytes", "sram_bytes"), ("flash bytes", "flash_bytes"),
            ("weights, original bytes", "weight_bytes_original"), ("weights, encoded bytes", "weight_bytes_encoded"),
            ("int8 TFLite accuracy (LiteRT reference kernels)", "tflite_accuracy")]
    rows = []
    for label, k in keys:
        if k in d and d[k] is not None:
            v = d[k]
            rows.append(f"<tr><th>{_e(label)}</th>"
                        + (_cell(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else _text_cell(v))
                        + "</tr>")
    for op in d.get("cpu_ops") or []:
        rows.append(f"<tr><th>on the CPU: {_e(op.get('op'))}</th>{_text_cell(op.get('reason') or op.get('name'))}</tr>")
    return f'<table id="vela"><tbody>{"".join(rows)}</tbody></table>'


def write_html(path: str | Path, doc: dict) -> Path:
    """Write the page for ``doc`` to ``path``, atomically.

    Raises:
        ConfigError: the page would be over :data:`MAX_BYTES`.
    """
    from nnshrink.errors import ConfigError

    data = render(doc).encode()
    if len(data) > MAX_BYTES:
        raise ConfigError(f"the HTML report would be {len(data):,} bytes, over {MAX_BYTES:,}: the model has too many "
                          "layers for one page; the JSON report has it all")
    atomic_write_bytes(path, data)
    return Path(path)
