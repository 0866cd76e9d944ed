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
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from nnshrink.progress import progress_bar
from nnshrink.techniques.quant.quantizers import WeightQuantizer
from nnshrink.search.engine import sensitivity_table
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


def choose_bits(sim, held: torch.Tensor, candidates: list[int], bits_of: Callable[[int], int],
                min_sqnr_db: float | None = None, floor: float | None = None,
                evaluate: Callable | None = None, show_progress: bool = True) -> dict:
    """Choose per-layer weight bits on a calibrated ``sim`` (left at the choice).

    Args:
        sim: A calibrated sim (activation ranges set).
        held: Held-out calibration inputs the noise is measured on.
        candidates: Weight bits to choose from, 32 meaning float.
        bits_of: The bits a layer really gets for a candidate (a target's cap).
        min_sqnr_db: Fidelity budget: the output SQNR against the float model to keep.
        floor: Accuracy budget: the lowest ``evaluate`` metric to accept.
        evaluate: The metric (higher is better) of a model, for ``floor``.

    Returns:
        ``bits`` (layer -> bits, 32 for float), the measured ``sqnr_db``, ``metric`` (with an
        accuracy budget), ``evaluations`` (full evaluations run) and ``weight_bits`` (the
        parameter-weighted mean).
    """
    cands = sorted(set(candidates))
    top = cands[-1]
    layers = [op.name for op in sim.layer_ops()]
    params = {n: sim.layer(n).weight.numel() for n in layers}
    cache: dict = {}
    sim.eval()
    sim.enable_only(set())
    with torch.no_grad():
        ref = flat_outputs(sim(held))
    sim.enable_only(None)
    signal = float(ref.pow(2).mean())
    for n in layers:
        _set_bits(sim, n, top, cache)
    base = _noise(sim, held, ref)
    added: dict[tuple[str, int], float] = {}
    with progress_bar("mixed precision: per-layer sensitivity", len(layers) * (len(cands) - 1), show_progress) as adv:
        for n in layers:
            for b in cands[:-1]:
                _set_bits(sim, n, b, cache)
                added[(n, b)] = max(0.0, _noise(sim, held, ref) - base)
                adv(1)
            _set_bits(sim, n, top, cache)
    # the greedy list: each move lowers one layer one candidate step
    level = {n: len(cands) - 1 for n in layers}
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
        if best is None:
            break
        _, n, lo, cost = best
        level[n] -= 1
        est += max(cost, 0.0)
        moves.append((n, lo, est))

    def assign(k: int) -> dict[str, int]:
        bits = dict.fromkeys(layers, top)
        for n, b, _ in moves[:k]:
            bits[n] = b
        return bits

    def apply(bits: dict[str, int]) -> None:
        for n, b in bits.items():
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
    out = {"bits": {n: bits_of(b) if b < FLOAT_BITS else FLOAT_BITS for n, b in bits.items()},
           "sqnr_db": round(sqnr_of(noise), 2), "estimated_sqnr_db": round(sqnr_of(moves[k - 1][2] if k else base), 2),
           "evaluations": evaluations,
           "weight_bits": round(sum(params[n] * (bits_of(b) if b < FLOAT_BITS else 32) for n, b in bits.items())
                                / max(1, sum(params.values())), 3)}
    if floor is not None:
        out["metric"] = evaluate(sim)
        out["evaluations"] += 1
    order = cands[::-1]  # mildest first
    out["sensitivity"] = sensitivity_table(
        "relative output error added (MSE / output power)", ["float" if b >= FLOAT_BITS else f"{bits_of(b)}-bit" for b in order],
        {n: [0.0 if b == top else added[(n, b)] / signal for b in order] for n in layers})
    return out
