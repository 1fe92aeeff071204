"""The run folder: one run per output_dir, resumable, interruptible (no torch imported here).

Rules (docs/dpo.md, "Resume and interrupt"):
* A fresh run (no `resume_from_checkpoint`) refuses an output_dir that holds another run (a
  `metrics.jsonl`, `mtpo_config.yaml` or `checkpoint-*`), unless `overwrite_output_dir: true`, which
  deletes that run's `metrics.jsonl` and `checkpoint-*` first.
* `resume_from_checkpoint: auto` continues from the newest `checkpoint-*` of output_dir, or says it
  starts fresh (dropping an old `metrics.jsonl`) when there is none; a folder continues from it.
* On resume `metrics.jsonl` is cut back to the checkpoint's step, so it never repeats a step or mixes
  two runs.
* SIGINT / SIGTERM during training: the step in progress finishes, a checkpoint is saved and the
  run stops with `Interrupted` (the CLI prints one line saying how to resume, exit 130 / 143).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal

from mtpo.config import ConfigError

logger = logging.getLogger("mtpo")
METRICS_FILE = "metrics.jsonl"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class Interrupted(Exception):
    """Training stopped on a signal after saving `checkpoint`."""

    def __init__(self, signum: int, step: int, checkpoint: str | None):
        self.signum, self.step, self.checkpoint = signum, step, checkpoint
        self.exit_code = 128 + signum  # shell convention: 130 for SIGINT, 143 for SIGTERM
        name = signal.Signals(signum).name
        saved = f"checkpoint saved to {checkpoint}" if checkpoint else "no checkpoint saved"
        super().__init__(f"{name} at step {step}: {saved}")


def checkpoints(output_dir: str) -> list[str]:
    """`checkpoint-<step>` folders of output_dir, oldest step first."""
    if not os.path.isdir(output_dir):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(output_dir)
             if (m := _CHECKPOINT.match(name)) and os.path.isdir(os.path.join(output_dir, name))]
    return [os.path.join(output_dir, name) for _, name in sorted(found)]


def previous_run(output_dir: str) -> list[str]:
    """What in output_dir belongs to an earlier run (empty: none)."""
    marks = [name for name in (METRICS_FILE, "mtpo_config.yaml") if os.path.exists(os.path.join(output_dir, name))]
    return marks + [os.path.basename(c) for c in checkpoints(output_dir)]


def _resume_value(config) -> str | None:
    value = getattr(config, "resume_from_checkpoint", None)
    return None if value in (None, "", False, "false") else str(value)


def check_output_dir(config) -> None:
    """Refuse a fresh run into an output_dir that holds another one (before anything is loaded)."""
    value = _resume_value(config)
    if value is not None and value != "auto" and not os.path.isdir(value):
        raise ConfigError(f"resume_from_checkpoint: not a folder: {value}")
    found = previous_run(config.output_dir)
    if value is None and found and not config.overwrite_output_dir:
        raise ConfigError(f"output_dir {config.output_dir} already holds a run ({', '.join(found[:4])}); "
                          "continue it with --resume_from_checkpoint=auto, start over with "
                          "--overwrite_output_dir=true, or choose another output_dir")


def resolve_resume(config, main_process: bool = True) -> str | None:
    """The checkpoint to resume from (None: start fresh), after making output_dir consistent with it:
    metrics.jsonl cut back to the checkpoint's step, or an old run's files removed for a fresh start.
    Only the main process changes files."""
    check_output_dir(config)
    value = _resume_value(config)
    checkpoint = None
    if value == "auto":
        found = checkpoints(config.output_dir)
        checkpoint = found[-1] if found else None
        if checkpoint is None and main_process:
            logger.warning("resume_from_checkpoint=auto: no checkpoint in %s, starting fresh", config.output_dir)
    elif value is not None:
        checkpoint = value
    if not main_process:
        return checkpoint
    metrics = os.path.join(config.output_dir, METRICS_FILE)
    if checkpoint is not None:
        step = checkpoint_step(checkpoint)
        logger.warning("resuming from %s (step %d)", checkpoint, step)
        truncate_metrics(metrics, step)
    elif os.path.exists(metrics) or config.overwrite_output_dir:
        for old in checkpoints(config.output_dir) if config.overwrite_output_dir else []:
            shutil.rmtree(old)
        if os.path.exists(metrics):
            os.remove(metrics)
        logger.warning("starting fresh in %s: removed the earlier run's metrics.jsonl%s", config.output_dir,
                       " and checkpoints" if config.overwrite_output_dir else "")
    return checkpoint


def checkpoint_step(checkpoint: str) -> int:
    """The global step a checkpoint was saved at (its trainer_state.json, else its folder name)."""
    try:
        with open(os.path.join(checkpoint, "trainer_state.json"), encoding="utf-8") as f:
            return int(json.load(f)["global_step"])
    except (OSError, KeyError, ValueError):
        m = _CHECKPOINT.match(os.path.basename(os.path.normpath(checkpoint)))
        if m is None:
            raise ConfigError(f"resume_from_checkpoint: {checkpoint} has no trainer_state.json") from None
        return int(m.group(1))


def truncate_metrics(path: str, step: int) -> None:
    """Keep the records a run resumed at `step` has already logged: steps before it, and those of
    the step itself except the end-of-training summary (`train_runtime`) an interrupted run wrote."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        records = [json.loads(line) for line in f if line.strip()]
    kept = [r for r in records if r.get("step", 0) < step or (r.get("step") == step and "train_runtime" not in r)]
    if len(kept) != len(records):
        logger.info("metrics.jsonl: dropped %d records after step %d", len(records) - len(kept), step)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
