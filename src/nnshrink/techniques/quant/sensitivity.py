"""Which layer is to blame: accuracy with one layer quantized alone, and with all but one.

Quantizing a layer here means its weights and its output activations (the quantizers an NPU
would apply for it); the model input's quantizer counts with every layer. "Only this layer"
shows the damage a layer does on its own; "all but this layer" shows how much the whole model
recovers when that layer stays at higher precision: the layer to ``skip`` in the quantize step's ``layers`` rules or to
give more ``bits`` there. On a small validation set accuracies move in steps of one
image, so each "only this layer" is also scored by the signal-to-quantization-noise ratio of the
model's output (SQNR, dB, against the float output on a batch of inputs), which ranks layers
finely where accuracies tie.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nnshrink.search.engine import measure_curves
from nnshrink.techniques.quant.sim import QuantSim


@dataclass(frozen=True)
class QuantSensitivity:
    """Validation accuracies of a quantized model with layers switched on and off.

    Attributes:
        float_accuracy: Every quantizer off.
        quantized_accuracy: Every quantizer on.
        only: layer -> accuracy with only that layer (and the input) quantized.
        all_but: layer -> accuracy with every layer but that one quantized.
        sqnr_only: layer -> output SQNR (dB) with only that layer quantized.
        sqnr_all: output SQNR (dB) with every quantizer on.
    """

    float_accuracy: float
    quantized_accuracy: float
    only: dict[str, float]
    all_but: dict[str, float]
    sqnr_only: dict[str, float] = field(default_factory=dict)
    sqnr_all: float | None = None

    def to_dict(self) -> dict:
        return {"schema": "nnshrink.quant_sensitivity/1", "float_accuracy": self.float_accuracy,
                "quantized_accuracy": self.quantized_accuracy, "sqnr_db": self.sqnr_all,
                "layers": [{"layer": n, "only_this_quantized": self.only[n],
                            "all_but_this_quantized": self.all_but[n],
                            "only_this_sqnr_db": self.sqnr_only.get(n)} for n in self.only]}

    def worst(self, k: int = 3) -> list[str]:
        """The ``k`` most sensitive layers: most accuracy recovered when kept in float, then
        lowest output SQNR when quantized alone."""
        def key(n):
            return (-(self.all_but[n] - self.quantized_accuracy), self.sqnr_only.get(n, 0.0))

        return sorted(self.all_but, key=key)[:k]


def flat_outputs(y) -> torch.Tensor:
    """A model's output(s) as one vector (a two-headed model's heads together)."""
    if isinstance(y, torch.Tensor):
        return y.reshape(-1).float()
    if isinstance(y, dict):
        y = list(y.values())
    return torch.cat([flat_outputs(v) for v in y if isinstance(v, (torch.Tensor, tuple, list, dict))])


def sqnr(ref, got) -> float:
    """Signal-to-quantization-noise ratio (dB) of ``got`` against ``ref`` over all outputs."""
    ref, got = flat_outputs(ref), flat_outputs(got)
    noise = float((got - ref).pow(2).mean())
    return float("inf") if noise == 0 else 10 * math.log10(float(ref.pow(2).mean()) / noise)


_sqnr = sqnr


_ONLY, _ALL_BUT = 0, 1  # a layer's two measurements: only it quantized, every layer but it


def _switched(sim: QuantSim, x, reference, unit: str, level: int, evaluate: Callable[[QuantSim], float],
              float_reference) -> list[float]:
    """[metric, output SQNR] with only layer ``unit`` (and the input) quantized (``_ONLY``; the
    SQNR against ``float_reference`` on ``x``, NaN without inputs), or [metric, NaN] with every
    layer but it (``_ALL_BUT``). The engine's ``reference`` is None (it is not computed: neither
    compares with it). The sim is left fully quantized."""
    try:
        if level == _ONLY:
            sim.enable_only({unit})
            sim.aq["input"].enabled = True
        else:
            sim.enable_only(None)
            for q in sim.quantizers_of(unit):
                if q is not None:
                    q.enabled = False
        with torch.no_grad():
            score = _sqnr(float_reference, sim(x)) if x is not None and level == _ONLY else math.nan
            return [evaluate(sim), score]
    finally:
        sim.enable_only(None)


@torch.no_grad()
def quant_sensitivity(sim: QuantSim, evaluate: Callable[[QuantSim], float], x: torch.Tensor | None = None,
                      show_progress: bool = True) -> QuantSensitivity:
    """Measure every layer of a calibrated :class:`QuantSim`; the sim is left fully quantized.

    ``x``: inputs on which output SQNRs are measured (none: no SQNR). Each layer is switched
    on alone and off alone on the decision engine (:func:`nnshrink.search.engine.measure_curves`),
    serially and uncached: the metric is the user's, over data the cache cannot hash, and the
    quantizers are the sim's own, calibrated once.
    """
    layers = [op.name for op in sim.layer_ops() if op.name not in sim.float_layers]
    sim.eval()
    try:
        sim.enable_only(set())
        float_acc = evaluate(sim)
        sim.enable_only(None)
        quant_acc = evaluate(sim)
        # the SQNRs are against the float output, so the measurements get that one (the
        # engine's own reference, the sim's output as it is, is not computed)
        ref = None
        if x is not None:
            sim.enable_only(set())
            ref = sim(x)
            sim.enable_only(None)
        sqnr_all = _sqnr(ref, sim(x)) if x is not None else None
        fn = functools.partial(_switched, evaluate=evaluate, float_reference=ref)
        got = measure_curves(sim, x, [(n, level) for n in layers for level in (_ONLY, _ALL_BUT)], fn, None, "serial",
                             show_progress=show_progress, cache=False, reference=False,
                             description="quantization sensitivity")
    finally:
        sim.enable_only(None)
    only = {n: got[(n, _ONLY)][0] for n in layers}
    all_but = {n: got[(n, _ALL_BUT)][0] for n in layers}
    sqnr = {n: got[(n, _ONLY)][1] for n in layers} if x is not None else {}
    return QuantSensitivity(float_acc, quant_acc, only, all_but, sqnr, sqnr_all)

