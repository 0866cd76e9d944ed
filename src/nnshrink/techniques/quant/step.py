"""The ``quantize`` plan step: W8A8 (or lower) PTQ with the best defaults, and QAT on request."""

from __future__ import annotations

import copy
import dataclasses
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from nnshrink.errors import ConfigError, UnsupportedModelError
from nnshrink.plan.config import SKIP, StepConfig, StepResult, glob_escape, pairs
from nnshrink.techniques.quant.ptq import (adaround, bias_correction, build_sim, calibrate, calibration_batches,
                                           set_weight_quantizers,
                                           cle_pairs, equalize, finish_qat, float_copy, init_weight_quantizers, prepare_qat)
from nnshrink.techniques.quant.graph import float_ops, float_summary, key
from nnshrink.techniques.quant.mixed import FLOAT_BITS, choose_bits
from nnshrink.techniques.quant.quantizers import ESTIMATORS
from nnshrink.techniques.quant.sensitivity import quant_sensitivity
from nnshrink.techniques.quant.sensitivity import sqnr as _sqnr
from nnshrink.techniques.quant.sim import TARGETS, X86_WEIGHT_BITS


@dataclass(frozen=True)
class Quantize(StepConfig):
    """Quantize weights and activations to integers for an integer NPU.

    Batch norms are folded, then (each switchable): cross-layer equalization, weight quantizers
    (per output channel, symmetric), activation calibration on ``calib_samples`` inputs,
    AdaRound, empirical bias correction, and ``qat_steps`` of quantization-aware training with
    learned step sizes (LSQ) or a plain straight-through estimator.

    Whether CLE and bias correction help depends on the model (measured: bias correction adds
    6 dB of output SQNR on ResNet-8 and costs 0.6 dB on the MobileNet; CLE matters for
    per-tensor weights). Left unset, each is chosen the way AIMET's AutoQuant chooses: every
    combination is run and the one whose output is closest to the float model's (SQNR) on 64
    held-out calibration inputs is kept; the choice is in the step's details.

    Attributes:
        weight_bits: 2 to 8.
        act_bits: 8 or 16.
        per_channel: Per-output-channel weight scales (else one per tensor).
        weight_symmetric: Symmetric weight grids (zero point 0), as integer kernels want.
        act_symmetric: Symmetric activation grids (default asymmetric: ReLU outputs use all 256 levels).
        act_estimator: Activation range estimator: ``mse`` (default), ``percentile`` or ``minmax``.
        percentile: Percentile for the ``percentile`` estimator.
        weight_estimator: ``minmax`` or ``mse``; default: ``mse`` below 8 bits, else ``minmax``.
        calib_samples: Calibration inputs used at most.
        cle: Cross-layer equalization. Default (None): chosen automatically for per-tensor or
            sub-8-bit weights (off for per-channel 8-bit, where per-channel scales absorb what
            it evens out), see below.
        bias_correction: Empirical bias correction. Default (None): chosen automatically.
        adaround: Learned rounding; default: on below 8 bits.
        adaround_iterations: Optimisation steps per layer.
        qat_steps: Quantization-aware training steps after PTQ (0: none).
        lsq: Learn the quantizers' step sizes during QAT (else fixed, straight-through only).
        layers: Per-layer rules on the quantized layers (first matching pattern wins): ``skip``
            keeps a layer's weights float (its inputs and outputs stay 8-bit); ``{"bits": 4}``
            gives its weights their own width (``32``: float, as ``skip``, while its other
            settings hold); ``{"act_bits": 16}`` its output (a layer whose
            8-bit output loses too much, a regression head or the input of a softmax; its readers
            take it at 16 bits, ONNX Runtime runs it as ``DQ -> float -> Q``). Version-1 plans' ``keep_float`` and ``layer_bits``
            are read into it.
        mixed_bits: Weight bits to choose from per layer (``[4, 8]``; ``32`` is float), chosen for
            the budget (``min_sqnr_db`` or ``max_drop``) from each layer's measured sensitivity
            (:mod:`.mixed`); empty (default): ``weight_bits`` and the ``layers`` rules as given. The
            choice, its measured SQNR and the full evaluations it took are in the details.
        mixed_act_bits: ``[8, 16]``: with ``mixed_bits``, each layer's output width is chosen
            in the same search (bytes of weights and of activations one currency), except where
            a ``layers`` rule sets its ``act_bits``.
        min_sqnr_db: Fidelity budget for ``mixed_bits``: output SQNR (dB) against the float model
            on held-out calibration inputs.
        max_drop: Accuracy budget for ``mixed_bits``: the largest relative drop of the plan's
            metric (needs an evaluation function) from the float model's.
        strict: Refuse a model with any op the target has no integer kernel for (an NPU with no
            CPU fallback), naming them grouped by op type, before any calibration. Default: such
            ops stay float between the integer islands (``DQ`` -> float -> ``Q``), listed in the
            step's ``float_ops``.
        sensitivity: Also measure, on the plan's metric, each layer quantized alone and each
            kept float alone (two evaluations a layer), into the details' ``quant_sensitivity``
            (the report's per-layer quantization chart; ``nnshrink quant-sensitivity`` alone).
        target: Where the integer model runs. ONNX Runtime's fast u8 x s8 kernels saturate on
            x86 CPUs without VNNI when weights exceed +-64 (see docs/ARCHITECTURE.md), so:
            ``ort-x86`` (default): ONNX Runtime on any x86 CPU, the same integers on every one,
            with weights of at most 7 bits (as its ``reduce_range``) in its fast kernels;
            ``ort-x86-u8``: the same with full 8-bit weights, written as uint8 (zero point 128)
            for its exact but slower u8 x u8 kernels; ``npu``: integer NPUs and TFLite
            (Ethos-U, DRP-AI): full-range int8 weights, which ONNX Runtime runs exactly only on
            CPUs with VNNI or with its session option ``session.x64quantprecision`` set to 1.
    """

    kind = "quantize"
    weight_bits: int = 8
    act_bits: int = 8
    per_channel: bool = True
    weight_symmetric: bool = True
    act_symmetric: bool = False
    act_estimator: str = "mse"
    percentile: float = 99.99
    weight_estimator: str | None = None
    calib_samples: int = 256
    cle: bool | None = None
    bias_correction: bool | None = None
    adaround: bool | None = None
    adaround_iterations: int = 500
    qat_steps: int = 0
    lsq: bool = True
    target: str = "ort-x86"
    strict: bool = False
    mixed_bits: tuple[int, ...] = ()
    mixed_act_bits: tuple[int, ...] = ()
    min_sqnr_db: float | None = None
    max_drop: float | None = None
    sensitivity: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.target not in TARGETS:
            raise ConfigError(f"quantize.target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if not 2 <= self.weight_bits <= 8:
            raise ConfigError(f"quantize.weight_bits must be from 2 to 8, got {self.weight_bits}")
        if self.act_bits not in (8, 16):
            raise ConfigError(f"quantize.act_bits must be 8 or 16, got {self.act_bits}")
        if self.act_estimator not in ESTIMATORS:
            raise ConfigError(f"quantize.act_estimator must be one of {', '.join(ESTIMATORS)}, got {self.act_estimator!r}")
        if self.weight_estimator not in (None, "minmax", "mse"):
            raise ConfigError(f"quantize.weight_estimator must be minmax or mse, got {self.weight_estimator!r}")
        if not 50 < self.percentile <= 100:
            raise ConfigError(f"quantize.percentile must be in (50, 100], got {self.percentile}")
        if self.calib_samples < 1 or self.adaround_iterations < 1 or self.qat_steps < 0:
            raise ConfigError("quantize.calib_samples and adaround_iterations must be positive, qat_steps >= 0")

        bad = [b for b in self.mixed_bits if isinstance(b, bool) or not isinstance(b, int) or not (2 <= b <= 8 or b == 32)]
        if bad or (self.mixed_bits and len(set(self.mixed_bits)) < 2):
            raise ConfigError(f"quantize.mixed_bits lists two or more weight bits from 2 to 8 (32: float), "
                              f"got {list(self.mixed_bits)}")
        if self.mixed_act_bits and (sorted(self.mixed_act_bits) != [8, 16] or not self.mixed_bits):
            raise ConfigError(f"quantize.mixed_act_bits is [8, 16] (each layer's output at 8 or 16 bits), beside "
                              f"mixed_bits; got {list(self.mixed_act_bits)}" + ("" if self.mixed_bits else " without mixed_bits"))
        if self.mixed_bits and (self.min_sqnr_db is None) == (self.max_drop is None):
            raise ConfigError("quantize.mixed_bits needs one budget: min_sqnr_db or max_drop")
        if self.max_drop is not None and not 0 <= self.max_drop < 1:
            raise ConfigError(f"quantize.max_drop is a relative drop in [0, 1), got {self.max_drop}")

    def __hash__(self) -> int:
        return hash((self.kind, self.weight_bits, self.act_bits, self.qat_steps, self.target))

    @property
    def use_adaround(self) -> bool:
        if self.adaround is not None:
            return self.adaround
        return self.weight_bits < 8 or any(isinstance(r, dict) and r.get("bits", 8) < 8 for r in self.layers.values())

    def build(self, model: nn.Module, example_input):
        est = self.weight_estimator or ("mse" if self.weight_bits < 8 else "minmax")
        sim = build_sim(model, example_input, self.weight_bits, self.act_bits, self.per_channel,
                        self.weight_symmetric, self.act_symmetric, self.act_estimator, est, target=self.target)
        if self.layers:  # the rules name the lowered layers, known only now
            names = [op.name for op in sim.layer_ops()]
            bits = self.layer_setting(names, "bits", "quantized layer")
            floats = self.skipped_layers(names, "quantized layer") + [n for n, b in bits.items() if b == FLOAT_BITS]
            set_weight_quantizers(sim, self.weight_bits, self.per_channel, self.weight_symmetric, est,
                                  {n: b for n, b in bits.items() if b != FLOAT_BITS}, floats)
            sim.set_act_bits(self.layer_setting(names, "act_bits", "quantized layer"))
        return sim

    layer_settings = {"bits": lambda v: None if isinstance(v, int) and not isinstance(v, bool)
                      and (2 <= v <= 8 or v == FLOAT_BITS) else "a whole number from 2 to 8, or 32 (float)",
                      "act_bits": lambda v: None if v in (8, 16) and not isinstance(v, bool) else "8 or 16"}
    legacy = {"keep_float": lambda v: dict.fromkeys(v, SKIP),
              "layer_bits": lambda v: {n: {"bits": b} for n, b in pairs(v, int).items()}}

    def _ptq(self, model: nn.Module, ctx, batches, cle: bool, bias_corr: bool, use_adaround: bool,
             show_progress: bool) -> tuple[nn.Module, dict]:
        sim, reference, details = self._calibrated(model, ctx, batches, cle, use_adaround, show_progress)
        details["bias_correction"] = bias_corr
        if bias_corr:
            details["bias_shift"] = bias_correction(sim, reference, _bc_batches(batches), show_progress)
        return sim, details

    def _calibrated(self, model: nn.Module, ctx, batches, cle: bool, use_adaround: bool,
                    show_progress: bool, sim=None) -> tuple[nn.Module, nn.Module, dict]:
        """The sim up to (not including) bias correction, and the float reference it needs
        (``sim``: a freshly built one to use)."""
        sim = sim if sim is not None else self.build(model, ctx.example_input)
        for q in sim.aq.values():
            q.percentile = self.percentile
        details: dict = {"cle": cle, "bias_correction": False, "adaround": use_adaround}
        if cle:
            details["cle_pairs"] = [list(p) for p in equalize(sim, batches)]
        init_weight_quantizers(sim)
        reference = float_copy(sim)  # the (equalized) float model, for AdaRound and bias correction
        calibrate(sim, batches, show_progress)
        if use_adaround:
            details["adaround_changed"] = adaround(sim, reference, batches, self.adaround_iterations,
                                                   show_progress=show_progress)
        return sim, reference, details

    def _candidates(self, model: nn.Module, ctx, batches, options, held: torch.Tensor, ref: torch.Tensor,
                    show_progress: bool, probe=None) -> tuple[dict, dict]:
        """Every ``(cle, bias_correction)`` option run and scored by output SQNR on ``held``.
        Bias correction only adds to a calibrated sim, so the corrected candidate is a corrected
        copy of the uncorrected one: one calibration per CLE setting, and the same models as
        running each option from scratch (tested)."""
        scored, runs = {}, {}
        fresh = probe
        for cle in dict.fromkeys(c for c, _ in options):
            sim, reference, details = self._calibrated(model, ctx, batches, cle, False, show_progress, fresh)
            fresh = None
            for bc in [b for c, b in options if c == cle]:
                if bc:
                    run = copy.deepcopy(sim) if (cle, False) in options else sim
                    more = {**details, "bias_correction": True,
                            "bias_shift": bias_correction(run, reference, _bc_batches(batches), show_progress)}
                else:
                    run, more = sim, details
                runs[(cle, bc)] = (run, more)
                with torch.no_grad():
                    scored[(cle, bc)] = _sqnr(ref, run(held))
        return scored, runs

    def apply(self, model: nn.Module, ctx, show_progress: bool = True) -> StepResult:
        t0 = time.perf_counter()
        details: dict = {"weight_bits": self.weight_bits, "act_bits": self.act_bits, "target": self.target}
        probe = self.build(model, ctx.example_input)  # lowering refuses before any calibration
        left_float = float_ops(probe.ops)
        if self.strict and left_float:
            raise UnsupportedModelError(f"strict quantization for target {self.target}: ops without an integer "
                                        f"kernel: {float_summary(probe.ops)}")
        details["float_ops"] = left_float
        if self.mixed_bits:
            return self._mixed(model, ctx, probe, details, show_progress)
        auto = self.cle is None or self.bias_correction is None
        batches = calibration_batches(ctx.calib, self.calib_samples + (_SELECT if auto else 0))
        if auto:  # hold out the last inputs to choose CLE / bias correction on
            flat = torch.cat(batches)
            if len(flat) > _SELECT * 2:
                held, flat = flat[-_SELECT:], flat[:-_SELECT]
            else:
                held = flat
            batches = list(flat.split(64))
        details["calib_samples"] = sum(len(b) for b in batches)
        if auto:
            with torch.no_grad():
                ref = model.eval()(held)
            # CLE evens out per-channel weight ranges, which per-channel scales already absorb at 8
            # bits (measured: it matters for per-tensor and 6-bit weights); left unset it is tried
            # there only, and only where a conv -> ReLU -> conv pair exists
            cle_options = (True, False) if self.cle is None and (not self.per_channel or self.weight_bits < 8) \
                else (self.cle,) if self.cle is not None else (False,)
            options = [(c, b) for c in cle_options
                       for b in ((True, False) if self.bias_correction is None else (self.bias_correction,))]
            if self.cle is None and not cle_pairs(probe):  # equalization would change nothing
                options = [(c, b) for c, b in options if not c]
                details["cle_pairs"] = []
            scored, runs = self._candidates(model, ctx, batches, options, held, ref, show_progress, probe)
            cle, bc = max(options, key=lambda o: scored[o])
            details["selection_sqnr_db"] = {f"cle={c},bias_correction={b}": round(v, 2) for (c, b), v in scored.items()}
        else:
            cle, bc, runs = self.cle, self.bias_correction, {}
        if (cle, bc) in runs and not self.use_adaround:  # the chosen run is the result
            sim, more = runs[(cle, bc)]
        else:
            sim, more = self._ptq(model, ctx, batches, cle, bc, self.use_adaround, show_progress)
        details.update(more)
        if ctx.evaluate is not None:
            details["val_ptq"] = ctx.evaluate(sim)
        if self.qat_steps:
            if ctx.train is None:
                raise ConfigError("quantize.qat_steps needs a train(model, steps) function or bundled data")
            prepare_qat(sim, self.lsq)
            sim = ctx.train(sim, self.qat_steps) or sim
            finish_qat(sim)
            if ctx.evaluate is not None:
                details["val_qat"] = ctx.evaluate(sim)
        if self.sensitivity:
            if ctx.evaluate is None:
                raise ConfigError("quantize.sensitivity needs an evaluation function (--eval, or bundled data)")
            details["quant_sensitivity"] = quant_sensitivity(sim, ctx.evaluate, torch.cat(batches)[:256],
                                                             show_progress).to_dict()
        if sim.act_bits_of():
            details["act_bits_per_layer"] = sim.act_bits_of()
        details["seconds"] = round(time.perf_counter() - t0, 2)
        skipped = [{"layer": n, "reason": "kept in float by the plan"} for n in sorted(sim.float_layers)]
        skipped += [{"layer": f"{g['op_type']} x{g['count']}", "reason": g["reason"]} for g in left_float]
        return StepResult(self.kind, sim.eval(), details, skipped)


    def _mixed(self, model: nn.Module, ctx, sim, details: dict, show_progress: bool) -> StepResult:
        """Choose per-layer weight bits for the budget, then quantize with that choice."""
        t0 = time.perf_counter()
        batches = calibration_batches(ctx.calib, self.calib_samples + _SELECT)
        flat = torch.cat(batches)
        held, flat = (flat[-_SELECT:], flat[:-_SELECT]) if len(flat) > 2 * _SELECT else (flat, flat)
        for q in sim.aq.values():
            q.percentile = self.percentile
        init_weight_quantizers(sim)
        fixed = sim.act_bits_of()  # widths the plan's rules set are not searched
        calibrate(sim, list(flat.split(64)), show_progress, keep_samples=bool(self.mixed_act_bits))
        twins = None
        if self.mixed_act_bits:
            twins = {}
            for op in sim.layer_ops():
                q = sim.aq[key(op.name)] if key(op.name) in sim.aq else None
                if q is not None and q.fixed is None and op.name not in fixed:
                    twins[op.name] = {q.bits: q, 24 - q.bits: q.at_bits(24 - q.bits)}
            for q in sim.aq.values():
                q.forget()
        floor = None
        if self.max_drop is not None:
            if ctx.evaluate is None:
                raise ConfigError("quantize.max_drop needs an evaluation function (--eval, or bundled data)")
            reference = ctx.evaluate(model)
            floor = reference - abs(reference) * self.max_drop
        cap = X86_WEIGHT_BITS if self.target == "ort-x86" else 8

        def bits_of(b: int) -> int:
            return b if b >= FLOAT_BITS else min(b, cap)

        choice = choose_bits(sim, held, list(self.mixed_bits), bits_of, self.min_sqnr_db, floor,
                             ctx.evaluate, show_progress, twins)
        choice["seconds"] = round(time.perf_counter() - t0, 2)
        chosen = choice["bits"]
        kept = set(sim.float_layers) | {n for n, b in chosen.items() if b >= FLOAT_BITS}
        acts = {**fixed, **{n: b for n, b in choice.get("act_bits", {}).items() if b != self.act_bits}}
        rules = {glob_escape(n): {"bits": FLOAT_BITS if n in kept else chosen[n], **({"act_bits": acts[n]} if n in acts else {})}
                 for n in sorted(kept | set(chosen))}
        final = dataclasses.replace(self, mixed_bits=(), mixed_act_bits=(), min_sqnr_db=None, max_drop=None,
                                    weight_bits=max(b for b in self.mixed_bits if b < FLOAT_BITS), layers=rules)
        result = final.apply(model, ctx, show_progress)
        result.details["mixed_precision"] = choice
        return result


_SELECT = 64  # held-out calibration inputs on which the automatic choice is scored
_BIAS_SAMPLES = 128  # calibration inputs bias correction measures channel means on


def _bc_batches(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The first ``_BIAS_SAMPLES`` calibration inputs: per-channel means settle long before 256."""
    out, n = [], 0
    for b in batches:
        if n >= _BIAS_SAMPLES:
            break
        out.append(b[: _BIAS_SAMPLES - n])
        n += len(out[-1])
    return out
