"""Reading a run config: YAML files with ``base:`` inheritance, dotted ``--set`` overrides, typed conversion.

One mechanism for every run::

    cfg = load_config("configs/gpt-b_mirai_e.yaml", ["train.micro_batch=16", "foresight.k=9"])

* A YAML file holds a nested mapping whose keys are the dataclass fields (``mirai.config.sections``). It may
  name one parent with ``base: other.yaml`` (a path relative to the file): the parent is loaded first
  (recursively) and the child's mapping is merged into it key by key (``name`` and ``out_dir`` are
  never inherited; ``name`` defaults to the file's stem). That is the only inheritance rule. A key given
  twice in one mapping is an error naming the file, the key and both lines.
* ``--set section.field=value`` overrides are applied after the YAML files; each value string is
  parsed with the type of its dataclass field (int, float, bool, str, Optional, tuple/list, Literal
  choices), so ``--set optim.lr=2e-4`` and ``--set foresight.lambdas=[2,2,1]`` both work.
* Unknown keys fail with the closest known names; wrong types fail with the dotted name of the field
  (``ConfigError``).
* ``save_config`` writes the resolved config (all fields, no ``base``) into the run folder; loading
  that file again gives the same config.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from mirai.config.sections import Config

CONFIG_DIR = Path(__file__).resolve().parent.parent.parent / "configs"


class ConfigError(ValueError):
    """A config value is unknown, mistyped or inconsistent; the message starts with the field name."""


# --------------------------------------------------------------------------------------------
# Typed conversion of one value
# --------------------------------------------------------------------------------------------
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is not None:
        return repr(tp).replace("typing.", "")
    return getattr(tp, "__name__", repr(tp))

def _mismatch(tp, where: str, value: Any) -> ConfigError:
    return ConfigError(f"{where}: expected {_type_name(tp)}, got {value!r}")


def _coerce(value: Any, tp, where: str, from_string: bool) -> Any:
    """Convert a YAML value (or a --set string) to the field type `tp`, or raise ConfigError."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return yaml.safe_load(value) if from_string else value
    if origin in (Union, types.UnionType):
        return _coerce_union(value, tp, where, from_string)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value in choices:
            return value
        raise ConfigError(f"{where}: must be one of {', '.join(repr(a) for a in choices)}, got {value!r}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping of {tp.__name__} fields, got {value!r}")
        return _build(tp, value, f"{where}.")
    if origin in (tuple, list) or tp in (tuple, list):
        return _coerce_sequence(value, tp, where, from_string)
    convert = _PLAIN.get(dict if origin is dict else tp)
    if convert is None:
        raise ConfigError(f"{where}: unsupported field type {tp!r}")
    try:
        return convert(value, from_string)
    except _Mismatch:
        raise _mismatch(tp, where, value) from None


def _coerce_union(value: Any, tp, where: str, from_string: bool) -> Any:
    """Optional[X] / X | Y: null (or "none" / "null" / "~" from a string) when allowed, else the first member
    type that takes the value."""
    args = typing.get_args(tp)
    nullable = type(None) in args
    if value is None or (nullable and isinstance(value, str) and value.strip().lower() in ("none", "null", "~")):
        if nullable:
            return None
        raise _mismatch(tp, where, value)
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, where, from_string)
        except ConfigError:
            pass
    raise _mismatch(tp, where, value)


