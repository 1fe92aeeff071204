"""What every `mtpo <trainer>` run does around the trainer: config → tokenizer → data → model → save.

Order matters for users: the config and the data are checked before any model is loaded, so a
typo or a broken row fails in seconds, not after a multi-GB download.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from mtpo.collate import ListDataset
from mtpo.config import ConfigError, save_config
from mtpo.data import load_rows
from mtpo.prepare import SkipReport
from mtpo.render import ChatRenderer, make_renderer
from mtpo.render_mistral import mistral_format
from mtpo.runs import Interrupted, check_output_dir, resolve_resume
from mtpo.trainers.args import MTPOConfig
from mtpo.trainers.base import StopOnSignal, disable_dropout
from mtpo.trainers.parallel import uses_deepspeed_or_fsdp
from mtpo.verify import check_first_rows

logger = logging.getLogger("mtpo")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(config: MTPOConfig):
    name = config.tokenizer_name_or_path or config.model_name_or_path
    fmt = mistral_format(config.mistral_format, config.chat_template)  # None: transformers decides (tekken.json)
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=config.trust_remote_code, mistral_format=fmt)
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
    """Load + render one split; warn on any skipped row, refuse when more than
    `max_skipped_fraction` of the rows (or all of them) were skipped, with the reasons."""
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
    check_skipped(report, config, split, source, bool(examples))
    return examples, report


def check_skipped(report: SkipReport, config: MTPOConfig, split: str, source: str, any_kept: bool) -> None:
    """Loud about data loss: a warning whenever rows were skipped, an error above the threshold.
    Rows a filter removed on purpose (SFT's filter_label / min_score) do not count as lost."""
    if not any_kept:
        raise ConfigError(f"{split} data {source}: every row was dropped ({report.summary()})")
    if not report.skipped:
        logger.info("%s data %s: %s", split, source, report.summary())
        return
    lost = sum(n for reason, n in report.reasons.items() if not reason.startswith("filtered out"))
    logger.warning("%s data %s: SKIPPED %d of %d rows — %s", split, source, report.skipped, report.total,
                   report.summary())
    if lost > config.max_skipped_fraction * report.total:
        raise ConfigError(f"{split} data {source}: {lost} of {report.total} rows skipped, more than "
                          f"max_skipped_fraction={config.max_skipped_fraction} ({report.summary()}); fix the data "
                          "or the limits (max_length, truncation), or raise max_skipped_fraction")


def run_training(config: MTPOConfig, *, prepare: Callable, trainer_cls: type, collator: Callable,
                 ref_layout=None, check_data: Callable | None = None) -> dict:
    """The one run every trainer shares: check paths → tokenizer → render data (errors here cost
    seconds) → models → trainer → optional reference precompute → train → save + summary.

    `collator(tokenizer)` builds the data collator; `ref_layout` (None for SFT: no reference) says
    how precomputed reference log-probs map to examples; `check_data(train_examples)` may refuse data.
    """
    started = time.time()
    config.check_paths()
    check_output_dir(config)  # every process, before any of them writes to output_dir
    tokenizer = load_tokenizer(config)
    renderer = make_renderer(tokenizer, config.render_options())
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
    checkpoint = resolve_resume(config, main_process=trainer.is_world_process_zero())
    stop = StopOnSignal()
    trainer.add_callback(stop)
    with stop.catching():
        trainer.train(resume_from_checkpoint=checkpoint)
    if stop.signum is not None and stop.checkpoint is not None:
        raise Interrupted(stop.signum, trainer.state.global_step, stop.checkpoint)
    if stop.signum is not None:  # after the last step: training is complete, save it as usual
        logger.warning("signal %d after the last step: saving the finished run", stop.signum)
    return finish(trainer, config, {"train": train_report, "eval": eval_report}, started)


def finish(trainer, config: MTPOConfig, reports: dict[str, SkipReport], started: float) -> dict:
    """Save weights + tokenizer (Trainer) (+ the merged model with `save_merged`), the resolved
    config and the data report; print a summary (last train and eval metrics)."""
    trainer.save_model(config.output_dir)
    if config.save_merged:
        save_merged(trainer, config, os.path.join(config.output_dir, "merged"))
    summary = {"output_dir": config.output_dir, "steps": trainer.state.global_step,
               "seconds": round(time.time() - started, 1),
               "data": {k: r.to_dict() for k, r in reports.items()}}
    history = [h for h in trainer.state.log_history if "loss" in h]
    if history:
        summary["first_log"], summary["last_log"] = history[0], history[-1]
    evals = [h for h in trainer.state.log_history if "eval_loss" in h]
    if evals:
        summary["first_eval"], summary["last_eval"] = evals[0], evals[-1]
    if trainer.is_world_process_zero():
        save_config(config, os.path.join(config.output_dir, "mtpo_config.yaml"))
        with open(os.path.join(config.output_dir, "data_report.json"), "w", encoding="utf-8") as f:
            json.dump(summary["data"], f, indent=2)
        print(format_summary(summary), flush=True)
    return summary


def save_merged(trainer, config: MTPOConfig, folder: str) -> None:
    """The saved LoRA adapter merged into a fresh copy of the base weights (loaded on the CPU, so no
    second model on the GPU, and the same under DeepSpeed/FSDP), saved with the tokenizer (and its
    chat template) as a plain checkpoint: `AutoModelForCausalLM.from_pretrained(folder)`, no peft."""
    if not trainer.is_world_process_zero():
        return
    from peft import PeftModel

    base = load_causal_lm(config.model_name_or_path, config)
    merged = PeftModel.from_pretrained(base, config.output_dir).merge_and_unload()
    merged.save_pretrained(folder)
    trainer.processing_class.save_pretrained(folder)
    logger.info("merged model written to %s", folder)


_NOT_SHOWN = ("step", "epoch", "grad_norm", "learning_rate")


def format_summary(summary: dict) -> str:
    lines = [f"done: {summary['steps']} steps in {summary['seconds']}s → {summary['output_dir']}"]
    for split, rep in summary["data"].items():
        lines.append(f"  {split} rows: {rep['kept']}/{rep['total']} kept, {rep['skipped']} skipped {rep['reasons'] or ''}")
    for first, last in ((summary.get("first_log"), summary.get("last_log")),
                        (summary.get("first_eval"), summary.get("last_eval"))):
        if not (first and last):
            continue
        keys = [k for k in last if k in first and k not in _NOT_SHOWN and not k.startswith("data/")
                and not k.endswith(("_runtime", "_per_second"))]
        for k in keys:
            if isinstance(last[k], (int, float)):  # "first → last"; one evaluation: its value
                lines.append(f"  {k:<24} {first[k]:>10.4f} → {last[k]:.4f}" if first is not last
                             else f"  {k:<24} {last[k]:>10.4f}")
    return "\n".join(lines)


def run_cli(name: str, config_cls: type, train: Callable, argv: list[str]) -> int:
    """`mtpo <name> config.yaml [--key=value ...]` (see `mtpo.trainers.command.run`)."""
    from mtpo.trainers.command import run

    return run(name, argv)
