"""Calibration inputs without labels, the user's own metric, and fidelity when there is neither.

- :func:`as_source`: what Python callers may pass as ``calib`` (a tensor, an array, a list of
  tensors or of ``(input, target)`` tuples, a DataLoader, or a callable returning any of these),
  made one re-iterable source of batches; anything else is one :class:`ConfigError`.
- :func:`load_calib`: the command line's ``--calib FILE``: an ``.npz`` with one key per model
  input (``(N, ...)`` arrays of any rank) or a folder of ``.npy`` files (each one batch, or one
  sample without the batch axis; their shapes may differ, as text lines' widths do).
- :func:`load_evaluator`: ``--eval module:function`` (or ``path/to/file.py:function``), the
  user's ``evaluate(model) -> float``, higher is better.
- :func:`fidelity`: how close a compressed model's outputs are to the source's on held-out
  inputs: output SQNR, top-1 agreement along the last axis, largest absolute error.
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from nnshrink.errors import ConfigError, DataError


def _tensor(x, where: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        if x.dtype.kind not in "fiub":
            raise ConfigError(f"{where}: arrays of {x.dtype} are not model inputs")
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32) if x.dtype.kind != "f" else np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise ConfigError(f"{where}: calibration batches must be tensors, arrays or (input, target) tuples, "
                          f"got {type(x).__name__}")
    if x.is_floating_point() and not torch.isfinite(x).all():
        raise DataError(f"{where}: the calibration inputs hold NaN or infinite values")
    return x.float() if not x.is_floating_point() else x


class CalibSource:
    """Batches of inputs, re-iterable, each a tensor (a ``(input, target)`` tuple keeps its target)."""

    def __init__(self, calib) -> None:
        self._calib = calib

    def __iter__(self) -> Iterator:
        items = self._calib() if callable(self._calib) and not isinstance(self._calib, nn.Module) else self._calib
        if isinstance(items, (torch.Tensor, np.ndarray)):
            items = [items]
        if not isinstance(items, Iterable) or isinstance(items, (str, bytes, dict)):
            raise ConfigError(f"calib must be a tensor, a list of tensors, a DataLoader or a callable returning "
                              f"one, got {type(items).__name__}")
        for i, item in enumerate(items):
            where = f"calibration batch {i}"
            if isinstance(item, (tuple, list)):
                if not item:
                    raise ConfigError(f"{where} is empty")
                yield (_tensor(item[0], where), *item[1:])
            else:
                yield _tensor(item, where)


def as_source(calib) -> CalibSource | None:
    """``calib`` as a :class:`CalibSource` (None stays None)."""
    if calib is None or isinstance(calib, CalibSource):
        return calib
    if isinstance(calib, (str, Path)):
        raise ConfigError("calib takes tensors or batches; for a file use nnshrink.data.calib.load_calib(path)")
    return CalibSource(calib)


def inputs_of(batch) -> torch.Tensor:
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def load_calib(path: str | Path, input_name: str | None = None, rank: int | None = None,
               batch_size: int = 32) -> list[torch.Tensor]:
    """Calibration batches from ``path``: an ``.npz`` (one key per model input; the key named
    ``input_name``, or the only key) or a folder of ``.npy`` files.

    Args:
        rank: The model input's rank with the batch axis, where known: a ``.npy`` file of one
            rank less is one sample.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"--calib {path}: no such file or folder")
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        if not files:
            raise DataError(f"--calib {path}: the folder holds no .npy files")
        batches = []
        for f in files:
            try:
                a = np.load(f, allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise DataError(f"--calib {f}: not a readable .npy array ({exc})") from exc
            t = _tensor(a, f"--calib {f}")
            if rank is not None and t.dim() == rank - 1:
                t = t.unsqueeze(0)
            elif rank is not None and t.dim() != rank:
                raise DataError(f"--calib {f}: shape {tuple(a.shape)} does not fit a model input of rank {rank}")
            batches.append(t)
        return batches
    if path.suffix.lower() != ".npz":
        raise DataError(f"--calib {path}: expected an .npz file or a folder of .npy files")
    try:
        with np.load(path, allow_pickle=False) as z:
            keys = list(z.files)
            if input_name is not None and input_name in keys:
                key = input_name
            elif len(keys) == 1:
                key = keys[0]
            else:
                raise DataError(f"--calib {path}: keys {keys}; name one after the model input "
                                f"{input_name!r} (one key per input)")
            arr = z[key]
    except (ValueError, OSError) as exc:
        raise DataError(f"--calib {path}: not a readable .npz ({exc})") from exc
    x = _tensor(arr, f"--calib {path}[{key}]")
    if rank is not None and x.dim() != rank:
        raise DataError(f"--calib {path}[{key}]: shape {tuple(arr.shape)} does not fit a model input of rank "
                        f"{rank} (the first axis is the samples)")
    if len(x) == 0:
        raise DataError(f"--calib {path}[{key}] holds no samples")
    return list(torch.split(x, batch_size))


def load_evaluator(spec: str) -> Callable[[nn.Module], float]:
    """The user's ``evaluate(model) -> float`` from ``module:function`` or ``file.py:function``."""
    if ":" not in spec:
        raise ConfigError(f"--eval takes module:function or path/to/file.py:function, got {spec!r}")
    target, _, name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            file = Path(target)
            if not file.is_file():
                raise FileNotFoundError(f"--eval {spec}: no such file {file}")
            mod_spec = importlib.util.spec_from_file_location(f"nnshrink_user_eval_{file.stem}", file)
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ImportError as exc:
        raise ConfigError(f"--eval {spec}: cannot import {target!r} ({exc})") from exc
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"--eval {spec}: {target!r} has no function {name!r}")

    def evaluate(model: nn.Module) -> float:
        value = fn(model)
        try:
            value = float(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"--eval {spec} returned {type(value).__name__}, not a number") from exc
        if not math.isfinite(value):
            raise ConfigError(f"--eval {spec} returned {value}")
        return value

    return evaluate


