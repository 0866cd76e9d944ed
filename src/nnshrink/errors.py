"""The one error tree of nnshrink.

Every error a user can cause derives from :class:`NnshrinkError`, so a caller (and the CLI)
can catch one type and print one line. Messages name the problem and, where possible, the fix.
"""

from __future__ import annotations


class NnshrinkError(Exception):
    """Base of every error nnshrink raises on purpose."""


class ConfigError(NnshrinkError, ValueError):
    """A config, plan or argument has an invalid value."""


class UnsupportedLayerError(NnshrinkError):
    """A layer cannot be handled by the requested operation."""


class UnsupportedModelError(NnshrinkError):
    """A whole model cannot be handled (for example torch.fx cannot trace it)."""


class UnsupportedOpError(UnsupportedModelError):
    """An ONNX graph holds operators that nnshrink cannot convert."""


class InputShapeError(NnshrinkError, ValueError):
    """The example input does not fit the model."""


class FormatError(NnshrinkError):
    """A file is not of the expected format (not ONNX, unknown version, ...)."""


class CorruptDataError(FormatError):
    """A file of the right format fails a checksum or structural check."""


class DataError(NnshrinkError):
    """A dataset cannot be found, read or split."""
