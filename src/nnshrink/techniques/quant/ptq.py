"""Post-training quantization: calibration, cross-layer equalization, bias correction, AdaRound.

- Cross-layer equalization (Nagel et al., 2019, "Data-Free Quantization"): for a conv followed by
  a ReLU and one consumer conv, scale output channel ``i`` of the first by ``1/s_i`` and input
  channel ``i`` of the second by ``s_i`` with ``s_i = sqrt(r1_i / r2_i)``, so both layers' per-
  channel ranges become equal (``r1``: weight range of output channel ``i`` of the first layer,
  ``r2``: of input channel ``i`` of the second). ReLU is positively homogeneous, so the float
  model is unchanged; ReLU6 is not, and is replaced by ReLU in an equalized pair, as AIMET does
  (reported, since it changes the float model slightly).
- Empirical bias correction (same paper, section 4.2): layer by layer, the mean of each output
  channel (before the activation) of the quantized model is made equal to the float model's on
  the calibration data.
- AdaRound (Nagel et al., 2020): each weight rounds up or down as learned, layer by layer, to
  reconstruct the float layer's output from the quantized model's input, with a rectified
  sigmoid and an annealed regulariser that drives every rounding to 0 or 1.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from nnshrink.errors import ConfigError
from nnshrink.graph import signature
from nnshrink.progress import progress_bar
from nnshrink.techniques.calibration import calibration_inputs
from nnshrink.techniques.quant.quantizers import WeightQuantizer
from nnshrink.techniques.quant.graph import Op, lower
from nnshrink.techniques.quant.sim import TARGETS, X86_WEIGHT_BITS, QuantSim, _key


def build_sim(model: nn.Module, example_input: torch.Tensor, weight_bits: int = 8, act_bits: int = 8,
              per_channel: bool = True, weight_symmetric: bool = True, act_symmetric: bool = False,
              act_estimator: str = "mse", weight_estimator: str = "minmax",
              layer_bits: dict[str, int] | None = None, keep_float: Iterable[str] = (),
              target: str = "ort-x86") -> QuantSim:
    """Lower ``model`` to a :class:`QuantSim` with uncalibrated quantizers (float weights kept).

    ``target`` is :class:`~nnshrink.techniques.quant.step.Quantize`'s: ``ort-x86`` caps every
    layer's weights at 7 bits."""
    if target not in TARGETS:
        raise ConfigError(f"quantize target must be one of {', '.join(TARGETS)}, got {target!r}")
    lowered = lower(model, example_input, target)
    sim = QuantSim(lowered, getattr(model, "input_shape", tuple(example_input.shape[1:])), example_input.shape,
                   act_bits, act_symmetric, act_estimator)
    sim.target = target
    if target == "npu" and act_bits == 8:
        # TFLite's int8 LOGISTIC and TANH kernels (and Vela's) take fixed output grids: [0, 1) on
        # 1/256 from -128, and (-1, 1) on 1/128 around 0
        for op in sim.ops:
            if op.integer and op.quant == "own" and op.op_type in ("Sigmoid", "Tanh"):
                aq = sim.aq[_key(op.name)]
                aq.fixed = (1.0 / 256, aq.qmin) if op.op_type == "Sigmoid" else (1.0 / 128, 0)
    signature.attach(sim, signature.get(model))  # the QDQ file keeps an imported model's interface
    set_weight_quantizers(sim, weight_bits, per_channel, weight_symmetric, weight_estimator, layer_bits, keep_float)
    return sim


def set_weight_quantizers(sim: QuantSim, weight_bits: int, per_channel: bool, weight_symmetric: bool,
                          weight_estimator: str, layer_bits: dict[str, int] | None = None,
                          keep_float: Iterable[str] = ()) -> None:
    """(Re)make every layer's weight quantizer: ``weight_bits``, or its own ``layer_bits``
    (capped at 7 for ``ort-x86``), and the layers of ``keep_float`` left float."""
    names = {op.name for op in sim.layer_ops()}
    layer_bits = dict(layer_bits or {})
    unknown = sorted((set(layer_bits) | set(keep_float)) - names)
    if unknown:
        raise ConfigError(f"no quantizable layer named {', '.join(map(repr, unknown))}; "
                          f"layers: {', '.join(sorted(names))}")
    for op in sim.layer_ops():
        bits = int(layer_bits.get(op.name, weight_bits))
        bits = min(bits, X86_WEIGHT_BITS) if sim.target == "ort-x86" else bits
        layer = sim.layer(op.name)
        # a transposed conv holds its output channels on axis 1; grouped, per tensor
        axis = 1 if op.kind == "convt" else 0
        channelwise = per_channel and (op.kind != "convt" or layer.groups == 1)
        sim.wq[_key(op.name)] = WeightQuantizer(bits, weight_symmetric, channelwise, weight_estimator, axis)
    sim.float_layers = set(keep_float)


