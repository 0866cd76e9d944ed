"""The integer form a technique leaves on a layer, for the container to store.

Not a technique itself: the one place that says how a layer carries its record, shared by every
technique that turns weights into integers (quantization, weight sharing).
"""

from __future__ import annotations

from typing import Protocol, TypeVar

import numpy as np
import torch
from torch import nn

_ATTR = "nnshrink_record"


class IntegerRecord(Protocol):
    """Integers plus side data that reproduce a layer's weight exactly."""

    bits: int

    def dequantize(self) -> np.ndarray: ...


R = TypeVar("R", bound=IntegerRecord)


def attach(layer: nn.Module, record: R) -> R:
    """Set ``layer.weight`` to the record's weights (exactly) and keep the record on the layer."""
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(record.dequantize()))
    setattr(layer, _ATTR, record)
    return record


def record_of(layer: nn.Module) -> IntegerRecord | None:
    """The layer's record, if it has one and its weights still equal it (training since makes it
    stale: the weights are then stored as floats)."""
    record = getattr(layer, _ATTR, None)
    if record is None or not hasattr(layer, "weight"):
        return None
    if not np.array_equal(record.dequantize(), layer.weight.detach().cpu().numpy()):
        return None
    return record
