"""The report people share: schema /2 (and /1 read), the HTML page, and the page in a real browser."""

import json
import re
from pathlib import Path

import pytest
import yaml

from nnshrink.cli import main
from nnshrink.report import READABLE_SCHEMAS, REPORT_SCHEMA, read_report
from nnshrink.report.html import MAX_BYTES

PLOTS = {"metric-bytes", "metric-macs", "bytes", "macs", "sensitivity"}


def _run(capsys, *argv):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def budget_run(tmp_path_factory, lenet5_trained):
    """LeNet-5 through a small budget search for the smallest model within 2 points (no retraining)."""
    tmp = tmp_path_factory.mktemp("budget-report")
    plan = tmp / "plan.yaml"
    plan.write_text(yaml.safe_dump({"version": 1, "steps": [{"budget": {
        "max_drop": 0.02, "sparsities": [0.9, 0.97], "bits": [3, 5], "prune_steps": 0, "share_steps": 0,
        "executor": "serial", "samples": 64}}]}))
    out, report, page = tmp / "b.nsz", tmp / "b.json", tmp / "b.html"
    code = main(["compress", "lenet5", "--plan", str(plan), "--out", str(out), "--report", str(report),
                 "--html", str(page)])
    assert code == 0
    return report, page


def test_the_report_is_schema_2_with_the_frontier_settings_and_sensitivity(budget_run):
    doc = json.loads(budget_run[0].read_text())
    assert doc["schema"] == REPORT_SCHEMA == "nnshrink.report/2"
    assert doc["run"]["model"] == "lenet5" and doc["run"]["target"] == {"target": None, "max_drop": 0.02}
    assert doc["run"]["metric"].startswith("top-1 accuracy")
    points = doc["frontier"]["points"]
    assert doc["frontier"]["source"] == "budget" and len(points) >= 3
    assert sum(p["chosen"] for p in points) == 1 and any(p.get("original") for p in points)
    chosen = next(p for p in points if p["chosen"])
    budget = doc["steps"][0]["details"]
    assert chosen["bytes"] == budget["bytes_file"] and all(p["macs"] > 0 for p in points)
    table = doc["sensitivity"][0]
    assert table["step"] == "budget" and set(table["layers"]) == {"conv1", "conv2", "fc1", "fc2"}
    assert all(len(v) == len(table["settings"]) for v in table["layers"].values())
    assert table["settings"][0] == "as is" and all(v[0] == 0 for v in table["layers"].values())
    assert all(row["settings"]["budget"].startswith("sparsity=") for row in doc["layers"])


def test_the_page_is_self_contained_and_has_every_plot(budget_run):
    text = budget_run[1].read_text()
    assert len(text.encode()) < MAX_BYTES
    assert text.startswith("<!DOCTYPE html>") and text.count("<svg") == len(PLOTS)
    assert set(re.findall(r'data-plot="([^"]+)"', text)) == PLOTS
    # nothing to fetch: no scripts, styles or images from elsewhere (SVG namespaces are names, not requests)
    assert not re.search(r'<(script|link|img)[^>]+(src|href)=', text)
    assert "url(http" not in text and "@import" not in text
    # every id is unique across the inline SVGs
    ids = re.findall(r'\bid="([^"]+)"', text)
    assert len(ids) == len(set(ids))
    for name in ("conv1", "conv2", "fc1", "fc2"):
        assert f'<td data-v="{name}">{name}</td>' in text


def test_report_reads_a_schema_1_file(capsys, budget_run, tmp_path):
    doc = json.loads(budget_run[0].read_text())
    old = {k: v for k, v in doc.items() if k not in ("run", "frontier", "sensitivity", "skipped", "quant_sensitivity")}
    old["schema"] = "nnshrink.report/1"
    old["layers"] = [{k: v for k, v in r.items() if k not in ("settings", "skipped")} for r in doc["layers"]]
    path, page = tmp_path / "old.json", tmp_path / "old.html"
    path.write_text(json.dumps(old))
    assert "nnshrink.report/1" in READABLE_SCHEMAS
    again = read_report(path)
    assert again["frontier"]["points"] == doc["frontier"]["points"]
    assert again["sensitivity"] == doc["sensitivity"] and again["run"]["model"] == "lenet5"
    code, out, err = _run(capsys, "report", path, "--html", page)
    assert code == 0, err
    assert "lenet5" in out and "x)" in out
    assert set(re.findall(r'data-plot="([^"]+)"', page.read_text())) == PLOTS


@pytest.mark.parametrize("case", ["not json", "other schema", "missing", "html is the input", "truncated"])
def test_report_refuses_bad_files_in_one_line(capsys, tmp_path, case):
    path = tmp_path / "r.json"
    html = tmp_path / "r.html"
    if case == "not json":
        path.write_text("{not json")
    elif case == "other schema":
        path.write_text(json.dumps({"schema": "nnshrink.analysis/1"}))
    elif case == "truncated":
        path.write_text(json.dumps({"schema": "nnshrink.report/1", "before": {}}))
    elif case == "html is the input":
        path.write_text("{}")
        html = path
    code, out, err = _run(capsys, "report", path if case != "missing" else tmp_path / "nope.json", "--html", html)
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert not (tmp_path / "r.html").exists()


def test_the_page_opens_in_headless_chromium_without_errors(budget_run, tmp_path):
    pytest.importorskip("playwright")
    from nnshrink.report.browser import VIEWPORT, chromium, inspect

    if chromium() is None:
        pytest.skip("no Chromium here (Debian's chromium package; CI installs it)")
    shot = tmp_path / "page.png"
    seen = inspect(budget_run[1], shot, click="#layers th:nth-child(7)")
    assert seen["problems"] == []
    assert {p["name"] for p in seen["plots"]} == PLOTS and len(seen["plots"]) == len(PLOTS)
    for p in seen["plots"]:  # drawn, at a readable size, with content
        assert p["width"] > 300 and p["height"] > 150 and p["shapes"] > 20, p
    # the layer table sorts by stored bytes when its header is clicked (ascending first)
    doc = json.loads(budget_run[0].read_text())
    by_bytes = sorted(doc["layers"], key=lambda r: r["after"]["storage"]["stored_bytes"])
    assert seen["clicked"]["after"] == [r["name"] for r in by_bytes] != seen["clicked"]["before"]
    # the screenshot is the whole page: the viewport's width, and as tall as the page laid out
    from PIL import Image

    with Image.open(shot) as im:
        width, height = im.size
    assert width == VIEWPORT["width"] == seen["size"]["width"]
    assert height == seen["size"]["height"] and 1000 < height < 8000


def test_a_latency_target_adds_latency_to_the_frontier_and_its_plot(budget_run):
    from nnshrink.report import derive
    from nnshrink.report.html import render

    doc = json.loads(budget_run[0].read_text())
    details = doc["steps"][0]["details"]
    for i, p in enumerate(details["frontier"]):  # as a latency= budget records them
        p["latency_s"] = 40e-6 + 5e-6 * i
    details["latency_before_s"] = 90e-6
    doc = derive(doc)
    points = doc["frontier"]["points"]
    assert [p["latency_us"] for p in points] == [40.0 + 5 * i for i in range(len(points) - 1)] + [90.0]
    text = render(doc)
    assert set(re.findall(r'data-plot="([^"]+)"', text)) == PLOTS | {"metric-latency"}
