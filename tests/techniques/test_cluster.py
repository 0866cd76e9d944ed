import numpy as np
import pytest
import torch

from nnshrink import ConfigError, Plan, compress, load, save, zoo
from nnshrink.io import describe
from nnshrink.techniques import ShareWeights, Sparsify, codebook_record, kmeans_1d, share_weights, sparsity_of


def test_kmeans_finds_well_separated_clusters():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(c, 0.01, 300) for c in (-1.0, 0.2, 3.0)])
    for init in ("linear", "density"):
        np.testing.assert_allclose(kmeans_1d(values, 3, init), [-1.0, 0.2, 3.0], atol=0.01)
    with pytest.raises(ConfigError):
        kmeans_1d(values, 3, "random")


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_shared_layer_has_at_most_2_to_the_bits_values_and_keeps_zeros(bits):
    torch.manual_seed(0)
    layer = torch.nn.Linear(50, 20)
    with torch.no_grad():
        layer.weight[:, ::3] = 0
    zeros = layer.weight == 0
    record = share_weights(layer, bits)
    assert torch.unique(layer.weight).numel() <= 2 ** bits
    assert torch.equal(layer.weight == 0, zeros)
    assert np.array_equal(record.dequantize(), layer.weight.detach().numpy())
    assert codebook_record(layer) is record


def test_centroid_fine_tuning_trains_only_the_codebook():
    model = zoo.build("lenet300")
    x = torch.zeros(1, 1, 28, 28)
    pruned = compress(model, Plan([Sparsify(sparsity=0.5)]), x).model

    def train(m, steps):
        opt = torch.optim.SGD([p for p in m.parameters() if p.requires_grad], lr=0.5)
        m.train()
        for _ in range(steps):
            loss = m(torch.randn(8, 1, 28, 28)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return m

    before = compress(pruned, Plan([ShareWeights(bits=3)]), x).model
    after = compress(pruned, Plan([ShareWeights(bits=3, steps=5)]), x, train=train).model
    for name in ("fc1", "fc2", "fc3"):
        w_before, w_after = getattr(before, name).weight, getattr(after, name).weight
        assert torch.unique(w_after).numel() <= 8
        assert torch.equal(w_after == 0, getattr(pruned, name).weight == 0)  # zeros stay zeros
        assert not torch.equal(w_before, w_after)  # the centroids moved
        rec = codebook_record(getattr(after, name))
        assert rec is not None and np.array_equal(rec.dequantize(), w_after.detach().numpy())
    assert sparsity_of(after) == pytest.approx(0.5, abs=1e-3)


def test_layer_rules_and_validation():
    model = zoo.build("lenet300")
    out = compress(model, Plan([ShareWeights(bits=2, layers={"fc3": {"bits": 5}, "fc2": "skip"})]),
                   torch.zeros(1, 1, 28, 28))
    assert out.steps[0].details["layers"]["fc3"]["bits"] == 5 and "fc2" not in out.steps[0].details["layers"]
    assert torch.unique(out.model.fc1.weight).numel() <= 4
    assert torch.equal(out.model.fc2.weight, model.fc2.weight)
    with pytest.raises(ConfigError, match=r"share_weights.layers\['fc1'\].bits must be a whole number from 1 to 8"):
        ShareWeights(layers={"fc1": {"bits": 9}})
    with pytest.raises(ConfigError, match="must be 'skip' or a mapping of bits"):
        ShareWeights(layers={"fc1": "float"})
    with pytest.raises(ConfigError, match="'fc9' match no Conv/Linear layer; Conv/Linear layers are fc1, fc2, fc3"):
        compress(model, Plan([ShareWeights(layers={"fc9": {"bits": 3}})]), torch.zeros(1, 1, 28, 28))
    # a version-1 plan's spellings are read into the rules
    old = Plan.from_dict({"version": 1, "steps": [{"share_weights": {"bits": 2, "exclude": ["fc2"],
                                                                     "layer_bits": ["fc3=5"]}}]})
    assert old.steps[0].layers == {"fc2": "skip", "fc3": {"bits": 5}}
    with pytest.raises(ConfigError, match="has no option 'exclude'"):
        Plan.from_dict({"version": 2, "steps": [{"share_weights": {"exclude": ["fc2"]}}]})


def test_pruned_and_shared_model_round_trips_through_the_container(tmp_path):
    pytest.importorskip("onnx")
    model = zoo.build("lenet5")
    x = torch.zeros(1, 1, 28, 28)
    small = compress(model, Plan([Sparsify(sparsity=0.9), ShareWeights(bits=4)]), x).model
    save(small, tmp_path / "dc.nsz")
    back = load(tmp_path / "dc.nsz")
    for name, p in small.named_parameters():
        assert torch.equal(dict(back.named_parameters())[name], p), name
    kinds = {r.name: r for r in describe(tmp_path / "dc.nsz")}
    assert kinds["fc1.weight"].kind == "codebook" and kinds["fc1.weight"].bits_per_weight < 1.0
    assert (tmp_path / "dc.nsz").stat().st_size * 25 < 431_080 * 4


def test_deep_compression_keeps_lenet300_accurate(mnist):
    model = zoo.pretrained("lenet300", "mnist", show_progress=False)
    base = zoo.accuracy(model, mnist, "test")
    plan = Plan([Sparsify(sparsity=0.9, steps=400), ShareWeights(bits=4, steps=150)])
    small = compress(model, plan, torch.zeros(1, 1, 28, 28), train=zoo.make_trainer(mnist, show_progress=False)).model
    assert sparsity_of(small) == pytest.approx(0.9, abs=1e-3)
    assert zoo.accuracy(small, mnist, "test") >= base - 0.01
