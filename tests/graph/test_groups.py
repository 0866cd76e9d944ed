import pytest
import torch

from nnshrink import UnsupportedModelError, build_dependency_graph, zoo
from nnshrink.testing import ConcatNet, FusedAttentionNet, GroupedNet, SplitAttentionNet, UntraceableNet


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
    # attention's q, k and v: one group of heads, read by the output projection
    deps = build_dependency_graph(R.task("transformer", scale=0.05).build(), torch.zeros(1, 7, 28))
    q = _group(deps, "layers.0.attn.q")
    assert q.prunable and q.block == 16 and q.channels == 64 and "attention" in q.couplings
    assert [p for p, _ in q.producers] == ["layers.0.attn.q", "layers.0.attn.k", "layers.0.attn.v"]
    assert [c.layer for c in q.consumers] == ["layers.0.attn.out"]
    assert [k for k, _ in q.rewrites] == ["split"] * 3 + ["merge"] and q.to_dict()["heads"] == 4


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


def test_attention_heads_are_pruned_whole_in_the_models_graph(tmp_path):
    """The transformer's attention loses whole heads: q, k, v rows and the output projection's
    columns (refitted), the head count in its reshapes rewritten in the torch.fx graph; the
    attention products' MACs shrink with the heads, and the pruned model exports to ONNX and runs
    in ONNX Runtime as in torch. Keeping part of a head, or pruning the plain module (whose code
    holds the head count), is refused."""
    import copy

    import numpy as np
    import onnxruntime as ort
    from torch import fx

    from nnshrink import ConfigError, export_onnx
    from nnshrink.graph import analyze
    from nnshrink.techniques.channels import editable, prune_group
    from nnshrink.zoo import realistic as R

    torch.manual_seed(0)
    t = R.task("transformer", scale=0.05)
    model = t.build().eval()
    x = t.splits["train"][0][:96]
    with pytest.raises(ConfigError, match="GraphModule"):
        prune_group(copy.deepcopy(model), x, "layers.0.attn.q", 32)
    gm = editable(model, x)
    assert isinstance(gm, fx.GraphModule) and gm.input_shape == model.input_shape
    assert copy.deepcopy(gm).input_shape == model.input_shape  # (what a step returns is a copy)
    with pytest.raises(ConfigError, match="whole number"):
        prune_group(copy.deepcopy(gm), x, "layers.0.attn.q", 24)
    with torch.no_grad():
        ref = model(x)
    errors = []
    for refit in (True, False):
        pruned = copy.deepcopy(gm)
        kept = prune_group(pruned, x, "layers.0.attn.q", 32, reconstruct=refit)
        assert len(kept) == 32 and all(kept[i] // 16 == kept[i + 15] // 16 for i in (0, 16))
        with torch.no_grad():
            out = pruned(x)
        errors.append(float((out - ref).pow(2).mean() / ref.pow(2).mean()))
    assert errors[0] <= errors[1] * 1.01 + 1e-9, errors
    attn = pruned.get_submodule("layers.0.attn")
    assert attn.q.out_features == attn.k.out_features == attn.v.out_features == attn.out.in_features == 32
    before, after = analyze(model, x[:1]), analyze(pruned, x[:1])
    products = lambda info: sum(o.macs for o in info.other if o.kind == "matmul")  # noqa: E731
    assert products(after) == products(before) * 3 // 4  # one layer's of two, at half its heads
    assert after.total_macs < before.total_macs
    path = export_onnx(pruned, tmp_path / "pruned.onnx", x[:2])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x[:5].numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, pruned(x[:5]).numpy(), rtol=1e-4, atol=1e-5)


