"""Strict YAML <-> dataclass conversion and type-checked ``--set`` overrides.

Every problem is collected (not just the first) and reported with its dotted path, e.g.
``model.lm.num_layers: expected int, got str 'sixty'``.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from megatron_emu.config.schema import EmuConfig


class ConfigError(ValueError):
    """One or more configuration problems; ``.errors`` lists them, each naming a dotted path."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("invalid configuration:\n  - " + "\n  - ".join(self.errors))


_MISSING = object()
_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def _section_type(hint: Any) -> Any:
    """The dataclass of a section annotated ``X`` or ``Optional[X]`` (else ``hint`` itself)."""
    if typing.get_origin(hint) in (Union, types.UnionType):
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(inner) == 1 and dataclasses.is_dataclass(inner[0]):
            return inner[0]
    return hint


def _dotted_keys(cls: type = EmuConfig, prefix: str = "") -> list[str]:
    """Every dotted key of the schema (sections and leaves)."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        out.append(prefix + f.name)
        section = _section_type(hints[f.name])
        if dataclasses.is_dataclass(section):
            out += _dotted_keys(section, f"{prefix}{f.name}.")
    return out


def did_you_mean(key: str) -> str:
    """`` (did you mean `train.lr`?)`` for a mistyped dotted key, or "" when nothing is close:
    the closest whole key, else the closest name in the same section."""
    import difflib

    keys = _dotted_keys()
    same_depth = [k for k in keys if k.count(".") == key.count(".")]
    best = difflib.get_close_matches(key, same_depth, n=1, cutoff=0.75)
    if not best:
        section, _, leaf = key.rpartition(".")
        siblings = [k.rpartition(".")[2] for k in keys if k.rpartition(".")[0] == section]
        near = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
        best = [f"{section}.{near[0]}" if section else near[0]] if near else []
    return f" (did you mean `{best[0]}`?)" if best else ""


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, path: str, errors: list[str]) -> Any:
    """Check ``value`` against annotation ``tp``; return the converted value (or _MISSING)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        sub: list[str] = []
        for a in inner:
            trial: list[str] = []
            out = _convert(value, a, path, trial)
            if not trial:
                return out
            sub.extend(trial)
        errors.append(sub[0] if len(inner) == 1 else f"{path}: {value!r} matches none of {tp}")
        return _MISSING
    if origin is Literal:
        if value in args:
            return value
        errors.append(f"{path}: expected one of {list(args)}, got {value!r}")
        return _MISSING
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{path}: expected a list, got {type(value).__name__} {value!r}")
            return _MISSING
        out = [_convert(v, args[0], f"{path}[{i}]", errors) for i, v in enumerate(value)]
        return out
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, path, errors)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        # YAML 1.1 reads "1e-4" (exponent, no dot) as a string.
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:  # pragma: no cover - schema uses only the types above
        raise TypeError(f"unsupported annotation {tp} at {path}")
    errors.append(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return _MISSING


def _build(cls: type, data: Any, path: str, errors: list[str]) -> Any:
    if not isinstance(data, dict):
        errors.append(f"{path or '<root>'}: expected a mapping, got {type(data).__name__}")
        return _MISSING
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{path}." if path else ""
    for key in data:
        if key not in fields:
            errors.append(f"{prefix}{key}: unknown key{did_you_mean(prefix + str(key))} "
                          f"(allowed here: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        if name in data:
            v = _convert(data[name], hints[name], prefix + name, errors)
            if v is not _MISSING:
                kwargs[name] = v
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            if dataclasses.is_dataclass(hints[name]):
                # A missing section: report its required fields, not just the section.
                _build(hints[name], {}, prefix + name, errors)
            else:
                errors.append(f"{prefix}{name}: missing required field")
    try:
        return cls(**kwargs)
    except TypeError:
        return _MISSING  # already reported above


def from_dict(data: dict) -> EmuConfig:
    errors: list[str] = []
    cfg = _build(EmuConfig, data, "", errors)
    if errors:
        raise ConfigError(errors)
    return cfg


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=3"`` -> ``("a.b", 3)``; the value is parsed as YAML (``null``, lists, numbers)."""
    if "=" not in item:
        raise ConfigError([f"--set {item!r}: expected dotted.key=value"])
    key, raw = item.split("=", 1)
    key = key.strip()
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError([f"--set {key}: value {raw!r} is not valid YAML ({e})"]) from e
    return key, value


def apply_overrides(data: dict, overrides: list[str], errors: list[str] | None = None) -> dict:
    """Apply ``--set`` items to a raw config dict (types are checked by ``from_dict`` after).

    Problems are appended to ``errors`` when given, else raised as one ``ConfigError``."""
    collect = errors is not None
    errors = errors if collect else []
    for item in overrides:
        try:
            key, value = parse_override(item)
        except ConfigError as e:
            errors.extend(e.errors)
            continue
        parts = key.split(".")
        node, cls = data, EmuConfig
        for i, part in enumerate(parts):
            names = {f.name: f for f in dataclasses.fields(cls)} if cls else {}
            if part not in names:
                errors.append(f"--set {key}: unknown key {'.'.join(parts[:i + 1])!r}{did_you_mean(key)}")
                break
            if i == len(parts) - 1:
                node[part] = value
                break
            hint = _section_type(typing.get_type_hints(cls)[part])
            if not dataclasses.is_dataclass(hint):
                errors.append(f"--set {key}: {'.'.join(parts[:i + 1])!r} is not a section")
                break
            if node.get(part) is None:
                node[part] = {}
            if not isinstance(node[part], dict):
                errors.append(f"--set {key}: {'.'.join(parts[:i + 1])!r} is not a mapping in the file")
                break
            node = node[part]
            cls = hint
    if errors and not collect:
        raise ConfigError(errors)
    return data


def load_config(path: str | Path, overrides: list[str] | None = None) -> EmuConfig:
    """Read a YAML preset, apply ``--set`` overrides, and build the typed config (strictly)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"--config: no such file {str(path)!r}"])
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError([f"{path}: not valid YAML ({e})"]) from e
    errors: list[str] = []
    data = apply_overrides(data, overrides or [], errors)
    try:
        cfg = from_dict(data)
    except ConfigError as e:
        errors.extend(e.errors)
    if errors:
        raise ConfigError(errors)
    return cfg


def dump_config(cfg: EmuConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
