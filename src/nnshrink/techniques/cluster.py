"""Weight sharing: k-means clustering of each layer's weights, with centroid fine-tuning.

Each layer's weights become indices into a small codebook (``2**bits`` entries). Zeros stay
exact zeros (a pruned weight keeps index 0, whose centroid is pinned at 0), so pruning and
sharing compose. During fine-tuning the layer computes ``codebook[indices]``, so autograd sums
the gradients of every weight of a cluster into its centroid, as in Deep Compression (Han et al.,
2016). The container stores the indices as an entropy-coded stream plus the codebook.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn.utils import parametrize

from nnshrink.errors import ConfigError
from nnshrink.graph.analysis import is_compressible
from nnshrink.plan.config import SKIP, StepConfig, StepResult, pairs
from nnshrink.techniques.records import attach, record_of, register

INITS = ("linear", "density")


@register
@dataclass(frozen=True)
class CodebookRecord:
    """``weight == codebook[indices]`` exactly.

    Attributes:
        indices: uint8 indices, the weight's shape.
        codebook: float32 centroids; entry 0 is 0.0 when the layer was pruned.
        bits: log2 of the codebook size the layer was allowed.
    """

    indices: np.ndarray
    codebook: np.ndarray
    bits: int

    kind: ClassVar[str] = "codebook"

    def dequantize(self) -> np.ndarray:
        return self.codebook[self.indices.astype(np.int64)].astype(np.float32)

    def to_parts(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {"bits": self.bits}, {"indices": self.indices, "codebook": self.codebook.astype(np.float32)}

    @classmethod
    def from_parts(cls, fields: dict, arrays: dict[str, np.ndarray]) -> CodebookRecord:
        idx, book = arrays["indices"], arrays["codebook"]
        if idx.dtype != np.uint8 or (idx.size and int(idx.max()) >= book.size):
            raise ValueError("the indices do not match the codebook")
        return cls(idx, book.astype(np.float32), int(fields["bits"]))


def codebook_record(module: nn.Module) -> CodebookRecord | None:
    """The :class:`CodebookRecord` of a shared layer, if its weights still match it."""
    record = record_of(module)
    return record if isinstance(record, CodebookRecord) else None


def kmeans_1d(values: np.ndarray, k: int, init: str = "linear", iters: int = 30) -> np.ndarray:
    """Lloyd's k-means on scalars; returns sorted centroids (fewer if values are fewer)."""
    if init not in INITS:
        raise ConfigError(f"init must be one of {INITS}, got {init!r}")
    values = np.sort(values.astype(np.float64))
    k = min(k, len(np.unique(values)))
    if k == 0:
        return np.zeros(0)
    if init == "linear":  # Deep Compression's choice: keeps the rare large weights represented
        centroids = np.linspace(values[0], values[-1], k)
    else:
        centroids = np.quantile(values, (np.arange(k) + 0.5) / k)
    for _ in range(iters):
        edges = (centroids[1:] + centroids[:-1]) / 2
        labels = np.searchsorted(edges, values)
        sums = np.bincount(labels, weights=values, minlength=k)
        counts = np.bincount(labels, minlength=k)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        if np.allclose(new, centroids, rtol=0, atol=1e-12):
            break
        centroids = new
    return np.unique(centroids)


class _Shared(nn.Module):
    """Parametrization ``weight = codebook[indices]``; the codebook is what trains."""

    def __init__(self, indices: torch.Tensor, codebook: torch.Tensor, pin_zero: bool) -> None:
        super().__init__()
        self.register_buffer("indices", indices)
        self.codebook = nn.Parameter(codebook)
        self.pin_zero = pin_zero

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        book = self.codebook
        if self.pin_zero:  # pruned weights stay exactly zero
            book = torch.cat([book.new_zeros(1), book[1:]])
        return book[self.indices]


