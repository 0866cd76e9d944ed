"""What the MAC-target steps (SVD, channel pruning) share besides the engine: their options'
checks, sampled inputs from the plan's context, and the MAC budget as a ratio of the model the
plan started from. Not a technique. Measuring and allocating live in :mod:`nnshrink.search`.
"""

from __future__ import annotations

import torch
from torch import nn

from nnshrink.errors import ConfigError
from nnshrink.graph.analysis import analyze
from nnshrink.search.engine import EXECUTORS
from nnshrink.techniques.calibration import calibration_inputs


def check_target_options(kind: str, mac_ratio: float, tolerance: float, executor: str, samples: int,
                         measured_levels: int) -> None:
    """Validate the options every MAC-target step shares; raises ConfigError naming the option."""
    if not 0 < mac_ratio <= 1:
        raise ConfigError(f"{kind}.mac_ratio must be in (0, 1], got {mac_ratio}")
    if not 0 < tolerance < mac_ratio:
        raise ConfigError(f"{kind}.tolerance must be in (0, mac_ratio), got {tolerance}")
    if executor not in EXECUTORS:
        raise ConfigError(f"{kind}.executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if samples < 1 or measured_levels < 2:
        raise ConfigError(f"{kind}.samples must be >= 1 and measured_levels >= 2, got {samples} and {measured_levels}")


def sample_inputs(ctx, samples: int) -> torch.Tensor:
    """Up to ``samples`` inputs from the context's calibration data (or its example input)."""
    if ctx.calib is None:
        return ctx.example_input
    return torch.cat(calibration_inputs(ctx.calib, samples, "sampling activations"))


def target_macs(ctx, model: nn.Module, x: torch.Tensor, ratio: float, tolerance: float) -> tuple[int, int, int]:
    """(MACs of the plan's original model, budget, floor) for a MAC ratio of the original."""
    base = analyze(ctx.original if ctx.original is not None else model, x[:1]).total_macs
    return base, int(ratio * base), int((ratio - tolerance) * base)
