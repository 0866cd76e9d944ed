"""Quantizers: integer grids, range estimators, and fake quantization that trains.

A quantizer maps a float tensor to integers ``q = clamp(round(x / scale) + zero_point, qmin,
qmax)`` and back, ``(q - zero_point) * scale``; the simulated model runs on the second form.
Rounding is half to even, as ONNX ``QuantizeLinear`` and ONNX Runtime round, so the simulation,
the exported model and the integer reference agree.

Gradients: the rounding passes gradients straight through (STE); with ``learn_scale`` the scale
is a parameter trained by LSQ (Esser et al., 2020): the gradient that autograd gives through
``(q - zp) * scale`` is LSQ's, scaled by ``1 / sqrt(numel * qmax)`` as the paper recommends.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nnshrink.errors import ConfigError

ESTIMATORS = ("minmax", "percentile", "mse")


def int_range(bits: int, symmetric: bool) -> tuple[int, int]:
    """The integer grid: symmetric grids are restricted (-127..127 for 8 bits), so negating a
    weight never overflows; asymmetric ones use the full signed range (-128..127)."""
    if symmetric:
        return -(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even forward; identity gradient backward."""
    return x + (torch.round(x) - x).detach()


def _grad_scale(x: torch.Tensor, g: float) -> torch.Tensor:
    """``x`` forward; gradient multiplied by ``g`` backward (LSQ's step-size gradient scale)."""
    return x * g + (x - x * g).detach()


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """``(clamp(round(x / scale) + zp, qmin, qmax) - zp) * scale`` with straight-through rounding."""
    if not (torch.is_grad_enabled() and (x.requires_grad or getattr(scale, "requires_grad", False))):
        # nothing to differentiate: the same arithmetic in place, without the STE's two extra
        # passes (``x + (round(x) - x)`` is exactly ``round(x)``, so the result is bit-identical)
        q = torch.round(x / scale).add_(zero_point).clamp_(qmin, qmax)
        return q.sub_(zero_point).mul_(scale)
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


