"""Step configs: frozen dataclasses, validated on construction, registered by name for YAML."""

from __future__ import annotations

import dataclasses
import fnmatch
import importlib
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import nn

from nnshrink.errors import ConfigError

#: Version of the plan file format; a plan file names the version it was written for.
#: Version 2: per-layer settings of every step are one ``layers:`` mapping; version 1 files (with
#: ``exclude``, ``layer_bits``, ``keep_float``, ``layer_sparsity`` and ``layer_layouts``) are read
#: and turned into it.
PLAN_VERSION = 2
READABLE_PLAN_VERSIONS = (1, 2)

#: What a ``layers:`` rule may be besides a mapping of settings: the layer is left as it is.
SKIP = "skip"


def glob_escape(name: str) -> str:
    """A layer name as an fnmatch pattern that matches only it."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def match_layers(rules: dict, names: Iterable[str], where: str, what: str = "Conv/Linear layer") -> dict[str, Any]:
    """The rule of each of ``names`` that has one: the first pattern (``fnmatch``, case-sensitive;
    a plain name matches itself) that matches it, in the order the rules are written.

    Raises:
        ConfigError: a pattern that matches none of ``names`` (a typo would otherwise silently
            change nothing), naming the layers there are.
    """
    names = list(names)
    found, used = {}, set()
    for name in names:
        hits = [p for p in rules if fnmatch.fnmatchcase(name, p)]
        used.update(hits)
        if hits:
            found[name] = rules[hits[0]]
    unknown = [p for p in rules if p not in used]
    if unknown:
        shown = ", ".join(names[:40]) + (f", ... ({len(names)} in all)" if len(names) > 40 else "")
        raise ConfigError(f"{where}.layers: pattern(s) {', '.join(map(repr, unknown))} match no {what}; "
                          f"{what[:-1] + 'ces' if what.endswith('matrix') else what + 's'} are {shown or 'none'}")
    return found

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
    #: The settings a ``layers:`` rule of this step may give, each with its check (value -> the
    #: error's "must be ..." text, or None if the value is good); empty: only ``skip``.
    layer_settings: ClassVar[dict[str, Callable[[Any], str | None]]] = {}
    #: Whether the step takes ``layers:`` rules at all.
    takes_layers: ClassVar[bool] = True

    #: Per-layer rules by layer name pattern, first match wins: ``skip`` leaves a layer as it is;
    #: a mapping gives the layer its own settings (the step's ``layer_settings``).
    layers: dict = field(default_factory=dict, kw_only=True)

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
        if self.layers and not self.takes_layers:
            raise ConfigError(f"{self.kind} takes no per-layer rules (layers:)")
        for pattern, rule in self.layers.items():
            self._check_rule(pattern, rule)

    def _check_rule(self, pattern: object, rule: object) -> None:
        where = f"{self.kind}.layers[{pattern!r}]"
        if not isinstance(pattern, str) or not pattern:
            raise ConfigError(f"{self.kind}.layers keys are layer name patterns, got {pattern!r}")
        if rule == SKIP:
            return
        keys = sorted(self.layer_settings)
        if not isinstance(rule, dict) or not rule or set(rule) - set(keys):
            allowed = f"a mapping of {', '.join(keys)}" if keys else "nothing else"
            raise ConfigError(f"{where} must be 'skip' or {allowed}, got {rule!r}")
        for key, value in rule.items():
            problem = self.layer_settings[key](value)
            if problem:
                raise ConfigError(f"{where}.{key} must be {problem}, got {value!r}")

    def layer_rules(self, names: Iterable[str], what: str = "Conv/Linear layer") -> dict[str, Any]:
        """Each layer's rule (``skip`` or its settings), for the layers that have one."""
        return match_layers(self.layers, names, self.kind, what)

    def skipped_layers(self, names: Iterable[str], what: str = "Conv/Linear layer") -> list[str]:
        """The layers of ``names`` a ``skip`` rule leaves as they are."""
        return [n for n, r in self.layer_rules(names, what).items() if r == SKIP]

    def layer_setting(self, names: Iterable[str], key: str, what: str = "Conv/Linear layer") -> dict[str, Any]:
        """layer -> the ``key`` setting its rule gives, for the layers whose rule gives one."""
        return {n: r[key] for n, r in self.layer_rules(names, what).items() if isinstance(r, dict) and key in r}

    #: Version-1 spellings of per-layer settings: option name -> a function of its value giving
    #: ``layers`` rules (pattern -> rule) for :func:`step_from_dict` to read older plan files.
    legacy: ClassVar[dict[str, Callable[[Any], dict]]] = {}

    def apply(self, model: nn.Module, ctx) -> StepResult:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        if not self.takes_layers:
            out.pop("layers")
        return {self.kind: out}


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


def _upgrade(cls: type[StepConfig], options: dict, where: str) -> dict:
    """A version-1 step's options with its per-layer spellings turned into ``layers`` rules
    (the older ones first, so an explicit ``layers`` rule written beside them wins)."""
    options = dict(options)
    rules: dict = {}
    for name, convert in cls.legacy.items():
        if name in options:
            value = options.pop(name)
            try:
                for pattern, rule in convert(value).items():
                    if isinstance(rules.get(pattern), dict) and isinstance(rule, dict):
                        rules[pattern] = {**rules[pattern], **rule}
                    else:
                        rules[pattern] = rule
            except (TypeError, ValueError, AttributeError):
                raise ConfigError(f"{where}: step {cls.kind!r}: {name} {value!r} is not understood") from None
    explicit = options.get("layers") or {}
    options["layers"] = {**explicit, **{p: r for p, r in rules.items() if p not in explicit}}
    return options


def pairs(items, cast=str) -> dict:
    """``["fc1=3", "conv*=4"]`` (version 1's spelling) or a mapping, as ``{name: cast(value)}``."""
    if isinstance(items, dict):
        return {str(k): cast(v) for k, v in items.items()}
    out = {}
    for item in items:
        name, sep, value = str(item).partition("=")
        if not sep or not name:
            raise ValueError(item)
        out[name] = cast(value)
    return out


def step_from_dict(entry: object, where: str = "plan", version: int = PLAN_VERSION) -> StepConfig:
    """Build a step from ``{kind: {field: value}}``, rejecting unknown kinds and keys; a
    ``version`` 1 step has its per-layer spellings read into ``layers`` first."""
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
    if version == 1 and set(options) & set(cls.legacy):
        options = _upgrade(cls, options, where)
    known = {f.name for f in dataclasses.fields(cls)} - (set() if cls.takes_layers else {"layers"})
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"{where}: step {kind!r} has no option {', '.join(map(repr, unknown))}; "
                          f"valid options: {', '.join(sorted(known)) or 'none'}")
    options = {k: tuple(v) if isinstance(v, list) else v for k, v in options.items()}
    try:
        return cls(**options)
    except TypeError as exc:
        raise ConfigError(f"{where}: step {kind!r}: {exc}") from exc
