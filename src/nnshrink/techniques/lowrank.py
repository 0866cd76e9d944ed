"""Low-rank decomposition: Weight SVD and Spatial SVD, with per-layer ranks for a MAC target.

- **Weight SVD** (Linear, 1x1 conv): ``W = U S V^T`` truncated to rank ``r`` becomes two layers,
  ``in -> r`` (``sqrt(S) V^T``) and ``r -> out`` (``U sqrt(S)``, with the bias).
- **Spatial SVD** (k x k conv, Jaderberg et al. 2014 as AIMET applies it): the weight reshaped to
  ``(C_in k_h) x (C_out k_w)`` is truncated to rank ``r``; the conv becomes a ``k_h x 1`` conv
  with ``r`` outputs (stride, padding and dilation of the height) followed by a ``1 x k_w`` conv
  (those of the width, and the bias).

Ranks come from the decision engine (:mod:`nnshrink.search.engine`, :mod:`nnshrink.search.solvers`):
each layer's curve of output loss against rank, measured alone on sampled inputs, and a
Lagrangian allocation that meets the MAC ratio (of the model the plan started from) within
``tolerance``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nnshrink.errors import ConfigError
from nnshrink.graph.analysis import analyze
from nnshrink.graph.surgery import replace_module
from nnshrink.plan.config import SKIP, StepConfig, StepResult
from nnshrink.search.engine import Unit, interpolate, level_table, measure_curves, output_loss
from nnshrink.search.solvers import allocate
from nnshrink.techniques.allocation import check_target_options, sample_inputs, target_macs


def _sqrt_split(u: torch.Tensor, s: torch.Tensor, vt: torch.Tensor, r: int):
    root = s[:r].sqrt()
    return u[:, :r] * root, root[:, None] * vt[:r]


def weight_svd(layer: nn.Module, rank: int) -> nn.Sequential:
    """A Linear or conv (1-D or 2-D, any kernel, ungrouped) as two layers of rank ``rank``: a
    conv keeps its kernel, stride, padding and dilation with ``rank`` outputs, then a 1x1 conv
    (with the bias) maps them to the outputs."""
    w = layer.weight.detach().double()
    out_f = w.shape[0]
    u, s, vt = torch.linalg.svd(w.reshape(out_f, -1), full_matrices=False)
    a, b = _sqrt_split(u, s, vt, rank)  # w ~ a @ b, a: out x r, b: r x (in k)
    if isinstance(layer, nn.Linear):
        first, second = nn.Linear(layer.in_features, rank, bias=False), nn.Linear(rank, out_f, bias=layer.bias is not None)
    else:
        conv = nn.Conv1d if isinstance(layer, nn.Conv1d) else nn.Conv2d
        first = conv(layer.in_channels, rank, layer.kernel_size, layer.stride, layer.padding, layer.dilation, bias=False)
        second = conv(rank, out_f, 1, bias=layer.bias is not None)
    first, second = first.to(layer.weight), second.to(layer.weight)  # its dtype and device
    with torch.no_grad():  # (copy_ rounds the float64 factors to that dtype)
        first.weight.copy_(b.reshape(first.weight.shape))
        second.weight.copy_(a.reshape(second.weight.shape))
        if layer.bias is not None:
            second.bias.copy_(layer.bias)
    return nn.Sequential(first, second).train(layer.training)


def spatial_svd(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """A k_h x k_w conv as a k_h x 1 conv with ``rank`` outputs and a 1 x k_w conv."""
    w = conv.weight.detach().double()  # o c kh kw
    o, c, kh, kw = w.shape
    m = w.permute(1, 2, 0, 3).reshape(c * kh, o * kw)
    u, s, vt = torch.linalg.svd(m, full_matrices=False)
    a, b = _sqrt_split(u, s, vt, rank)  # m ~ a @ b; a: (c kh) x r, b: r x (o kw)
    (sh, sw), (ph, pw), (dh, dw) = conv.stride, conv.padding, conv.dilation
    first = nn.Conv2d(c, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False)
    second = nn.Conv2d(rank, o, (1, kw), (1, sw), (0, pw), (1, dw), bias=conv.bias is not None)
    first, second = first.to(conv.weight), second.to(conv.weight)
    with torch.no_grad():
        first.weight.copy_(a.reshape(c, kh, rank).permute(2, 0, 1).unsqueeze(-1))
        second.weight.copy_(b.reshape(rank, o, kw).permute(1, 0, 2).unsqueeze(2))
        if conv.bias is not None:
            second.bias.copy_(conv.bias)
    return nn.Sequential(first, second).train(conv.training)


def eligible(module: nn.Module, method: str, any_kernel: bool = False) -> str | None:
    """None if ``module`` can be decomposed by ``method``, else the reason it cannot. Weight SVD
    takes Linear and 1x1 convs, or with ``any_kernel`` every ungrouped Conv1d/Conv2d (the
    budget's choice between it and spatial SVD, per layer); the SVD steps keep to 1x1."""
    if method == "weight":
        if isinstance(module, nn.Linear):
            return None
        if isinstance(module, (nn.Conv2d, nn.Conv1d)) and (any_kernel or isinstance(module, nn.Conv2d)):
            if not any_kernel and module.kernel_size != (1, 1):
                return "not 1x1 (spatial SVD handles k x k convs)"
            if module.groups != 1:
                return "grouped conv"
            if isinstance(module.padding, str) or module.padding_mode != "zeros":
                return "padding given as a string or not zeros"
            return None
        return "not a Linear or Conv2d"
    if not isinstance(module, nn.Conv2d):
        return "not a Conv2d"
    if module.kernel_size == (1, 1):
        return "1x1 conv (weight SVD handles it)"
    if module.groups != 1:
        return "grouped or depthwise conv"
    if isinstance(module.padding, str) or module.padding_mode != "zeros":
        return "padding given as a string or not zeros"
    return None


def full_rank(module: nn.Module, method: str) -> int:
    """The rank at which ``method`` reproduces ``module`` exactly (its largest useful rank)."""
    if method == "spatial":
        o, c, kh, kw = module.weight.shape
        return min(c * kh, o * kw)
    return min(module.weight.shape[0], int(np.prod(module.weight.shape[1:])))


def _rank_macs(module: nn.Module, info, method: str, full: int):
    """``rank -> MACs`` per sample (all calls) of the layer decomposed at ``rank``: read off the
    graph counter on the layer alone, decomposed at ranks 1 and 2 (a decomposition's MACs grow
    linearly with its rank), scaled as the layer's own count over its calls is to one call."""
    x = module.weight.new_zeros(1, *info.in_shape)  # the layer's dtype and device
    scale = info.macs / analyze(module, x).total_macs
    at = [analyze(decompose(method, module, r), x).total_macs * scale for r in range(1, min(full, 2) + 1)]
    step = at[1] - at[0] if len(at) > 1 else 0.0
    return lambda rank: int(round(at[0] + step * (rank - 1)))


def decompose(method: str, module: nn.Module, rank: int) -> nn.Sequential:
    return weight_svd(module, rank) if method == "weight" else spatial_svd(module, rank)


def _svd_loss(model: nn.Module, x: torch.Tensor, reference: torch.Tensor, unit: str, level: int) -> float:
    """Output loss with only layer ``unit`` decomposed; ``level`` is ``method:rank`` encoded as
    ``rank * 2 + (method == 'spatial')``."""
    method, rank = ("spatial" if level % 2 else "weight"), level // 2
    trial = copy.deepcopy(model)
    replace_module(trial, unit, decompose(method, trial.get_submodule(unit), rank))
    with torch.no_grad():
        return output_loss(reference, trial(x))


@dataclass(frozen=True)
class _SVDStep(StepConfig):
    mac_ratio: float = 0.5
    tolerance: float = 0.01
    samples: int = 256
    measured_levels: int = 8
    executor: str = "process"
    required: bool = True

    method = "weight"
    layer_settings = {"rank": lambda v: None if isinstance(v, int) and not isinstance(v, bool) and v >= 1
                      else "a whole number, at least 1"}
    legacy = {"exclude": lambda v: dict.fromkeys(v, SKIP)}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_target_options(self.kind, self.mac_ratio, self.tolerance, self.executor, self.samples,
                             self.measured_levels)

    def apply(self, model: nn.Module, ctx, show_progress: bool = True) -> StepResult:
        x = sample_inputs(ctx, self.samples)
        base, budget, floor = target_macs(ctx, model, x, self.mac_ratio, self.tolerance)
        given = analyze(model, x[:1])
        rules = self.layer_rules([li.name for li in given.layers])
        fixed = {}  # layers given a rank by the plan: decomposed first, the rest allocated around them
        model = copy.deepcopy(model)
        for name, rule in rules.items():
            if isinstance(rule, dict):
                module = model.get_submodule(name)
                if eligible(module, self.method) is not None:
                    raise ConfigError(f"{self.kind}.layers[{name!r}]: {eligible(module, self.method)}; no rank to set")
                replace_module(model, name, decompose(self.method, module, int(rule["rank"])))
                fixed[name] = {"rank": int(rule["rank"]), "set_by": "the plan's layer rules"}
        info = analyze(model, x[:1])
        units, skipped, per_rank, full_ranks, rank_macs = [], [], {}, {}, {}
        for li in info.layers:
            if any(li.name.startswith(f"{n}.") for n in fixed):  # the factors of a layer set by the plan
                continue
            module = model.get_submodule(li.name)
            reason = eligible(module, self.method)
            if reason is None and rules.get(li.name) == SKIP:
                reason = "skipped by the plan's layer rules"
            ranks = []
            if reason is None:
                full = full_rank(module, self.method)
                full_ranks[li.name] = full
                macs_at = _rank_macs(module, li, self.method, full)
                ranks = [r for r in range(full, 0, -1) if macs_at(r) < li.macs]
                if not ranks:
                    reason = "a decomposition of any rank costs more MACs than the layer"
            if reason is not None:
                if reason != f"not a {'Linear or Conv2d' if self.method == 'weight' else 'Conv2d'}":
                    skipped.append({"layer": li.name, "reason": reason})
                continue
            per_rank[li.name], rank_macs[li.name] = (li, ranks), macs_at
        saving = {name: [0] + [li.macs - rank_macs[name](r) for r in ranks]
                  for name, (li, ranks) in per_rank.items()}
        floor_macs = info.total_macs - sum(v[-1] for v in saving.values())
        if floor_macs > budget and not self.required:  # a stage of a flow that has little to work on here
            details = {"mac_ratio_target": self.mac_ratio, "mac_ratio": info.total_macs / base,
                       "macs_before": given.total_macs, "macs_after": info.total_macs, "layers": fixed,
                       "measurements": 0,
                       "not_applied": f"the eligible layers cannot reach the target ({floor_macs:,} MACs at the "
                                      f"lowest ranks, target {budget:,}); the model is passed on unchanged"}
            return StepResult(self.kind, model, details, skipped)
        tag = 1 if self.method == "spatial" else 0
        tasks = []
        for name, (_, ranks) in per_rank.items():
            picks = np.unique(np.geomspace(1, len(ranks), self.measured_levels).round().astype(int))
            tasks += [(name, ranks[i - 1] * 2 + tag) for i in picks]
        losses = measure_curves(model, x, tasks, _svd_loss, ["svd", self.method], self.executor,
                                show_progress=show_progress)
        for name, (_, ranks) in per_rank.items():
            measured = {0: 0.0}
            for i, r in enumerate(ranks, start=1):
                if (name, r * 2 + tag) in losses:
                    measured[i] = losses[(name, r * 2 + tag)]
            units.append(Unit(name, [None] + ranks, interpolate(measured, len(ranks) + 1)))

        def macs_of(choice: dict[str, int]) -> int:
            return info.total_macs - sum(saving[n][i] for n, i in choice.items())

        choice = allocate(units, macs_of, budget, floor)
        new = copy.deepcopy(model)
        layers = {}
        for u in units:
            i = choice[u.name]
            if i == 0:
                continue
            rank = u.levels[i]
            replace_module(new, u.name, decompose(self.method, new.get_submodule(u.name), rank))
            layers[u.name] = {"rank": int(rank), "predicted_loss": round(float(u.loss[i]), 6)}
        after = analyze(new, x[:1]).total_macs
        by_rank = {(n, r): losses[(n, r * 2 + tag)] for n, (_, ranks) in per_rank.items() for r in ranks
                   if (n, r * 2 + tag) in losses}
        table = level_table("relative output error (MSE / output power)", by_rank,
                            {n: ranks for n, (_, ranks) in per_rank.items()},
                            full_ranks, "rank")
        details = {"mac_ratio_target": self.mac_ratio, "mac_ratio": after / base, "macs_before": given.total_macs,
                   "macs_after": after, "layers": {**fixed, **layers}, "measurements": len(tasks), "sensitivity": table}
        return StepResult(self.kind, new.eval(), details, skipped)


@dataclass(frozen=True)
class WeightSVD(_SVDStep):
    """Weight SVD of Linear and 1x1 conv layers, ranks chosen to reach ``mac_ratio``.

    Attributes:
        mac_ratio: MACs after / MACs of the model the plan started from.
        tolerance: The result lies in ``[mac_ratio - tolerance, mac_ratio]``.
        layers: Per-layer rules (first matching pattern wins): ``skip`` leaves a layer alone;
            ``{"rank": 16}`` decomposes it at that rank before the others' ranks are chosen.
            Version-1 plans' ``exclude`` is read into it.
        samples: Inputs used to measure each layer's curve.
        measured_levels: Ranks measured per layer (the curve is interpolated between them).
        executor: ``process`` (local pool), ``serial`` or ``ray``.
        required: If the eligible layers cannot reach ``mac_ratio`` even at rank 1, raise
            (True) or pass the model on unchanged and say so in the step's details (False, for
            the SVD stage of an SVD-then-channel-pruning flow on a model with few such layers,
            such as a MobileNet whose k x k convs are depthwise).
    """

    kind = "weight_svd"
    method = "weight"


@dataclass(frozen=True)
class SpatialSVD(_SVDStep):
    """Spatial SVD of k x k convs (k x 1 then 1 x k), ranks chosen to reach ``mac_ratio``.

    Attributes: as :class:`WeightSVD`.
    """

    kind = "spatial_svd"
    method = "spatial"
