"""MAC reduction: Weight/Spatial SVD, channel pruning with reconstruction, allocation for a target."""

import pytest
import torch
from torch import nn

from nnshrink import analyze, zoo
from nnshrink.errors import ConfigError
from nnshrink.plan import Plan, compress
from nnshrink.techniques import ChannelPrune, SpatialSVD, WeightSVD, spatial_svd, weight_svd
from nnshrink.search.engine import Unit
from nnshrink.search.solvers import allocate
from nnshrink.techniques.channels import prune_group
from nnshrink.testing import ConcatNet


def _x(n=64, shape=(1, 28, 28), seed=0):
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


def _randomized(name):
    model = zoo.build(name)
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def test_full_rank_decompositions_are_exact():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1)
    x = torch.randn(2, 4, 9, 9)
    torch.testing.assert_close(spatial_svd(conv, 12)(x), conv(x), rtol=1e-4, atol=1e-4)
    lin = nn.Linear(10, 7)
    v = torch.randn(3, 10)
    torch.testing.assert_close(weight_svd(lin, 7)(v), lin(v), rtol=1e-4, atol=1e-4)
    pw = nn.Conv2d(8, 5, 1, stride=2)
    y = torch.randn(2, 8, 6, 6)
    torch.testing.assert_close(weight_svd(pw, 5)(y), pw(y), rtol=1e-4, atol=1e-4)
    # weight SVD of a k x k conv and of a 1-D conv keeps the kernel in the first factor (the budget's choice)
    kxk = nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=1)
    torch.testing.assert_close(weight_svd(kxk, 6)(x), kxk(x), rtol=1e-4, atol=1e-4)
    c1 = nn.Conv1d(5, 7, 5, stride=2, padding=2, dilation=1)
    z = torch.randn(2, 5, 30)
    torch.testing.assert_close(weight_svd(c1, 7)(z), c1(z), rtol=1e-4, atol=1e-4)


def test_truncated_spatial_svd_is_the_best_rank_r_fit_and_saves_macs():
    torch.manual_seed(0)
    conv = nn.Conv2d(16, 16, 3, padding=1)
    x = torch.randn(4, 16, 8, 8)
    with torch.no_grad():
        errs = [float((spatial_svd(conv, r)(x) - conv(x)).norm()) for r in (2, 6, 12, 24)]
    assert errs == sorted(errs, reverse=True)
    small = analyze(nn.Sequential(spatial_svd(conv, 4)), x[:1]).total_macs
    assert small < analyze(conv, x[:1]).total_macs / 2


def test_allocation_meets_the_target_with_the_least_loss():
    # two units, one cheap to compress (low loss), one expensive
    units = [Unit("a", [0, 1, 2, 3], [0.0, 0.01, 0.02, 0.03]), Unit("b", [0, 1, 2, 3], [0.0, 0.5, 1.0, 1.5])]

    def macs(choice):
        return 100 - 10 * choice["a"] - 10 * choice["b"]

    choice = allocate(units, macs, target=75, floor=70)
    assert 70 <= macs(choice) <= 75 and choice == {"a": 3, "b": 0}
    with pytest.raises(ConfigError, match="cannot be reached"):
        allocate(units, macs, target=30, floor=20)


@pytest.mark.parametrize("step", [SpatialSVD(mac_ratio=0.6, executor="serial", samples=32, measured_levels=4),
                                  ChannelPrune(mac_ratio=0.5, executor="serial", samples=32, measured_levels=3)])
def test_steps_hit_the_mac_target_on_a_resnet(step):
    model, x = _randomized("resnet8"), _x()
    base = analyze(model, x[:1]).total_macs
    result = compress(model, Plan([step]), x[:2], calib=[x])
    after = analyze(result.model, x[:1]).total_macs
    assert step.mac_ratio - 0.01 <= after / base <= step.mac_ratio
    assert result.steps[0].details["mac_ratio"] == pytest.approx(after / base)
    # each unit's measured errors, for the report's heatmap: mildest first, so they grow along a row
    table = result.steps[0].details["sensitivity"]
    assert table["layers"] and all(len(v) == len(table["settings"]) for v in table["layers"].values())
    for name, row in table["layers"].items():
        seen = [v for v in row if v is not None]
        assert seen and seen[-1] >= seen[0] and table["labels"][name][0]
    out = result.model(x)
    assert out.shape == (64, 10) and torch.isfinite(out).all()