def _coerce_sequence(value: Any, tp, where: str, from_string: bool) -> list | tuple:
    """tuple[X, Y] (exact length), tuple[X, ...] and list[X]; a --set string may omit the brackets."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if from_string and isinstance(value, str):
        text = value.strip()
        value = yaml.safe_load(text if text.startswith("[") else f"[{text}]")
    if not isinstance(value, (list, tuple)):
        value = [value]
    if origin is tuple and args and args[-1] is not Ellipsis:
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r})")
        items = [_coerce(v, a, f"{where}[{i}]", from_string=False) for i, (v, a) in enumerate(zip(value, args))]
    else:
        elem = args[0] if args else Any
        items = [_coerce(v, elem, f"{where}[{i}]", from_string=False) for i, v in enumerate(value)]
    return tuple(items) if (origin is tuple or tp is tuple) else items


class _Mismatch(Exception):
    """A value that does not fit a plain field type (``_coerce`` turns it into a ConfigError naming the field)."""


def _to_bool(value: Any, from_string: bool) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise _Mismatch


def _to_int(value: Any, from_string: bool) -> int:
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            f = float(value.replace("_", ""))
        except ValueError:
            raise _Mismatch from None
        if f.is_integer():
            return int(f)
    raise _Mismatch


def _to_float(value: Any, from_string: bool) -> float:
    if isinstance(value, bool):
        raise _Mismatch
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise _Mismatch from None
    raise _Mismatch


def _to_str(value: Any, from_string: bool) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool) and not from_string:
        return str(value)
    raise _Mismatch


def _to_dict(value: Any, from_string: bool) -> dict:
    if from_string and isinstance(value, str):
        value = yaml.safe_load(value)
    if not isinstance(value, dict):
        raise _Mismatch
    return dict(value)


_PLAIN = {bool: _to_bool, int: _to_int, float: _to_float, str: _to_str, dict: _to_dict}


# Fields that no longer exist, each with the one field that now holds its setting.
REMOVED = {
    "foresight.ema_decay": "removed: the Mirai-E teacher is the model EMA, whose decay is ema.decay; set that",
    "data.features": "removed: the loader reads the store's features when foresight.use_precomputed_features "
                     "is true; set that",
}


def _unknown(cls, key: str, where: str) -> ConfigError:
    if where in REMOVED:
        return ConfigError(f"{where}: {REMOVED[where]}")
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else f"; known keys: {', '.join(names)}"
    return ConfigError(f"{where}: unknown key{hint}")


def _build(cls, mapping: dict[str, Any], prefix: str = ""):
    """Instantiate dataclass `cls` from a (partial) mapping, typed and checked."""
    hints = _hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in mapping.items():
        where = f"{prefix}{key}"
        if key not in names:
            raise _unknown(cls, key, where)
        kwargs[key] = _coerce(value, hints[key], where, from_string=False)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as err:  # a section's own __post_init__ check
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: {err}") from err


# --------------------------------------------------------------------------------------------
# YAML files, base inheritance and --set overrides
# --------------------------------------------------------------------------------------------
def _merge(base: dict[str, Any], child: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _refuse_duplicate_keys(node, path: tuple[str, ...] = ()) -> None:
    """Raise ConfigError naming the dotted key and its lines when a YAML mapping repeats a key
    (``yaml.safe_load`` would silently keep the last value)."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[str, int] = {}
        for key_node, value_node in node.value:
            key = str(key_node.value) if isinstance(key_node, yaml.ScalarNode) else None
            if key is not None and key != "<<":
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise ConfigError(f"{'.'.join(path + (key,))}: given twice (lines {seen[key]} and {line}); "
                                      "remove one")
                seen[key] = line
            _refuse_duplicate_keys(value_node, path + ((key,) if key is not None else ()))
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_duplicate_keys(item, path)


def read_yaml(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The merged mapping of a YAML config file and its ``base:`` chain."""
    path = Path(path)
    if not path.exists() and not path.is_absolute() and (CONFIG_DIR / path).exists():
        path = CONFIG_DIR / path
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: base chain loops ({' -> '.join(map(str, _seen + (path,)))})")
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text()
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML ({err})") from err
    try:
        _refuse_duplicate_keys(root)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    base = data.pop("base", None)
    if base is not None:
        parent = read_yaml(path.parent / base, _seen + (path,))
        for own in ("name", "out_dir"):      # a run's identity is never inherited
            parent.pop(own, None)
        data = _merge(parent, data)
    return data


def _set_dotted(mapping: dict[str, Any], dotted: str, raw: str) -> None:
    """Apply `dotted=raw`, parsing raw with the field's type."""
    parts = dotted.split(".")
    cls: Any = Config
    node = mapping
    for i, part in enumerate(parts):
        where = ".".join(parts[: i + 1])
        if not (dataclasses.is_dataclass(cls) and part in {f.name for f in dataclasses.fields(cls)}):
            if dataclasses.is_dataclass(cls):
                raise _unknown(cls, part, where)
            raise ConfigError(f"{where}: {'.'.join(parts[:i])} is not a section")
        tp = _hints(cls)[part]
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(tp):
                raise ConfigError(f"{where}: is a section; set one of its fields ({where}.<field>=...)")
            node[part] = _coerce(raw, tp, where, from_string=True)
        else:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{where}: expected a section")
            cls = tp


def parse_overrides(overrides: list[str] | None) -> list[tuple[str, str]]:
    out = []
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value (e.g. train.micro_batch=16)")
        key, value = item.split("=", 1)
        out.append((key.strip(), value))
    return out


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                mapping: dict[str, Any] | None = None) -> Config:
    """Load a YAML file (or a mapping), apply ``key=value`` overrides, return a typed Config.

    ``name`` defaults to the file's stem when the file does not set it.
    """
    data: dict[str, Any] = {}
    if path is not None:
        data = read_yaml(path)
        data.setdefault("name", Path(path).stem)
    if mapping is not None:
        data = _merge(data, mapping)
    for key, value in parse_overrides(overrides):
        _set_dotted(data, key, value)
    return _build(Config, data)


def save_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write the resolved config as YAML (atomically)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text("# resolved config of this run (mirai train --config this_file reproduces it)\n"
                   + yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    os.replace(tmp, path)
    return path
