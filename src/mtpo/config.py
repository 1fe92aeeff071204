"""Configs: one dataclass per trainer, each field written once with its docstring-comment.

`load_config(cls, "config.yaml", ["--beta=0.2"])` reads YAML, applies `--key=value` overrides (values
parsed as YAML, so `--bf16=true`, `--lora_target_modules=[q_proj,v_proj]` work), rejects unknown keys
(with a suggestion) and wrong types before anything heavy happens, then builds the dataclass, whose
`__post_init__` validates the values.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml
from transformers import TrainingArguments

from mtpo.prepare import INVALID_ROW_MODES, TRUNCATION_MODES
from mtpo.render import END_OF_TURN_MODES, RENDER_MODES, RenderOptions

DTYPES = ("auto", "float32", "bfloat16", "float16")


class ConfigError(ValueError):
    """A config file or override is wrong; the message names the key."""


@dataclass
class MTPOConfig(TrainingArguments):
    """Options shared by `mtpo dpo`, `mtpo kto` and `mtpo sft` (plus every `TrainingArguments` field)."""

    # --- model
    model_name_or_path: str | None = field(default=None, metadata={"help": "Policy: Hub name or local folder."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's)."})
    chat_template: str | None = field(default=None, metadata={"help": "A .jinja file overriding the tokenizer's template."})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto (checkpoint's), float32, bfloat16, float16."})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, eager, flash_attention_2."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the Hub."})
    # --- data
    train_data: str | None = field(default=None, metadata={"help": "JSONL/JSON/Parquet file, dataset folder or Hub name."})
    eval_data: str | None = field(default=None, metadata={"help": "Optional evaluation data (same formats)."})
    max_length: int | None = field(default=2048, metadata={"help": "Max tokens per trajectory (each side of a pair)."})
    truncation: str = field(default="drop", metadata={"help": "Rows over max_length: drop (counted) or keep_start."})
    invalid_rows: str = field(default="error", metadata={"help": "Malformed rows: error (stop, naming the row) or skip (count)."})
    trainable_roles: list[str] = field(default_factory=lambda: ["assistant"], metadata={"help": "Roles the policy generated."})
    end_of_turn: str = field(default="every", metadata={"help": "Train the end-of-turn token on every / last / none turn."})
    end_of_turn_text: list[str] = field(default_factory=list, metadata={"help": "End-of-turn strings (default: detected)."})
    render_mode: str = field(default="auto", metadata={"help": "auto: one sequence per trajectory where the template is prefix-stable, else each assistant turn in its own generation context (per_turn); or force single / per_turn."})
    # --- compute
    logprob_chunk_size: int = field(default=1024, metadata={"help": "At most this many rows through the LM head at once (fewer at large vocabularies: rows × V ≤ 2^27)."})
    # --- LoRA (needs `pip install mtpo[peft]`)
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={"help": "Modules to adapt."})

    def __post_init__(self):
        if self.output_dir is None:
            self.output_dir = "outputs/mtpo"
        # Our batches carry explicit masks, not the model's forward arguments: keep every column.
        self.remove_unused_columns = False
        super().__post_init__()
        _one_of("dtype", self.dtype, DTYPES)
        _one_of("truncation", self.truncation, TRUNCATION_MODES)
        _one_of("invalid_rows", self.invalid_rows, INVALID_ROW_MODES)
        _one_of("end_of_turn", self.end_of_turn, END_OF_TURN_MODES)
        _one_of("render_mode", self.render_mode, RENDER_MODES)
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {self.max_length}")
        if self.logprob_chunk_size < 1:
            raise ConfigError(f"logprob_chunk_size must be positive, got {self.logprob_chunk_size}")
        if not self.trainable_roles:
            raise ConfigError("trainable_roles is empty: nothing would be trained")
        if (self.bf16 and self.dtype == "float16") or (self.fp16 and self.dtype == "bfloat16"):
            raise ConfigError(f"dtype={self.dtype} contradicts {'bf16' if self.bf16 else 'fp16'}=true")

    def render_options(self) -> RenderOptions:
        template = None
        if self.chat_template:
            with open(self.chat_template, encoding="utf-8") as f:
                template = f.read()
        return RenderOptions(tuple(self.trainable_roles), self.end_of_turn, tuple(self.end_of_turn_text), template,
                             render_mode=self.render_mode)

    def check_paths(self) -> None:
        """Missing local files fail here, before any model is loaded."""
        if not self.model_name_or_path:
            raise ConfigError("model_name_or_path is required")
        if not self.train_data:
            raise ConfigError("train_data is required")
        for key in ("train_data", "eval_data", "chat_template", "model_name_or_path", "tokenizer_name_or_path",
                    "ref_model_name_or_path"):
            value = getattr(self, key, None)
            if value and _looks_local(value) and not os.path.exists(value):
                raise ConfigError(f"{key}: path not found: {value}")
        strategy = getattr(self.eval_strategy, "value", self.eval_strategy)
        if strategy != "no" and not self.eval_data:
            raise ConfigError(f"eval_strategy={strategy} needs eval_data (or set eval_strategy: 'no')")


@dataclass
class ReferenceConfig(MTPOConfig):
    """Options of the trainers that compare the policy with a reference (`mtpo dpo`, `mtpo kto`)."""

    ref_model_name_or_path: str | None = field(default=None, metadata={"help": "Reference (default: policy's start)."})
    precompute_ref_log_probs: bool = field(default=False, metadata={"help": "Compute reference log-probs once, before training."})
    disable_dropout: bool = field(default=True, metadata={"help": "Turn dropout off in policy and reference."})

    def __post_init__(self):
        super().__post_init__()
        if self.use_peft and self.ref_model_name_or_path:
            raise ConfigError("with use_peft the reference is the adapter-disabled policy; drop ref_model_name_or_path")


def _looks_local(value: str) -> bool:
    return value.startswith((".", "/", "~")) or value.endswith((".jsonl", ".json", ".parquet", ".jinja", ".yaml"))


def _one_of(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


# ------------------------------------------------------------------------------------------ loading


def load_config(cls: type, path: str | None = None, overrides: list[str] | None = None, **extra: Any):
    """Build `cls` from a YAML file, `--key=value` overrides and keyword values (in that order)."""
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
    return build_config(cls, values)


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
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown option {key!r}{hint}")
        kwargs[key] = _coerce(key, value, hints.get(key, Any))
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(str(e)) from None


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
