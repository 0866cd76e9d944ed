"""The exact integer (or sparse) form a technique leaves on a layer, and how each form is stored.

Not a technique itself: the one place that says how a layer carries its records and how a record
turns into stored parts and back. Each record type is a *storage kind*: it names itself
(``kind``), splits itself into JSON fields and named arrays (:meth:`Record.to_parts`), and
rebuilds itself from them (``from_parts``). The container entropy-codes the integer arrays and
stores the rest little-endian, and knows no technique: a kind is looked up here, by name, and its
module imported on first use, as plan steps are. A new storage kind (ASTC blocks, say) is a new
class registered with :func:`register`, not an edit of the container.

A layer may carry one record per parameter (``weight``, or an LSTM's ``weight_ih_l0`` ...).
"""

from __future__ import annotations

import importlib
from typing import ClassVar, Protocol, TypeVar

import numpy as np
import torch
from torch import nn

_ATTR = "nnshrink_records"


class Record(Protocol):
    """Integers (or positions and values) plus side data that reproduce a tensor exactly."""

    kind: ClassVar[str]
    bits: int

    def dequantize(self) -> np.ndarray: ...

    def to_parts(self) -> tuple[dict, dict[str, np.ndarray]]:
        """JSON-able fields and named arrays; the first array is the one reported as its stream.
        A kind may name parts to store byte for byte, not entropy-coded, in ``raw_parts``."""
        ...


IntegerRecord = Record  # the name earlier code used
R = TypeVar("R", bound=Record)

_KINDS: dict[str, type] = {}
# kinds whose classes live in technique modules, imported when a container names them
_MODULES = {"quantized": "nnshrink.techniques.weights", "grouped": "nnshrink.techniques.weights",
            "codebook": "nnshrink.techniques.cluster", "astc": "nnshrink.techniques.astc.record"}


def register(cls: type) -> type:
    """Class decorator: make ``cls`` (with ``kind``, ``to_parts`` and ``from_parts``) a storage kind."""
    kind = cls.kind
    if kind in _KINDS and _KINDS[kind] is not cls:
        raise TypeError(f"storage kind {kind!r} is registered twice")
    _KINDS[kind] = cls
    return cls


def kind_class(kind: str) -> type | None:
    """The record class of storage kind ``kind``, or None if no such kind exists."""
    if kind not in _KINDS and kind in _MODULES:
        importlib.import_module(_MODULES[kind])
    return _KINDS.get(kind)


def attach(layer: nn.Module, record: R, param: str = "weight") -> R:
    """Set ``layer.<param>`` to the record's values (exactly) and keep the record on the layer."""
    with torch.no_grad():
        getattr(layer, param).copy_(torch.from_numpy(record.dequantize()))
    records = dict(getattr(layer, _ATTR, {}))
    records[param] = record
    setattr(layer, _ATTR, records)
    return record


def record_of(layer: nn.Module, param: str = "weight") -> Record | None:
    """The record of ``layer.<param>``, if it has one and the values still equal it (training
    since makes it stale: the values are then stored as floats)."""
    record = getattr(layer, _ATTR, {}).get(param)
    value = getattr(layer, param, None)
    if record is None or not isinstance(value, torch.Tensor):
        return None
    if not np.array_equal(record.dequantize(), value.detach().cpu().numpy()):
        return None
    return record


def records_of(layer: nn.Module) -> dict[str, Record]:
    """Every parameter record of ``layer`` that still holds, by parameter name."""
    out = {}
    for param in getattr(layer, _ATTR, {}):
        record = record_of(layer, param)
        if record is not None:
            out[param] = record
    return out


