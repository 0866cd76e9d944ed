import pytest
import torch
from torch import nn

from nnshrink import InputShapeError, analyze, zoo
from nnshrink.graph import ANALYSIS_SCHEMA
from nnshrink.testing import Conv1dNet, GroupedNet, SharedLayerNet


def test_lenet5_caffe_totals_are_exact():
    model = zoo.build("lenet5")
    info = analyze(model, torch.zeros(1, 1, 28, 28))
    assert info.total_macs == 2_293_000
    assert info.total_params == 431_080
    assert info.total_bytes == 431_080 * 4
    assert [(i.name, i.macs) for i in info.layers] == [
        ("conv1", 288_000), ("conv2", 1_600_000), ("fc1", 400_000), ("fc2", 5_000)]
    assert info.layer("conv2").weight_shape == (50, 20, 5, 5)


def test_macs_are_per_sample_whatever_the_batch():
    model = zoo.build("lenet300")
    one = analyze(model, torch.zeros(1, 1, 28, 28))
    many = analyze(model, torch.zeros(7, 1, 28, 28))
    assert one.total_macs == many.total_macs == 784 * 300 + 300 * 100 + 100 * 10
    assert one.total_params == 266_610


def test_grouped_and_depthwise_kinds_and_macs():
    info = analyze(GroupedNet(), torch.zeros(2, 4, 12, 12))
    kinds = {i.name: i.kind for i in info.layers}
    assert kinds == {"conv": "conv2d", "grouped": "conv2d-grouped", "depthwise": "conv2d-depthwise",
                     "pointwise": "conv2d", "fc": "linear"}
    assert info.layer("grouped").macs == 12 * 12 * 8 * (8 // 2) * 9
    assert info.layer("depthwise").macs == 12 * 12 * 8 * 1 * 9


def test_conv1d_layers():
    info = analyze(Conv1dNet(), torch.zeros(1, 2, 32))
    assert info.layer("c1").kind == "conv1d"
    assert info.layer("c1").macs == 14 * 6 * 2 * 5
    assert info.layer("c2").kind == "conv1d-depthwise"


def test_shared_unused_and_unsupported_layers_are_reported():
    info = analyze(SharedLayerNet(), torch.zeros(3, 8))
    shared = info.layer("shared")
    assert shared.calls == 2 and shared.macs == 2 * 64
    reasons = {s.name: s.reason for s in info.skipped}
    assert reasons["unused"] == "not called in the forward pass"
    assert "recurrent" in reasons["rnn"]
    assert "unused" not in [i.name for i in info.layers]


def test_wrong_input_shape_raises_our_error():
    with pytest.raises(InputShapeError, match=r"\(1, 3, 28, 28\)"):
        analyze(zoo.build("lenet5"), torch.zeros(1, 3, 28, 28))
    with pytest.raises(InputShapeError):
        analyze(zoo.build("lenet5"), torch.tensor(1.0))


def test_to_dict_follows_schema():
    doc = analyze(zoo.build("resnet8"), torch.zeros(1, 1, 28, 28)).to_dict()
    assert doc["schema"] == ANALYSIS_SCHEMA
    assert set(doc["totals"]) == {"macs", "compressible_macs", "params", "bytes", "compressible_params", "layers"}
    assert doc["totals"]["macs"] == doc["totals"]["compressible_macs"] and doc["other_macs"] == []
    assert doc["totals"]["layers"] == len(doc["layers"]) == 10
    assert all(isinstance(s["reason"], str) for s in doc["skipped"])
    assert {s["type"] for s in doc["skipped"]} == {"BatchNorm2d"}


def test_analysis_restores_training_mode():
    model = zoo.build("lenet5").train()
    analyze(model, torch.zeros(1, 1, 28, 28))
    assert model.training
    assert all(not m._forward_hooks for m in model.modules() if isinstance(m, nn.Conv2d))


def test_macs_no_compressible_layer_does_are_counted():
    """Transposed convs, recurrent layers, products of activations (matmul, einsum, attention) and
    functional layers outside a module count towards the total, by their module; a Linear's own
    call is not counted twice."""
    import torch.nn.functional as F
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.up = nn.ConvTranspose1d(8, 4, 2, stride=2)
            self.rnn = nn.GRU(4, 6, batch_first=True, bidirectional=True)
            self.q = nn.Linear(12, 12)
            self.mha = nn.MultiheadAttention(12, 3, batch_first=True)
            self.tied = nn.Parameter(torch.randn(5, 12))

        def forward(self, x):  # x: (N, 8, T)
            y = self.rnn(self.up(x).transpose(1, 2))[0]  # (N, 2T, 12)
            q = self.q(y)
            att = torch.softmax(q @ y.transpose(1, 2), -1)  # (N, 2T, 2T)
            y = torch.einsum("nts,nsc->ntc", att, y) + self.mha(y, y, y)[0]
            return F.linear(y, self.tied)

    t = 5
    info = analyze(Net(), torch.zeros(3, 8, t))
    other = {(o.name, o.kind): o.macs for o in info.other}
    steps = 2 * t
    assert other == {
        ("up", "conv-transpose1d"): 8 * t * 4 * 2,
        ("rnn", "gru"): steps * 2 * 3 * 6 * (4 + 6),
        ("<root>", "matmul"): steps * steps * 12,
        ("<root>", "einsum"): steps * steps * 12,
        ("mha", "attention"): 4 * steps * 12 * 12 + 2 * steps * steps * 12,
        ("<root>", "linear"): steps * 5 * 12,
    }
    assert info.compressible_macs == info.layer("q").macs == steps * 12 * 12
    assert info.total_macs == info.compressible_macs + sum(other.values())


def test_a_scripted_submodule_a_keyword_input_and_a_double_model_are_counted():
    """A ScriptModule takes no hooks (its work is opaque and not counted; the rest is), an RNN
    called as ``rnn(input=x)`` is counted like one called positionally, and the SVD steps read a
    float64 model's rank MACs off the counter in its own dtype."""
    from nnshrink.plan import Plan, compress
    from nnshrink.techniques.lowrank import WeightSVD

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.scripted = torch.jit.script(nn.Linear(6, 6))
            self.rnn = nn.LSTM(6, 4, batch_first=True)
            self.fc = nn.Linear(4, 3)

        def forward(self, x):
            return self.fc(self.rnn(input=self.scripted(x))[0])

    info = analyze(Net(), torch.zeros(2, 5, 6))
    assert {(o.name, o.kind): o.macs for o in info.other} == {("rnn", "lstm"): 5 * 4 * 4 * (6 + 4)}
    assert info.compressible_macs == 5 * 4 * 3
    torch.manual_seed(0)
    double = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 32)).double()
    x = torch.randn(64, 32, dtype=torch.float64)
    result = compress(double, Plan([WeightSVD(mac_ratio=0.6, samples=64)]), x[:1], calib=[x])
    assert analyze(result.model, x[:1]).total_macs <= 0.6 * 2 * 32 * 32
