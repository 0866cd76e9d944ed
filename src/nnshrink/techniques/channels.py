"""Channel pruning with reconstruction, dependency groups kept consistent, for a MAC target.

For a channel group (:mod:`nnshrink.graph.groups`: the output channels of one or more producing
layers, everything sliced with them, and the layers that read them), channels are removed as
AIMET and ThiNet do it, on sampled activations:

1. **Sampling.** The inputs of every consumer are recorded on a few hundred calibration inputs
   (for a conv, a random subset of its im2col patches). Each channel's contribution to each
   consumer's output is ``z_c = X_c W_c^T``.
2. **Selection** (ThiNet's greedy, Luo et al. 2017): channels are removed one at a time, each
   time the one that keeps the summed removed contribution ``||sum_{c removed} z_c||`` (the
   change of every consumer's output) smallest, computed from the Gram matrix of the ``z_c``.
3. **Reconstruction.** Every consumer's kept weights are refitted by least squares (ridge) so
   that its output on the sampled inputs stays what it was.
4. **Removal** from the producers' output channels and biases, batch norms and depthwise convs
   in the group, and the consumers' input channels (at the group's offset in a concatenation,
   times the flattened width for a linear after a flatten). Residual adds are one group, so
   every branch loses the same channels.

Attention is pruned in whole heads (a group's ``block``): the selection ranks heads by the change
of the output projection, the query, key and value projections lose the heads' rows, the output
projection their columns (refitted), and the head count in the model's reshapes into and out of
heads is rewritten. That last edit is to the model's code, so a model with such a group is pruned
as its torch.fx ``GraphModule`` (:func:`editable`), with the same parameter names.

Groups that cannot be pruned safely (the model's output, a grouped conv, an op the dependency
analysis does not understand) are left alone and reported with the reason. How many channels
each group keeps comes from the decision engine (:mod:`nnshrink.search.solvers`).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import fx, nn

from nnshrink.errors import ConfigError
from nnshrink.graph.analysis import analyze
from nnshrink.graph.fx import trace
from nnshrink.graph.groups import ChannelGroup, DependencyGraph, build_dependency_graph, reshape_sizes
from nnshrink.plan.config import SKIP, StepConfig, StepResult
from nnshrink.search.engine import (
    Unit,
    interpolate,
    level_table,
    measure_curves,
    output_loss,
)
from nnshrink.search.solvers import allocate, repair
from nnshrink.techniques.allocation import (
    check_target_options,
    sample_inputs,
    target_macs,
)
from nnshrink.techniques.calibration import input_columns, watch

_PATCHES_PER_IMAGE = 16


def _label(group: ChannelGroup) -> str:
    return group.producers[0][0]


def _find(model: nn.Module, x: torch.Tensor, label: str) -> ChannelGroup:
    for g in build_dependency_graph(model, x[:1]).groups:
        if g.producers and _label(g) == label:
            return g
    raise ConfigError(f"no channel group produced by {label!r}")


_TRANSPOSED = (nn.ConvTranspose1d, nn.ConvTranspose2d)


def _consumer_columns(layer: nn.Module, offset: int, width: int, channels: list[int] | np.ndarray) -> np.ndarray:
    """Columns of the consumer's (im2col) input matrix that the group's channels occupy (a
    transposed conv's columns are its input channels at one position: see :func:`_weight_matrix`)."""
    if isinstance(layer, nn.Linear):
        per = width
    elif isinstance(layer, _TRANSPOSED):
        per = 1
    else:
        per = math.prod(layer.kernel_size)
    ch = np.asarray(channels, dtype=np.int64) + offset
    return (ch[:, None] * per + np.arange(per)[None, :]).reshape(-1)


def _sample(model: nn.Module, x: torch.Tensor, layers: list[str], seed: int = 0) -> dict[str, torch.Tensor]:
    """Each named layer's input matrix on ``x``: im2col patches (a random subset per sample) for
    convs, rows for linears."""
    gen = torch.Generator().manual_seed(seed)
    got: dict[str, list[torch.Tensor]] = {}

    def keep(name: str, module: nn.Module, inp: torch.Tensor) -> None:
        if isinstance(module, _TRANSPOSED):  # each input position's channels (see _weight_matrix)
            cols = inp.double().flatten(2).transpose(1, 2)
        else:
            cols = input_columns(module, inp.double())  # (n, positions, d)
        if not isinstance(module, nn.Linear):
            n, positions, d = cols.shape
            take = min(positions, _PATCHES_PER_IMAGE)
            idx = torch.randint(0, positions, (n, take), generator=gen)
            cols = torch.gather(cols, 1, idx[:, :, None].expand(n, take, d))
        got.setdefault(name, []).append(cols.reshape(-1, cols.shape[-1]))

    with watch(model, {n: model.get_submodule(n) for n in layers}, keep):
        model(x)
    return {n: torch.cat(v) for n, v in got.items()}


def _weight_matrix(layer: nn.Module) -> torch.Tensor:
    """The layer's GEMM matrix, rows its outputs. A transposed conv scatters each input position's
    channels into an ``out x k x k`` patch of the output, linearly: its matrix is that map (the
    patches of neighbouring positions add where they overlap; the selection and the refit fit
    each position's contribution, which is exact where they do not, as at stride = kernel)."""
    w = layer.weight.detach().double()
    if isinstance(layer, _TRANSPOSED):
        return w.reshape(w.shape[0], -1).T
    return w.reshape(w.shape[0], -1)


def select_channels(model: nn.Module, group: ChannelGroup, samples: dict[str, torch.Tensor], keep: int) -> list[int]:
    """The ``keep`` channels of ``group`` to keep (ThiNet greedy on sampled consumer inputs; in
    whole blocks, an attention head's channels, where the group has them)."""
    n = group.channels
    gram = torch.zeros(n, n, dtype=torch.float64)
    for c in group.consumers:
        layer = model.get_submodule(c.layer)
        x, w = samples[c.layer], _weight_matrix(layer)
        per = len(_consumer_columns(layer, c.offset, c.width, [0]))
        cols = torch.from_numpy(_consumer_columns(layer, c.offset, c.width, range(n)))
        # contribution of channel k to the consumer's output: x[:, cols_k] @ w[:, cols_k].T
        xs = x[:, cols].reshape(len(x), n, per)
        ws = w[:, cols].reshape(w.shape[0], n, per)
        z = torch.einsum("skp,okp->kso", xs, ws).reshape(n, -1)
        z = z / z.norm().clamp_min(1e-12)  # each consumer counts equally
        gram += z @ z.T
    block = group.block
    if block > 1:  # a head's contribution is the sum of its channels': the Gram matrix of heads
        heads = n // block
        gram = gram.reshape(heads, block, heads, block).sum(dim=(1, 3))
        kept = _greedy(gram, keep // block)
        return [h * block + i for h in kept for i in range(block)]
    return _greedy(gram, keep)


def _greedy(gram: torch.Tensor, keep: int) -> list[int]:
    """Remove the item that keeps the summed removed contribution smallest, until ``keep`` are left."""
    n = gram.shape[0]
    removed: list[int] = []
    alive = torch.ones(n, dtype=torch.bool)
    acc = torch.zeros(n, dtype=torch.float64)  # sum_{d removed} G[:, d]
    for _ in range(n - keep):
        cost = 2 * acc + gram.diagonal()
        cost[~alive] = float("inf")
        k = int(cost.argmin())
        removed.append(k)
        alive[k] = False
        acc += gram[:, k]
    return sorted(set(range(n)) - set(removed))


def _slice_out(layer: nn.Module, idx: torch.Tensor) -> None:
    if isinstance(layer, _TRANSPOSED):  # weight (in, out, k...): outputs on axis 1
        layer.weight = nn.Parameter(layer.weight.detach()[:, idx].clone())
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias.detach()[idx].clone())
        layer.out_channels = len(idx)
        return
    layer.weight = nn.Parameter(layer.weight.detach()[idx].clone())
    if layer.bias is not None:
        layer.bias = nn.Parameter(layer.bias.detach()[idx].clone())
    if isinstance(layer, nn.Linear):
        layer.out_features = len(idx)
    else:
        layer.out_channels = len(idx)


def _slice_member(module: nn.Module, idx: torch.Tensor) -> None:
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        for name in ("weight", "bias"):
            p = getattr(module, name)
            if p is not None:
                setattr(module, name, nn.Parameter(p.detach()[idx].clone()))
        for name in ("running_mean", "running_var"):
            b = getattr(module, name)
            if b is not None:
                setattr(module, name, b[idx].clone())
        module.num_features = len(idx)
    elif isinstance(module, nn.PReLU):
        module.weight = nn.Parameter(module.weight.detach()[idx].clone())
        module.num_parameters = len(idx)
    elif isinstance(module, (nn.Conv1d, nn.Conv2d)) and module.groups == module.in_channels == module.out_channels:
        _slice_out(module, idx)
        module.in_channels = module.groups = len(idx)
    else:
        raise ConfigError(f"cannot slice {type(module).__name__} along a channel group")


def editable(model: nn.Module, x: torch.Tensor, deps: DependencyGraph | None = None) -> nn.Module:
    """``model`` as it is, or, where one of its prunable groups is attention heads (whose count
    its code holds), a copy as a torch.fx ``GraphModule``: the same layers and parameter names, in
    a graph whose reshapes :func:`prune_group` can rewrite. Plain attributes (``input_shape``)
    are carried over."""
    if isinstance(model, fx.GraphModule):
        return model
    deps = deps if deps is not None else build_dependency_graph(model, x[:1])
    if not any(g.prunable and g.rewrites for g in deps.groups):
        return model
    gm = trace(copy.deepcopy(model))
    kept = {key: value for key, value in vars(model).items()
            if not key.startswith("_") and key != "training" and not hasattr(gm, key)
            and isinstance(value, (int, float, str, bool, tuple, type(None)))}
    for key, value in kept.items():
        setattr(gm, key, value)
    # (a GraphModule's deep copy keeps only what this meta entry names)
    gm.meta.setdefault("_user_preserved_attributes", {}).update(kept)
    gm.train(model.training)
    return gm


def _rewrite_heads(model: fx.GraphModule, group: ChannelGroup, keep: int) -> None:
    """Set the head count of the group's split and merge reshapes to what ``keep`` channels hold."""
    nodes = {n.name: n for n in model.graph.nodes}
    for kind, name in group.rewrites:
        node = nodes.get(name)
        if node is None:
            raise ConfigError(f"attention heads of {_label(group)!r}: reshape {name!r} is not in the model's graph")
        if kind == "parts":  # split(size, dim) of a fused q/k/v projection: each part keeps ``keep``
            size = node.args[1] if len(node.args) > 1 else node.kwargs["split_size_or_sections"]
            size = [keep] * len(size) if isinstance(size, (list, tuple)) else keep
            if len(node.args) > 1:
                node.args = (node.args[0], size, *node.args[2:])
            else:
                node.kwargs = {**node.kwargs, "split_size_or_sections": size}
            continue
        found = reshape_sizes(node)
        if found is None:
            raise ConfigError(f"attention heads of {_label(group)!r}: reshape {name!r} takes its sizes from a tensor")
        sizes, write = found
        # split (.., heads, head channels): both set, so that no size read from a narrowed tensor
        # misleads; merge (.., channels)
        new = {len(sizes) - 2: keep // group.block, len(sizes) - 1: group.block} if kind == "split" else {len(sizes) - 1: keep}
        for i, v in new.items():
            if not (isinstance(sizes[i], int) and sizes[i] == -1):
                sizes[i] = v
        write(sizes)
    model.graph.eliminate_dead_code()  # the sizes the reshapes no longer read
    model.recompile()


def prune_group(model: nn.Module, x: torch.Tensor, label: str, keep: int, reconstruct: bool = True,
                ridge: float = 1e-6) -> list[int]:
    """Prune the group produced by ``label`` to ``keep`` channels, in place; returns the kept ones.
    A group of attention heads keeps a whole number of heads, and the model must be a
    ``GraphModule`` (:func:`editable`)."""
    group = _find(model, x, label)
    if not group.prunable:
        raise ConfigError(f"channel group of {label!r} cannot be pruned: {group.reason}")
    if keep < 1:
        raise ConfigError(f"channel group of {label!r} keeps at least one channel, not {keep}")
    if keep % group.block:
        raise ConfigError(f"channel group of {label!r} is {group.channels // group.block} attention heads of "
                          f"{group.block} channels: it keeps a whole number of them, not {keep} channels")
    if group.rewrites and not isinstance(model, fx.GraphModule):
        raise ConfigError(f"channel group of {label!r} is attention heads, whose count is in the model's "
                          "code: prune its torch.fx GraphModule (nnshrink.techniques.channels.editable)")
    consumers = [c.layer for c in group.consumers]
    samples = _sample(model, x, consumers)
    kept = select_channels(model, group, samples, keep)
    removed = sorted(set(range(group.channels)) - set(kept))
    if not removed:
        return kept
    # a layer may read the group at several offsets (a concat of one group's tensors); a layer
    # called twice on the group reads it twice at the same offset: once
    reads: dict[str, dict] = {}
    for c in group.consumers:
        reads.setdefault(c.layer, {})[c.offset] = c
    for name in reads:
        reads[name] = list(reads[name].values())
    for name, entries in reads.items():
        layer = model.get_submodule(name)
        w = _weight_matrix(layer)
        drop = np.concatenate([_consumer_columns(layer, c.offset, c.width, removed) for c in entries])
        stay = torch.from_numpy(np.setdiff1d(np.arange(w.shape[1]), drop))
        new_w = w[:, stay]
        if reconstruct:
            xs = samples[name]
            target = xs @ w.T  # the output (without bias) before pruning
            xk = xs[:, stay]
            gram = xk.T @ xk
            lam = ridge * gram.diagonal().mean().clamp_min(1e-12)
            new_w = torch.linalg.solve(gram + lam * torch.eye(len(stay), dtype=gram.dtype), xk.T @ target).T
        if isinstance(layer, _TRANSPOSED):
            new_w = new_w.T.reshape(len(stay), *layer.weight.shape[1:])
        else:
            new_w = new_w.reshape(layer.weight.shape[0], -1, *layer.weight.shape[2:])
        layer.weight = nn.Parameter(new_w.to(layer.weight.dtype).contiguous())
        if isinstance(layer, nn.Linear):
            layer.in_features = layer.weight.shape[1]
        else:  # what the new weight holds (a transposed conv's inputs are its weight's axis 0)
            layer.in_channels = layer.weight.shape[0] if isinstance(layer, _TRANSPOSED) else layer.weight.shape[1] * layer.groups
    idx = torch.tensor(kept)
    # a producer keeps every output outside the group; a fused q/k/v projection is a producer at
    # three offsets, sliced once
    dropped: dict[str, list[int]] = {}
    for name, offset in group.producers:
        dropped.setdefault(name, []).extend(r + offset for r in removed)
    for name, drop in dropped.items():
        layer = model.get_submodule(name)
        outputs = layer.weight.shape[1] if isinstance(layer, _TRANSPOSED) else layer.weight.shape[0]
        _slice_out(layer, torch.from_numpy(np.setdiff1d(np.arange(outputs), drop)))
    for name in group.members:
        _slice_member(model.get_submodule(name), idx)
    if group.rewrites:
        _rewrite_heads(model, group, len(kept))
    return kept


def prunable_groups(deps, rules: dict, exclude: set[str] = frozenset()) -> tuple[list[ChannelGroup], list[dict]]:
    """The channel groups of ``deps`` that may be pruned, in execution order, and the others with
    the reason (``skipped`` entries): not prunable, skipped by a ``skip`` rule on a producer
    (``rules``: layer -> rule), read by nothing, or a single channel. Groups labelled in
    ``exclude`` are left out silently."""
    groups, skipped = [], []
    for g in deps.groups:
        if not g.producers or _label(g) in exclude:
            continue
        names = [n for n, _ in g.producers]
        if not g.prunable:
            skipped.append({"layer": ", ".join(names), "reason": g.reason or "not prunable"})
        elif any(rules.get(n) == SKIP for n in names):
            skipped.append({"layer": ", ".join(names), "reason": "skipped by the plan's layer rules"})
        elif g.channels < 2 or not g.consumers:
            skipped.append({"layer": ", ".join(names), "reason": "nothing reads it" if not g.consumers
                            else "a single channel"})
        else:
            groups.append(g)
    return groups, skipped


def group_label(group: ChannelGroup) -> str:
    """A group's name: its first producing layer (what :func:`prune_group` finds it by)."""
    return _label(group)


def _cp_loss(model: nn.Module, x: torch.Tensor, reference: torch.Tensor, unit: str, level: int) -> float:
    trial = copy.deepcopy(model)
    prune_group(trial, x, unit, level)
    with torch.no_grad():
        return output_loss(reference, trial(x))


@dataclass(frozen=True)
class ChannelPrune(StepConfig):
    """Channel pruning with least-squares reconstruction, channel counts chosen for ``mac_ratio``.

    Attributes:
        mac_ratio: MACs after / MACs of the model the plan started from.
        tolerance: The result lies in ``[mac_ratio - tolerance, mac_ratio]``.
        layers: Per-layer rules on the layers that produce a channel group (first matching
            pattern wins): ``skip`` leaves the group alone; ``{"channels": 16}`` prunes it to that
            many channels (with the reconstruction) before the other groups' counts are chosen.
            Version-1 plans' ``exclude`` is read into it.
        min_keep: Fewest channels a group keeps, as a fraction of its channels.
        samples: Inputs sampled for selection, reconstruction and the sensitivity curves.
        measured_levels: Channel counts measured per group (interpolated between them).
        reconstruct: Refit the consumers' kept weights by least squares.
        round_to: Channel counts are multiples of this where the target allows. Default (None):
            the allocations for multiples of 8 and of 4 are each applied and the one more
            accurate on validation is kept (two evaluations; by output error without an
            evaluator). Finer grids make models that ONNX Runtime runs slower than the
            original despite half the MACs (x86 blocked kernels; multiples of 2 measured:
            1.37x float latency on the MobileNet, 1.06x on ResNet-8; multiples of 4 and 8:
            0.67-0.91x); 2 or 1 allow them where only accuracy matters.
        executor: ``process`` (local pool), ``serial`` or ``ray``.
    """

    kind = "channel_prune"
    mac_ratio: float = 0.5
    tolerance: float = 0.01
    min_keep: float = 0.1
    samples: int = 256
    measured_levels: int = 8
    reconstruct: bool = True
    round_to: int | None = None
    executor: str = "process"

    layer_settings = {"channels": lambda v: None if isinstance(v, int) and not isinstance(v, bool) and v >= 1
                      else "a whole number, at least 1"}
    legacy = {"exclude": lambda v: dict.fromkeys(v, SKIP)}

    def __post_init__(self) -> None:
        super().__post_init__()
        check_target_options(self.kind, self.mac_ratio, self.tolerance, self.executor, self.samples,
                             self.measured_levels)
        if not 0 < self.min_keep <= 1:
            raise ConfigError(f"channel_prune.min_keep must be in (0, 1], got {self.min_keep}")
        if self.round_to is not None and self.round_to < 1:
            raise ConfigError(f"channel_prune.round_to must be >= 1, got {self.round_to}")

    def apply(self, model: nn.Module, ctx, show_progress: bool = True) -> StepResult:
        x = sample_inputs(ctx, self.samples)
        model = copy.deepcopy(model).eval()
        start = build_dependency_graph(model, x[:1])
        model = editable(model, x, start)  # (the GraphModule traced from it has the same groups)
        info = analyze(model, x[:1])
        base, budget, floor = target_macs(ctx, model, x, self.mac_ratio, self.tolerance)
        rules = self.layer_rules([li.name for li in info.layers])
        fixed = {}  # groups given a channel count by the plan: pruned first, the rest allocated around them
        for g in start.groups:
            counts = {rules[n]["channels"] for n, _ in g.producers if isinstance(rules.get(n), dict)}
            if not counts:
                continue
            keep = min(counts)
            if keep % g.block:
                raise ConfigError(f"channel_prune.layers: group {_label(g)} is {g.channels // g.block} attention heads of "
                                  f"{g.block} channels; {keep} channels is not a whole number of heads")
            if not g.prunable or keep >= g.channels:
                raise ConfigError(f"channel_prune.layers: group {_label(g)} ({g.channels} channels) cannot be pruned "
                                  f"to {keep}: {g.reason or 'it has no more than that'}")
            fixed[_label(g)] = {"channels": g.channels, "kept": keep}
        for label, v in fixed.items():
            prune_group(model, x, label, v["kept"], self.reconstruct)
        deps = build_dependency_graph(model, x[:1])
        groups, skipped = prunable_groups(deps, rules, set(fixed))
        lowest = {_label(g): g.block * max(1, math.ceil(self.min_keep * g.channels / g.block)) for g in groups}
        tasks = []
        for g in groups:  # (an attention group's counts: whole heads)
            counts = list(range(g.channels - g.block, lowest[_label(g)] - 1, -g.block))
            if not counts:
                continue
            picks = np.unique(np.linspace(0, len(counts) - 1, self.measured_levels).round().astype(int))
            tasks += [(_label(g), counts[i]) for i in picks]
        losses = measure_curves(model, x, tasks, _cp_loss, ["cp", self.reconstruct, _PATCHES_PER_IMAGE],
                                self.executor, show_progress=show_progress)
        units = []
        for g in groups:
            label = _label(g)
            levels = list(range(g.channels, lowest[label] - 1, -g.block))
            measured = {0: 0.0}
            for i, k in enumerate(levels):
                if (label, k) in losses:
                    measured[i] = losses[(label, k)]
            if len(levels) > 1:
                units.append(Unit(label, levels, interpolate(measured, len(levels))))
        # (counted on the model as the plan's fixed counts left it)
        macs_of = _cost_model(model, analyze(model, x[:1]) if fixed else info, deps, {u.name: u for u in units})
        grids = (self.round_to,) if self.round_to is not None else (8, 4)
        candidates = {}
        for grid in grids:  # each grid's allocation, applied; kept: the best on validation
            choice = self._allocate(units, macs_of, budget, floor, grid)
            key = tuple(sorted(choice.items()))
            if key in {k for k, _ in candidates.values()}:
                continue
            pruned_model, pruned = copy.deepcopy(model), {}
            for u in units:  # in execution order; each prune re-derives the groups of the current model
                keep = u.levels[choice[u.name]]
                if keep < u.levels[0]:
                    prune_group(pruned_model, x, u.name, keep, self.reconstruct)
                    pruned[u.name] = {"channels": u.levels[0], "kept": keep}
            with torch.no_grad():
                err = output_loss(model(x), pruned_model(x))
            val = ctx.evaluate(pruned_model) if ctx.evaluate is not None and len(grids) > 1 else None
            candidates[grid] = (key, (pruned_model, pruned, err, val))
        scores = {g: ((c[3] if c[3] is not None else 0.0), -c[2]) for g, (_, c) in candidates.items()}
        grid = max(scores, key=lambda g: scores[g])
        model, pruned = candidates[grid][1][0], candidates[grid][1][1]
        after = analyze(model, x[:1])
        shrunk = [li.name for li, lo in zip(after.layers, info.layers) if li.weight_shape != lo.weight_shape]
        odd = [k for k, v in pruned.items() if v["kept"] % grid]
        details = {"mac_ratio_target": self.mac_ratio, "mac_ratio": after.total_macs / base,
                   "round_to": grid, "not_multiple_of_round_to": odd,
                   "candidates": {str(g): {"val": c[3], "output_error": round(c[2], 6)} for g, (_, c) in candidates.items()},
                   "macs_before": info.total_macs, "macs_after": after.total_macs, "groups": {**fixed, **pruned},
                   "layers_shrunk": shrunk, "measurements": len(tasks),
                   "sensitivity": level_table("relative output error (MSE / output power)", losses,
                                              {_label(g): list(range(g.channels - g.block, 0, -g.block)) for g in groups},
                                              {_label(g): float(g.channels) for g in groups}, "channels")}
        return StepResult(self.kind, model.eval(), details, skipped)

    @staticmethod
    def _allocate(units: list[Unit], macs_of, budget: int, floor: int, grid: int) -> dict[str, int]:
        """Allocate on channel counts that are multiples of ``grid`` (what vectorised kernels
        want), then let single groups move by single channels where that is needed to land in
        ``[floor, budget]``."""
        if grid <= 1:
            return allocate(units, macs_of, budget, floor)
        keep = {u.name: [i for i, k in enumerate(u.levels) if i == 0 or k % grid == 0] for u in units}
        coarse = [Unit(u.name, [u.levels[i] for i in keep[u.name]], [u.loss[i] for i in keep[u.name]])
                  for u in units]

        def coarse_macs(choice):
            return macs_of({n: keep[n][i] for n, i in choice.items()})

        try:
            picked = allocate(coarse, coarse_macs, budget, floor)
        except ConfigError:  # the multiples alone cannot reach the budget: use every count
            return allocate(units, macs_of, budget, floor)
        return repair(units, {n: keep[n][i] for n, i in picked.items()}, macs_of, budget, floor)


def _cost_model(model: nn.Module, info, deps, units: dict[str, Unit]):
    """MACs of the model as a function of the level chosen for each group: each layer's count
    from the graph counter, scaled by the share of its inputs and outputs kept."""
    produced: dict[str, str] = {}
    members: dict[str, str] = {}
    consumed: dict[str, list[tuple[str, int]]] = {}
    products: dict[str, int] = {}  # attention products, which shrink with the heads kept
    times: dict[str, int] = {}
    for g in deps.groups:
        if not g.producers or _label(g) not in units:
            continue
        label = _label(g)
        if g.products:
            products[label] = g.products
        for n, _ in g.producers:  # (a fused q/k/v projection produces the group three times)
            produced[n] = label
            times[n] = times.get(n, 0) + 1
        for n in g.members:
            members[n] = label
        for c in g.consumers:
            consumed.setdefault(c.layer, []).append((label, c.width))
    rows = []
    for li in info.layers:
        layer = model.get_submodule(li.name)
        if isinstance(layer, nn.Linear):
            out_n, in_n = layer.out_features, layer.in_features
        else:
            out_n, in_n = layer.out_channels, layer.in_channels
        rows.append((li.macs, out_n, in_n, produced.get(li.name), members.get(li.name),
                     consumed.get(li.name, []), times.get(li.name, 1)))
    fixed = 0  # what no group narrows: recurrent layers, attention products and the like
    for o in info.other:  # a transposed conv reads one group and makes another, as a conv does
        layer = model.get_submodule(o.name) if o.name != "<root>" else None
        if isinstance(layer, (nn.ConvTranspose1d, nn.ConvTranspose2d)) and layer.groups == 1:
            rows.append((o.macs, layer.out_channels, layer.in_channels, produced.get(o.name), None,
                         consumed.get(o.name, []), 1))
        else:
            fixed += o.macs
    fixed -= sum(products.values())
    full = {name: u.levels[0] for name, u in units.items()}

    def macs_of(choice: dict[str, int]) -> int:
        removed = {n: full[n] - units[n].levels[i] for n, i in choice.items()}
        total = float(fixed) + sum(m * (full[n] - removed.get(n, 0)) / full[n] for n, m in products.items())
        for macs, out_n, in_n, prod, member, cons, times_produced in rows:
            if member is not None:  # depthwise: one input per output channel
                total += macs * (out_n - removed.get(member, 0)) / out_n
                continue
            r_out = (out_n - times_produced * removed.get(prod, 0)) / out_n if prod else 1.0
            r_in = (in_n - sum(removed.get(g, 0) * w for g, w in cons)) / in_n
            total += macs * r_out * r_in
        return int(round(total))

    return macs_of
