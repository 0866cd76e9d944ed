import time

import pytest
import torch

from nnshrink import ConfigError, zoo
from nnshrink.zoo import Recipe, accuracy, fit


@pytest.mark.parametrize("name, params", [("lenet300", 266_610), ("lenet5", 431_080)])
def test_published_parameter_counts(name, params):
    assert sum(p.numel() for p in zoo.build(name).parameters()) == params


@pytest.mark.parametrize("name", zoo.NAMES)
def test_every_model_runs_on_28x28_and_on_digits_where_it_can(name):
    model = zoo.build(name).eval()
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
    if name == "lenet5":
        with pytest.raises(ConfigError, match="16x16"):
            zoo.build(name, (1, 8, 8))
    else:
        assert zoo.build(name, (1, 8, 8)).eval()(torch.zeros(1, 1, 8, 8)).shape == (1, 10)


def test_unknown_model_name():
    with pytest.raises(ConfigError, match="lenet300, lenet5, resnet8, mobilenet"):
        zoo.build("vgg16")


def test_lenet5_reaches_its_bar_and_is_cached(lenet5_trained, mnist):
    assert accuracy(lenet5_trained, mnist, "test") >= 0.975
    start = time.perf_counter()
    again = zoo.pretrained("lenet5", "mnist", show_progress=False)
    assert time.perf_counter() - start < 5
    for a, b in zip(again.state_dict().values(), lenet5_trained.state_dict().values()):
        assert torch.equal(a, b)
    assert zoo.checkpoint_path("lenet5").suffix == ".safetensors"


def test_lenet300_reaches_its_bar(mnist):
    model = zoo.pretrained("lenet300", "mnist", show_progress=False)
    assert accuracy(model, mnist, "test") >= 0.95


def test_training_is_deterministic(mnist):
    recipe = Recipe(epochs=1, lr=2e-3)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)
        model = zoo.build("lenet300")
        fit(model, mnist, recipe, seed=4, steps=20, show_progress=False)
        runs.append(model.fc3.weight.detach().clone())
    assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize("steps", [1, 5, 9])
def test_a_fine_tune_of_a_few_steps_runs_and_moves_the_weights(mnist, steps):
    # OneCycleLR divides by zero at 5 steps (its warm-up phase is empty); short runs decay linearly.
    torch.manual_seed(0)
    model = zoo.build("lenet300")
    before = model.fc3.weight.detach().clone()
    fit(model, mnist, Recipe(epochs=1, lr=2e-3), steps=steps, show_progress=False)
    assert not torch.equal(before, model.fc3.weight)


def test_damaged_checkpoint_is_rebuilt(tmp_path, monkeypatch, mnist):
    monkeypatch.setenv("NNSHRINK_CACHE_DIR", str(tmp_path))
    monkeypatch.setitem(zoo.RECIPES, "lenet300", Recipe(epochs=1, shift=1))
    path = zoo.checkpoint_path("lenet300")
    path.parent.mkdir(parents=True)
    path.write_bytes(b"garbage")
    model = zoo.pretrained("lenet300", show_progress=False)
    assert accuracy(model, mnist, "val") > 0.8 and path.stat().st_size > 1_000_000


def test_checkpoints_are_keyed_by_content_recipe_and_code(tmp_path, monkeypatch):
    import numpy as np

    from nnshrink.data import load_dataset

    monkeypatch.setenv("NNSHRINK_CACHE_DIR", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, size=(60, 28, 28), dtype=np.uint8), np.arange(60) % 10
    for folder in ("one", "two"):
        (tmp_path / folder).mkdir()
        np.savez(tmp_path / folder / "d.npz", x=x, y=y)
    one, two = load_dataset(tmp_path / "one" / "d.npz"), load_dataset(tmp_path / "two" / "d.npz")
    assert zoo.checkpoint_path("lenet300", one) == zoo.checkpoint_path("lenet300", two)  # same content
    np.savez(tmp_path / "two" / "d.npz", x=255 - x, y=y)  # other data at the same path
    assert zoo.checkpoint_path("lenet300", tmp_path / "two" / "d.npz") != zoo.checkpoint_path("lenet300", one)
    base = zoo.checkpoint_path("lenet300", one)
    monkeypatch.setitem(zoo.RECIPES, "lenet300", Recipe(epochs=1, shift=1))
    assert zoo.checkpoint_path("lenet300", one) != base  # another recipe
    with pytest.raises(ConfigError, match="run 'nnshrink train lenet300 --data"):
        zoo.pretrained("lenet300", str(tmp_path / "one" / "d.npz"), train_missing=False)
    assert not (tmp_path / "cache" / "models").exists()  # nothing was trained


@pytest.mark.slow
@pytest.mark.parametrize("name, bar", [("resnet8", 0.975), ("mobilenet", 0.975)])
def test_cnn_recipes_reach_their_bar(name, bar, mnist):
    model = zoo.pretrained(name, "mnist", show_progress=False)
    assert accuracy(model, mnist, "test") >= bar
