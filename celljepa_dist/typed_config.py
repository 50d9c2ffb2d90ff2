"""The one dict <-> dataclass mechanism of every config in the project (torch-free).

    cfg = from_dict(ModelConfig, {"d_model": 64}, prefix="model")   # coerced by field type
    apply_override(data, TrainConfig, "optim.lr=3e-4")                # `--set`, checked by path
    flatten(cfg) == {"model.d_model": 64, ...}                        # MLflow params

Any dataclass field whose type is itself a dataclass is a nested section; a key that matches no
field is rejected with its full dotted name and the valid keys. Enumerations are `Literal` types:
`from_dict` rejects a value outside them, and `check_choices` (called by each section's pure
`validate`) catches one set directly in Python. Errors are `ConfigError` (a ValueError) naming the
dotted key.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the dotted key."""


def invalid(where: str, name: str, value: Any, why: str) -> ConfigError:
    """The error for field `name` of the section at dotted path `where`: `where.name=value: why`."""
    key = f"{where}.{name}" if where else name
    return ConfigError(f"{key}={value!r}: {why}")


def field_types(cls) -> dict[str, Any]:
    """Field name -> resolved type annotation of dataclass `cls` (string annotations evaluated)."""
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def unwrap_optional(tp) -> tuple[Any, bool]:
    """(T, True) for Optional[T] / T | None, else (tp, False)."""
    if typing.get_origin(tp) in (typing.Union, getattr(types, "UnionType", None)):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0], True
    return tp, False


def literal_choices(tp) -> tuple | None:
    """The allowed values of a (possibly Optional) Literal type, else None."""
    tp, _ = unwrap_optional(tp)
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def check_choices(obj, where: str) -> None:
    """Raise naming `where.field` when a Literal-typed field of dataclass `obj` holds another value.

    Pure: reads `obj` only. `from_dict` already rejects such values; this catches configs built in
    Python (`ModelConfig(norm_style="sandwich")`)."""
    for name, tp in field_types(type(obj)).items():
        choices = literal_choices(tp)
        value = getattr(obj, name)
        if choices is not None and value not in choices and not (value is None and unwrap_optional(tp)[1]):
            raise invalid(where, name, value, f"must be one of {list(choices)}")


def coerce(value: Any, tp: Any, key: str) -> Any:
    """Convert a YAML/JSON/CLI value to the field type `tp`; strings from `--set` are parsed."""
    tp, optional = unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise ConfigError(f"{key}: null is not allowed (expected {getattr(tp, '__name__', tp)})")
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise ConfigError(f"{key}: expected a boolean, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            as_float = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not as_float.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(as_float)
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        items = [coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if isinstance(value, str):
            value = yaml.safe_load(value)
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, prefix=key)
    return value


def from_dict(cls, data: dict | None, prefix: str = ""):
    """Build dataclass `cls` from a nested dict; unknown keys raise naming the dotted key.

    Missing keys take the field defaults. Values are coerced, not validated: call `validate()`."""
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {data!r}")
    types_ = field_types(cls)
    unknown = sorted(set(data) - set(types_), key=str)
    if unknown:
        dotted = [f"{prefix}.{k}" if prefix else str(k) for k in unknown]
        raise ConfigError(
            f"unknown config key(s) {dotted}; valid keys under {prefix or '<root>'}: {sorted(types_)}"
        )
    kwargs = {name: coerce(data[name], tp, f"{prefix}.{name}" if prefix else name)
              for name, tp in types_.items() if name in data}
    return cls(**kwargs)


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def apply_override(data: dict, cls, assignment: str) -> None:
    """Apply one `a.b.c=value` to the nested dict `data`, checking the path against `cls`.

    Mutates `data` (the raw mapping being assembled from YAML and `--set`), never a config."""
    if "=" not in assignment:
        raise ConfigError(f"--set expects key=value, got {assignment!r}")
    dotted, raw = assignment.split("=", 1)
    parts = dotted.strip().split(".")
    node, node_cls = data, cls
    for i, part in enumerate(parts):
        types_ = field_types(node_cls)
        if part not in types_:
            where = ".".join(parts[:i]) or "<root>"
            raise ConfigError(f"--set {dotted}: unknown key {part!r} under {where}; valid: {sorted(types_)}")
        tp, _ = unwrap_optional(types_[part])
        if i == len(parts) - 1:
            # Keep the raw string; from_dict coerces it by the field type (so `1e-4` -> float).
            node[part] = raw if not dataclasses.is_dataclass(tp) else yaml.safe_load(raw)
        else:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(f"--set {dotted}: {'.'.join(parts[: i + 1])} is not a section")
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            elif not isinstance(child, dict):
                raise ConfigError(f"--set {dotted}: {'.'.join(parts[: i + 1])} is {child!r}, not a mapping")
            node, node_cls = child, tp


def flatten(obj, prefix: str = "") -> dict[str, Any]:
    """`{"optim.lr": 1e-4, ...}` for MLflow params."""
    out: dict[str, Any] = {}
    items = to_dict(obj).items() if dataclasses.is_dataclass(obj) else obj.items()
    for k, v in items:
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
