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
