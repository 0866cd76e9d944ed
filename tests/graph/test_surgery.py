import pytest
import torch
from torch import nn

from nnshrink import fold_batchnorms, replace_module, zoo
from nnshrink.graph import fold_bn
from nnshrink.testing import ConcatNet, DynamicConvNet, randomize_batchnorm


@pytest.mark.parametrize("conv, bn, shape", [
    (nn.Conv2d(3, 5, 3, bias=False), nn.BatchNorm2d(5), (2, 3, 9, 9)),
    (nn.Conv2d(4, 4, 3, groups=4), nn.BatchNorm2d(4), (2, 4, 7, 7)),
    (nn.Conv1d(2, 6, 3), nn.BatchNorm1d(6), (2, 2, 11)),
    (nn.Linear(7, 5), nn.BatchNorm1d(5), (3, 7)),
])
def test_fold_bn_matches_conv_then_bn(conv, bn, shape):
    randomize_batchnorm(bn)
    bn.eval()
    x = torch.randn(shape)
    fused = fold_bn(conv, bn)
    torch.testing.assert_close(fused(x), bn(conv(x)), atol=1e-5, rtol=1e-5)
    assert fused is not conv and fused.bias is not None


@pytest.mark.parametrize("model, shape", [
    (zoo.build("resnet8"), (3, 1, 28, 28)), (zoo.build("mobilenet"), (3, 1, 28, 28)),
    (ConcatNet(), (2, 3, 16, 16)), (DynamicConvNet(), (2, 1, 20, 20)),
])
def test_fold_batchnorms_keeps_outputs_and_input_model(model, shape):
    randomize_batchnorm(model).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(shape)
    folded, pairs = fold_batchnorms(model)
    torch.testing.assert_close(folded(x), model(x), atol=1e-4, rtol=1e-4)
    assert pairs and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_replace_module_by_qualified_name():
    model = zoo.build("resnet8")
    old = replace_module(model, "layer2.conv1", nn.Identity())
    assert isinstance(old, nn.Conv2d) and isinstance(model.layer2.conv1, nn.Identity)
    with pytest.raises(KeyError, match="layer9"):
        replace_module(model, "layer9.conv1", nn.Identity())


class _Flagged(nn.Module):
    """forward(x, flag=False): a Python branch on an argument, which torch.fx cannot trace as a Proxy."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x, flag=False, scale=1.0):
        y = self.bn(self.conv(x))
        if flag:
            y = y * 2
        return self.fc(y.mean(dim=(2, 3))) * scale


class _DataDependent(nn.Module):
    """Control flow on tensor values: untraceable, so batch norms are folded eagerly."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x):
        a = self.conv1(x)
        y = self.bn1(a)
        if y.sum() > -1e9:  # always taken, but fx cannot know
            y = y + a  # conv1's output is read twice: its batch norm must not be folded
        return self.bn2(self.conv2(y))


def _randomize_bn(model):
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2)
                m.weight.uniform_(0.5, 2)
    return model.eval()


def test_forward_arguments_are_traced_at_their_defaults():
    import nnshrink as ns

    model = _randomize_bn(_Flagged())
    x = torch.rand(2, 3, 10, 10)
    assert ns.graph.concrete_args(model) == {"flag": False, "scale": 1.0}
    folded, pairs = fold_batchnorms(model)
    assert pairs == [("conv", "bn")]
    torch.testing.assert_close(folded(x), model(x), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(ns.graph.trace(model)(x), model(x))


def test_fold_batchnorm_step_folds_untraceable_models_eagerly_and_checks_each_fold():
    from nnshrink.plan import FoldBatchNorm, Plan, compress

    model = _randomize_bn(_DataDependent())
    x = torch.rand(2, 3, 12, 12)
    with pytest.raises(Exception):
        fold_batchnorms(model)
    res = compress(model, Plan([FoldBatchNorm()]), x)
    details = res.steps[0].details
    assert details["folded"] == [["conv2", "bn2"]] and details["found_by"].startswith("eager")
    assert [s["layer"] for s in res.steps[0].skipped] == ["bn1"]
    torch.testing.assert_close(res.model(x), model(x), rtol=1e-4, atol=1e-5)
