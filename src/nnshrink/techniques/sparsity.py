"""Unstructured magnitude pruning (one-shot or gradual) and N:M structured sparsity.

The :class:`Pruner` keeps a 0/1 mask per layer and applies it in a forward pre-hook, so the
masks hold through any training loop (the user's ``train(model, steps)`` included) without
touching the optimizer: a masked weight may receive an update, but it is zeroed again before it
is ever used. Each forward pass in training mode is one schedule step; the sparsity rises from
``initial_sparsity`` to ``final_sparsity`` along the polynomial schedule of Zhu & Gupta (2017):
``s_t = s_f + (s_i - s_f) * (1 - t / T) ** power``, recomputing the masks every ``frequency``
steps. ``pruner.step()`` advances the schedule by hand, for loops that want DRP-AI's style.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from nnshrink.errors import ConfigError
from nnshrink.graph.analysis import is_compressible
from nnshrink.plan.config import SKIP, StepConfig, StepResult, glob_escape, pairs
from nnshrink.search.engine import (
    EXECUTORS,
    held_memo,
    measure_curves,
    output_loss,
    output_rows,
    sensitivity_table,
)
from nnshrink.search.solvers import least_noise
from nnshrink.techniques.calibration import (
    calibration_inputs,
    inverse_hessian_factor,
    layer_hessians,
    reconstruct,
)

SCOPES = ("global", "layer")


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value < 1.0:
        raise ConfigError(f"{name} must be in [0, 1), got {value}")


def prunable_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """Conv/Linear layers whose names match none of the ``exclude`` patterns (fnmatch)."""
    return {name: m for name, m in model.named_modules()
            if is_compressible(m) and not any(fnmatch.fnmatch(name, p) for p in exclude)}


def magnitude_masks(layers: dict[str, nn.Module], sparsity: float | dict[str, float],
                    scope: str = "global") -> dict[str, torch.Tensor]:
    """Masks that zero the ``sparsity`` fraction of smallest-magnitude weights.

    ``global`` ranks all layers' weights together (layers with small weights lose more);
    ``layer`` prunes each layer to ``sparsity``, which may then be a mapping from layer name to
    its own fraction. Ties at the threshold are broken by position, so the count is exact.
    """
    if scope not in SCOPES:
        raise ConfigError(f"scope must be one of {SCOPES}, got {scope!r}")
    weights = {n: m.weight.detach().abs().reshape(-1) for n, m in layers.items()}
    if isinstance(sparsity, dict) and scope != "layer":
        raise ConfigError("per-layer sparsities need scope='layer'")
    if scope == "layer":
        per = sparsity if isinstance(sparsity, dict) else dict.fromkeys(weights, sparsity)
        return {n: keep_largest(w, per[n]).reshape(layers[n].weight.shape) for n, w in weights.items()}
    flat = torch.cat(list(weights.values()))
    keep = keep_largest(flat, sparsity)
    masks, offset = {}, 0
    for n, w in weights.items():
        masks[n] = keep[offset:offset + w.numel()].reshape(layers[n].weight.shape)
        offset += w.numel()
    return masks


def keep_largest(values: torch.Tensor, sparsity: float) -> torch.Tensor:
    """A 0/1 mask over flat ``values`` dropping the ``sparsity`` fraction of smallest (exact
    count, ties broken by position)."""
    n_prune = int(round(sparsity * values.numel()))
    mask = torch.ones_like(values)
    if n_prune > 0:
        order = torch.argsort(values, stable=True)
        mask[order[:n_prune]] = 0.0
    return mask


NM_GROUPS = ("k", "channels")


def n_m_mask(weight: torch.Tensor, n: int, m: int, groups: str = "k") -> torch.Tensor:
    """Keep the ``n`` largest of every ``m`` consecutive weights along the input dimension.

    ``groups``: ``k``: along the flattened ``(in_channels, kh, kw)`` of each output row, the K
    dimension of the GEMM that sparse tensor cores accelerate; ``channels``: along the input
    channels at each kernel position (``(kh, kw, in_channels)``, the NHWC order), which is what
    Ethos-U85's weight encoder takes as 2:4 (measured with Vela 5.2: LeNet-5 at 2:4 along channels
    takes 11% fewer U85 cycles, along ``k`` none). The two are the same for a linear layer.

    Raises:
        ConfigError: The groups' axis is not a multiple of ``m``.
    """
    if groups not in NM_GROUPS:
        raise ConfigError(f"N:M groups must be one of {NM_GROUPS}, got {groups!r}")
    w = weight.detach()
    channels_last = groups == "channels" and w.dim() >= 3
    if channels_last:
        w = w.movedim(1, -1)  # (out, kh, kw, in)
    rows = w.reshape(w.shape[0], -1)
    if (w.shape[-1] if channels_last else rows.shape[1]) % m:
        what = "input channels" if channels_last else "a row length"
        raise ConfigError(f"{n}:{m} sparsity needs {what} divisible by {m}, got "
                          f"{w.shape[-1] if channels_last else rows.shape[1]}")
    g = rows.abs().reshape(rows.shape[0], -1, m)
    top = torch.topk(g, n, dim=2).indices
    mask = torch.zeros_like(g)
    mask.scatter_(2, top, 1.0)
    mask = mask.reshape(w.shape)
    return mask.movedim(-1, 1).contiguous() if channels_last else mask


class Pruner:
    """Gradual magnitude pruning for a training loop.

    >>> import torch, nnshrink as ns
    >>> model = ns.zoo.build("lenet300")
    >>> pruner = Pruner(model, final_sparsity=0.7, steps=100)
    >>> for _ in range(100):
    ...     pruner.step()       # or just train: each training forward pass is one step
    >>> round(pruner.sparsity(), 2)
    0.7

    Args:
        model: Model whose Conv/Linear weights are pruned (in place).
        final_sparsity: Fraction of weights zero at the end, or a mapping from layer name to its
            own fraction (then ``scope`` is ``layer``; unnamed layers stay dense).
        initial_sparsity: Fraction zero at ``start_step``.
        steps: Steps from ``start_step`` to reaching ``final_sparsity``.
        start_step: Steps before pruning begins.
        frequency: Recompute masks every this many steps.
        power: Exponent of the polynomial schedule (3 as in Zhu & Gupta).
        scope: ``global`` or ``layer`` thresholds.
        exclude: Layer name patterns (fnmatch) never pruned.
        n_m: ``(n, m)`` for N:M structured sparsity (then the schedule is ignored: the pattern
            is applied from the first step).
        nm_groups: Where the N:M groups lie (:func:`n_m_mask`): ``k`` or ``channels``.
    """

    def __init__(self, model: nn.Module, final_sparsity: float | dict[str, float] = 0.7, initial_sparsity: float = 0.0,
                 steps: int = 1000, start_step: int = 0, frequency: int = 10, power: float = 3.0,
                 scope: str = "global", exclude: tuple[str, ...] = (), n_m: tuple[int, int] | None = None,
                 nm_groups: str = "k") -> None:
        self.per_layer = dict(final_sparsity) if isinstance(final_sparsity, dict) else None
        for name, value in (self.per_layer or {"final_sparsity": final_sparsity}).items():
            _check_fraction(f"final sparsity of {name}", value)
        _check_fraction("initial_sparsity", initial_sparsity)
        if self.per_layer is not None:
            scope = "layer"
            final_sparsity = max(self.per_layer.values(), default=0.0)
        if initial_sparsity > final_sparsity:
            raise ConfigError("initial_sparsity must not exceed final_sparsity")
        if steps < 1 or frequency < 1 or start_step < 0:
            raise ConfigError("steps and frequency must be at least 1, start_step at least 0")
        if scope not in SCOPES:
            raise ConfigError(f"scope must be one of {SCOPES}, got {scope!r}")
        if n_m is not None and not (0 < n_m[0] < n_m[1]):
            raise ConfigError(f"n_m must be (n, m) with 0 < n < m, got {n_m}")
        self.model = model
        self.final, self.initial, self.steps = final_sparsity, initial_sparsity, steps
        self.start, self.frequency, self.power, self.scope = start_step, frequency, power, scope
        if nm_groups not in NM_GROUPS:
            raise ConfigError(f"nm_groups must be one of {NM_GROUPS}, got {nm_groups!r}")
        self.n_m, self.nm_groups = n_m, nm_groups
        self.layers = prunable_layers(model, exclude)
        if self.per_layer is not None:
            unknown = set(self.per_layer) - set(self.layers)
            if unknown:
                raise ConfigError(f"per-layer sparsity names unknown or excluded layers {sorted(unknown)}")
            self.layers = {n: m for n, m in self.layers.items() if n in self.per_layer}
        if not self.layers:
            raise ConfigError("no Conv/Linear layer left to prune (check the exclude patterns)")
        self.masks = {n: torch.ones_like(m.weight) for n, m in self.layers.items()}
        self.step_count = 0
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in self.layers.items()]
        self._handles.append(model.register_forward_pre_hook(self._count))
        self._update(force=True)

    def target(self, step: int | None = None) -> float:
        """The scheduled sparsity at ``step`` (default: now)."""
        t = self.step_count if step is None else step
        if t < self.start:
            return self.initial if self.start == 0 else 0.0
        frac = min(1.0, (t - self.start) / self.steps)
        return self.final + (self.initial - self.final) * (1.0 - frac) ** self.power

    def _targets(self) -> float | dict[str, float]:
        """Scheduled sparsity now: each layer's final scaled by the same schedule when per layer."""
        t = self.target()
        if self.per_layer is None:
            return t
        progress = t / self.final if self.final else 1.0
        return {n: v * progress for n, v in self.per_layer.items()}

    def _count(self, model: nn.Module, args) -> None:
        if model.training:  # one training forward pass = one schedule step
            self.step(apply=False)

    def _hook(self, name: str):
        def pre_forward(module: nn.Module, args) -> None:
            self._apply(name)

        return pre_forward

    def _apply(self, name: str) -> None:
        with torch.no_grad():
            self.layers[name].weight.mul_(self.masks[name])

    def _due(self) -> bool:
        t = self.step_count - self.start
        return 0 <= t <= self.steps and (t % self.frequency == 0 or t == self.steps)

    def _update(self, force: bool = False) -> None:
        if not force and not self._due():
            return
        if self.n_m is not None:
            self.masks = {n: n_m_mask(m.weight, *self.n_m, self.nm_groups) for n, m in self.layers.items()}
        else:
            # masks only grow: weights pruned earlier stay pruned
            for n, m in self.layers.items():
                with torch.no_grad():
                    m.weight.mul_(self.masks[n])
            self.masks = magnitude_masks(self.layers, self._targets(), self.scope)
        for n in self.layers:
            self._apply(n)

    def step(self, apply: bool = True) -> None:
        """Advance the schedule by one step and apply the masks (call after optimizer.step())."""
        self.step_count += 1
        self._update()
        if apply:
            for n in self.layers:
                self._apply(n)

    def finalize(self) -> None:
        """Apply the final sparsity (whatever step the schedule reached), then remove the hooks.

        The weights keep their zeros; the model no longer depends on the pruner.
        """
        self.step_count = max(self.step_count, self.start + self.steps)
        self._update(force=True)
        for h in self._handles:
            h.remove()
        self._handles = []

    def sparsity(self) -> float:
        """Fraction of zero weights over the pruned layers, measured on the weights."""
        zeros = sum(int((m.weight == 0).sum()) for m in self.layers.values())
        return zeros / sum(m.weight.numel() for m in self.layers.values())

    def layer_sparsity(self) -> dict[str, float]:
        return {n: float((m.weight == 0).float().mean()) for n, m in self.layers.items()}


