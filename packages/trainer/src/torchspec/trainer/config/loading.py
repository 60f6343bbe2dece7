"""Reading a training config: YAML files and dotted command-line overrides, checked strictly.

Files and overrides are checked strictly: an unknown key fails with the closest known key as a
suggestion, a value of the wrong type fails with its key path, and a key of the 0.3 layout
(``training.learning_rate``) fails naming where it moved (``migration.MOVED_KEYS``).

YAML is read with one change to PyYAML's scalar rules: ``5e-5`` is a float (YAML 1.1 wants
``5.0e-5``), because learning rates are written that way on command lines.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from torchspec.trainer.config.migration import LAYOUT_VERSION, MOVED_KEYS
from torchspec.trainer.config.schema import ConfigError, TrainConfig
from torchspec.trainer.config.validation import validate_config

__all__ = [
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "dump_config",
    "load_config",
    "parse_yaml_scalar",
]

# --- YAML with scientific-notation floats ------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    pass


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.VERBOSE,
)
_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
for _first in "-+0123456789.":
    _Loader.yaml_implicit_resolvers[_first] = [
        (tag, regexp)
        for tag, regexp in _Loader.yaml_implicit_resolvers.get(_first, [])
        if tag != "tag:yaml.org,2002:float"
    ]
    _Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, [_first])


def parse_yaml_scalar(text: str) -> Any:
    """A command-line value read with the same rules as the config files (``5e-5`` is a float)."""
    if text == "":
        return ""
    return yaml.load(text, Loader=_Loader)


# --- dict <-> dataclasses, strictly ------------------------------------------------------------------

_SECTIONS = {f.name: f.type for f in dataclasses.fields(TrainConfig)}
# Keys that say the same thing two ways. Each layer of a config (the defaults, the file, the
# command line) may set one of a pair; it then resets the other, so a later layer's choice replaces
# an earlier one's instead of conflicting with it. Both set in one layer is a ConfigError.
_ALTERNATIVES = (("lr_schedule", "warmup_steps", "warmup_ratio"),)
_UNION_ORIGINS = (Union, types.UnionType)
_NOT_A_MATCH = object()


def _section_classes() -> dict[str, type]:
    hints = typing.get_type_hints(TrainConfig)
    return {name: hints[name] for name in _SECTIONS}


def _all_key_paths() -> list[str]:
    paths: list[str] = []
    for section, cls in _section_classes().items():
        paths.extend(f"{section}.{f.name}" for f in dataclasses.fields(cls))
    return paths


def _suggest(path: str) -> str:
    candidates = _all_key_paths() + list(_SECTIONS)
    match = difflib.get_close_matches(path, candidates, n=1, cutoff=0.6)
    if not match:
        # The right key in the wrong place: "learning_rate" at the top level, or under data.
        by_leaf = {candidate.rsplit(".", 1)[-1]: candidate for candidate in candidates}
        leaf = difflib.get_close_matches(path.rsplit(".", 1)[-1], list(by_leaf), n=1, cutoff=0.75)
        match = [by_leaf[leaf[0]]] if leaf else []
    return f"; did you mean {match[0]}?" if match else f"; known sections: {', '.join(_SECTIONS)}"


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(repr(v) for v in typing.get_args(hint))
    if origin in _UNION_ORIGINS:
        return " | ".join("null" if a is type(None) else _type_name(a) for a in typing.get_args(hint))
    if origin is list:
        return f"list of {_type_name(typing.get_args(hint)[0])}"
    if origin is dict:
        return "a mapping"
    return {int: "integer", float: "number", bool: "true/false", str: "string"}.get(hint, str(hint))


def _coerce(value: Any, hint: Any) -> Any:
    """``value`` as ``hint`` or ``_NOT_A_MATCH``. Integers are accepted for floats; nothing else converts."""
    origin = typing.get_origin(hint)
    if hint is Any:
        return value
    if origin is Literal:
        return value if any(value == v and type(value) is type(v) for v in typing.get_args(hint)) else _NOT_A_MATCH
    if origin in _UNION_ORIGINS:
        for arg in typing.get_args(hint):
            if arg is type(None):
                if value is None:
                    return None
                continue
            result = _coerce(value, arg)
            if result is not _NOT_A_MATCH:
                return result
        return _NOT_A_MATCH
    if origin is dict:
        return dict(value) if isinstance(value, dict) and all(isinstance(k, str) for k in value) else _NOT_A_MATCH
    if origin is list:
        if not isinstance(value, (list, tuple)):
            return _NOT_A_MATCH
        (item_hint,) = typing.get_args(hint)
        items = [_coerce(v, item_hint) for v in value]
        return _NOT_A_MATCH if any(i is _NOT_A_MATCH for i in items) else items
    if hint is bool:
        return value if isinstance(value, bool) else _NOT_A_MATCH
    if hint is int:
        return value if isinstance(value, int) and not isinstance(value, bool) else _NOT_A_MATCH
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        return _NOT_A_MATCH
    if hint is str:
        return value if isinstance(value, str) else _NOT_A_MATCH
    return value if isinstance(value, hint) else _NOT_A_MATCH


def _where(source: str | None) -> str:
    return f" in {source}" if source else ""


def config_from_dict(values: dict, source: str | None = None, base: TrainConfig | None = None) -> TrainConfig:
    """Build a config from nested dicts on top of ``base`` (default: the defaults). ``source`` names
    the file for error messages."""
    config = dataclasses.replace(base) if base is not None else TrainConfig()
    if values is None:
        return config
    if not isinstance(values, dict):
        raise ConfigError(
            f"{source or 'config'}: expected a mapping of sections ({', '.join(_SECTIONS)}), "
            f"got {type(values).__name__}"
        )
    sections = _section_classes()
    layer = set()
    for section, section_values in values.items():
        if section not in sections:
            raise ConfigError(f"unknown key {section}{_where(source)}{_suggest(str(section))}")
        if section_values is None:
            continue
        if not isinstance(section_values, dict):
            raise ConfigError(f"{section}{_where(source)} must be a mapping of keys, got {section_values!r}")
        current = dataclasses.replace(getattr(config, section))
        for key, value in section_values.items():
            _set_field(current, section, str(key), value, source)
            layer.add((section, str(key)))
        setattr(config, section, current)
    _settle_alternatives(config, layer, source)
    return config


def _settle_alternatives(config: TrainConfig, layer: set[tuple[str, str]], source: str | None) -> None:
    """Apply the ``_ALTERNATIVES`` rule to the keys one layer set (``(section, key)`` pairs)."""
    for section, first, second in _ALTERNATIVES:
        values = getattr(config, section)
        chosen = [key for key in (first, second) if (section, key) in layer and getattr(values, key) is not None]
        if len(chosen) == 2:
            raise ConfigError(
                f"{section}.{first} and {section}.{second} are both set{_where(source)}; keep one of them"
            )
        if chosen:
            setattr(values, second if chosen[0] == first else first, None)


def _set_field(section_obj: Any, section: str, key: str, value: Any, source: str | None) -> None:
    path = f"{section}.{key}"
    hints = typing.get_type_hints(type(section_obj))
    if path in MOVED_KEYS:
        raise ConfigError(f"{path}{_where(source)} moved to {MOVED_KEYS[path]} in torchspec-trainer {LAYOUT_VERSION}")
    if key not in hints:
        raise ConfigError(f"unknown key {path}{_where(source)}{_suggest(path)}")
    coerced = _coerce(value, hints[key])
    if coerced is _NOT_A_MATCH:
        raise ConfigError(f"{path}{_where(source)} must be {_type_name(hints[key])}, got {value!r}")
    setattr(section_obj, key, coerced)


def apply_overrides(config: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``section.key=value`` strings (values read as YAML scalars)."""
    config = dataclasses.replace(config, **{name: dataclasses.replace(getattr(config, name)) for name in _SECTIONS})
    layer = set()
    for override in overrides:
        where = f"command-line override {override!r}"
        if "=" not in override:
            raise ConfigError(f"{where} is not key=value; write it like optimizer.learning_rate=5e-5")
        path, text = override.split("=", 1)
        parts = path.strip().split(".")
        if len(parts) != 2 or parts[0] not in _SECTIONS:
            raise ConfigError(f"unknown key {path.strip()} in {where}{_suggest(path.strip())}")
        try:
            value = parse_yaml_scalar(text)
        except yaml.YAMLError as err:
            raise ConfigError(f"{where}: the value is not valid YAML ({str(err).splitlines()[0]})") from None
        _set_field(getattr(config, parts[0]), parts[0], parts[1], value, where)
        layer.add((parts[0], parts[1]))
    _settle_alternatives(config, layer, "the command-line overrides")
    return config


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The defaults, updated by the YAML file at ``path`` (if any), then by ``overrides``; validated."""
    config = TrainConfig()
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist; pass an existing YAML file to --config")
        try:
            values = yaml.load(path.read_text(), Loader=_Loader)
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            line = f":{mark.line + 1}" if mark is not None else ""
            raise ConfigError(f"{path}{line}: invalid YAML ({getattr(err, 'problem', None) or err})") from None
        config = config_from_dict(values, source=str(path))
    config = apply_overrides(config, overrides or [])
    validate_config(config, source=str(path) if path is not None else None)
    return config


# --- output -----------------------------------------------------------------------------------------


def config_to_dict(config: TrainConfig) -> dict:
    return dataclasses.asdict(config)


def dump_config(config: TrainConfig, path: str | os.PathLike | None = None) -> str:
    """The fully resolved config as YAML (written to ``path`` when given); loading it gives ``config`` back."""
    text = yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=None)
    if path is not None:
        Path(path).write_text(text)
    return text
