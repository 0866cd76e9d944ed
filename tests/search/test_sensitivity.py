import pytest
import torch

from nnshrink import zoo
from nnshrink.search import Sensitivity, allocate, layer_sensitivity, per_layer_plan


def test_allocate_walks_from_the_mildest_setting():
    sens = Sensitivity(0.98, {"a": {0.5: 0.98, 0.7: 0.90, 0.9: 0.975}, "b": {0.5: 0.95, 0.9: 0.97}},
                       {"a": {2: 0.97, 3: 0.979, 4: 0.98}, "b": {2: 0.90, 4: 0.90}})
    sparsity, bits = allocate(sens, 0.01)
    assert sparsity == {"a": 0.5, "b": 0.0}  # a's spike at 0.9 is not trusted; b drops at once
    assert bits == {"a": 3, "b": 4}


def test_layer_sensitivity_restores_the_model_and_feeds_a_plan(lenet5_trained, mnist):
    before = {k: v.clone() for k, v in lenet5_trained.state_dict().items()}
    evaluate = zoo.make_evaluator(mnist, "val", limit=200)
    sens = layer_sensitivity(lenet5_trained, evaluate, sparsities=(0.5, 0.99), bits=(2, 4), show_progress=False)
    assert all(torch.equal(before[k], v) for k, v in lenet5_trained.state_dict().items())
    assert set(sens.sparsity) == {"conv1", "conv2", "fc1", "fc2"}
    assert sens.sparsity["fc2"][0.99] < sens.sparsity["fc2"][0.5] <= sens.baseline + 0.01
    plan = per_layer_plan(sens, 0.02, prune_steps=10, share_steps=0)
    sparsify, share = plan.steps
    assert len(sparsify.layers) == 4 and len(share.layers) == 4
    assert sens.to_dict()["baseline"] == pytest.approx(sens.baseline)