@dataclass(frozen=True)
class Sparsify(StepConfig):
    """Magnitude pruning as a plan step: one-shot (``steps: 0``) or gradual during fine-tuning.

    Attributes:
        sparsity: Final fraction of zero weights.
        steps: Fine-tuning steps with the bundled or the user's trainer; pruning reaches
            ``sparsity`` after ``ramp`` of them and the rest recover accuracy. 0: one-shot.
        ramp: Fraction of ``steps`` over which the sparsity rises.
        layers: Per-layer rules (first matching pattern wins): ``skip`` leaves a layer dense;
            ``{"sparsity": 0.95}`` gives it its own fraction (then every layer is pruned to its
            own fraction, ``sparsity`` for the layers without one), as a sensitivity search sets
            them. Version-1 plans' ``exclude`` and ``layer_sparsity`` are read into it.
        scope: ``global``, ``layer``, or ``sensitivity``: one-shot unstructured, each layer's
            fraction chosen from measured costs so that ``sparsity`` of the weights go overall
            with the least added output error: every layer is pruned alone at each fraction of
            ``sensitivities`` (with SparseGPT's refit where ``reconstruct`` asks, fitted on half
            of the calibration inputs and scored on the other half), and the fractions are a
            multiple-choice knapsack over the weights kept (the table is in the details).
        pattern: ``unstructured``, ``2:4`` or ``4:8``.
        nm_groups: For ``2:4``/``4:8``: ``k`` (default: groups along each output row's flattened
            inputs, as GPU sparse tensor cores take them) or ``channels`` (along the input channels
            at each kernel position, as Ethos-U85 takes them).
        reconstruct: ``none``, or ``sparsegpt`` for one-shot pruning without retraining: each
            layer's fraction as magnitude pruning (and ``scope``) sets it; layer by layer in the
            order the model runs them, on the inputs the layers pruned before it give, SparseGPT
            chooses the weights to prune and the kept weights and bias are refit by least squares
            to the original layer's outputs (:func:`~nnshrink.techniques.calibration.reconstruct`),
            from calibration inputs only (no labels).
        calib_samples: Calibration inputs for ``sparsegpt`` and ``scope: sensitivity``.
        sensitivities: The fractions ``scope: sensitivity`` chooses among per layer (0 added).
        executor: Where ``scope: sensitivity`` measures: ``serial``, ``process`` or ``ray``.
    """

    kind = "sparsify"
    sparsity: float = 0.7
    steps: int = 0
    ramp: float = 0.6
    scope: str = "global"
    pattern: str = "unstructured"
    nm_groups: str = "k"
    reconstruct: str = "none"
    calib_samples: int = 256
    sensitivities: tuple[float, ...] = tuple(round(0.05 * i, 2) for i in range(1, 20))
    executor: str = "process"

    layer_settings = {"sparsity": lambda v: None if isinstance(v, (int, float)) and not isinstance(v, bool)
                      and 0 <= v < 1 else "a fraction in [0, 1)"}
    legacy = {"exclude": lambda v: dict.fromkeys(v, SKIP),
              "layer_sparsity": lambda v: {n: {"sparsity": s} for n, s in pairs(v, float).items()}}

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_fraction("sparsify.sparsity", self.sparsity)
        for s in self.sensitivities:
            _check_fraction("sparsify.sensitivities", s)
        if self.executor not in EXECUTORS:
            raise ConfigError(f"sparsify.executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.scope == "sensitivity":
            if self.pattern != "unstructured" or self.steps or any(isinstance(r, dict) for r in self.layers.values()):
                raise ConfigError("sparsify.scope sensitivity chooses per-layer fractions for one-shot unstructured "
                                  "pruning: it takes no pattern, steps or per-layer sparsity (skip rules only)")
        if self.steps < 0 or not 0 < self.ramp <= 1:
            raise ConfigError("sparsify.steps must be >= 0 and ramp in (0, 1]")
        if self.scope not in (*SCOPES, "sensitivity"):
            raise ConfigError(f"sparsify.scope must be one of {(*SCOPES, 'sensitivity')}, got {self.scope!r}")
        if self.pattern not in ("unstructured", "2:4", "4:8"):
            raise ConfigError(f"sparsify.pattern must be unstructured, 2:4 or 4:8, got {self.pattern!r}")
        if self.nm_groups not in NM_GROUPS:
            raise ConfigError(f"sparsify.nm_groups must be one of {', '.join(NM_GROUPS)}, got {self.nm_groups!r}")
        if self.nm_groups != "k" and self.reconstruct != "none":
            raise ConfigError("sparsify.reconstruct sparsegpt takes nm_groups: k (it refits columns in that order)")
        if self.reconstruct not in ("none", "sparsegpt"):
            raise ConfigError(f"sparsify.reconstruct must be none or sparsegpt, got {self.reconstruct!r}")
        if self.reconstruct != "none" and self.steps:
            raise ConfigError("sparsify.reconstruct is for one-shot pruning (steps: 0); retraining recovers otherwise")

    def apply(self, model: nn.Module, ctx) -> StepResult:
        import copy

        new = copy.deepcopy(model)
        n_m = None if self.pattern == "unstructured" else tuple(int(v) for v in self.pattern.split(":"))
        names = list(prunable_layers(new))
        ruled = self.skipped_layers(names)
        exclude = tuple(glob_escape(n) for n in ruled)
        skipped = [{"layer": n, "reason": "skipped by the plan's layer rules"} for n in ruled]
        for name, layer in prunable_layers(new, exclude).items():
            row = layer.weight[0].numel()
            if self.nm_groups == "channels" and layer.weight.dim() >= 3:
                row, what = layer.weight.shape[1], "input channels"
            else:
                what = "row length"
            reason = None
            if n_m is not None and row % n_m[1]:  # sparse kernels take rows in whole groups of m
                reason = f"{what} {row} is not a multiple of {n_m[1]}: left dense"
            elif self.reconstruct == "sparsegpt" and getattr(layer, "groups", 1) != 1:
                # a depthwise conv has a few weights per channel and SparseGPT no column walk for
                # them: pruned without reconstruction one-shot, it took MobileNetV3 from 96% to 19%
                # (it is refit densely instead, with the other layers left dense)
                reason = "grouped conv: SparseGPT does not prune it; left dense"
            if reason:
                exclude += (glob_escape(name),)
                skipped.append({"layer": name, "reason": reason})
        ramp_steps = max(1, int(self.steps * self.ramp))
        target: float | dict[str, float] = self.sparsity
        overrides = {n: float(v) for n, v in self.layer_setting(names, "sparsity").items() if n not in ruled}
        table = None
        if self.scope == "sensitivity":
            overrides, table = self._allocate(model, prunable_layers(new, exclude), ctx)
            for name in [n for n, s in overrides.items() if s == 0]:  # left dense, untouched
                exclude += (glob_escape(name),)
                skipped.append({"layer": name, "reason": "sensitivity: most costly to prune; left dense"})
                del overrides[name]
        if overrides:
            layers = prunable_layers(new, exclude)
            target = {n: overrides.get(n, self.sparsity) for n in layers}
        pruner = Pruner(new, final_sparsity=target, steps=ramp_steps, frequency=max(1, ramp_steps // 20),
                        scope="layer" if self.scope == "sensitivity" else self.scope, exclude=exclude, n_m=n_m, nm_groups=self.nm_groups)
        if self.steps:
            if ctx.train is None:
                raise ConfigError("gradual sparsify needs a train(model, steps) function or bundled data")
            new = ctx.train(new, self.steps) or new
        reconstructed, errors, held = [], {}, {}
        if self.reconstruct == "sparsegpt":
            batches = calibration_inputs(ctx.calib, self.calib_samples, "sparsify with reconstruct sparsegpt")
            pruner.finalize()  # the magnitude pass sets each layer's fraction
            fractions = {n: float((m.weight == 0).float().mean()) for n, m in pruner.layers.items()}
            # reconstruct() starts each layer from the original model's weights, not the magnitude pass's
            targets = {n: m for n, m in pruner.layers.items() if getattr(m, "groups", 1) == 1}
            # the layers left dense for their shape take up the error of those pruned before them;
            # those the plan's rules skip stay as they are
            held = {n: m for n, m in prunable_layers(new, tuple(glob_escape(n) for n in ruled)).items()
                    if n not in targets}

            def choose(name: str, layer: nn.Module, hessian: torch.Tensor) -> None:
                sparsegpt(layer, hessian, fractions[name], n_m)

            errors = reconstruct(model, new, {**targets, **held}, batches, choose, dense=tuple(held))
            reconstructed = [n for n in errors if n not in held]
        else:
            pruner.finalize()
        details = {"sparsity": pruner.sparsity(), "layers": pruner.layer_sparsity(), "pattern": self.pattern,
                   "steps": self.steps, "val_after": ctx.evaluate(new) if ctx.evaluate else None}
        if self.reconstruct != "none":
            details["reconstructed"] = reconstructed
            details["refit_dense"] = sorted(held)
            details["reconstruction_error"] = {n: float(f"{e:.4g}") for n, e in errors.items()}
        if table is not None:
            details["sensitivity"] = table
        return StepResult(self.kind, new.eval(), details, skipped)

    def _allocate(self, model: nn.Module, layers: dict[str, nn.Module], ctx) -> tuple[dict[str, float], dict]:
        """Per-layer fractions for ``scope: sensitivity`` and the table they were chosen from."""
        batches = calibration_inputs(ctx.calib, self.calib_samples, "sparsify with scope sensitivity")
        x = torch.cat(batches)[:self.calib_samples]
        if len(x) < 2:
            raise ConfigError("sparsify.scope sensitivity needs at least 2 calibration inputs (half fit, half score)")
        grid = sorted({0.0, *self.sensitivities})
        refit = self.reconstruct == "sparsegpt"
        tasks = [(n, _oneshot_level(s, refit)) for n in layers for s in grid if s > 0]
        losses = measure_curves(model, x, tasks, _oneshot_loss, ["sparsify-oneshot"], self.executor,
                                description="sparsify: output error per layer and fraction")
        options = {n: [(m.weight.numel() * (1 - s), losses.get((n, _oneshot_level(s, refit)), 0.0)) for s in grid]
                   for n, m in layers.items()}
        total = sum(m.weight.numel() for m in layers.values())
        assign = least_noise(options, total * (1 - self.sparsity))
        if assign is None:  # pragma: no cover - the largest fraction in the grid is below the target
            raise ConfigError(f"sparsify.sensitivities reach at most {max(grid):.0%}, below sparsity {self.sparsity:.0%}")
        table = sensitivity_table("relative output error (MSE / output power)",
                                  [f"{s:.0%} pruned" for s in grid], {n: [o[1] for o in options[n]] for n in layers})
        return {n: grid[i] for n, i in assign.items()}, table


def _oneshot_level(sparsity: float, refit: bool) -> int:
    return int(round(sparsity * 1000)) * 2 + int(refit)


_HESSIAN: dict = {}  # unit -> its input Hessian on the fitting half, for one model and inputs (held_memo)


def _oneshot_loss(model: nn.Module, x: torch.Tensor, reference, unit: str, level: int) -> float:
    """Output error with layer ``unit`` alone pruned one-shot to ``level`` (:func:`_oneshot_level`):
    by magnitude, or by SparseGPT with its refit fitted on the first half of ``x``; scored on the
    second half either way, so both are measured on inputs the refit did not see."""
    sparsity, refit = (level // 2) / 1000, bool(level % 2)
    layer = model.get_submodule(unit)
    half = len(x) // 2
    original = layer.weight.detach().clone()
    try:
        if refit and getattr(layer, "groups", 1) == 1:
            sparsegpt(layer, held_memo(_HESSIAN, unit, (model, x),
                                       lambda: layer_hessians(model, {unit: layer}, [x[:half]])[unit]), sparsity)
        else:
            mask = magnitude_masks({unit: layer}, {unit: sparsity}, "layer")[unit]
            with torch.no_grad():
                layer.weight.mul_(mask)
        with torch.no_grad():
            return output_loss(output_rows(reference, slice(half, None)), model(x[half:]))
    finally:
        with torch.no_grad():
            layer.weight.copy_(original)


def sparsity_of(model: nn.Module) -> float:
    """Fraction of zero weights over all Conv/Linear layers of ``model``."""
    layers = prunable_layers(model)
    return sum(int((m.weight == 0).sum()) for m in layers.values()) / max(1, sum(m.weight.numel() for m in layers.values()))



def sparsegpt(layer: nn.Module, hessian: torch.Tensor, sparsity: float, n_m: tuple[int, int] | None = None,
              block: int = 128) -> None:
    """Prune ``layer.weight`` in place to ``sparsity`` (or N:M along the input columns) with
    SparseGPT (Frantar & Alistarh, 2023): in blocks of columns, the weights with the least
    saliency ``w^2 / [H^-1]_ii`` are set to zero and each column's error is spread over the
    columns not yet visited through the inverse Hessian of the layer's calibration inputs, so the
    kept weights are refit to what the pruned ones did."""
    w = layer.weight.detach()
    W = w.reshape(w.shape[0], -1).double().clone()
    U = inverse_hessian_factor(hessian, W)
    if U is None:  # cannot be factored: magnitude pruning
        mask = n_m_mask(w, *n_m) if n_m else (w.abs() > torch.quantile(w.abs().flatten().float(), sparsity))
        with torch.no_grad():
            layer.weight.mul_(mask.to(w.dtype))
        return
    cols = W.shape[1]
    for i1 in range(0, cols, block):
        i2 = min(i1 + block, cols)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        prune = torch.zeros_like(W1, dtype=torch.bool)
        if n_m is None:
            saliency = W1 ** 2 / torch.diag(U1)[None, :] ** 2
            k = int(saliency.numel() * sparsity)
            if k:
                prune.view(-1)[torch.topk(saliency.flatten(), k, largest=False).indices] = True
        for i in range(i2 - i1):
            if n_m is not None and i % n_m[1] == 0:
                sal = W1[:, i:i + n_m[1]] ** 2 / torch.diag(U1)[i:i + n_m[1]][None, :] ** 2
                drop = torch.topk(sal, n_m[1] - n_m[0], dim=1, largest=False).indices
                prune[:, i:i + n_m[1]].scatter_(1, drop, True)
            col = W1[:, i]
            q = torch.where(prune[:, i], torch.zeros_like(col), col)
            err = (col - q) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            Err1[:, i] = err
        W[:, i1:i2] = W1
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    with torch.no_grad():
        layer.weight.copy_(W.reshape(w.shape).to(w.dtype))
