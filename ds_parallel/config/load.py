"""YAML + dotted overrides -> typed `Config`, with one-line errors.

Order: YAML file (or the embedded default) -> `key=value` overrides -> model preset filled
in under the explicit model fields -> typed construction (unknown keys and wrong types
rejected) -> `validate` for cross-field rules.
"""
from __future__ import annotations

import dataclasses
import os
import types
import typing
from typing import Any, Literal, Union

import yaml

from ds_parallel.config.errors import ConfigError
from ds_parallel.config.presets import MODEL_PRESETS
from ds_parallel.config.schema import Config
from ds_parallel.config.validate import validate


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """`["train.steps=5", "parallel.tp=2"]` -> nested dict; values parsed as YAML scalars."""
    tree: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key or any(not part for part in key.split(".")):
            raise ConfigError(f"override {item!r} is not of the form dotted.key=value (e.g. train.steps=50)")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        if isinstance(value, str):
            try:
                value = float(value)  # "1e-3": YAML 1.1 only knows floats with a dot
            except ValueError:
                pass
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} sets a key below the scalar {part!r}")
        node[parts[-1]] = value
    return tree


def merge_trees(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge_trees(out[key], value)
        else:
            out[key] = value
    return out


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(path: str, value: Any, tp: Any) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return _build(path, tp, value)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(path, value, arg)
            except ConfigError:
                pass
        raise ConfigError(f"{path}={value!r} has the wrong type: expected {_type_name(tp)}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{path}={value!r} is not one of {', '.join(map(repr, choices))}")
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {value!r}")
        (item,) = typing.get_args(tp)
        return [_coerce(f"{path}[{i}]", v, item) for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}={value!r} has the wrong type: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}={value!r} has the wrong type: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}={value!r} has the wrong type: expected a number")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}={value!r} has the wrong type: expected a string")
        return value
    if tp is Any:
        return value
    raise TypeError(f"config field {path}: unsupported annotation {tp!r}")


def _build(prefix: str, cls: type, data: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in hints:
            where = f"{prefix}.{key}" if prefix else key
            section = prefix or "the top level"
            raise ConfigError(f"unknown key {where!r}: {section} accepts {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in data:
            kwargs[name] = _coerce(f"{prefix}.{name}" if prefix else name, data[name], hints[name])
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Typed construction: fills the model preset under explicit model fields."""
    data = dict(data)
    model = dict(data.get("model") or {})
    preset_name = model.get("preset", "debug_dense")
    if preset_name not in MODEL_PRESETS:
        raise ConfigError(
            f"model.preset={preset_name!r} is unknown: choose one of {', '.join(sorted(MODEL_PRESETS))}"
        )
    data["model"] = {**MODEL_PRESETS[preset_name], **model, "preset": preset_name}
    return _build("", Config, data)


def read_yaml(path: str) -> dict[str, Any]:
    if not os.path.isfile(path):
        raise ConfigError(f"--config {path!r} does not exist: pass a YAML file such as configs/smoke_cpu.yaml")
    with open(path) as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            line = getattr(getattr(exc, "problem_mark", None), "line", None)
            at = f" (line {line + 1})" if line is not None else ""
            raise ConfigError(f"--config {path!r} is not valid YAML{at}: fix the syntax") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path!r} must hold a mapping of sections (model:, train:, ...)")
    return data


def load_config(path: str | None, overrides: list[str] = (), world_size: int | None = None,
                purpose: str = "train") -> Config:
    """The full pipeline: YAML -> overrides -> typed tree -> validation (see validate's
    `purpose`: "plan" admits layouts the trainer cannot run yet)."""
    data = read_yaml(path) if path else {}
    data = merge_trees(data, parse_overrides(list(overrides)))
    cfg = config_from_dict(data)
    validate(cfg, world_size, purpose)
    return cfg


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
