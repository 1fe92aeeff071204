"""Configs: one dataclass per trainer, each field written once with its docstring-comment.

`load_config(cls, "config.yaml", ["--beta=0.2"])` reads YAML, applies `--key=value` overrides (values
parsed as YAML, so `--bf16=true`, `--lora_target_modules=[q_proj,v_proj]` work), rejects unknown keys
(with a suggestion) and wrong types before anything heavy happens, then builds the dataclass, whose
`__post_init__` validates the values. This module imports no torch and no transformers: the option
fields and their checks live in `mtpo.options`; the `TrainingArguments` subclasses (`MTPOConfig`,
`ReferenceConfig`, importable from here) in `mtpo.trainers.args`.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


def __getattr__(name: str):
    # The config classes subclass transformers' TrainingArguments (~5 s to import with torch): loaded
    # on first use, so that reading and checking a config (mtpo.options) stays light.
    if name in ("MTPOConfig", "ReferenceConfig"):
        from mtpo.trainers import args

        return getattr(args, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ------------------------------------------------------------------------------------------ loading


def load_config(cls: type, path: str | None = None, overrides: list[str] | None = None, **extra: Any):
    """Build `cls` from a YAML file, `--key=value` overrides and keyword values (in that order)."""
    return build_config(cls, read_values(cls, path, overrides, **extra))


def read_values(cls: type, path: str | None = None, overrides: list[str] | None = None, **extra: Any) -> dict:
    """The option values of a YAML file, `--key=value` overrides and keywords (later ones win), unchecked."""
    values: dict[str, Any] = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}")
        with open(path, encoding="utf-8") as f:
            try:
                loaded = yaml.load(f, Loader=_YAMLLoader) or {}
            except yaml.YAMLError as e:
                raise ConfigError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of option: value")
        values.update(_resolve_aliases(cls, loaded))
    # Aliases are resolved per source, so `--warmup_steps=0` overrides a file's `warmup_ratio: 0.1`.
    values.update(_resolve_aliases(cls, parse_overrides(overrides or [])))
    values.update(_resolve_aliases(cls, extra))
    return values


class _YAMLLoader(yaml.SafeLoader):
    """YAML 1.2 scalars where PyYAML's YAML 1.1 surprises: `2e-7` (no dot) is a number, not a string,
    and only true/false are booleans, so `--eval_strategy=no` stays the string "no" (bool options
    still accept yes/no/on/off, see `_coerce`)."""


_YAMLLoader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_YAMLLoader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                  list("tTfF"))
_YAMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def parse_overrides(args: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--"):
            raise ConfigError(f"expected --key=value, got {arg!r}")
        key, eq, raw = arg[2:].partition("=")
        if not eq:  # `--key value` or a bare flag `--bf16`
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                raw, i = args[i + 1], i + 1
            else:
                raw = "true"
        try:
            out[key.replace("-", "_")] = yaml.load(raw, Loader=_YAMLLoader) if raw != "" else ""
        except yaml.YAMLError:  # e.g. `--run_name=a: b`: keep the text as given
            out[key.replace("-", "_")] = raw
        i += 1
    return out


# Names from transformers 4 / TRL recipes that transformers 5 renamed; accepted so old recipes run.
ALIASES = {"warmup_ratio": "warmup_steps"}  # a float in [0, 1) is a ratio in transformers 5


def _resolve_aliases(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    """Rename old option names (`warmup_ratio` → `warmup_steps`) within one source of values."""
    fields = {f.name for f in dataclasses.fields(cls)}
    values = dict(values)
    for old, new in ALIASES.items():
        if old in values and old not in fields:
            if new in values:
                raise ConfigError(f"give either {old!r} or {new!r}, not both")
            values[new] = values.pop(old)
    return values


def build_config(cls: type, values: dict[str, Any]):
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    values = _resolve_aliases(cls, values)
    if isinstance(values.get("warmup_steps"), float) and not 0 <= values["warmup_steps"] < 1:
        raise ConfigError(f"warmup_steps: a float is a ratio and must be in [0, 1), got {values['warmup_steps']}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in fields:
            raise ConfigError(unknown_option(key, fields, cls))
        kwargs[key] = _coerce(key, value, hints.get(key, Any))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


def unknown_option(key: str, known, cls: type) -> str:
    """'unknown option' with the closest known name, or the trainer whose option it is
    (`mtpo dpo examples/kto.yaml` → "this looks like a `mtpo kto` config")."""
    from mtpo.options import TRAINER_OPTIONS

    owners = [name for name, options in TRAINER_OPTIONS.items()
              if not issubclass(cls, options) and key in {f.name for f in dataclasses.fields(options)}]
    if owners:
        return (f"unknown option {key!r}: it is an option of `mtpo {' / mtpo '.join(owners)}`; "
                f"this looks like a `mtpo {owners[0]}` config")
    close = difflib.get_close_matches(key, list(known), n=1)
    return f"unknown option {key!r}" + (f" (did you mean {close[0]!r}?)" if close else "")


_BOOL_WORDS = {"yes": True, "on": True, "y": True, "no": False, "off": False, "n": False}


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the field type; convert the few safe cases (int→float, str→list)."""
    if tp is Any or value is None:
        return value
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in args:
            if option is type(None):
                continue
            try:
                return _coerce(key, value, option)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{key}: {value!r} does not fit {tp}")
    if origin in (list, tuple):
        items = value if isinstance(value, (list, tuple)) else [v.strip() for v in str(value).split(",")]
        inner = args[0] if args else Any
        return [_coerce(key, v, inner) for v in items]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in _BOOL_WORDS:
            return _BOOL_WORDS[value.lower()]
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{key}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        valid = [e.value for e in tp]
        if value in valid or isinstance(value, tp):
            return value
        raise ConfigError(f"{key}: expected one of {valid}, got {value!r}")
    return value


def save_config(config, path: str) -> None:
    """The resolved config (every field) as YAML, so a run can be repeated exactly."""
    data = {}
    for f in dataclasses.fields(config):
        if not f.init or f.name.startswith("_"):
            continue
        value = getattr(config, f.name)
        if isinstance(value, enum.Enum):
            value = value.value
        if isinstance(value, (str, int, float, bool, list, dict, type(None))):
            data[f.name] = value
    with open(path, "w", encoding="utf-8") as f:
        yaml.safe_dump(data, f, sort_keys=True)