def test_channel_pruning_shrinks_residual_groups_and_depthwise_convs():
    model, x = _randomized("mobilenet"), _x(16)
    step = ChannelPrune(mac_ratio=0.6, executor="process", samples=16, measured_levels=2)
    result = compress(model, Plan([step]), x[:2], calib=[x])
    d = result.steps[0].details
    assert 0.59 <= d["mac_ratio"] <= 0.6
    before = {li.name: li.weight_shape for li in analyze(model, x[:1]).layers}
    after = {li.name: li.weight_shape for li in analyze(result.model, x[:1]).layers}
    assert before.keys() == after.keys()
    shrunk = {n for n in before if before[n] != after[n]}
    from nnshrink.graph import build_dependency_graph

    groups = build_dependency_graph(model, x[:1]).groups
    residual = {n for g in groups if "residual" in g.couplings for n, _ in g.producers}
    depthwise = {n for g in groups if "depthwise" in g.couplings for n in g.members}
    assert shrunk & residual and shrunk & depthwise, shrunk
    odd = [k for k, v in d["groups"].items() if v["kept"] % d["round_to"]]
    assert odd == d["not_multiple_of_round_to"] and len(odd) <= 2
    # the model output is never pruned, and says so
    assert any(s["layer"] == "fc" and "output" in s["reason"] for s in result.steps[0].skipped)


def test_reconstruction_beats_plain_removal():
    model, x = _randomized("resnet8"), _x(128)
    with torch.no_grad():
        ref = model(x)
    errs = {}
    for rec in (False, True):
        m = zoo.build("resnet8")
        m.load_state_dict(model.state_dict())
        m.eval()
        prune_group(m, x, "layer3.conv1", 24, reconstruct=rec)
        with torch.no_grad():
            errs[rec] = float((m(x) - ref).pow(2).mean())
    assert errs[True] < errs[False]


def test_concat_groups_are_pruned_at_their_offsets():
    model, x = ConcatNet().eval(), _x(16, (3, 16, 16))
    step = ChannelPrune(mac_ratio=0.7, executor="serial", samples=16, measured_levels=3)
    result = compress(model, Plan([step]), x[:2], calib=[x])
    assert result.model(x).shape == model(x).shape
    assert result.steps[0].details["mac_ratio"] <= 0.7