def quantize_int(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """The integers of ``x`` (as int32)."""
    return torch.clamp(torch.round(x / scale) + zero_point, qmin, qmax).to(torch.int32)


def scale_zero_point(lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point that cover ``[lo, hi]`` (always including 0, so zero is exact)."""
    qmin, qmax = int_range(bits, symmetric)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    if symmetric:
        scale = torch.maximum(hi, -lo) / qmax
        zp = torch.zeros_like(scale)
    else:
        scale = (hi - lo) / (qmax - qmin)
        safe = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.clamp(torch.round(qmin - lo / safe), qmin, qmax)
    scale = torch.where(scale > 0, scale, torch.full_like(scale, 1.0))
    return scale.float(), zp.float()


def _mse_search(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bits: int, symmetric: bool,
                grid: int = 60) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink ``[lo, hi]`` by a common factor to minimise the mean squared quantization error.

    ``x`` is ``(channels, samples)`` with ``lo``/``hi`` per channel (one row for per-tensor).
    """
    qmin, qmax = int_range(bits, symmetric)
    best_err = torch.full((x.shape[0],), float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for alpha in torch.linspace(0.2, 1.0, grid):
        scale, zp = scale_zero_point(lo * alpha, hi * alpha, bits, symmetric)
        q = torch.clamp(torch.round(x / scale[:, None]) + zp[:, None], qmin, qmax)
        err = ((q - zp[:, None]) * scale[:, None] - x).pow(2).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * alpha, best_lo)
        best_hi = torch.where(better, hi * alpha, best_hi)
    return best_lo, best_hi


def estimate_range(x: torch.Tensor, bits: int, symmetric: bool, estimator: str,
                   percentile: float = 99.99) -> tuple[torch.Tensor, torch.Tensor]:
    """The range to quantize ``x`` (``(channels, samples)``) to, one per row."""
    x = x.detach().float()
    lo, hi = x.min(dim=1).values, x.max(dim=1).values
    if estimator == "minmax":
        return lo, hi
    if estimator == "percentile":
        # torch.quantile refuses very large inputs; a sorted copy does the same job
        s = torch.sort(x, dim=1).values
        n = s.shape[1]
        k_hi = min(n - 1, int(math.ceil(percentile / 100 * (n - 1))))
        k_lo = max(0, int(math.floor((1 - percentile / 100) * (n - 1))))
        return s[:, k_lo], s[:, k_hi]
    if estimator == "mse":
        return _mse_search(x, lo, hi, bits, symmetric)
    raise ConfigError(f"unknown range estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")


class WeightQuantizer(nn.Module):
    """Fake-quantizes a layer's weight, per output channel (along ``axis``: 0, or 1 for a
    transposed conv) or per tensor."""

    def __init__(self, bits: int = 8, symmetric: bool = True, per_channel: bool = True,
                 estimator: str = "minmax", axis: int = 0) -> None:
        super().__init__()
        if not 2 <= bits <= 8:
            raise ConfigError(f"weight bits must be from 2 to 8, got {bits}")
        self.bits, self.symmetric, self.per_channel, self.estimator = bits, symmetric, per_channel, estimator
        self.axis = axis
        self.qmin, self.qmax = int_range(bits, symmetric)
        self.enabled = True
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(1))

    def init_from(self, weight: torch.Tensor) -> None:
        """Set scale and zero point from the weight (min-max or MSE-optimal per channel)."""
        w = weight.detach().float()
        rows = w.movedim(self.axis, 0).reshape(w.shape[self.axis], -1) if self.per_channel else w.reshape(1, -1)
        lo, hi = estimate_range(rows, self.bits, self.symmetric, "mse" if self.estimator == "mse" else "minmax")
        scale, zp = scale_zero_point(lo, hi, self.bits, self.symmetric)
        self.scale = nn.Parameter(scale, requires_grad=self.scale.requires_grad)
        self.zero_point = zp

    def learn_scale(self, on: bool = True) -> None:
        self.scale.requires_grad_(on)

    def _shaped(self, t: torch.Tensor, ndim: int) -> torch.Tensor:
        if t.numel() == 1:
            return t.reshape(())
        shape = [1] * ndim
        shape[self.axis] = -1
        return t.reshape(shape)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return w
        scale = self._shaped(self.scale, w.dim())
        if self.scale.requires_grad:
            scale = _grad_scale(scale, 1.0 / math.sqrt(w[0].numel() * self.qmax))
        return fake_quantize(w, scale, self._shaped(self.zero_point, w.dim()), self.qmin, self.qmax)

    def integers(self, w: torch.Tensor) -> torch.Tensor:
        return quantize_int(w.detach(), self._shaped(self.scale.detach(), w.dim()),
                            self._shaped(self.zero_point, w.dim()), self.qmin, self.qmax)


class ActQuantizer(nn.Module):
    """Fake-quantizes an activation tensor per tensor; calibrated from observed values.

    While ``observing``, each call records the tensor's range and a random sample of its values
    (at most ``max_samples`` in all) and passes it through unchanged; :meth:`calibrate` then sets
    scale and zero point with the chosen estimator.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, estimator: str = "mse",
                 percentile: float = 99.99, max_samples: int = 400_000) -> None:
        super().__init__()
        if bits not in (8, 16):
            raise ConfigError(f"activation bits must be 8 or 16, got {bits}")
        if estimator not in ESTIMATORS:
            raise ConfigError(f"unknown range estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
        self.bits, self.symmetric, self.estimator, self.percentile = bits, symmetric, estimator, percentile
        self.qmin, self.qmax = int_range(bits, symmetric)
        self.enabled = True
        self.observing = False
        self.max_samples = max_samples
        self.scale = nn.Parameter(torch.ones(()), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(()))
        self._samples: list[torch.Tensor] = []
        self._lo = self._hi = None
        self._gen = torch.Generator().manual_seed(0)
        self.fixed: tuple[float, int] | None = None  # (scale, zero point) an op's kernels require

    def learn_scale(self, on: bool = True) -> None:
        self.scale.requires_grad_(on and self.fixed is None)  # a grid a kernel requires stays

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observe(x.detach())
            return x
        if not self.enabled:
            return x
        scale = self.scale
        if scale.requires_grad:
            scale = _grad_scale(scale, 1.0 / math.sqrt(x[0].numel() * self.qmax))
        return fake_quantize(x, scale, self.zero_point, self.qmin, self.qmax)

    def _observe(self, x: torch.Tensor) -> None:
        flat = x.reshape(-1).float()
        lo, hi = flat.min(), flat.max()
        self._lo = lo if self._lo is None else torch.minimum(self._lo, lo)
        self._hi = hi if self._hi is None else torch.maximum(self._hi, hi)
        take = min(flat.numel(), 20_000)
        if sum(s.numel() for s in self._samples) < self.max_samples:
            idx = torch.randint(0, flat.numel(), (take,), generator=self._gen)
            self._samples.append(flat[idx])

    def calibrate(self, forget: bool = True) -> None:
        """Set scale and zero point from what was observed (or the fixed ones an op's kernels
        require: a softmax's 1/256); forget the samples unless ``forget`` is False (then
        :meth:`at_bits` can make twins of other widths from them, and :meth:`forget` drops them)."""
        if self.fixed is not None:
            self.set(*self.fixed)
            self.forget()
            return
        if self._lo is None:
            raise ConfigError("an activation quantizer saw no data during calibration")
        if self.estimator == "minmax":
            lo, hi = self._lo[None], self._hi[None]
        else:
            x = torch.cat(self._samples)[None]
            x = torch.cat([x, torch.stack([self._lo, self._hi])[None]], dim=1)
            lo, hi = estimate_range(x, self.bits, self.symmetric, self.estimator, self.percentile)
        scale, zp = scale_zero_point(lo, hi, self.bits, self.symmetric)
        with torch.no_grad():
            self.scale.copy_(scale[0])
        self.zero_point = zp[0].clone()
        if forget:
            self.forget()
        self.observing = False

    def forget(self) -> None:
        self._samples, self._lo, self._hi = [], None, None
        self.observing = False

    def at_bits(self, bits: int) -> ActQuantizer:
        """A twin of this quantizer at another width, calibrated from the same observations (kept
        by ``calibrate(forget=False)``)."""
        twin = ActQuantizer(bits, self.symmetric, self.estimator, self.percentile, self.max_samples)
        twin._samples, twin._lo, twin._hi = list(self._samples), self._lo, self._hi
        twin.calibrate()
        return twin

    def set(self, scale: float, zero_point: int) -> None:
        with torch.no_grad():
            self.scale.fill_(scale)
        self.zero_point = torch.tensor(float(zero_point))
