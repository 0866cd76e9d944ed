import pytest
import torch

from nnshrink import UnsupportedModelError, build_dependency_graph, zoo
from nnshrink.testing import ConcatNet, GroupedNet, UntraceableNet


def _group(deps, producer):
    g = deps.group_of(producer)
    assert g is not None, producer
    return g


def test_resnet8_residual_groups_tie_block_outputs_and_shortcuts():
    deps = build_dependency_graph(zoo.build("resnet8"), torch.zeros(1, 1, 28, 28))
    stage1 = _group(deps, "stem.0")
    assert {p for p, _ in stage1.producers} == {"stem.0", "layer1.conv2"}
    assert "residual" in stage1.couplings and "batchnorm" in stage1.couplings
    assert {"stem.1", "layer1.bn2"} <= set(stage1.members)
    assert {"layer1.conv1", "layer2.conv1", "layer2.shortcut.0"} <= {c.layer for c in stage1.consumers}
    stage3 = _group(deps, "layer3.conv2")
    assert {p for p, _ in stage3.producers} == {"layer3.conv2", "layer3.shortcut.0"}
    assert stage3.prunable
    inner = _group(deps, "layer2.conv1")
    assert [c.layer for c in inner.consumers] == ["layer2.conv2"] and inner.prunable
    assert ("layer2.conv1", "layer2.conv2") in deps.edges


def test_model_input_and_output_channels_are_not_prunable():
    deps = build_dependency_graph(zoo.build("resnet8"), torch.zeros(1, 1, 28, 28))
    out = _group(deps, "fc")
    assert not out.prunable and "output" in out.reason
    first = [g for g in deps.groups if any(c.layer == "stem.0" for c in g.consumers)][0]
    assert not first.prunable and "input" in first.reason


def test_mobilenet_depthwise_convs_carry_their_input_channels():
    deps = build_dependency_graph(zoo.build("mobilenet"), torch.zeros(1, 1, 28, 28))
    expand = _group(deps, "blocks.1.block.0")
    assert "blocks.1.block.3" in expand.members  # the depthwise conv
    assert "depthwise" in expand.couplings
    assert [c.layer for c in expand.consumers] == ["blocks.1.block.6"]
    residual = _group(deps, "blocks.1.block.6")
    assert {p for p, _ in residual.producers} == {"blocks.1.block.6", "blocks.2.block.6"}


def test_concat_segments_and_flatten_widths():
    deps = build_dependency_graph(ConcatNet(), torch.zeros(1, 3, 16, 16))
    left, right = _group(deps, "left"), _group(deps, "right")
    assert left.consumers[0].layer == right.consumers[0].layer == "merge"
    assert (left.consumers[0].offset, right.consumers[0].offset) == (0, 6)
    assert "concat" in left.couplings and left.prunable
    stem = _group(deps, "stem")
    assert "bn" in stem.members and {c.layer for c in stem.consumers} == {"left", "right"}
    lenet = build_dependency_graph(zoo.build("lenet5"), torch.zeros(1, 1, 28, 28))
    conv2 = _group(lenet, "conv2")
    assert [(c.layer, c.width) for c in conv2.consumers] == [("fc1", 16)]


def test_grouped_conv_blocks_pruning_with_reason():
    deps = build_dependency_graph(GroupedNet(), torch.zeros(1, 4, 12, 12))
    g = _group(deps, "conv")
    assert not g.prunable and "grouped" in g.reason
    pw = _group(deps, "pointwise")
    assert pw.consumers[0].width == 144


def test_untraceable_model_error_names_the_line():
    with pytest.raises(UnsupportedModelError, match=r"cannot trace UntraceableNet.*if x.sum\(\) > 0"):
        build_dependency_graph(UntraceableNet(), torch.zeros(1, 4))
