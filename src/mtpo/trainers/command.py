"""`mtpo dpo|kto|sft CONFIG [--key=value ...]`: help and config checks before torch is imported.

Importing torch + transformers' `TrainingArguments` costs ~5 s, so this module does not. `--help`
lists every option — mtpo's (`mtpo.options`) then `TrainingArguments`' — with its help text and
default; the latter are read from transformers' own source (`training_args.py`, parsed, not imported).
A config is checked the same way first (unknown options, types, mtpo's values, files, `report_to`
packages, the output_dir), so most mistakes cost a fraction of a second; only then is the trainer
module imported and the full config built (`TrainingArguments`' own checks) and trained.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import importlib
import importlib.util
import logging
import os
import sys
import textwrap
import typing
from typing import Any

from mtpo.cli import dataclass_options, option_entry
from mtpo.config import ConfigError, _coerce, build_config, read_values, unknown_option
from mtpo.data import DataError
from mtpo.options import TRAINER_OPTIONS
from mtpo.runs import Interrupted, check_output_dir

TRAINERS = {"dpo": ("mtpo.trainers.dpo", "DPOConfig", "train_dpo", "Train a policy with multi-turn DPO (M-DPO)."),
            "kto": ("mtpo.trainers.kto", "KTOConfig", "train_kto", "Train a policy with multi-turn KTO (M-KTO)."),
            "sft": ("mtpo.trainers.sft", "SFTConfig", "train_sft", "Masked multi-turn SFT (or RAFT with filter_label "
                    "/ min_score).")}


@dataclasses.dataclass
class ArgInfo:
    name: str
    annotation: str
    default: str
    help: str


@functools.lru_cache(maxsize=1)
def training_arguments_fields() -> dict[str, ArgInfo]:
    """`TrainingArguments`' fields, from the source of the installed transformers (not imported)."""
    spec = importlib.util.find_spec("transformers")  # a top-level find_spec imports nothing
    path = os.path.join(list(spec.submodule_search_locations)[0], "training_args.py")
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TrainingArguments")
    out = {}
    for node in cls.body:
        if not (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)):
            continue
        default, help_ = "None" if node.value is None else ast.unparse(node.value), ""
        call = node.value
        if isinstance(call, ast.Call) and getattr(call.func, "id", None) == "field":
            kw = {k.arg: k.value for k in call.keywords}
            default = ast.unparse(kw["default"]) if "default" in kw else (
                ast.unparse(kw["default_factory"]) + "()" if "default_factory" in kw else "required")
            meta = kw.get("metadata")
            if isinstance(meta, ast.Dict):
                for k, v in zip(meta.keys, meta.values):
                    if isinstance(k, ast.Constant) and k.value == "help" and isinstance(v, ast.Constant):
                        help_ = str(v.value)
            if kw.get("init") is not None and ast.unparse(kw["init"]) == "False":
                continue
        if not node.target.id.startswith("_"):
            out[node.target.id] = ArgInfo(node.target.id, ast.unparse(node.annotation), default, help_)
    return out


def _annotation_type(annotation: str):
    """The annotation as a type for `_coerce`, when it names only builtins (else Any: checked later)."""
    names = {"str": str, "int": int, "float": float, "bool": bool, "list": list, "dict": dict, "None": None,
             "Optional": typing.Optional, "Union": typing.Union, "Any": Any}
    try:
        return eval(annotation, {"__builtins__": {}}, names)  # noqa: S307 — transformers' own annotation text
    except Exception:
        return Any


# ------------------------------------------------------------------------------------------ checking


def precheck(name: str, values: dict[str, Any]):
    """Every check that needs no torch: returns a light options object (TrainingArguments values set
    as attributes) or raises ConfigError naming the option."""
    options_cls = TRAINER_OPTIONS[name]
    own = {f.name for f in dataclasses.fields(options_cls)}
    training = training_arguments_fields()
    for key in values:
        if key not in own and key not in training:
            raise ConfigError(unknown_option(key, own | set(training), options_cls))
    options = build_config(options_cls, {k: v for k, v in values.items() if k in own})
    for key, value in values.items():
        if key not in own:
            setattr(options, key, _coerce(key, value, _annotation_type(training[key].annotation)))
    if getattr(options, "output_dir", None) is None:
        options.output_dir = "outputs/mtpo"
    options.validate()
    options.check_paths()
    check_output_dir(options)
    return options


# ------------------------------------------------------------------------------------------ help


OWN_DEFAULTS = {"output_dir": "'outputs/mtpo'"}  # TrainingArguments fields whose default mtpo sets (args.py)


def format_help(name: str) -> str:
    """Every option of `mtpo <name>`: mtpo's first, then TrainingArguments', with help and default."""
    _, _, _, what = TRAINERS[name]
    intro = ("Options go in the YAML file (option: value) or on the command line as --key=value (a YAML value: "
             "--bf16, --max_length=null, --lora_target_modules=[q_proj,v_proj]); the command line wins.")
    lines = [f"usage: mtpo {name} CONFIG.yaml [--key=value ...]", "", what, *textwrap.wrap(intro, 96), "",
             f"mtpo options (docs/{name}.md):"]
    lines += dataclass_options(TRAINER_OPTIONS[name])
    lines += ["", "transformers TrainingArguments options (https://huggingface.co/docs/transformers/main_classes/"
              "trainer#transformers.TrainingArguments):"]
    for info in training_arguments_fields().values():
        lines += option_entry(info.name, info.help, OWN_DEFAULTS.get(info.name, info.default))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ running


def run(name: str, argv: list[str]) -> int:
    """`mtpo <name> config.yaml [--key=value ...]`: a config or data error exits 2 with one line;
    an interrupt (Ctrl-C, SIGTERM) saves a checkpoint and exits 130 / 143 with one line."""
    if any(a in ("-h", "--help") for a in argv):
        print(format_help(name))
        return 0
    parser = argparse.ArgumentParser(prog=f"mtpo {name}", add_help=False)
    parser.add_argument("config", nargs="?")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    module_name, config_name, train_name, _ = TRAINERS[name]
    try:
        values = read_values(TRAINER_OPTIONS[name], args.config, overrides)
        precheck(name, values)
        module = importlib.import_module(module_name)  # torch + transformers: only for a config that passed
        config = build_config(getattr(module, config_name), values)
        getattr(module, train_name)(config)
    except (ConfigError, DataError, OSError) as e:  # OSError: missing files, unknown Hub names offline
        print(f"mtpo {name}: error: {e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        if os.environ.get("RANK", "0") == "0":
            again = [a for a in argv if not a.startswith("--resume_from_checkpoint")]
            print(f"mtpo {name}: stopped by {e}; resume: mtpo {name} {' '.join(again)} "
                  "--resume_from_checkpoint=auto", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:  # before training started (loading, rendering): nothing to save
        print(f"mtpo {name}: interrupted; no checkpoint saved", file=sys.stderr)
        return 130
    return 0


def dpo(argv: list[str]) -> int:
    return run("dpo", argv)


def kto(argv: list[str]) -> int:
    return run("kto", argv)


def sft(argv: list[str]) -> int:
    return run("sft", argv)