def init_weight_quantizers(sim: QuantSim) -> None:
    for op in sim.layer_ops():
        sim.weight_quantizer(op.name).init_from(sim.layer(op.name).weight)


def calibration_batches(calib, samples: int) -> list[torch.Tensor]:
    """Up to ``samples`` inputs from ``calib`` (batches of inputs, or of ``(input, label)``)."""
    return calibration_inputs(calib, samples, "quantization")


@torch.no_grad()
def calibrate(sim: QuantSim, batches: list[torch.Tensor], show_progress: bool = True, keep_samples: bool = False) -> None:
    """Observe activations on ``batches`` (weights quantized) and set every activation range
    (keeping what was observed with ``keep_samples``, for twins of other widths)."""
    sim.eval()
    sim.set_observing(True)
    try:
        with progress_bar("calibrating", len(batches), show_progress) as advance:
            for x in batches:
                sim(x)
                advance(1)
    finally:
        sim.set_observing(False)
    for q in sim.aq.values():
        q.calibrate(forget=not keep_samples)


# -- cross-layer equalization ------------------------------------------------------------------
def _consumers(sim: QuantSim) -> dict[str, list[Op]]:
    users: dict[str, list[Op]] = {}
    for op in sim.ops:
        for i in op.inputs:
            users.setdefault(i, []).append(op)
    return users


