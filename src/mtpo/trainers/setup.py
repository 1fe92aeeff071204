"""What every `mtpo <trainer>` run does around the trainer: config → tokenizer → data → model → save.

Order matters for users: the config and the data are checked before any model is loaded, so a
typo or a broken row fails in seconds, not after a multi-GB download.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.trainer_utils import get_last_checkpoint

from mtpo.collate import ListDataset
from mtpo.config import ConfigError, MTPOConfig, load_config, save_config
from mtpo.data import RecordError, load_rows
from mtpo.prepare import SkipReport
from mtpo.render import ChatRenderer
from mtpo.trainers.base import disable_dropout
from mtpo.trainers.parallel import uses_deepspeed_or_fsdp
from mtpo.verify import check_first_rows

logger = logging.getLogger("mtpo")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(config: MTPOConfig):
    name = config.tokenizer_name_or_path or config.model_name_or_path
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=config.trust_remote_code)
    options = config.render_options()
    if options.chat_template:  # saved with the outputs, so the trained model carries its template
        tokenizer.chat_template = options.chat_template
    if tokenizer.pad_token_id is None:
        # Only a filler value: attention and loss masks are explicit, so pad == eos is harmless.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name: str, config: MTPOConfig):
    """Load a causal LM honouring the configured dtype (never a silent fp32/fp16 mix-up)."""
    kwargs = {"dtype": _DTYPES.get(config.dtype, "auto"), "trust_remote_code": config.trust_remote_code}
    if config.attn_implementation:
        kwargs["attn_implementation"] = config.attn_implementation
    model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
    if config.fp16 and model.dtype == torch.bfloat16 or config.bf16 and model.dtype == torch.float16:
        raise ConfigError(f"{name} loaded as {model.dtype} but training is {'fp16' if config.fp16 else 'bf16'}; "
                          "set `dtype` to match")
    model.config.use_cache = False
    return model


def apply_peft(model, config: MTPOConfig):
    if not config.use_peft:
        return model
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise ConfigError("use_peft: true needs peft: pip install 'mtpo[peft]'") from None
    targets = config.lora_target_modules
    lora = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
                      target_modules=targets[0] if targets == ["all-linear"] else targets, task_type="CAUSAL_LM")
    return get_peft_model(model, lora)


def load_models(config: MTPOConfig, reference: bool = True):
    """Policy (+ LoRA when `use_peft`) and, if `reference`, the frozen reference model or None.

    No separate reference is loaded when the adapter-disabled policy is the reference (`use_peft`) or
    when reference log-probs are precomputed from the policy itself (`precompute_ref_log_probs` with
    no `ref_model_name_or_path`) — except under DeepSpeed/FSDP, where the policy is not wrapped yet
    when the reference log-probs are precomputed (before `train()`): a separate copy of the initial
    weights is loaded, prepared for inference, used once and freed. Dropout is turned off in both
    when `disable_dropout` is set.
    """
    model = load_causal_lm(config.model_name_or_path, config)
    ref_model = None
    ref_name = getattr(config, "ref_model_name_or_path", None)
    precompute = getattr(config, "precompute_ref_log_probs", False)
    separate = not config.use_peft and not (precompute and not ref_name)
    if reference and (separate or (precompute and uses_deepspeed_or_fsdp(config))):
        ref_model = load_causal_lm(ref_name or config.model_name_or_path, config)
    model = apply_peft(model, config)
    if getattr(config, "disable_dropout", False):
        for m in (model, ref_model):
            if m is not None:
                disable_dropout(m)
    return model, ref_model


def load_examples(config: MTPOConfig, renderer: ChatRenderer, prepare: Callable, split: str):
    """Load + render one split; refuse an empty result with the reasons rows were dropped."""
    source = config.train_data if split == "train" else config.eval_data
    if not source:
        return None, SkipReport()
    rows = load_rows(source)
    if not rows:
        raise ConfigError(f"{split} data {source} is empty")
    if split == "train":  # masks of the first rows vs an independent method, before any model loads
        check_first_rows(rows, renderer, config.verify_masks)
    examples, report = prepare(rows, renderer, max_length=config.max_length, truncation=config.truncation,
                               invalid_rows=config.invalid_rows)
    logger.info("%s data %s: %s", split, source, report.summary())
    if not examples:
        raise ConfigError(f"{split} data {source}: every row was dropped ({report.summary()})")
    return examples, report


def resolve_resume(config: MTPOConfig) -> str | None:
    """`resume_from_checkpoint: auto` = the newest checkpoint in output_dir (or none)."""
    value = config.resume_from_checkpoint
    if value in (None, "", "false"):
        return None
    if value == "auto":
        return get_last_checkpoint(config.output_dir) if os.path.isdir(config.output_dir) else None
    if not os.path.isdir(value):
        raise ConfigError(f"resume_from_checkpoint: not a folder: {value}")
    return value


def run_training(config: MTPOConfig, *, prepare: Callable, trainer_cls: type, collator: Callable,
                 ref_layout=None, check_data: Callable | None = None) -> dict:
    """The one run every trainer shares: check paths → tokenizer → render data (errors here cost
    seconds) → models → trainer → optional reference precompute → train → save + summary.

    `collator(tokenizer)` builds the data collator; `ref_layout` (None for SFT: no reference) says
    how precomputed reference log-probs map to examples; `check_data(train_examples)` may refuse data.
    """
    started = time.time()
    config.check_paths()
    tokenizer = load_tokenizer(config)
    renderer = ChatRenderer(tokenizer, config.render_options())
    train_examples, train_report = load_examples(config, renderer, prepare, "train")
    eval_examples, eval_report = load_examples(config, renderer, prepare, "eval")
    if check_data is not None:
        check_data(train_examples)

    model, ref_model = load_models(config, reference=ref_layout is not None)
    trainer = trainer_cls(model=model, args=config, train_dataset=ListDataset(train_examples),
                          eval_dataset=ListDataset(eval_examples) if eval_examples else None,
                          processing_class=tokenizer, ref_model=ref_model, data_collator=collator(tokenizer),
                          data_report=train_report.to_dict())
    del model, ref_model  # the trainer holds them; no other name may keep a freed reference alive
    if ref_layout is not None and getattr(config, "precompute_ref_log_probs", False):
        trainer.precompute_references(ref_layout)
    trainer.train(resume_from_checkpoint=resolve_resume(config))
    return finish(trainer, config, {"train": train_report, "eval": eval_report}, started)


def finish(trainer, config: MTPOConfig, reports: dict[str, SkipReport], started: float) -> dict:
    """Save weights + tokenizer (Trainer), the resolved config and the data report; print a summary."""
    trainer.save_model(config.output_dir)
    summary = {"output_dir": config.output_dir, "steps": trainer.state.global_step,
               "seconds": round(time.time() - started, 1),
               "data": {k: r.to_dict() for k, r in reports.items()}}
    history = [h for h in trainer.state.log_history if "loss" in h]
    if history:
        summary["first_log"], summary["last_log"] = history[0], history[-1]
    if trainer.is_world_process_zero():
        save_config(config, os.path.join(config.output_dir, "mtpo_config.yaml"))
        with open(os.path.join(config.output_dir, "data_report.json"), "w", encoding="utf-8") as f:
            json.dump(summary["data"], f, indent=2)
        print(format_summary(summary), flush=True)
    return summary


def format_summary(summary: dict) -> str:
    lines = [f"done: {summary['steps']} steps in {summary['seconds']}s → {summary['output_dir']}"]
    for split, rep in summary["data"].items():
        lines.append(f"  {split} rows: {rep['kept']}/{rep['total']} kept, {rep['skipped']} skipped {rep['reasons'] or ''}")
    first, last = summary.get("first_log"), summary.get("last_log")
    if first and last:
        skip = ("step", "epoch", "grad_norm", "learning_rate")
        keys = [k for k in last if k in first and k not in skip and not k.startswith("data/")]
        for k in keys:
            if isinstance(last[k], (int, float)):
                lines.append(f"  {k:<24} {first[k]:>10.4f} → {last[k]:.4f}")
    return "\n".join(lines)


def run_cli(name: str, config_cls: type, train: Callable, argv: list[str]) -> int:
    """`mtpo <name> config.yaml [--key=value ...]`: errors in config or data exit 2 with one clear line."""
    parser = argparse.ArgumentParser(prog=f"mtpo {name}", description=(train.__doc__ or "").strip().split("\n")[0],
                                     epilog="Any config field can be overridden as --key=value (YAML value).")
    parser.add_argument("config", nargs="?", help="YAML config file")
    args, overrides = parser.parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        config = load_config(config_cls, args.config, overrides)
        train(config)
    except (ConfigError, RecordError, OSError) as e:  # OSError: missing files, unknown Hub names offline
        print(f"mtpo {name}: error: {e}", file=sys.stderr)
        return 2
    return 0