def test_the_channel_step_counts_what_no_group_narrows_and_narrows_a_transposed_conv():
    """A transposed conv (its input and output channels groups) and an attention-like product of
    activations carry MACs of the whole: the step lands in [C - tolerance, C] of all of them."""

    class UpNet(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1, self.up = nn.Conv2d(3, 16, 3, padding=1), nn.ConvTranspose2d(16, 16, 2, stride=2)
            self.conv2 = nn.Conv2d(16, 8, 3, padding=1)

        def forward(self, x):
            y = self.conv2(torch.relu(self.up(torch.relu(self.conv1(x)))))  # (N, 8, 2H, 2W)
            t = y.flatten(2)  # (N, 8, 4HW): a product of two activations, which no group narrows
            return torch.softmax(t @ t.transpose(1, 2), -1)

    torch.manual_seed(0)
    model, x = UpNet().eval(), _x(16, (3, 8, 8))
    before = analyze(model, x[:1])
    assert {o.kind for o in before.other} == {"conv-transpose2d", "matmul"}
    step = ChannelPrune(mac_ratio=0.6, executor="serial", samples=16, measured_levels=3, round_to=1)
    result = compress(model, Plan([step]), x[:2], calib=[x])
    d = result.steps[0].details
    after = analyze(result.model, x[:1])
    assert d["macs_before"] == before.total_macs and d["macs_after"] == after.total_macs
    assert 0.59 <= after.total_macs / before.total_macs <= 0.6
    assert result.model.up.in_channels < 16 or result.model.up.out_channels < 16


def test_channel_counts_the_plan_sets_are_kept_and_the_rest_allocated():
    model, x = _randomized("resnet8"), _x(32)
    step = ChannelPrune(mac_ratio=0.6, executor="serial", samples=16, measured_levels=3,
                        layers={"layer2.conv1": {"channels": 8}, "layer3.conv1": "skip"})
    result = compress(model, Plan([step]), x[:2], calib=[x])
    d = result.steps[0].details
    assert d["groups"]["layer2.conv1"] == {"channels": 32, "kept": 8} and result.model.layer2.conv1.out_channels == 8
    assert result.model.layer3.conv1.out_channels == model.layer3.conv1.out_channels
    assert d["mac_ratio"] <= 0.6 and any("layer3.conv1" in s["layer"] and "layer rules" in s["reason"]
                                         for s in result.steps[0].skipped)


def test_weight_svd_on_lenet300_and_bad_configs():
    model, x = zoo.build("lenet300").eval(), _x(32)
    result = compress(model, Plan([WeightSVD(mac_ratio=0.5, executor="serial")]), x[:2], calib=[x])
    assert 0.49 <= result.steps[0].details["mac_ratio"] <= 0.5
    # a rank the plan sets is applied first, the other layers' ranks chosen around it; a skip is left alone
    rules = {"fc1": {"rank": 100}, "fc3": "skip"}
    fixed = compress(model, Plan([WeightSVD(mac_ratio=0.5, executor="serial", layers=rules)]), x[:2], calib=[x])
    d = fixed.steps[0].details
    assert d["layers"]["fc1"]["rank"] == 100 and fixed.model.fc1[0].out_features == 100 and "fc2" in d["layers"]
    assert isinstance(fixed.model.fc3, nn.Linear) and "fc3" not in d["layers"] and 0.49 <= d["mac_ratio"] <= 0.5
    with pytest.raises(ConfigError, match="rank must be a whole number"):
        WeightSVD(layers={"fc1": {"rank": 0}})
    with pytest.raises(ConfigError, match="mac_ratio"):
        ChannelPrune(mac_ratio=1.5)
    with pytest.raises(ConfigError, match="executor"):
        SpatialSVD(executor="mpi")


def test_svd_stage_that_cannot_reach_its_target_raises_or_passes_on():
    model, x = zoo.build("mobilenet").eval(), _x(16)  # its k x k convs are depthwise: little to decompose
    with pytest.raises(ConfigError, match="cannot be reached"):
        compress(model, Plan([SpatialSVD(mac_ratio=0.75, executor="serial", samples=16)]), x[:2], calib=[x])
    result = compress(model, Plan([SpatialSVD(mac_ratio=0.75, executor="serial", samples=16, required=False)]),
                      x[:2], calib=[x])
    step = result.steps[0]
    assert "cannot reach" in step.details["not_applied"] and step.details["mac_ratio"] == 1.0
    with torch.no_grad():
        torch.testing.assert_close(result.model(x), model(x))


def test_process_pool_gives_the_serial_results_and_the_cache_serves_a_rerun(tmp_path, monkeypatch):
    import functools

    from nnshrink.techniques import lowrank

    monkeypatch.setenv("NNSHRINK_CACHE_DIR", str(tmp_path))
    model, x = _randomized("resnet8"), _x(32)
    serial = compress(model, Plan([SpatialSVD(mac_ratio=0.7, executor="serial")]), x[:2], calib=[x])
    monkeypatch.setenv("NNSHRINK_CACHE_DIR", str(tmp_path / "other"))
    pooled = compress(model, Plan([SpatialSVD(mac_ratio=0.7, executor="process")]), x[:2], calib=[x])
    assert serial.steps[0].details["layers"] == pooled.steps[0].details["layers"]
    calls = []
    measure = lowrank._svd_loss

    @functools.wraps(measure)  # the same name and module, so the same cache key
    def counted(*args, **kwargs):
        calls.append(args[3:5])
        return measure(*args, **kwargs)

    monkeypatch.setattr(lowrank, "_svd_loss", counted)
    again = compress(model, Plan([SpatialSVD(mac_ratio=0.7, executor="serial")]), x[:2], calib=[x])
    assert again.steps[0].details["layers"] == pooled.steps[0].details["layers"]
    assert calls == []  # every measurement came from the cache the pooled run wrote


def test_ray_executor_without_ray_says_how_to_get_it(tmp_path, monkeypatch):
    import importlib.util

    if importlib.util.find_spec("ray") is not None:
        pytest.skip("ray is installed")
    monkeypatch.setenv("NNSHRINK_CACHE_DIR", str(tmp_path))
    model, x = _randomized("resnet8"), _x(16)
    with pytest.raises(ConfigError, match="nnshrink\\[ray\\]"):
        compress(model, Plan([SpatialSVD(mac_ratio=0.7, executor="ray")]), x[:2], calib=[x])


def test_ray_executor_gives_the_serial_results(tmp_path, monkeypatch):
    """Runs where Ray is installed (not in CI: a local Ray start takes about a minute on 2 cores)."""
    ray = pytest.importorskip("ray")
    monkeypatch.setenv("NNSHRINK_CACHE_DIR", str(tmp_path / "serial"))
    model, x = _randomized("resnet8"), _x(32)
    serial = compress(model, Plan([SpatialSVD(mac_ratio=0.7, executor="serial")]), x[:2], calib=[x])
    monkeypatch.setenv("NNSHRINK_CACHE_DIR", str(tmp_path / "ray"))
    try:
        remote = compress(model, Plan([SpatialSVD(mac_ratio=0.7, executor="ray")]), x[:2], calib=[x])
    finally:
        ray.shutdown()
    assert remote.steps[0].details["layers"] == serial.steps[0].details["layers"]


@pytest.mark.parametrize("name", ["lenet300", "lenet5", "resnet8", "mobilenet", "concat", "resnet8-unoptimized"])
def test_structural_steps_on_an_imported_onnx_graph_match_the_torch_module(name, tmp_path):
    """conv -> flatten/reshape -> linear, global pooling -> reshape, residual adds, concatenation:
    the exporter writes the feature count as a number (a constant, or shape arithmetic with batch
    norms left in: the unoptimized export); folding, channel pruning and SVD of the imported graph
    give what they give on the torch module the file came from, at any batch size."""
    from nnshrink import FoldBatchNorm, export_onnx, load_model
    from nnshrink.testing import ConcatNet, randomize_batchnorm

    torch.manual_seed(0)
    model = ConcatNet().eval() if name == "concat" else randomize_batchnorm(zoo.build(name.split("-")[0])).eval()
    shape = getattr(model, "input_shape", (1, 28, 28))
    if name.endswith("unoptimized"):
        program = torch.onnx.export(model, (torch.zeros((2, *shape)),), dynamo=True, optimize=False,
                                    dynamic_shapes=({0: torch.export.Dim("b")},))
        program.save(str(tmp_path / "m.onnx"))
    else:
        export_onnx(model, tmp_path / "m.onnx", torch.zeros((2, *shape)))
    imported = load_model(tmp_path / "m.onnx")
    x = torch.rand((64, *shape), generator=torch.Generator().manual_seed(1))
    fast = {"samples": 64, "measured_levels": 4, "executor": "serial"}
    steps = [FoldBatchNorm(), ChannelPrune(mac_ratio=0.6, round_to=4, **fast)]
    if name == "lenet5":  # channel pruning after Spatial SVD put nn.Sequentials into the graph
        steps.insert(1, SpatialSVD(mac_ratio=0.75, required=False, **fast))
    if name == "lenet300":  # Linear layers behind the imported graph's MatMul/Gemm
        steps.append(WeightSVD(mac_ratio=0.4, **fast))
    results = [compress(m, Plan(steps), x[:2], calib=[x]) for m in (model, imported)]
    for a, b in zip(*(r.steps[1:] for r in results)):
        key = "groups" if a.step == "channel_prune" else "layers"
        assert a.details[key] == b.details[key]
        assert a.details["mac_ratio"] == pytest.approx(b.details["mac_ratio"])
    with torch.no_grad():
        for batch in (1, 3):
            xb = x[:batch]
            torch.testing.assert_close(results[1].model(xb), results[0].model(xb), rtol=1e-3, atol=1e-3)


def test_the_channel_step_prunes_attention_heads_and_counts_their_products():
    """On a transformer the step may take whole attention heads (the query, key, value and output
    projections and the attention products shrink together); its cost model scales the products
    with the heads kept, so it lands in [C - tolerance, C] of the whole forward pass."""
    from torch import fx

    from nnshrink.zoo import realistic as R

    torch.manual_seed(0)
    t = R.task("transformer", scale=0.05)
    model = t.build().eval()
    x = t.splits["train"][0][:32]
    step = ChannelPrune(mac_ratio=0.6, executor="serial", samples=32, measured_levels=3, round_to=1,
                        layers={"layers.0.attn.q": {"channels": 32}})
    result = compress(model, Plan([step]), x[:2], calib=[x])
    d = result.steps[0].details
    before, after = analyze(model, x[:1]), analyze(result.model, x[:1])
    assert 0.59 <= after.total_macs / before.total_macs <= 0.6
    assert d["groups"]["layers.0.attn.q"] == {"channels": 64, "kept": 32}
    assert all(c["kept"] % 16 == 0 for label, c in d["groups"].items() if ".attn." in label)
    assert isinstance(result.model, fx.GraphModule) and result.model(x).shape == (32, 10)
    assert result.model.get_submodule("layers.0.attn.out").in_features == 32
    products = lambda info: sum(o.macs for o in info.other if o.kind == "matmul")  # noqa: E731
    assert products(after) < products(before)
    with pytest.raises(ConfigError, match="whole number of heads"):
        compress(model, Plan([ChannelPrune(mac_ratio=0.6, executor="serial", samples=32, measured_levels=3,
                                           layers={"layers.0.attn.q": {"channels": 40}})]), x[:2], calib=[x])


def test_the_channel_step_counts_a_fused_qkv_projection_three_times():
    """A fused q/k/v Linear produces its group of heads at three offsets: the step's cost model
    takes three times the channels from it, so it lands in [C - tolerance, C]."""
    from nnshrink.testing import FusedAttentionNet

    torch.manual_seed(0)
    model, x = FusedAttentionNet().eval(), torch.randn(32, 16, 48)
    step = ChannelPrune(mac_ratio=0.52, tolerance=0.02, executor="serial", samples=32, measured_levels=3, round_to=1)
    result = compress(model, Plan([step]), x[:2], calib=[x])
    d = result.steps[0].details
    before, after = analyze(model, x[:1]), analyze(result.model, x[:1])
    assert 0.50 <= after.total_macs / before.total_macs <= 0.52  # 2 of 4 heads: 0.511 (1 head: 0.27, 3: 0.76)
    assert d["groups"]["qkv"]["kept"] == 24 and result.model.qkv.out_features == 72
