"""Step configs: frozen dataclasses, validated on construction, registered by name for YAML."""

from __future__ import annotations

import dataclasses
import importlib
import types
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from nnshrink.errors import ConfigError

#: Version of the plan file format; a plan file names the version it was written for.
PLAN_VERSION = 1

_REGISTRY: dict[str, type[StepConfig]] = {}

#: Modules that register steps when imported. ``plan`` sits below the techniques and the searches
#: (they import it), so it finds their steps by importing these by name when a plan names a kind
#: not yet registered, instead of importing them itself.
STEP_PROVIDERS = ("nnshrink.techniques", "nnshrink.search.budget")


@dataclass
class StepResult:
    """What a step did: the new model, facts worth reporting, and layers it left alone."""

    step: str
    model: nn.Module
    details: dict[str, Any] = field(default_factory=dict)
    skipped: list[dict[str, str]] = field(default_factory=list)


@dataclass(frozen=True)
class StepConfig:
    """Base of every plan step.

    A subclass is a frozen dataclass with a unique ``kind`` (its name in YAML), checks its fields
    in ``__post_init__`` (raising :class:`ConfigError`), and implements :meth:`apply`, which must
    not change the model it is given.
    """

    kind: ClassVar[str] = ""
    version: ClassVar[int] = 1

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if cls.kind:
            if cls.kind in _REGISTRY:
                raise TypeError(f"step kind {cls.kind!r} is registered twice")
            _REGISTRY[cls.kind] = cls

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            _check_type(self.kind, f.name, getattr(self, f.name), hints[f.name])

    def apply(self, model: nn.Module, ctx) -> StepResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict:
        return {self.kind: dataclasses.asdict(self)}


def _check_type(kind: str, name: str, value: object, hint: object) -> None:
    origin = typing.get_origin(hint)
    allowed = typing.get_args(hint) if origin in (typing.Union, types.UnionType) else (hint,)
    for t in allowed:
        if t is type(None) and value is None:
            return
        base = typing.get_origin(t) or t
        if base is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return
        if base is int and isinstance(value, bool):
            continue
        if isinstance(base, type) and isinstance(value, base):
            if base is tuple and typing.get_args(t):
                inner = typing.get_args(t)[0]
                if all(isinstance(v, inner) for v in value):
                    return
                continue
            return
    names = " or ".join(getattr(t, "__name__", str(t)) for t in allowed)
    raise ConfigError(f"{kind}.{name} must be {names}, got {value!r}")


def registered_steps() -> dict[str, type[StepConfig]]:
    """Step kinds that a plan may name, and their config classes."""
    for provider in STEP_PROVIDERS:
        importlib.import_module(provider)
    return dict(_REGISTRY)


def step_from_dict(entry: object, where: str = "plan") -> StepConfig:
    """Build a step from ``{kind: {field: value}}``, rejecting unknown kinds and keys."""
    if isinstance(entry, str):
        entry = {entry: {}}
    if not isinstance(entry, dict) or len(entry) != 1:
        raise ConfigError(f"{where}: each step must be a mapping with one key, the step kind, got {entry!r}")
    (kind, options), = entry.items()
    cls = _REGISTRY.get(kind)
    if cls is None:
        for provider in STEP_PROVIDERS:
            importlib.import_module(provider)
        cls = _REGISTRY.get(kind)
    if cls is None:
        raise ConfigError(f"{where}: unknown step {kind!r}; known steps: {', '.join(sorted(_REGISTRY))}")
    options = options or {}
    if not isinstance(options, dict):
        raise ConfigError(f"{where}: options of step {kind!r} must be a mapping, got {options!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"{where}: step {kind!r} has no option {', '.join(map(repr, unknown))}; "
                          f"valid options: {', '.join(sorted(known)) or 'none'}")
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError(f"{where}: step {kind!r}: {exc}") from exc
