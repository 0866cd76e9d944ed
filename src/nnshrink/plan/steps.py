"""Steps that need no compression technique: folding batch norm, fine-tuning."""

from __future__ import annotations

import copy
from dataclasses import dataclass

from torch import nn

from nnshrink.errors import ConfigError, UnsupportedModelError
from nnshrink.graph.surgery import fold_batchnorms, fold_batchnorms_eager
from nnshrink.plan.config import StepConfig, StepResult


@dataclass(frozen=True)
class FoldBatchNorm(StepConfig):
    """Fold each batch norm into the conv or linear layer that feeds it (inference form)."""

    kind = "fold_batchnorm"
    takes_layers = False  # folding changes no output: nothing to choose per layer

    def apply(self, model: nn.Module, ctx) -> StepResult:
        try:
            new, folded = fold_batchnorms(model)
            how = "graph"
        except UnsupportedModelError:  # untraceable: pairs found by running it once, each fold checked
            new, folded = fold_batchnorms_eager(model, ctx.example_input)
            how = "eager (torch.fx cannot trace the model; each fold checked on the example input)"
        skipped = [{"layer": name, "reason": "batch norm does not directly follow a single-use conv/linear"}
                   for name, m in new.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        return StepResult(self.kind, new, {"folded": [list(p) for p in folded], "found_by": how}, skipped)


@dataclass(frozen=True)
class FineTune(StepConfig):
    """Train the model for ``steps`` optimiser steps with the user's or the bundled trainer.

    ``layers: {"conv1": skip}`` holds those layers' parameters fixed while the rest train."""

    kind = "finetune"
    steps: int = 200

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1:
            raise ConfigError(f"finetune.steps must be at least 1, got {self.steps}")

    def apply(self, model: nn.Module, ctx) -> StepResult:
        if ctx.train is None:
            raise ConfigError("the finetune step needs a train(model, steps) function or bundled data")
        new = copy.deepcopy(model)
        owners = [n for n, m in new.named_modules() if n and any(True for _ in m.parameters(recurse=False))]
        frozen = self.skipped_layers(owners, "layer with parameters")
        held = [p for n in frozen for p in new.get_submodule(n).parameters(recurse=False) if p.requires_grad]
        before = ctx.evaluate(new) if ctx.evaluate else None
        for p in held:
            p.requires_grad_(False)
        try:
            new = ctx.train(new, self.steps) or new
        finally:
            for p in held:
                p.requires_grad_(True)
        after = ctx.evaluate(new) if ctx.evaluate else None
        skipped = [{"layer": n, "reason": "held fixed by the plan's layer rules"} for n in frozen]
        return StepResult(self.kind, new.eval(), {"steps": self.steps, "val_before": before, "val_after": after},
                          skipped)
