"""Training and evaluation for the bundled data: zoo recipes, a fine-tuner, accuracy."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nnshrink.data import Dataset
from nnshrink.errors import ConfigError, InputShapeError
from nnshrink.progress import progress_bar


@dataclass(frozen=True)
class Recipe:
    """A deterministic training recipe: Adam with a one-cycle schedule and random shifts.

    Attributes:
        epochs: Passes over the training split.
        lr: Peak learning rate.
        batch_size: Images per step.
        weight_decay: Decoupled weight decay (AdamW).
        shift: Random translation in pixels applied to each training image (0 disables it).
        version: Bump when the recipe changes so cached checkpoints are retrained.
    """

    epochs: int = 12
    lr: float = 2e-3
    batch_size: int = 64
    weight_decay: float = 1e-4
    shift: int = 2
    version: int = 1

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.lr <= 0 or self.shift < 0:
            raise ConfigError(f"invalid training recipe {asdict(self)}")


RECIPES: dict[str, Recipe] = {
    "lenet300": Recipe(epochs=15, lr=2e-3, shift=1),
    "lenet5": Recipe(epochs=12, lr=2e-3),
    "resnet8": Recipe(epochs=10, lr=4e-3),
    "mobilenet": Recipe(epochs=12, lr=4e-3),
}


def _shift(x: torch.Tensor, pixels: int, gen: torch.Generator) -> torch.Tensor:
    """Translate each image by up to ``pixels`` in each direction, filling with zeros."""
    if pixels == 0:
        return x
    n, _, h, w = x.shape
    padded = F.pad(x, (pixels, pixels, pixels, pixels))
    dy = torch.randint(0, 2 * pixels + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pixels + 1, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None]
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :]
    idx_n = torch.arange(n)[:, None, None, None]
    idx_c = torch.arange(x.shape[1])[None, :, None, None]
    return padded[idx_n, idx_c, rows, cols]


def fit(model: nn.Module, dataset: Dataset, recipe: Recipe, seed: int = 0, steps: int | None = None,
        show_progress: bool = True, description: str = "training") -> nn.Module:
    """Train ``model`` in place on the training split of ``dataset``.

    Args:
        model: The model to train (changed in place and returned).
        dataset: Its ``train`` split is used; nothing else is touched.
        recipe: Optimiser settings; ``recipe.epochs`` is ignored when ``steps`` is given.
        seed: Seeds the initial shuffle, augmentation and dropout.
        steps: Number of optimiser steps, for fine-tuning; default: ``recipe.epochs`` epochs.
        show_progress: Show a progress bar.
        description: Label of the progress bar.
    """
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    loader = dataset.loader("train", batch_size=recipe.batch_size, shuffle=True, seed=seed)
    total = steps if steps is not None else recipe.epochs * len(loader)
    if total < 1:
        raise ConfigError(f"training needs at least one step, got {total}")
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=recipe.weight_decay)
    if total >= 10:
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=total, pct_start=0.2)
    else:
        # Too short for a warm-up: OneCycleLR's first phase is empty at 5 steps (0.2 * 5 = 1) and
        # it divides by zero; a few fine-tuning steps decay linearly instead.
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / total)
    model.train()
    done = 0
    with progress_bar(description, total, enabled=show_progress) as advance:
        while done < total:
            for x, y in loader:
                x = _shift(x, recipe.shift, gen)
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
                done += 1
                advance(1)
                if done >= total:
                    break
    model.eval()
    return model


def make_trainer(dataset: Dataset, recipe: Recipe | None = None, seed: int = 0,
                 show_progress: bool = True) -> Callable[[nn.Module, int], nn.Module]:
    """A ``train(model, steps)`` callable on the bundled data, for fine-tuning plan steps."""
    recipe = recipe or Recipe(lr=1e-3)

    def train(model: nn.Module, steps: int) -> nn.Module:
        return fit(model, dataset, recipe, seed=seed, steps=steps, show_progress=show_progress,
                   description="fine-tuning")

    return train


def predict(model: nn.Module, x: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Class predictions of ``model`` on ``x`` in eval mode."""
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                out.append(model(x[i:i + batch_size]).argmax(dim=1))
    except RuntimeError as exc:
        first = (str(exc).strip().splitlines() or ["forward failed"])[0]
        raise InputShapeError(f"the model cannot run on inputs of shape {tuple(x.shape[1:])}: {first}") from exc
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.empty(0, dtype=torch.long)


def accuracy(model: nn.Module, dataset: Dataset, split: str = "test", limit: int | None = None) -> float:
    """Top-1 accuracy (a fraction in [0, 1]) of ``model`` on ``split`` of ``dataset``."""
    x, y = dataset.tensors(split, limit)
    return float((predict(model, x) == y).float().mean())


def make_evaluator(dataset: Dataset, split: str = "val", limit: int | None = None) -> Callable[[nn.Module], float]:
    """An ``evaluate(model) -> float`` on the bundled data (validation split by default)."""

    def evaluate(model: nn.Module) -> float:
        return accuracy(model, dataset, split, limit)

    return evaluate
