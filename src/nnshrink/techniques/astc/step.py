"""The ``astc`` plan step: each layer's weights as an ASTC texture, footprints per layer, re-training.

Each layer's weights are mapped to [0, 1] by a scale and offset (per layer, or per output with
``range: row``), laid out as a 2-D texture (:mod:`.layout`), and encoded by astcenc at the
layer's footprint; the layer's weights become exactly the decode of its blocks (:mod:`.codec`'s
decode profile), which the container stores byte for byte with the scales. With calibration
inputs each texture is encoded strip by strip with error compensation (:mod:`.compensate`).

Footprints: one for every layer, per-layer overrides, or chosen per layer for a budget
(``bits_per_weight`` or ``max_drop``) from measured sensitivity: every layer is encoded at every
footprint (at one and at two channels) once, each encoding alone measured as output noise on
calibration inputs, and :mod:`nnshrink.search.solvers` gives the assignment (the least estimated
noise within a byte budget, exactly; for an accuracy budget, a bisection over byte budgets with a
few full evaluations).

Re-training (needs the bundled or the user's trainer):

- ``interleaved`` (A): layers are encoded one at a time, largest first; after each, the layers
  not yet encoded and every bias are fine-tuned for ``steps``, so later layers learn to make up
  for earlier ones' error. With ``rounds > 1`` every layer is then released, fine-tuned and
  re-encoded again.
- ``blocks`` (B): :mod:`.blocks` trains the blocks themselves (endpoints and weight grids of one
  fixed block mode per layer) through a differentiable model of the decode, then writes them as
  real blocks whose astcenc decode equals the trained weights.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import functools
import hashlib
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from nnshrink.cache import code_fingerprint
from nnshrink.errors import ConfigError
from nnshrink.graph.analysis import is_compressible
from nnshrink.plan.config import SKIP, StepConfig, StepResult, pairs
from nnshrink.progress import progress_bar
from nnshrink.techniques.astc import codec
from nnshrink.techniques.astc.compensate import Gram, encode_compensated
from nnshrink.techniques.astc.layout import LAYOUTS, chain_order, make_layout
from nnshrink.techniques.astc.record import AstcRecord
from nnshrink.search.engine import EXECUTORS, held_memo, measure_curves, output_loss, sensitivity_table
from nnshrink.search.solvers import estimated_noise, least_noise, smallest_within, total_bytes
from nnshrink.techniques.calibration import calibration_inputs, layer_hessians
from nnshrink.techniques.records import attach, record_of

RANGES = ("layer", "row")
ORDERS = ("auto", "none")
COMPENSATE = ("auto", "hessian", "none")
_PROBE = ((8, 8), 1)  # the option a layer's layout and order are chosen at
RETRAIN = ("none", "interleaved", "blocks")
_FLOAT = "float"


def input_shapes(model: nn.Module, example: torch.Tensor) -> dict[str, tuple[int, int]]:
    """For each Linear that reads a flattened ``N x C x H x W`` tensor: ``(H, W)``."""
    flattened: dict[int, tuple[int, int]] = {}
    found: dict[str, tuple[int, int]] = {}
    hooks = []

    def on_flatten(_m, inputs, output):
        if inputs and isinstance(inputs[0], torch.Tensor) and inputs[0].dim() == 4:
            flattened[id(output)] = tuple(inputs[0].shape[2:])

    def on_linear(name):
        def hook(_m, inputs):
            if inputs and id(inputs[0]) in flattened:
                found[name] = flattened[id(inputs[0])]
        return hook

    for name, m in model.named_modules():
        if isinstance(m, nn.Flatten):
            hooks.append(m.register_forward_hook(on_flatten))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_pre_hook(on_linear(name)))
    try:
        with torch.no_grad():
            model(example[:1])
    finally:
        for h in hooks:
            h.remove()
    return found


_ENCODED: collections.OrderedDict = collections.OrderedDict()  # recent encodings (astcenc is the slow part)
_ENCODED_MAX = 256


def encode_weight(weight: np.ndarray, fp: tuple[int, int], layout_kind: str = "auto",
                  input_hw: tuple[int, int] | None = None, value_range: str = "layer",
                  quality: str | float = "medium", threads: int = 1,
                  name: str = "weight", channels: int = 1,
                  order: np.ndarray | None = None, gram: Gram | None = None) -> tuple[AstcRecord, str | None]:
    """The record of ``weight`` at footprint ``fp`` with ``channels`` weights per texel (outputs
    placed in ``order``, else their own), and why its layout is not the one asked for. With the
    layer's ``gram`` the texture is encoded strip by strip with error compensation
    (:mod:`.compensate`). The same weights and settings give the same blocks (the last few hundred
    encodings are kept, so a second budget on a model costs no encoding)."""
    w = np.asarray(weight, np.float32)
    key = (hashlib.sha1(w.tobytes()).hexdigest(), w.shape, fp, layout_kind, input_hw, value_range,
           codec.quality_value(quality), channels, None if order is None else tuple(order),
           None if gram is None else gram.digest)
    if key in _ENCODED:
        _ENCODED.move_to_end(key)
        record, why = _ENCODED[key]
        return dataclasses.replace(record, name=name, _cache=dict(record._cache)), why
    result = _encode(w, fp, layout_kind, input_hw, value_range, quality, threads, name, channels, order, gram)
    _ENCODED[key] = result
    while len(_ENCODED) > _ENCODED_MAX:
        _ENCODED.popitem(last=False)
    return result


def _encode(w, fp, layout_kind, input_hw, value_range, quality, threads, name, channels, order, gram):
    layout, why = make_layout(layout_kind, w.shape, fp, input_hw, channels, order)
    rows = w.reshape(w.shape[0], -1)
    if value_range == "row":
        lo, hi = rows.min(axis=1), rows.max(axis=1)
    else:
        lo, hi = rows.min(keepdims=True).reshape(1), rows.max(keepdims=True).reshape(1)
    scale = np.where(hi > lo, hi - lo, 1.0).astype(np.float32)
    offset = lo.astype(np.float32)
    blocks = None if gram is None else encode_compensated(rows, gram.matrix, layout, fp, offset, scale, quality,
                                                          threads)
    compensated = blocks is not None
    if blocks is None:
        t = np.clip((rows - offset.reshape(-1, 1)) / scale.reshape(-1, 1), 0.0, 1.0)
        blocks = codec.encode(layout.to_texture(t), fp, quality, threads)
    record = AstcRecord(tuple(w.shape), fp, layout, np.frombuffer(blocks, np.uint8).reshape(-1, codec.BLOCK_BYTES),
                        offset, scale, "astcenc", name)
    record._cache["compensated"] = compensated
    return record, why


def placement_of(weight: np.ndarray, kind: str = "auto", input_hw: tuple[int, int] | None = None,
                 value_range: str = "layer", quality: str | float = "medium", threads: int = 1,
                 order: str = "auto", free_layout: bool = True) -> tuple[str, np.ndarray | None]:
    """A layer's layout and output order: with ``order`` ``auto``, its outputs in their own order
    or in a nearest-neighbour chain (and, for a Linear whose layout no rule fixed, its rows as
    rows), whichever encodes its weights with the least error at 8x8; deterministic, so a worker
    measuring a layer places it as the step that encodes it does."""
    w = np.asarray(weight, np.float32)
    choices = [(kind, None)]
    chain = chain_order(w.reshape(w.shape[0], -1)) if order == "auto" else None
    if chain is not None:
        choices.append((kind, chain))
        if kind == "auto" and free_layout and w.ndim == 2:
            choices.append(("rows", chain))
    if len(choices) == 1:
        return choices[0]

    def error(choice):
        rec = encode_weight(w, _PROBE[0], choice[0], input_hw, value_range, quality, threads, "probe",
                            _PROBE[1], choice[1])[0]
        return float(((rec.dequantize() - w) ** 2).sum())
    return min(choices, key=error)


def encode_layer(layer: nn.Module, option: tuple, input_hw: tuple[int, int] | None = None,
                 hessian: torch.Tensor | None = None, quality: str | float = "medium", threads: int = 1,
                 name: str = "weight") -> AstcRecord:
    """``layer``'s weights as ASTC blocks at ``option`` (``((w, h), channels)``) in the step's
    default placement (:func:`placement_of`) and per-layer range, error-compensated with the
    ``hessian`` of its inputs where one is given (not for a grouped conv); the record is attached,
    so the weights become its decode. For other searches that offer a footprint (the ``budget``
    step)."""
    w = layer.weight.detach().cpu().numpy()
    kind, order = placement_of(w, "auto", input_hw, "layer", quality, threads)
    gram = Gram(hessian) if hessian is not None and getattr(layer, "groups", 1) == 1 else None
    record, _ = encode_weight(w, option[0], kind, input_hw, "layer", quality, threads, name, option[1], order, gram)
    return attach(layer, record)


def record_bytes(record: AstcRecord) -> int:
    """Stored bytes of a record: its blocks and its scales and offsets."""
    return int(record.blocks.nbytes + record.offset.nbytes + record.scale.nbytes)


def _problem(check, value, wanted: str) -> str | None:
    """``wanted`` if ``check(value)`` refuses it (a ``layers:`` rule's check), else None."""
    try:
        check(value)
    except (ConfigError, TypeError, ValueError):
        return wanted
    return None


def parse_option(text: str) -> tuple | None:
    """``"10x10"`` -> ((10, 10), 1); ``"10x10/2"`` -> ((10, 10), 2); ``"float"`` -> None."""
    if text == _FLOAT:
        return None
    fp, sep, ch = str(text).partition("/")
    if sep and ch not in ("1", "2"):
        raise ConfigError(f"an astc option looks like '10x10' or '10x10/2' (two channels), got {text!r}")
    return codec.parse_footprint(fp), int(ch) if sep else 1


def option_name(option: tuple | None) -> str:
    if option is None:
        return _FLOAT
    return codec.footprint_name(option[0]) + ("/2" if option[1] == 2 else "")


def _check_layout(value: str) -> None:
    if value not in LAYOUTS:
        raise ConfigError(f"astc layout must be one of {', '.join(LAYOUTS)}, got {value!r}")


@dataclass(frozen=True)
class Astc(StepConfig):
    """Store each layer's weights as ASTC texture blocks that a GPU's texture unit decodes.

    Attributes:
        footprint: Block footprint of every layer (``8x8``; any of the 14 2-D ones, 4x4 to 12x12).
        channels: Weights per texel: 1 (luminance) or 2 (luminance and alpha: half the bits).
        layers: Per-layer rules (first matching pattern wins): ``skip`` leaves a layer as it is;
            ``{"footprint": "12x12"}`` (``"12x12/2"``: two channels; ``"float"``) fixes its
            footprint, ``{"layout": "rows"}`` its layout. Version-1 plans' ``exclude``,
            ``layer_footprints`` and ``layer_layouts`` (``"name=..."``) are read into it.
        bits_per_weight: Size budget: footprints chosen per layer so the encoded layers average at
            most this many stored bits per weight (scales included), least output noise first.
        max_drop: Accuracy budget: the smallest footprints whose metric stays within this
            relative drop of the model's (needs an evaluation function).
        footprints: Candidates for a budget, like ``10x10`` or ``10x10/2`` (default: all 14 at one
            and at two channels, and float).
        layout: ``auto`` (conv kernels tiled, a Linear after a flatten as input-shaped tiles,
            else rows), ``rows``, ``kernels`` or ``input``.
        range: ``layer`` (one scale and offset per layer) or ``row`` (one per output).
        quality: astcenc's search preset (``fastest`` ... ``exhaustive``) or 0-100.
        retrain: ``none``, ``interleaved`` (A) or ``blocks`` (B).
        steps: Fine-tuning steps per round of re-training.
        rounds: Rounds of re-training A (after the first, every layer is released and re-encoded).
        order: ``auto``: each layer's outputs may be placed in a nearest-neighbour chain (and a
            Linear's rows as rows), whichever encodes its weights with less error at 8x8;
            ``none``: outputs in their own order.
        compensate: ``hessian``: each texture is encoded a column of blocks at a time, and the
            weights not yet encoded make up for the error so far, weighted by how the layer's
            inputs co-vary on calibration data (:mod:`.compensate`; about a tenth of the output
            error at the same bytes); ``none``: one astcenc pass over the texture; ``auto``:
            ``hessian`` where calibration inputs are given. Grouped convs are encoded plainly.
        executor: Where a budget's per-layer sensitivity is measured (by
            :func:`nnshrink.search.engine.measure_curves`, cached, so a second run measures
            nothing): ``process`` (a local pool), ``serial`` or ``ray``.
        min_weights: Layers with fewer weights stay float (named in the report).
        calib_samples: Calibration inputs the sensitivity and the compensation are measured on.
    """

    kind = "astc"
    footprint: str = "8x8"
    channels: int = 1
    bits_per_weight: float | None = None
    max_drop: float | None = None
    footprints: tuple[str, ...] = ()
    layout: str = "auto"
    range: str = "layer"
    quality: str | float = "medium"
    retrain: str = "none"
    steps: int = 300
    rounds: int = 1
    order: str = "auto"
    compensate: str = "auto"
    executor: str = "process"
    min_weights: int = 64
    calib_samples: int = 256

    layer_settings = {"footprint": lambda v: _problem(parse_option, v, "a footprint like 12x12, 12x12/2 or float"),
                      "layout": lambda v: _problem(_check_layout, v, f"one of {', '.join(LAYOUTS)}")}
    legacy = {"exclude": lambda v: dict.fromkeys(v, SKIP),
              "layer_footprints": lambda v: {n: {"footprint": f} for n, f in pairs(v).items()},
              "layer_layouts": lambda v: {n: {"layout": f} for n, f in pairs(v).items()}}

    def __post_init__(self) -> None:
        super().__post_init__()
        codec.parse_footprint(self.footprint)
        if self.channels not in (1, 2):
            raise ConfigError(f"astc.channels must be 1 or 2, got {self.channels}")
        _check_layout(self.layout)
        for f in self.footprints:
            parse_option(f)
        if self.order not in ORDERS:
            raise ConfigError(f"astc.order must be one of {ORDERS}, got {self.order!r}")
        if self.compensate not in COMPENSATE:
            raise ConfigError(f"astc.compensate must be one of {COMPENSATE}, got {self.compensate!r}")
        if self.executor not in EXECUTORS:
            raise ConfigError(f"astc.executor must be one of {', '.join(EXECUTORS)}, got {self.executor!r}")
        if self.range not in RANGES:
            raise ConfigError(f"astc.range must be one of {RANGES}, got {self.range!r}")
        if self.retrain not in RETRAIN:
            raise ConfigError(f"astc.retrain must be one of {RETRAIN}, got {self.retrain!r}")
        codec.quality_value(self.quality)
        if self.bits_per_weight is not None and self.max_drop is not None:
            raise ConfigError("astc takes one budget: bits_per_weight or max_drop")
        if self.bits_per_weight is not None and not 0 < self.bits_per_weight <= 32:
            raise ConfigError(f"astc.bits_per_weight must be in (0, 32], got {self.bits_per_weight}")
        if self.max_drop is not None and not 0 <= self.max_drop < 1:
            raise ConfigError(f"astc.max_drop is a relative drop in [0, 1), got {self.max_drop}")
        if self.steps < 1 or self.rounds < 1 or self.min_weights < 1 or self.calib_samples < 1:
            raise ConfigError("astc.steps, rounds, min_weights and calib_samples must be at least 1")

    # -- the pieces ---------------------------------------------------------------------------

    def _candidates(self) -> list[tuple | None]:
        if self.footprints:
            cands = [parse_option(n) for n in self.footprints]
        else:
            cands = [None] + [(f, c) for f in codec.FOOTPRINTS for c in (1, 2)]
        return sorted(set(cands), key=lambda o: 0 if o is None else o[0][0] * o[0][1] * o[1])

    def _grams(self, model: nn.Module, layers: dict[str, nn.Module], batches) -> dict[str, Gram]:
        """Each layer's ``X^T X`` on the calibration inputs, where compensation is on (not for
        grouped convs, whose groups each read other inputs)."""
        plain = {n: m for n, m in layers.items() if getattr(m, "groups", 1) == 1}
        if not batches or not plain:
            return {}
        return {n: Gram(h) for n, h in layer_hessians(model, plain, batches).items()}

    def _encoder(self, layers: dict[str, nn.Module], shapes: dict, threads: int, layouts: dict[str, str],
                 grams: dict[str, Gram]):
        cache: dict = {}
        placement: dict[str, tuple[str, np.ndarray | None]] = {}

        def weight(name: str) -> np.ndarray:
            return layers[name].weight.detach().cpu().numpy()

        def place(name: str) -> tuple[str, np.ndarray | None]:
            if name not in placement:
                placement[name] = placement_of(weight(name), layouts.get(name, self.layout), shapes.get(name),
                                               self.range, self.quality, threads, self.order, name not in layouts)
            return placement[name]

        def encode(name: str, option: tuple) -> tuple[AstcRecord, str | None]:
            key = (name, option)
            if key not in cache:
                kind, order = place(name)
                cache[key] = encode_weight(weight(name), option[0], kind, shapes.get(name), self.range,
                                           self.quality, threads, name, option[1], order, grams.get(name))
            return cache[key]
        return encode, place

    def _choose(self, model, layers, encode, place, shapes, grams, ctx, batches, show) -> tuple[dict, dict]:
        """Per-layer footprints for the budget, and what the choice measured."""
        cands = self._candidates()
        held = torch.cat(batches)
        setup = {"candidates": [option_name(o) for o in cands], "range": self.range,
                 "quality": codec.quality_value(self.quality), "batches": [len(b) for b in batches],
                 "layers": {}}
        for n in layers:
            kind, order = place(n)  # measured here, once, before any worker starts
            setup["layers"][n] = {"layout": kind, "input_hw": shapes.get(n), "compensate": n in grams,
                                  "order": None if order is None else [int(i) for i in order]}
        # the key names every setting but the output orders (which the weights, hashed by the
        # engine, decide), and the code of the encoding modules beside this one's
        from nnshrink.techniques.astc import compensate, layout, record

        key = ["astc-footprint", {k: v for k, v in setup.items() if k != "layers"},
               {n: {k: v for k, v in s.items() if k != "order"} for n, s in setup["layers"].items()},
               code_fingerprint(codec, compensate, layout, record), codec.encoder_version()]
        tasks = [(n, i) for n in layers for i, o in enumerate(cands) if o is not None]
        measured = measure_curves(model, held, tasks, functools.partial(_footprint_loss, setup=setup), key,
                                  self.executor, show_progress=show, description="astc: per-layer sensitivity")
        options = {n: [(layer.weight.numel() * 4.0, 0.0) if o is None else
                       (float(measured[(n, i)][1]), float(measured[(n, i)][0])) for i, o in enumerate(cands)]
                   for n, layer in layers.items()}
        params = sum(layer.weight.numel() for layer in layers.values())
        originals = {n: layer.weight.detach().cpu().numpy().copy() for n, layer in layers.items()}

        def apply(assign: dict[str, int]) -> None:
            for n, i in assign.items():
                w = encode(n, cands[i])[0].dequantize() if cands[i] is not None else originals[n]
                with torch.no_grad():
                    layers[n].weight.copy_(torch.from_numpy(np.asarray(w)))

        evaluations = 0
        if self.bits_per_weight is not None:
            assign = least_noise(options, self.bits_per_weight * params / 8)
            if assign is None:
                smallest = sum(min(b for b, _ in o) for o in options.values()) * 8 / params
                raise ConfigError(f"astc.bits_per_weight {self.bits_per_weight} is below the smallest these "
                                  f"footprints reach ({smallest:.3f} bits per weight, scales included)")
        else:
            if ctx.evaluate is None:
                raise ConfigError("astc.max_drop needs an evaluation function (--eval, or bundled data)")
            reference = ctx.evaluate(model)
            floor = reference - abs(reference) * self.max_drop
            assign, evaluations = smallest_within(options, lambda a: (apply(a), ctx.evaluate(model) >= floor)[1])
        for n, w in originals.items():  # the float weights back; the caller encodes the choice
            with torch.no_grad():
                layers[n].weight.copy_(torch.from_numpy(w))
        choice = {n: cands[i] for n, i in assign.items()}
        est = estimated_noise(options, assign)
        info = {"candidates": [option_name(o) for o in cands], "evaluations": evaluations,
                "sensitivity": sensitivity_table("relative output error (MSE / output power)",
                                                 [option_name(o) for o in cands],
                                                 {n: [e for _, e in o] for n, o in options.items()}),
                "estimated_bits_per_weight": round(total_bytes(options, assign) * 8 / params, 4),
                "estimated_sqnr_db": round(float(10 * np.log10(1 / est)), 2) if est > 0 else None}
        return choice, info

    # -- apply --------------------------------------------------------------------------------

    def apply(self, model: nn.Module, ctx) -> StepResult:
        t0 = time.perf_counter()
        new = copy.deepcopy(model).eval()
        show = getattr(ctx, "show_progress", True)
        candidates = {n: m for n, m in new.named_modules() if is_compressible(m)}
        left = self.skipped_layers(candidates)
        overrides = {n: parse_option(v) for n, v in self.layer_setting(candidates, "footprint").items() if n not in left}
        skipped = [{"layer": n, "reason": "skipped by the plan's layer rules"} for n in left]
        layers = {}
        for n, m in candidates.items():
            if n in left:
                continue
            if m.weight.numel() < self.min_weights:
                skipped.append({"layer": n, "reason": f"{m.weight.numel()} weights, fewer than min_weights "
                                                      f"{self.min_weights}: left float"})
                continue
            layers[n] = m
        if self.retrain != "none" and ctx.train is None:
            raise ConfigError(f"astc.retrain {self.retrain} needs a train(model, steps) function or bundled data")
        shapes = input_shapes(new, ctx.example_input)
        fixed = {n: fp for n, fp in overrides.items() if n in layers}
        free = {n: m for n, m in layers.items() if n not in fixed}
        budgeted = (self.bits_per_weight is not None or self.max_drop is not None) and free
        compensating = self.compensate == "hessian" or (self.compensate == "auto" and ctx.calib is not None)
        batches = (calibration_inputs(ctx.calib, self.calib_samples, "astc footprint choice and compensation")
                   if budgeted or compensating else [])
        grams = self._grams(new, layers, batches) if compensating else {}
        encode, place = self._encoder(layers, shapes, torch.get_num_threads(),
                                      self.layer_setting(candidates, "layout"), grams)
        details: dict = {}
        if budgeted:
            chosen, details["choice"] = self._choose(new, free, encode, place, shapes, grams, ctx, batches, show)
        else:
            chosen = dict.fromkeys(free, (codec.parse_footprint(self.footprint), self.channels))
        chosen.update(fixed)
        for n, fp in chosen.items():
            if fp is None:
                skipped.append({"layer": n, "reason": "left float by the plan or the budget"})
        plan = {n: fp for n, fp in chosen.items() if fp is not None}
        if self.retrain == "interleaved":
            records = self._interleaved(new, layers, plan, shapes, place, ctx, batches if compensating else [], show)
        elif self.retrain == "blocks":
            from nnshrink.techniques.astc.blocks import retrain_blocks

            records = retrain_blocks(new, {n: layers[n] for n in plan}, plan, lambda n, fp: encode(n, fp)[0],
                                     ctx, self.steps, show)
        else:
            records = {}
            with progress_bar("astc: encoding", len(plan), show) as adv:
                for n, fp in plan.items():
                    records[n] = attach(layers[n], encode(n, fp)[0])
                    adv(1)
        # why a layer's layout is not the one asked for: from the layout rule alone (encoding again
        # after re-training, as reading it off encode() did, cost a full astcenc pass per layer)
        layouts = {n: make_layout(place(n)[0], tuple(layers[n].weight.shape), fp[0], shapes.get(n), fp[1])[1]
                   for n, fp in plan.items()}
        per_layer = {}
        for n, r in records.items():
            count = int(np.prod(r.shape))
            entry = {"footprint": codec.footprint_name(r.footprint), "channels": r.layout.channels,
                     "layout": r.layout.kind, "output_order": "chain" if r.layout.order else "own",
                     "texture": [r.layout.width, r.layout.height], "blocks": int(r.blocks.shape[0]),
                     "bytes": record_bytes(r), "bits_per_weight": round(record_bytes(r) * 8 / count, 4),
                     "origin": r.origin, "compensated": bool(r._cache.get("compensated", False))}
            if layouts.get(n):
                entry["layout_note"] = layouts[n]
            if r.origin == "trained":
                entry["block_mode"] = r._cache.get("mode")
                entry["trained_max_diff"] = r._cache.get("trained_max_diff")
            per_layer[n] = entry
        # over the layers the step decided on: encoded ones at their stored bytes, those it left
        # float (by an override or the budget) at 4 bytes a weight, as the budget counts them
        handled = {n: layers[n].weight.numel() for n in chosen}
        stored = sum(record_bytes(records[n]) if n in records else 4 * handled[n] for n in handled)
        details.update({"layers": per_layer, "retrain": self.retrain,
                        "bits_per_weight": round(stored * 8 / max(1, sum(handled.values())), 4),
                        "seconds": round(time.perf_counter() - t0, 2),
                        "val_after": ctx.evaluate(new) if ctx.evaluate else None})
        return StepResult(self.kind, new.eval(), details, skipped)

    def _interleaved(self, model, layers, plan, shapes, place, ctx, batches, show) -> dict[str, AstcRecord]:
        """Re-training A: encode the largest layer, fine-tune the rest, encode the next, ... (with
        compensation on, each layer's Gram is measured on the model as re-training left it)."""
        order = sorted(plan, key=lambda n: -layers[n].weight.numel())
        threads = torch.get_num_threads()
        records: dict[str, AstcRecord] = {}

        def encode_now(n):
            w = layers[n].weight.detach().cpu().numpy()
            kind, outputs = place(n)  # the placement chosen on the weights before re-training
            gram = self._grams(model, {n: layers[n]}, batches).get(n)
            records[n] = attach(layers[n], encode_weight(w, plan[n][0], kind, shapes.get(n), self.range,
                                                         self.quality, threads, n, plan[n][1], outputs, gram)[0])
            layers[n].weight.requires_grad_(False)

        with progress_bar("astc: interleaved re-training", len(order) * self.rounds, show) as adv:
            for r in range(self.rounds):
                if r:
                    for n in order:
                        layers[n].weight.requires_grad_(True)
                    model = ctx.train(model, self.steps) or model
                for n in order:
                    encode_now(n)
                    model.train()
                    model = ctx.train(model, self.steps) or model  # the rest (and every bias) make up for it
                    model.eval()
                    adv(1)
        for n in order:
            layers[n].weight.requires_grad_(True)
            if record_of(layers[n]) is None:  # pragma: no cover - frozen weights cannot drift
                raise RuntimeError(f"astc: layer {n}'s weights changed after encoding")
        return records


_GRAM: dict = {}  # unit -> its Gram on the measured inputs, for one model and inputs (held_memo)


def _footprint_loss(model: nn.Module, x: torch.Tensor, reference, unit: str, level: int, *,
                    setup: dict) -> list[float]:
    """``[output error, stored bytes]`` with layer ``unit`` alone encoded at candidate ``level``
    (an index into ``setup["candidates"]``), in the layout, output order and compensation the
    step chose (the Gram from ``x`` split into the step's calibration batches, as the step
    measures it). The engine's measurement for the footprint budget; the encoding stays in
    :func:`encode_weight`'s memory, so in the step's own process the final encoding is free."""
    fp, channels = parse_option(setup["candidates"][level])
    rule = setup["layers"][unit]
    layer = model.get_submodule(unit)
    original = layer.weight.detach().clone()
    gram = None
    if rule["compensate"]:
        gram = held_memo(_GRAM, unit, (model, x), lambda: Gram(layer_hessians(
            model, {unit: layer}, torch.split(x, setup["batches"]))[unit]))
    order = None if rule["order"] is None else np.asarray(rule["order"])
    input_hw = None if rule["input_hw"] is None else tuple(rule["input_hw"])
    record, _ = encode_weight(original.cpu().numpy(), fp, rule["layout"], input_hw, setup["range"],
                              setup["quality"], torch.get_num_threads(), unit, channels, order, gram)
    try:
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(record.dequantize()))
            return [output_loss(reference, model(x)), float(record_bytes(record))]
    finally:
        with torch.no_grad():
            layer.weight.copy_(original)
