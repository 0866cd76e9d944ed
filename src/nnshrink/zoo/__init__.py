"""Reference models with deterministic training recipes and cached checkpoints."""

from __future__ import annotations

import hashlib
import json

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from nnshrink.cache import atomic_path, cache_dir, code_fingerprint
from nnshrink.data import Dataset, load_dataset
from nnshrink.errors import ConfigError
from nnshrink.zoo.models import ARCHITECTURES, build
from nnshrink.zoo.train import RECIPES, Recipe, accuracy, fit, make_evaluator, make_trainer, predict

NAMES = tuple(ARCHITECTURES)


def checkpoint_path(name: str, data: str | Dataset = "mnist", seed: int = 0):
    """Where the trained checkpoint of zoo model ``name`` on ``data`` is cached: keyed by the
    data's content, the recipe and the code that builds and trains the model, never by a name
    or path as typed, so other data at the same path never reuses it."""
    from nnshrink.zoo import models, train

    dataset = data if isinstance(data, Dataset) else load_dataset(data)
    recipe = RECIPES[name]
    label = dataset.name if dataset.bundled else "data"
    key = hashlib.sha256(json.dumps([dataset.fingerprint, recipe.__dict__, code_fingerprint(models, train)],
                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    return cache_dir() / "models" / f"{name}-{label}-{key}-s{seed}.safetensors"


def pretrained(name: str, data: str = "mnist", seed: int = 0, retrain: bool = False,
               show_progress: bool = True, train_missing: bool = True) -> nn.Module:
    """Zoo model ``name`` trained on dataset ``data``: from the cache, else trained now.

    Training follows ``RECIPES[name]`` with ``seed``; the checkpoint is saved as safetensors
    (atomically) together with its held-out accuracy in the file's metadata, keyed by the data's
    content (:func:`checkpoint_path`).

    Args:
        train_missing: Train when no checkpoint is cached (else raise: a command that only
            evaluates never trains a model behind the user's back).

    Raises:
        ConfigError: Unknown model or dataset name, or no checkpoint and ``train_missing`` off.
    """
    if name not in ARCHITECTURES:
        raise ConfigError(f"unknown zoo model {name!r}; choose one of {', '.join(NAMES)}")
    dataset = load_dataset(data)
    torch.manual_seed(seed)  # the initial weights are part of the recipe
    model = build(name, dataset.input_shape, dataset.num_classes)
    path = checkpoint_path(name, dataset, seed)
    if path.exists() and not retrain:
        try:
            model.load_state_dict(load_file(path))
            return model.eval()
        except (SafetensorError, RuntimeError, OSError):
            path.unlink(missing_ok=True)  # stale or damaged cache entry: rebuild it below
    if not train_missing and not retrain:
        raise ConfigError(f"no {name} trained on {dataset.name} yet (shape {dataset.input_shape}, "
                          f"{dataset.num_classes} classes); run 'nnshrink train {name} --data {dataset.name}' first")
    fit(model, dataset, RECIPES[name], seed=seed, show_progress=show_progress,
        description=f"training {name} on {data}")
    meta = {"name": name, "data": data, "seed": str(seed),
            "recipe": json.dumps(RECIPES[name].__dict__),
            "test_accuracy": f"{accuracy(model, dataset, 'test'):.4f}"}
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=meta)
    return model.eval()


def example_input(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """A zero input of the shape ``model`` was built or imported for."""
    shape = getattr(model, "input_shape", None)
    if shape is None or any(not isinstance(d, int) for d in shape):
        raise ConfigError(f"{type(model).__name__} does not record a fixed input shape; pass an example input")
    return torch.zeros((batch, *shape))


__all__ = ["NAMES", "RECIPES", "Dataset", "Recipe", "accuracy", "build", "checkpoint_path",
           "example_input", "fit", "make_evaluator", "make_trainer", "predict", "pretrained"]
