import pytest
import torch

from nnshrink import Plan, zoo
from nnshrink.report.plots import frontier_plot
from nnshrink.search import Point, pareto, smallest_within, sweep
from nnshrink.techniques import ShareWeights, Sparsify

pytest.importorskip("onnx")


def _p(label, size, acc):
    return Point(label, {}, size, acc, acc)


def test_pareto_and_selection():
    pts = [_p("a", 100, 0.90), _p("b", 200, 0.95), _p("c", 150, 0.89), _p("d", 300, 0.95), _p("e", 50, 0.80)]
    assert [p.label for p in pareto(pts)] == ["e", "a", "b"]
    assert smallest_within(pts, 0.96, 0.015).label == "b"
    assert smallest_within(pts, 0.96, 0.07).label == "a"
    assert smallest_within(pts, 0.99, 0.01) is None


def test_sweep_measures_real_containers(mnist, tmp_path):
    model = zoo.build("lenet300")
    plans = {"50%/4b": Plan([Sparsify(sparsity=0.5), ShareWeights(bits=4)]),
             "90%/2b": Plan([Sparsify(sparsity=0.9), ShareWeights(bits=2)])}
    evaluate = zoo.make_evaluator(mnist, "val", limit=200)
    points = sweep(model, plans, torch.zeros(1, 1, 28, 28), evaluate, show_progress=False)
    sizes = {p.label: p.bytes for p in points}
    assert sizes["90%/2b"] < sizes["50%/4b"] < 266_610
    assert all(0.0 <= p.val_accuracy <= 1.0 and p.test_accuracy is None for p in points)
    out = frontier_plot(points, pareto(points), 266_610 * 4, 0.95, tmp_path / "f.png", chosen=points[0])
    assert out.read_bytes()[:4] == b"\x89PNG"