def test_attention_through_sdpa_permute_and_flatten_and_what_blocks_heads():
    """``scaled_dot_product_attention`` over ``view``/``permute`` splits and a ``flatten`` merge
    is a group of heads; a per-head bias, and ``nn.MultiheadAttention`` (whose projections are its
    own), block the channels, with the reason; a layer called three times is one group."""
    import torch.nn.functional as F
    from torch import nn

    from nnshrink.graph import analyze
    from nnshrink.techniques.channels import editable, prune_group

    class Sdpa(nn.Module):
        def __init__(self, d=32, h=4):
            super().__init__()
            self.h, self.q, self.k, self.v, self.o = h, nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

        def forward(self, x):
            n, t, _ = x.shape
            q, k, v = (m(x).view(n, t, self.h, -1).permute(0, 2, 1, 3) for m in (self.q, self.k, self.v))
            return self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2))

    class PerHeadBias(Sdpa):
        def __init__(self):
            super().__init__()
            self.bias = nn.Parameter(torch.zeros(1, 4, 1, 1))

        def forward(self, x):
            n, t, d = x.shape
            q, k, v = (m(x).reshape(n, t, self.h, d // self.h).transpose(1, 2) for m in (self.q, self.k, self.v))
            a = torch.softmax(q @ k.transpose(-2, -1) + self.bias, dim=-1)
            return self.o((a @ v).transpose(1, 2).reshape(n, t, d))

    class Mha(nn.Module):
        def __init__(self):
            super().__init__()
            self.f, self.a = nn.Linear(32, 32), nn.MultiheadAttention(32, 4, batch_first=True)

        def forward(self, x):
            return self.a(self.f(x), self.f(x), self.f(x))[0]

    torch.manual_seed(0)
    x = torch.randn(48, 9, 32)
    model = Sdpa().eval()
    g = _group(build_dependency_graph(model, x[:1]), "q")
    assert g.prunable and g.block == 8 and [k for k, _ in g.rewrites] == ["split"] * 3
    pruned = editable(model, x)
    prune_group(pruned, x, "q", 16)
    with torch.no_grad():
        assert pruned(x).shape == model(x).shape
    assert analyze(pruned, x[:1]).total_macs * 2 == analyze(model, x[:1]).total_macs
    g = _group(build_dependency_graph(PerHeadBias().eval(), x[:1]), "q")
    assert not g.prunable and "per-channel operand" in g.reason
    deps = build_dependency_graph(Mha().eval(), x[:1])
    shared = [g for g in deps.groups if g.producers]
    assert len(shared) == 1 and not shared[0].prunable and "last axis" in shared[0].reason
    plain = Mha()
    assert editable(plain, x) is plain  # no heads to prune: the module as it is


@pytest.mark.parametrize("make,label", [(lambda: FusedAttentionNet(), "qkv"), (lambda: FusedAttentionNet(sdpa=True), "qkv"),
                                        (lambda: SplitAttentionNet(), "c_attn")], ids=["timm", "timm-sdpa", "nanogpt"])
def test_a_fused_qkv_projection_is_pruned_in_whole_heads(make, label, tmp_path):
    """One Linear making q, k and v (reshaped into (3, heads) and unbound, as timm does, or split
    along its channels, as nanoGPT does) produces one group of heads at three offsets: pruning
    takes the same heads from each part, the model runs, exports and matches ONNX Runtime; its
    output also used whole blocks the heads."""
    import copy

    import numpy as np
    import onnxruntime as ort

    from nnshrink import export_onnx
    from nnshrink.graph import analyze
    from nnshrink.techniques.channels import editable, prune_group

    torch.manual_seed(0)
    model, x = make().eval(), torch.randn(64, 16, 48)
    g = _group(build_dependency_graph(model, x[:1]), label)
    assert g.prunable and g.block == 12 and g.channels == 48, g.reason
    assert g.producers == [(label, 0), (label, 48), (label, 96)]
    with torch.no_grad():
        ref = model(x)
    errors = []
    for refit in (True, False):
        pruned = editable(copy.deepcopy(model), x)
        prune_group(pruned, x, label, 24, reconstruct=refit)
        with torch.no_grad():
            errors.append(float((pruned(x) - ref).pow(2).mean() / ref.pow(2).mean()))
    assert errors[0] <= errors[1] * 1.01 + 1e-9, errors
    assert pruned.get_submodule(label).out_features == 72
    assert analyze(pruned, x[:1]).total_macs < analyze(model, x[:1]).total_macs
    path = export_onnx(pruned, tmp_path / "m.onnx", x[:2])
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x[:3].numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, pruned(x[:3]).numpy(), rtol=1e-4, atol=1e-5)
    if label == "qkv":
        leaky = _group(build_dependency_graph(FusedAttentionNet(leak=True).eval(), x[:1]), "qkv")
        assert not leaky.prunable and "used whole" in leaky.reason


def test_an_imported_onnx_transformer_has_the_same_groups_and_prunes_heads(tmp_path):
    """The transformer exported to ONNX and imported back (Reshape with a constant shape,
    Transpose with a perm, MatMul, Softmax and GELU as Erf, as the importer's helpers): the same
    attention and feed-forward groups as the torch module; heads pruned in its graph run as in
    ONNX Runtime."""
    import copy

    import numpy as np
    import onnxruntime as ort

    from nnshrink import export_onnx
    from nnshrink.io import load_onnx
    from nnshrink.techniques.channels import prune_group
    from nnshrink.zoo import realistic as R

    torch.manual_seed(0)
    t = R.task("transformer", scale=0.05)
    x = t.splits["train"][0][:64]
    path = export_onnx(t.build().eval(), tmp_path / "t.onnx", x[:2])
    model = load_onnx(path)
    groups = [g for g in build_dependency_graph(model, x[:1]).groups if g.prunable]
    assert sorted((g.channels, g.block, len(g.producers)) for g in groups) == [(64, 16, 3), (64, 16, 3), (128, 1, 1), (128, 1, 1)]
    pruned = copy.deepcopy(model)
    heads = next(g for g in groups if g.block > 1)
    prune_group(pruned, x, heads.producers[0][0], 16)
    ffn = next(g for g in groups if g.block == 1)
    prune_group(pruned, x, ffn.producers[0][0], 64)
    out = export_onnx(pruned, tmp_path / "p.onnx", x[:2])
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x[:3].numpy()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(got, pruned(x[:3]).numpy(), rtol=1e-4, atol=1e-5)
        assert pruned(x).shape == model(x).shape


def test_what_would_break_a_pruned_attention_is_blocked_not_guessed():
    """Parts of a fused projection that end in different groups, a merge whose sizes come from the
    input's shape, a per-head mask given to scaled_dot_product_attention, a transposed key read
    as ``k.mT``, and one layer called on two groups' channels: each blocks, with the reason; a
    permute given as ``dims=`` is followed."""
    import torch.nn.functional as F
    from torch import nn

    class Apart(nn.Module):  # q, k, v each read by their own layer: one slice of qkv cannot serve three groups
        def __init__(self):
            super().__init__()
            self.qkv, self.a, self.b, self.c = nn.Linear(8, 24), nn.Linear(8, 4), nn.Linear(8, 4), nn.Linear(8, 4)

        def forward(self, x):
            q, k, v = self.qkv(x).split(8, dim=-1)
            return self.a(q) * self.b(torch.relu(k)) * self.c(v)

    def attention(merge_like_input=False, mask=None, mt=False, dims_kw=False):
        class Attn(nn.Module):
            def __init__(self):
                super().__init__()
                self.q, self.k, self.v, self.o = (nn.Linear(16, 16) for _ in range(4))

            def forward(self, x):
                n, t, d = x.shape
                split = (lambda y: torch.permute(y.reshape(n, t, 4, 4), dims=(0, 2, 1, 3))) if dims_kw else \
                    (lambda y: y.reshape(n, t, 4, 4).transpose(1, 2))
                q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
                if mask is not None:
                    y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                else:
                    y = torch.softmax(q @ (k.mT if mt else k.transpose(-2, -1)), dim=-1) @ v
                y = y.transpose(1, 2)
                return self.o(y.reshape(x.shape) if merge_like_input else y.reshape(n, t, d))

        return Attn().eval()

    class SharedIn(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.sh = nn.Conv2d(1, 6, 3), nn.Conv2d(1, 6, 3), nn.Conv2d(6, 2, 1)

        def forward(self, x):
            return self.sh(torch.relu(self.a(x))) + self.sh(torch.relu(self.b(x)))

    x = torch.randn(2, 5, 16)
    g = _group(build_dependency_graph(Apart().eval(), torch.randn(2, 5, 8)), "qkv")
    assert not g.prunable and "different groups" in g.reason
    for model, label, why in ((attention(merge_like_input=True), "q", "sizes from elsewhere"),
                              (attention(mask=torch.zeros(1, 4, 5, 5)), "q", "per-head attention mask"),
                              (attention(mt=True), "k", "getattr")):
        g = _group(build_dependency_graph(model, x), label)
        assert not g.prunable and why in g.reason, g.reason
    assert _group(build_dependency_graph(attention(mask=torch.zeros(5, 5)), x), "q").prunable  # one mask for all heads
    assert _group(build_dependency_graph(attention(dims_kw=True), x), "q").prunable
    deps = build_dependency_graph(SharedIn().eval(), torch.randn(2, 1, 8, 8))
    assert _group(deps, "a") is _group(deps, "b") and "shared" in _group(deps, "a").couplings
