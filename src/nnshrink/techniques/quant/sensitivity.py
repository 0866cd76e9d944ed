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

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from nnshrink.progress import progress_bar
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


@torch.no_grad()
def quant_sensitivity(sim: QuantSim, evaluate: Callable[[QuantSim], float], x: torch.Tensor | None = None,
                      show_progress: bool = True) -> QuantSensitivity:
    """Measure every layer of a calibrated :class:`QuantSim`; the sim is left fully quantized.

    ``x``: inputs on which output SQNRs are measured (none: no SQNR).
    """
    layers = [op.name for op in sim.layer_ops() if op.name not in sim.float_layers]
    only, all_but, sqnr = {}, {}, {}
    sim.eval()
    try:
        sim.enable_only(set())
        float_acc = evaluate(sim)
        ref = sim(x) if x is not None else None
        sim.enable_only(None)
        quant_acc = evaluate(sim)
        sqnr_all = _sqnr(ref, sim(x)) if x is not None else None
        with progress_bar("quantization sensitivity", 2 * len(layers), show_progress) as advance:
            for name in layers:
                sim.enable_only({name})
                sim.aq["input"].enabled = True
                only[name] = evaluate(sim)
                if x is not None:
                    sqnr[name] = _sqnr(ref, sim(x))
                advance(1)
                sim.enable_only(None)
                for q in sim.quantizers_of(name):
                    if q is not None:
                        q.enabled = False
                all_but[name] = evaluate(sim)
                advance(1)
    finally:
        sim.enable_only(None)
    return QuantSensitivity(float_acc, quant_acc, only, all_but, sqnr, sqnr_all)