def share_weights(layer: nn.Module, bits: int, init: str = "linear", param: str = "weight") -> CodebookRecord:
    """Cluster ``layer.<param>`` in place (values replaced by their centroids); return the record."""
    w = getattr(layer, param).detach().cpu().numpy().astype(np.float32)
    flat = w.reshape(-1)
    pruned = bool((flat == 0).any())
    nonzero = flat[flat != 0]
    k = 2 ** bits - (1 if pruned else 0)
    centroids = kmeans_1d(nonzero, k, init) if nonzero.size else np.zeros(0)
    book = np.concatenate([[0.0], centroids]) if pruned or not centroids.size else centroids
    book = book.astype(np.float32)
    offset = 1 if pruned or not centroids.size else 0
    if centroids.size:
        edges = (book[offset + 1:] + book[offset:-1]) / 2
        idx = np.searchsorted(edges, flat) + offset
    else:
        idx = np.zeros(flat.shape, np.int64)
    if pruned:
        idx = np.where(flat == 0, 0, idx)
    return attach(layer, CodebookRecord(idx.reshape(w.shape).astype(np.uint8), book, bits), param)


@dataclass(frozen=True)
class ShareWeights(StepConfig):
    """k-means weight sharing per layer, then fine-tuning of the centroids.

    Attributes:
        bits: Codebook size ``2**bits`` per layer (1 to 8).
        init: ``linear`` (evenly spaced, as Deep Compression) or ``density`` (quantiles).
        steps: Centroid fine-tuning steps with the bundled or the user's trainer (0: none).
        layers: Per-layer rules (first matching pattern wins): ``skip`` leaves a layer as it
            is; ``{"bits": 3}`` gives it its own codebook size. Version-1 plans' ``exclude`` and
            ``layer_bits`` (``"fc1=3"``) are read into it.
    """

    kind = "share_weights"
    bits: int = 4
    init: str = "linear"
    steps: int = 0

    layer_settings = {"bits": lambda v: None if isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 8
                      else "a whole number from 1 to 8"}
    legacy = {"exclude": lambda v: dict.fromkeys(v, SKIP),
              "layer_bits": lambda v: {n: {"bits": b} for n, b in pairs(v, int).items()}}

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 1 <= self.bits <= 8:
            raise ConfigError(f"share_weights.bits must be from 1 to 8, got {self.bits}")
        if self.init not in INITS:
            raise ConfigError(f"share_weights.init must be one of {INITS}, got {self.init!r}")
        if self.steps < 0:
            raise ConfigError("share_weights.steps must be >= 0")

    def apply(self, model: nn.Module, ctx) -> StepResult:
        new = copy.deepcopy(model)
        names = [n for n, m in new.named_modules() if is_compressible(m)]
        left = self.skipped_layers(names)
        overrides = self.layer_setting(names, "bits")
        layers = {n: new.get_submodule(n) for n in names if n not in left}
        records = {n: share_weights(m, overrides.get(n, self.bits), self.init) for n, m in layers.items()}
        if self.steps:
            if ctx.train is None:
                raise ConfigError("share_weights with steps needs a train(model, steps) function or bundled data")
            for n, m in layers.items():
                r = records[n]
                parametrize.register_parametrization(m, "weight", _Shared(
                    torch.from_numpy(r.indices.astype(np.int64)), torch.from_numpy(r.codebook.copy()),
                    pin_zero=bool(r.codebook.size and r.codebook[0] == 0 and (r.indices == 0).any())))
                m.parametrizations.weight.original.requires_grad_(False)
            new = ctx.train(new, self.steps) or new
            for n, m in layers.items():
                book = m.parametrizations.weight[0].codebook.detach()
                if m.parametrizations.weight[0].pin_zero:
                    book = torch.cat([book.new_zeros(1), book[1:]])
                parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
                records[n] = attach(m, CodebookRecord(records[n].indices, book.numpy().astype(np.float32),
                                                      records[n].bits))
        details = {"layers": {n: {"bits": r.bits, "centroids": int(r.codebook.size)} for n, r in records.items()},
                   "val_after": ctx.evaluate(new) if ctx.evaluate else None}
        return StepResult(self.kind, new.eval(), details,
                          [{"layer": n, "reason": "skipped by the plan's layer rules"} for n in left])
