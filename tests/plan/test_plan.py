import dataclasses
from pathlib import Path

import pytest
import torch
from torch import nn

from nnshrink import ConfigError, FineTune, FoldBatchNorm, Plan, compress, zoo
from nnshrink.plan import registered_steps
from nnshrink.testing import randomize_batchnorm

PLANS = Path(__file__).resolve().parents[2] / "examples" / "plans"


@pytest.mark.parametrize("path", sorted(PLANS.glob("*.yaml")), ids=lambda p: p.name)
def test_example_plans_parse_and_round_trip(path):
    plan = Plan.from_yaml(path)
    assert plan.steps
    assert Plan.from_dict(plan.to_dict()) == plan


@pytest.mark.parametrize("doc, message", [
    ({"version": 1, "steps": [{"prune_everything": {}}]}, "unknown step 'prune_everything'"),
    ({"version": 1, "steps": [{"finetune": {"epochs": 3}}]}, "no option 'epochs'; valid options: layers, steps"),
    ({"version": 1, "steps": [{"finetune": {"steps": "many"}}]}, "finetune.steps must be int"),
    ({"version": 1, "steps": [{"finetune": {"steps": 0}}]}, "at least 1"),
    ({"version": 3, "steps": []}, "version 3 is not supported"),
    ({"version": 2, "steps": [{"sparsify": {"exclude": ["fc1"]}}]}, "no option 'exclude'"),
    ({"version": 2, "steps": [{"fold_batchnorm": {"layers": {"fc1": "skip"}}}]}, "no option 'layers'"),
    ({"version": 2, "steps": [{"sparsify": {"layers": {"fc1": {"bits": 3}}}}]},
     r"sparsify.layers\['fc1'\] must be 'skip' or a mapping of sparsity"),
    ({"version": 2, "steps": [{"sparsify": {"layers": {"fc1": "dense"}}}]}, "must be 'skip'"),
    ({"version": 1, "steps": [], "stepz": []}, "unknown key"),
    ({"version": 1, "steps": {"finetune": {}}}, "must be a list"),
    ([1, 2], "a plan is a mapping"),
])
def test_bad_plans_name_the_problem(doc, message):
    with pytest.raises(ConfigError, match=message):
        Plan.from_dict(doc)


def test_bad_yaml_and_missing_plan(tmp_path):
    bad = tmp_path / "p.yaml"
    bad.write_text("version: 1\nsteps: [\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        Plan.from_yaml(bad)
    with pytest.raises(FileNotFoundError):
        Plan.from_yaml(tmp_path / "none.yaml")


def test_configs_are_frozen_and_validated():
    step = FineTune(steps=5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        step.steps = 6
    with pytest.raises(ConfigError):
        FineTune(steps=True)
    assert set(registered_steps()) >= {"fold_batchnorm", "finetune"}


def test_compress_folds_batchnorm_without_touching_the_input():
    model = randomize_batchnorm(zoo.build("resnet8")).eval()
    x = torch.randn(4, 1, 28, 28)
    result = compress(model, Plan([FoldBatchNorm()]), x[:1])
    torch.testing.assert_close(result.model(x), model(x), atol=1e-4, rtol=1e-4)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert not any(isinstance(m, nn.BatchNorm2d) for m in result.model.modules())
    assert len(result.steps[0].details["folded"]) == 9


def test_finetune_uses_the_given_trainer_and_needs_one():
    calls = []

    def train(model, steps):
        calls.append(steps)
        return model

    compress(zoo.build("lenet300"), Plan([FineTune(steps=7)]), torch.zeros(1, 1, 28, 28), train=train)
    assert calls == [7]
    with pytest.raises(ConfigError, match="needs a train"):
        compress(zoo.build("lenet300"), Plan([FineTune(steps=7)]), torch.zeros(1, 1, 28, 28))


def test_finetune_holds_the_layers_its_rules_skip():
    def train(model, steps):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        for _ in range(steps):
            opt.zero_grad()
            model(torch.rand(8, 1, 28, 28)).square().mean().backward()
            opt.step()
        return model

    model = zoo.build("lenet300")
    result = compress(model, Plan([FineTune(steps=3, layers={"fc1": "skip"})]), torch.zeros(1, 1, 28, 28), train=train)
    assert torch.equal(result.model.fc1.weight, model.fc1.weight)
    assert not torch.equal(result.model.fc2.weight, model.fc2.weight)
    assert all(p.requires_grad for p in result.model.parameters())  # held only while it trained
    assert result.steps[0].skipped == [{"layer": "fc1", "reason": "held fixed by the plan's layer rules"}]