def _flat_outputs(model: nn.Module, batches) -> list[torch.Tensor]:
    was = model.training
    model.eval()
    outs: list[list[torch.Tensor]] = []
    with torch.no_grad():
        for b in batches:
            y = model(inputs_of(b))
            ys = y if isinstance(y, (tuple, list)) else (y,)
            # class scores last: (N, C), (N, T, C) as they are, (N, C, H, W) with C moved last
            outs.append([(t.movedim(1, -1) if t.dim() >= 4 else t).float() for t in ys])
    model.train(was)
    return [torch.cat([o[k].reshape(-1, o[k].shape[-1]) if o[k].dim() > 1 else o[k].reshape(-1, 1)
                       for o in outs]) for k in range(len(outs[0]))]


class Fidelity:
    """Measures models against ``reference`` on ``batches``; the reference's outputs are computed
    once, not at every measurement (a plan step's sweep evaluates many candidates)."""

    def __init__(self, reference: nn.Module, batches) -> None:
        self.batches = list(batches)
        self.ref = _flat_outputs(reference, self.batches)

    def __call__(self, model: nn.Module) -> dict:
        """Output SQNR (dB), top-1 agreement of the class axis (the last of ``(N, C)`` and
        ``(N, T, C)`` outputs, axis 1 of ``(N, C, H, W)`` maps; outputs with one class are left
        out) and the largest absolute error of ``model``, over all outputs."""
        ref, got = self.ref, _flat_outputs(model, self.batches)
        signal = sum(float((r ** 2).sum()) for r in ref)
        noise = sum(float(((r - g) ** 2).sum()) for r, g in zip(ref, got))
        agree = [float((r.argmax(-1) == g.argmax(-1)).float().mean()) for r, g in zip(ref, got) if r.shape[-1] > 1]
        return {"output_sqnr_db": 10 * math.log10(signal / noise) if noise > 0 else None,
                "top1_agreement": sum(agree) / len(agree) if agree else None,
                "max_abs_error": max(float((r - g).abs().max()) for r, g in zip(ref, got))}

    def sqnr(self, model: nn.Module) -> float:
        """``evaluate(model)`` for plan steps: output SQNR in dB, capped at 100, higher is better."""
        value = self(model)["output_sqnr_db"]
        return 100.0 if value is None else min(100.0, value)


def fidelity(reference: nn.Module, model: nn.Module, batches) -> dict:
    """:class:`Fidelity` of ``model`` against ``reference`` on ``batches``, measured once."""
    return Fidelity(reference, batches)(model)