def _preact_max(sim: QuantSim, names: list[str], batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-channel maximum of each named layer's output before its activation (float model)."""
    ref = float_copy(sim)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for x in batches:
            cap = dict.fromkeys(names)
            ref(x, capture=cap)
            for n, y in cap.items():
                m = y.transpose(0, 1).reshape(y.shape[1], -1).amax(dim=1)
                out[n] = m if n not in out else torch.maximum(out[n], m)
    return out


def _pairs(sim: QuantSim) -> list[tuple[Op, Op]]:
    """The conv -> ReLU/ReLU6 -> conv pairs cross-layer equalization applies to."""
    users = _consumers(sim)
    pairs = []
    for op in sim.layer_ops():
        if op.kind != "conv" or op.act not in ("relu", "relu6") or op.name in sim.float_layers:
            continue
        nxt = users.get(op.name, [])
        if len(nxt) != 1 or nxt[0].kind != "conv" or nxt[0].name in sim.float_layers:
            continue
        l1, l2 = sim.layer(op.name), sim.layer(nxt[0].name)
        if isinstance(l1, nn.Linear) or l1.groups != 1 and l1.groups != l1.out_channels:
            continue
        if not (l2.groups == 1 or l2.groups == l2.in_channels == l2.out_channels):
            continue
        pairs.append((op, nxt[0]))
    return pairs


def cle_pairs(sim: QuantSim) -> list[tuple[str, str]]:
    """The layer pairs :func:`equalize` would equalize (none: it would change nothing)."""
    return [(a.name, b.name) for a, b in _pairs(sim)]


def equalize(sim: QuantSim, batches: list[torch.Tensor] | None = None, iterations: int = 3) -> list[tuple[str, str]]:
    """Cross-layer equalization of every conv -> ReLU/ReLU6 -> conv pair (in place).

    A pair qualifies when the first layer's output feeds only the second, the second reads all
    of its channels (an ordinary or a depthwise conv), and neither is kept in float. Returns the
    pairs equalized.

    ReLU6 is not positively homogeneous. With ``batches`` (calibration inputs) it is kept: a
    channel whose activation reaches 6 on them is not scaled, and no channel is scaled so far
    that it would, so the clip never acts differently on that data. Without data, a pair's ReLU6
    becomes a ReLU, as AIMET does (which changes the float model where activations exceed 6).
    """
    pairs = _pairs(sim)
    relu6 = [op1.name for op1, _ in pairs if op1.act == "relu6"]
    peak = _preact_max(sim, relu6, batches) if batches is not None and relu6 else {}
    with torch.no_grad():
        for _ in range(iterations):
            for op1, op2 in pairs:
                l1, l2 = sim.layer(op1.name), sim.layer(op2.name)
                r1 = l1.weight.abs().reshape(l1.out_channels, -1).amax(dim=1)
                w2 = l2.weight
                if l2.groups == 1:
                    r2 = w2.abs().transpose(0, 1).reshape(w2.shape[1], -1).amax(dim=1)
                else:
                    r2 = w2.abs().reshape(w2.shape[0], -1).amax(dim=1)
                s = torch.sqrt(r1 / r2.clamp_min(1e-12))
                s = torch.where((r1 > 0) & (r2 > 0), s, torch.ones_like(s)).clamp(1e-4, 1e4)
                if op1.name in peak:  # keep ReLU6 exact: never let a channel reach the clip
                    m = peak[op1.name]
                    s = torch.where(m >= 6.0, torch.ones_like(s), torch.maximum(s, m / 6.0 * 1.0001))
                    peak[op1.name] = m / s
                l1.weight.div_(s.reshape(-1, *([1] * (l1.weight.dim() - 1))))
                if l1.bias is not None:
                    l1.bias.div_(s)
                if l2.groups == 1:
                    l2.weight.mul_(s.reshape(1, -1, *([1] * (w2.dim() - 2))))
                else:  # depthwise: input channel i is output channel i, which stays unchanged
                    l2.weight.mul_(s.reshape(-1, *([1] * (w2.dim() - 1))))
    if batches is None:
        for op1, _ in pairs:
            op1.act = "relu" if op1.act == "relu6" else op1.act
    return [(a.name, b.name) for a, b in pairs]


# -- bias correction --------------------------------------------------------------------------
def _channel_mean(y: torch.Tensor, axis: int = 1) -> torch.Tensor:
    return y.movedim(axis, 0).reshape(y.shape[axis], -1).mean(dim=1)


def _channel_axis(op: Op) -> int:
    return -1 if op.kind == "linear" else 1


@torch.no_grad()
def bias_correction(sim: QuantSim, reference: QuantSim, batches: list[torch.Tensor],
                    show_progress: bool = True) -> dict[str, float]:
    """Empirical bias correction, layer by layer in order; returns the largest shift per layer."""
    layer_ops = [op for op in sim.layer_ops() if op.name not in sim.float_layers]
    reference.enable_only(set())
    want = {op.name: 0.0 for op in layer_ops}
    for x in batches:
        cap = dict.fromkeys(want)
        reference(x, capture=cap)
        for k, v in cap.items():
            want[k] = want[k] + _channel_mean(v, _channel_axis(sim._index[k])) * len(x)
    n = sum(len(x) for x in batches)
    shifts = {}
    # One pass, op by op over every batch: a layer's correction changes only what comes after
    # it, so each layer is corrected when the pass reaches it and its output recomputed. The
    # same arithmetic as re-running the model up to each layer (bit for bit), in one pass
    # instead of one per layer; tensors are dropped after their last reader.
    last_read = {}
    for i, op in enumerate(sim.ops):
        for name in op.inputs:
            last_read[name] = i
    envs = [{"input": sim.aq["input"](x) if sim.input_quantized else x} for x in batches]
    with progress_bar("bias correction", len(layer_ops), show_progress) as advance:
        for i, op in enumerate(sim.ops):
            ys = [sim.run_op(op, [env[j] for j in op.inputs]) for env in envs]
            if op.name in want:  # a layer to correct
                got = 0.0
                for y, x in zip(ys, batches):
                    got = got + _channel_mean(y, _channel_axis(op)) * len(x)
                delta = (want[op.name] - got) / n
                layer = sim.layer(op.name)
                if layer.bias is None:
                    layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0]))
                layer.bias.add_(delta)
                shifts[op.name] = float(delta.abs().max())
                ys = [sim.run_op(op, [env[j] for j in op.inputs]) for env in envs]
                advance(1)
            for env, y in zip(envs, ys):
                sim.store(op, y, env)
                for name in op.inputs:
                    if last_read[name] == i:
                        env.pop(name, None)
    return shifts


# -- AdaRound ---------------------------------------------------------------------------------
_ZETA, _GAMMA = 1.1, -0.1


def _rectified_sigmoid(v: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.sigmoid(v) * (_ZETA - _GAMMA) + _GAMMA, 0, 1)


