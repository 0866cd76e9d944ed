"""Mixed precision from measured sensitivity: per-layer weight bits (and float fallback) for a budget.

Each layer is measured alone: with every other layer at the highest candidate, the layer's
weights at each lower candidate, the output noise power on held-out calibration inputs against
the float model's output (forward passes only, no labels). Noise powers of independent rounding
errors add, so the total for any assignment is estimated as the all-highest noise plus each
layer's added noise. Downgrades are then taken greedily, cheapest added noise per weight byte
saved first, giving one ordered list of assignments from largest to smallest:

- with a fidelity budget (``min_sqnr_db``), the longest prefix whose estimated output SQNR stays
  within it is checked by one measurement of the real assignment, and shortened until the
  measurement holds (the estimate is usually right: one or two checks);
- with an accuracy budget (``max_drop``, relative to the float model, with the plan's evaluation
  function), the longest prefix within it is found by bisection on the list: about
  ``log2(moves)`` full evaluations, where measuring every layer at every setting with full evaluations (as AIMET's
  AMP does) takes ``layers x candidates``.

``32`` among the candidates is float: a layer can stay float where even 8 bits cost too much.

With activation candidates (``act_twins``: each layer's output quantizer at 8 and at 16 bits,
calibrated from the same observations), every layer starts with a 16-bit output as well, and
lowering an output to 8 bits is one more kind of move in the same list: it saves the output's
bytes per inference (what an NPU writes and reads back), at the noise that layer's output alone
adds at 8 bits. Weight bytes and activation bytes are one currency: both are memory traffic, which
dominates an NPU's time (and int16 layers run at about half the int8 rate on Ethos-U). 4-bit
activations are not offered: no deployed runtime here (ONNX Runtime, TFLite) has kernels for them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch

from nnshrink.techniques.quant.quantizers import WeightQuantizer
from nnshrink.search.engine import measure_curves, sensitivity_table
from nnshrink.techniques.quant.sensitivity import flat_outputs

FLOAT_BITS = 32


def _set_bits(sim, name: str, bits: int, cache: dict) -> None:
    """Give layer ``name`` ``bits``-bit weights (32: float)."""
    if bits >= FLOAT_BITS:
        sim.float_layers.add(name)
        return
    sim.float_layers.discard(name)
    k = (name, bits)
    if k not in cache:
        old = sim.weight_quantizer(name)
        q = WeightQuantizer(bits, old.symmetric, old.per_channel, old.estimator, old.axis)
        q.init_from(sim.layer(name).weight)
        cache[k] = q
    sim.wq[name.replace(".", "__")] = cache[k]


@torch.no_grad()
def _noise(sim, held: torch.Tensor, ref: torch.Tensor) -> float:
    return float((flat_outputs(sim(held)) - ref).pow(2).mean())


_OUTPUT = "output:"  # a unit that is a layer's output width, not its weights


def _added_noise(sim, held: torch.Tensor, reference, unit: str, level: int, float_reference: torch.Tensor,
                 base: float, cache: dict, twins: dict, top: int) -> float:
    """The output noise (against ``float_reference``) that layer ``unit``'s weights at ``level``
    bits, or (``output:`` + layer) its output at 8 bits, add to ``base``, every other layer as it
    is; the sim is put back."""
    if unit.startswith(_OUTPUT):
        name = unit[len(_OUTPUT):]
        key = name.replace(".", "__")
        sim.aq[key] = twins[name][level]
        try:
            return max(0.0, _noise(sim, held, float_reference) - base)
        finally:
            sim.aq[key] = twins[name][16]
    _set_bits(sim, unit, level, cache)
    try:
        return max(0.0, _noise(sim, held, float_reference) - base)
    finally:
        _set_bits(sim, unit, top, cache)


def _output_elements(sim, held: torch.Tensor, names: list[str]) -> dict[str, int]:
    """Elements per sample of each named layer's output (what its quantizer sees)."""
    seen: dict[str, int] = {}

    def hook(name: str):
        def fn(module, args, out) -> None:  # returns None: the output stays as it is
            seen.setdefault(name, args[0][0].numel())
        return fn

    handles = [sim.aq[n.replace(".", "__")].register_forward_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            sim(held[:1])
    finally:
        for h in handles:
            h.remove()
    return seen


def choose_bits(sim, held: torch.Tensor, candidates: list[int], bits_of: Callable[[int], int],
                min_sqnr_db: float | None = None, floor: float | None = None,
                evaluate: Callable | None = None, show_progress: bool = True,
                act_twins: dict[str, dict[int, object]] | None = None) -> dict:
    """Choose per-layer weight bits (and output bits, with ``act_twins``) on a calibrated
    ``sim`` (left at the choice).

    Args:
        sim: A calibrated sim (activation ranges set).
        held: Held-out calibration inputs the noise is measured on.
        candidates: Weight bits to choose from, 32 meaning float.
        bits_of: The bits a layer really gets for a candidate (a target's cap).
        min_sqnr_db: Fidelity budget: the output SQNR against the float model to keep.
        floor: Accuracy budget: the lowest ``evaluate`` metric to accept.
        evaluate: The metric (higher is better) of a model, for ``floor``.
        act_twins: Layer -> ``{8: quantizer, 16: quantizer}`` of its output, for a choice of
            activation widths too (the layers not named keep theirs).

    Returns:
        ``bits`` (layer -> bits, 32 for float), the measured ``sqnr_db``, ``metric`` (with an
        accuracy budget), ``evaluations`` (full evaluations run) and ``weight_bits`` (the
        parameter-weighted mean); with ``act_twins``, ``act_bits`` (layer -> its output's bits).
    """
    cands = sorted(set(candidates))
    top = cands[-1]
    layers = [op.name for op in sim.layer_ops()]
    params = {n: sim.layer(n).weight.numel() for n in layers}
    twins = act_twins or {}
    elements = _output_elements(sim, held, list(twins))
    cache: dict = {}
    sim.eval()
    sim.enable_only(set())
    with torch.no_grad():
        ref = flat_outputs(sim(held))
    sim.enable_only(None)
    signal = float(ref.pow(2).mean())

    def set_act(n: str, b: int) -> None:
        sim.aq[n.replace(".", "__")] = twins[n][b]

    for n in layers:
        _set_bits(sim, n, top, cache)
    for n in twins:
        set_act(n, 16)
    base = _noise(sim, held, ref)
    # each layer's weights at each lower width, each output at 8 bits, alone: on the decision
    # engine, serially and uncached (the quantizers are this sim's, calibrated once)
    tasks = [(n, b) for n in layers for b in cands[:-1]] + [(_OUTPUT + n, 8) for n in twins]
    fn = functools.partial(_added_noise, float_reference=ref, base=base, cache=cache, twins=twins, top=top)
    got = measure_curves(sim, held, tasks, fn, None, "serial", show_progress=show_progress, cache=False, reference=False,
                         description="mixed precision: per-layer sensitivity")
    added = {(n, b): got[(n, b)] for n in layers for b in cands[:-1]}
    act_added = {n: got[(_OUTPUT + n, 8)] for n in twins}
    # the greedy list: each move lowers one layer's weights one candidate step, or its output to 8 bits
    level = {n: len(cands) - 1 for n in layers}
    wide = set(twins)
    moves, est = [], base
    while True:
        best = None
        for n in layers:
            i = level[n]
            if i == 0:
                continue
            hi, lo = cands[i], cands[i - 1]
            saved = params[n] * (bits_of(hi) - bits_of(lo)) / 8
            if saved <= 0:
                continue
            cost = added[(n, lo)] - (added[(n, hi)] if i < len(cands) - 1 else 0.0)
            ratio = max(cost, 0.0) / saved
            if best is None or ratio < best[0]:
                best = (ratio, n, lo, cost)
        for n in wide:
            ratio = act_added[n] / max(1, elements.get(n, 1))
            if best is None or ratio < best[0]:
                best = (ratio, n, "act8", act_added[n])
        if best is None:
            break
        _, n, lo, cost = best
        if lo == "act8":
            wide.discard(n)
        else:
            level[n] -= 1
        est += max(cost, 0.0)
        moves.append((n, lo, est))

    def assign(k: int) -> dict[str, int]:
        bits = dict.fromkeys(layers, top)
        bits.update({("act", n): 16 for n in twins})
        for n, b, _ in moves[:k]:
            if b == "act8":
                bits[("act", n)] = 8
            else:
                bits[n] = b
        return bits

    def apply(bits: dict) -> None:
        for n, b in bits.items():
            if isinstance(n, tuple):
                set_act(n[1], b)
            else:
                _set_bits(sim, n, b, cache)

    def sqnr_of(noise: float) -> float:
        return float("inf") if noise <= 0 else 10 * math.log10(signal / noise)

    evaluations = 0
    if floor is not None:
        lo, hi = 0, len(moves)  # lo: within budget (or the best there is)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            apply(assign(mid))
            evaluations += 1
            if evaluate(sim) >= floor:
                lo = mid
            else:
                hi = mid - 1
        k = lo
    else:
        budget = signal / 10 ** (min_sqnr_db / 10) if min_sqnr_db is not None else float("inf")
        k = max([i + 1 for i, (_, _, e) in enumerate(moves) if e <= budget], default=0)
        while k > 0:  # the estimate checked by a measurement of the real assignment
            apply(assign(k))
            if _noise(sim, held, ref) <= budget:
                break
            k -= 1
    bits = assign(k)
    apply(bits)
    noise = _noise(sim, held, ref)
    acts = {n[1]: b for n, b in bits.items() if isinstance(n, tuple)}
    bits = {n: b for n, b in bits.items() if not isinstance(n, tuple)}
    out = {"bits": {n: bits_of(b) if b < FLOAT_BITS else FLOAT_BITS for n, b in bits.items()},
           "sqnr_db": round(sqnr_of(noise), 2), "estimated_sqnr_db": round(sqnr_of(moves[k - 1][2] if k else base), 2),
           "evaluations": evaluations,
           "weight_bits": round(sum(params[n] * (bits_of(b) if b < FLOAT_BITS else 32) for n, b in bits.items())
                                / max(1, sum(params.values())), 3)}
    if floor is not None:
        out["metric"] = evaluate(sim)
        out["evaluations"] += 1
    if twins:
        out["act_bits"] = acts
    order = cands[::-1]  # mildest first
    columns = ["float" if b >= FLOAT_BITS else f"{bits_of(b)}-bit" for b in order]
    rows = {n: [0.0 if b == top else added[(n, b)] / signal for b in order] for n in layers}
    if twins:
        columns.append("8-bit output")
        for n in layers:
            rows[n].append(act_added.get(n, 0.0) / signal)
    out["sensitivity"] = sensitivity_table("relative output error added (MSE / output power)", columns, rows)
    return out
