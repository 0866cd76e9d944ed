"""Quantization for integer NPUs: quantizers, the simulated model, PTQ, QAT, sensitivity and an
integer-only reference executor.

Modules: ``quantizers`` (grids, range estimators, fake quantization with STE/LSQ), ``sim`` (the
op list an integer NPU runs and :class:`QuantSim`), ``ptq`` (calibration, CLE, bias correction,
AdaRound, QAT preparation), ``step`` (the ``quantize`` plan step), ``sensitivity`` (per-layer
accuracy drops), ``reference`` (numpy integer-only execution with fixed-point requantization).
"""

from nnshrink.techniques.quant.ptq import (adaround, bias_correction, build_sim, calibrate, equalize,
                                           init_weight_quantizers)
from nnshrink.techniques.quant.quantizers import ActQuantizer, WeightQuantizer, fake_quantize, int_range
from nnshrink.techniques.quant.graph import Op, QuantGraph, freeze, lower
from nnshrink.techniques.quant.sim import QuantSim
from nnshrink.techniques.quant.step import Quantize

__all__ = ["ActQuantizer", "Op", "QuantGraph", "QuantSim", "Quantize", "WeightQuantizer", "adaround", "bias_correction",
           "build_sim", "calibrate", "equalize", "fake_quantize", "freeze", "init_weight_quantizers", "int_range", "lower"]