def adaround(sim: QuantSim, reference: QuantSim, batches: list[torch.Tensor], iterations: int = 500,
             batch_size: int = 32, reg_weight: float = 0.01, lr: float = 1e-2, seed: int = 0,
             show_progress: bool = True) -> dict[str, float]:
    """Learn each layer's rounding (in place). Returns the fraction of weights rounded
    differently from nearest, per layer."""
    gen = torch.Generator().manual_seed(seed)
    x_all = torch.cat(batches)
    layer_ops = [op for op in sim.layer_ops() if op.name not in sim.float_layers and op.kind != "convt"]
    reference.enable_only(set())
    changed = {}
    with progress_bar("AdaRound", len(layer_ops) * iterations, show_progress) as advance:
        for op in layer_ops:
            with torch.no_grad():
                inp, tgt = {op.name: None}, {op.name: None}
                parts_in, parts_out = [], []
                for i in range(0, len(x_all), 128):
                    xb = x_all[i:i + 128]
                    inp = {op.name: None}
                    sim(xb, inputs=inp, stop_after=op.name)
                    parts_in.append(inp[op.name])
                    tgt = {op.name: None}
                    reference(xb, capture=tgt, stop_after=op.name)
                    parts_out.append(QuantSim.activation(op, tgt[op.name]))
                xin, yref = torch.cat(parts_in), torch.cat(parts_out)
            changed[op.name] = _adaround_layer(sim, op, xin, yref, iterations, batch_size, reg_weight, lr, gen, advance)
    return changed


def _adaround_layer(sim, op, xin, yref, iterations, batch_size, reg_weight, lr, gen, advance) -> float:
    layer, wq = sim.layer(op.name), sim.weight_quantizer(op.name)
    w = layer.weight.detach()
    shape = (-1,) + (1,) * (w.dim() - 1)
    scale = wq.scale.detach().reshape(shape) if wq.scale.numel() > 1 else wq.scale.detach()
    zp = wq.zero_point.reshape(shape) if wq.zero_point.numel() > 1 else wq.zero_point
    w_floor = torch.floor(w / scale)
    rest = (w / scale - w_floor).clamp(1e-4, 1 - 1e-4)
    v = nn.Parameter(-torch.log((_ZETA - _GAMMA) / (rest - _GAMMA) - 1))
    opt = torch.optim.Adam([v], lr=lr)
    bias = sim.bias(op)
    if bias is not None:
        bias = bias.detach()
    warmup = int(0.2 * iterations)
    for it in range(iterations):
        idx = torch.randint(0, len(xin), (min(batch_size, len(xin)),), generator=gen)
        h = _rectified_sigmoid(v)
        wsoft = (torch.clamp(w_floor + h + zp, wq.qmin, wq.qmax) - zp) * scale
        y = _layer_forward(layer, op, xin[idx], wsoft, bias)
        rec = F.mse_loss(QuantSim.activation(op, y), yref[idx], reduction="none").flatten(1).sum(1).mean()
        if it < warmup:
            reg = torch.zeros(())
        else:
            beta = 20 + (2 - 20) * (it - warmup) / max(1, iterations - warmup)
            reg = reg_weight * (1 - (2 * h - 1).abs().pow(beta)).sum()
        opt.zero_grad()
        (rec + reg).backward()
        opt.step()
        advance(1)
    with torch.no_grad():
        up = (v >= 0).float()
        q = torch.clamp(w_floor + up + zp, wq.qmin, wq.qmax)
        nearest = torch.clamp(torch.round(w / scale) + zp, wq.qmin, wq.qmax)
        layer.weight.copy_((q - zp) * scale)
        return float((q != nearest).float().mean())


def _layer_forward(layer: nn.Module, op: Op, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    if op.kind == "linear":
        return F.linear(x, w, b)
    conv = F.conv1d if isinstance(layer, nn.Conv1d) else F.conv2d
    return conv(x, w, b, layer.stride, layer.padding, layer.dilation, layer.groups)


# -- QAT ----------------------------------------------------------------------------------------
def prepare_qat(sim: QuantSim, lsq: bool = True) -> QuantSim:
    """Make the quantizers' scales trainable (LSQ) or fixed (plain STE) for training."""
    for q in list(sim.wq.values()) + list(sim.aq.values()):
        q.learn_scale(lsq)
    sim.train()
    return sim


def finish_qat(sim: QuantSim) -> QuantSim:
    """Freeze scales (kept positive) after training."""
    with torch.no_grad():
        for q in list(sim.wq.values()) + list(sim.aq.values()):
            q.learn_scale(False)
            q.scale.clamp_(min=1e-8)
    return sim.eval()


def float_copy(sim: QuantSim) -> QuantSim:
    """A copy of the sim with every quantizer off: the float model on the same op list."""
    ref = copy.deepcopy(sim)
    ref.enable_only(set())
    return ref.eval()


def weight_error(sim: QuantSim) -> dict[str, float]:
    """Relative weight quantization error per layer (||W_q - W|| / ||W||)."""
    out = {}
    with torch.no_grad():
        for op in sim.layer_ops():
            w = sim.layer(op.name).weight
            out[op.name] = float((sim.weight(op) - w).norm() / w.norm().clamp_min(1e-12))
    return out