@register
class SparseRecord:
    """A tensor with many exact zeros: where the non-zeros are (a 0/1 mask, entropy-coded) and
    their values, in float16 when every one of them is exactly a float16, else float32.

    Made by the container for any float weight that is sparse enough to be smaller this way (a
    pruned layer left in float); every value comes back equal, a zero as +0.0 (a pruned weight
    masked to -0.0 reads back as +0.0, which no conv or matmul tells apart).
    """

    kind: ClassVar[str] = "sparse"

    def __init__(self, mask: np.ndarray, values: np.ndarray) -> None:
        self.mask = mask.astype(np.uint8)
        self.values = values
        self.bits = int(values.dtype.itemsize * 8)

    @classmethod
    def of(cls, array: np.ndarray) -> SparseRecord:
        nz = array != 0
        values = array[nz].astype(np.float32)
        half = values.astype(np.float16)
        exact16 = bool(np.array_equal(half.astype(np.float32), values))
        return cls(nz, half if exact16 else values)

    def dequantize(self) -> np.ndarray:
        out = np.zeros(self.mask.shape, np.float32)
        out[self.mask.astype(bool)] = self.values.astype(np.float32)
        return out

    def to_parts(self) -> tuple[dict, dict[str, np.ndarray]]:
        return {}, {"mask": self.mask, "values": self.values}

    @classmethod
    def from_parts(cls, fields: dict, arrays: dict[str, np.ndarray]) -> SparseRecord:
        mask, values = arrays["mask"], arrays["values"]
        if mask.dtype != np.uint8 or (mask.size and int(mask.max()) > 1) or int(mask.sum()) != values.size \
                or values.dtype not in (np.float16, np.float32):
            raise ValueError("the positions do not match the stored values")
        return cls(mask, values)


@register
class StackedRecord:
    """Several records of one shape stacked along a new first axis, each with its rows in
    ``rows`` order: how an ONNX LSTM/GRU holds its matrices (``W[direction, gates x hidden,
    input]``, the gates in ONNX's order, not torch's), where the exporter folds the per-direction
    parameters into one constant. Each item is stored as its own kind's parts (a matrix without a
    record as a :class:`SparseRecord`, which holds dense floats too), under ``"<item>/<part>"``.
    """

    kind: ClassVar[str] = "stacked"

    def __init__(self, items: list, rows: list[int] | None = None) -> None:
        self.items = list(items)
        self.rows = None if rows is None else [int(r) for r in rows]
        self.bits = max(int(getattr(r, "bits", 32)) for r in self.items)
        self.raw_parts = {f"{i}/{key}" for i, r in enumerate(self.items) for key in getattr(r, "raw_parts", ())}

    def dequantize(self) -> np.ndarray:
        arrays = [r.dequantize() for r in self.items]
        if self.rows is not None:
            arrays = [a[self.rows] for a in arrays]
        return np.stack(arrays).astype(np.float32)

    def to_parts(self) -> tuple[dict, dict[str, np.ndarray]]:
        fields, arrays = {"items": [], "rows": self.rows}, {}
        for i, record in enumerate(self.items):
            f, a = record.to_parts()
            fields["items"].append({"kind": record.kind, "fields": f})
            arrays.update({f"{i}/{key}": v for key, v in a.items()})
        return fields, arrays

    @classmethod
    def from_parts(cls, fields: dict, arrays: dict[str, np.ndarray]) -> StackedRecord:
        items = []
        for i, item in enumerate(fields["items"]):
            kind = item["kind"]
            sub = kind_class(kind) if kind != cls.kind else None  # one level: no stack of stacks
            if sub is None:
                raise ValueError(f"item {i} has kind {kind!r}, which a stack cannot hold")
            prefix = f"{i}/"
            items.append(sub.from_parts(item["fields"], {k[len(prefix):]: v for k, v in arrays.items()
                                                         if k.startswith(prefix)}))
        if not items:
            raise ValueError("a stack of no items")
        shapes = {r.dequantize().shape for r in items}
        rows = fields.get("rows")
        if len(shapes) != 1:
            raise ValueError(f"the stacked items differ in shape: {sorted(shapes)}")
        if rows is not None:
            n = next(iter(shapes))[0] if next(iter(shapes)) else 0
            if not isinstance(rows, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in rows) \
                    or sorted(rows) != list(range(n)):
                raise ValueError("the row order is not a permutation of the items' rows")
        return cls(items, rows)
