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


def test_realistic_zoo_groups_through_resize_transposed_conv_concat_and_token_sequences():
    """The FPN detector's lateral convs (joined by adds after nearest Resize, read three times by
    one conv through a concatenation), its transposed conv (reads one group, produces another)
    and the transformer's feed-forward hidden channels (Linear over (N, T, C)) are groups that
    prune: the model runs, its MACs drop, and the consumers' refit beats leaving them as they were."""
    import copy

    from nnshrink.graph import analyze
    from nnshrink.techniques.channels import prune_group
    from nnshrink.zoo import realistic as R

    torch.manual_seed(0)
    # (P-Net's PReLUs hold a slope per channel: sliced with their group)
    cases = {"dbnet": {"lat1": 8, "smooth.0": 8, "up1": 8}, "transformer": {"layers.0.ff1": 64},
             "pnet": {"conv1": 6, "conv2": 8}}
    for name, labels in cases.items():
        t = R.task(name, scale=0.05)
        model = t.build().eval()
        x = t.splits["train"][0][:64]
        deps = build_dependency_graph(model, x[:1])
        with torch.no_grad():
            ref = torch.cat([o.flatten(1) for o in model(x)], 1) if name == "pnet" else model(x)
        for label, keep in labels.items():
            group = _group(deps, label)
            assert group.prunable, (label, group.reason)
            errors = []
            for refit in (True, False):
                pruned = copy.deepcopy(model)
                prune_group(pruned, x, label, keep, reconstruct=refit)
                with torch.no_grad():
                    out = pruned(x)
                out = torch.cat([o.flatten(1) for o in out], 1) if name == "pnet" else out
                assert out.shape == ref.shape
                errors.append(float((out - ref).pow(2).mean() / ref.pow(2).mean()))
            assert errors[0] <= errors[1] * 1.01 + 1e-9, (label, errors)  # (an untrained detector barely moves)
            assert all(m.num_parameters == m.weight.numel() for m in pruned.modules() if isinstance(m, torch.nn.PReLU))
            assert analyze(pruned, x[:1]).total_macs < analyze(model, x[:1]).total_macs  # a transposed conv's too
    lat = _group(deps := build_dependency_graph(R.task("dbnet", scale=0.05).build(), torch.zeros(1, 1, 32, 32)), "lat1")
    assert {p for p, _ in lat.producers} == {"lat1", "lat2", "lat3"} and "concat" in lat.couplings
    assert [c.layer for c in lat.consumers].count("smooth.0") == 3
    assert [c.layer for c in _group(deps, "smooth.0").consumers] == ["up1"]
    # attention's q, k, v reach a reshape into heads: not tracked, and said so
    deps = build_dependency_graph(R.task("transformer", scale=0.05).build(), torch.zeros(1, 7, 28))
    q = _group(deps, "layers.0.attn.q")
    assert not q.prunable and "last axis" in q.reason


def test_a_per_channel_operand_of_lower_rank_blocks_its_group():
    """``x * gamma`` with ``gamma`` of shape (C,) on channels on the last axis (LayerScale), or of
    shape (C, 1, 1) on a feature map: the operand would need slicing, so the group is not prunable."""

    class Scaled(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)
            self.gamma = torch.nn.Parameter(torch.ones(16))
            self.c, self.d = torch.nn.Conv2d(1, 6, 3), torch.nn.Conv2d(6, 2, 1)
            self.scale = torch.nn.Parameter(torch.ones(6, 1, 1))

        def forward(self, x, img):
            return self.b(torch.relu(self.a(x)) * self.gamma), self.d(self.c(img) * self.scale)

    deps = build_dependency_graph(Scaled(), (torch.zeros(2, 5, 8), torch.zeros(2, 1, 8, 8)))
    for producer in ("a", "c"):
        g = _group(deps, producer)
        assert not g.prunable and "per-channel operand" in g.reason


def test_a_layer_called_twice_on_a_group_is_narrowed_once():
    from nnshrink.techniques.channels import prune_group

    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.c = torch.nn.Conv2d(1, 8, 3), torch.nn.Conv2d(8, 4, 1)

        def forward(self, x):
            y = torch.relu(self.a(x))
            return self.c(y) + self.c(y * 0.5)

    model = Twice().eval()
    x = torch.randn(16, 1, 10, 10)
    prune_group(model, x, "a", 5)
    assert model.c.in_channels == model.c.weight.shape[1] == 5 and model(x).shape == (16, 4, 8, 8)
