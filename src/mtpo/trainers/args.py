"""The trainers' config classes: mtpo's options (`mtpo.options`) + transformers' `TrainingArguments`.

    DPOConfig(ReferenceConfig, DPOOptions), KTOConfig(ReferenceConfig, KTOOptions), SFTConfig(MTPOConfig, SFTOptions)

`__post_init__` fills mtpo's defaults, picks CPU/gloo for a multi-process launch on a machine without
an accelerator (`pick_cpu_for_multiprocess`), runs `TrainingArguments.__post_init__`, then the
options' own `validate()` — the same checks `mtpo <trainer>` runs before importing torch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from transformers import TrainingArguments

from mtpo.config import ConfigError
from mtpo.options import MTPOOptions, ReferenceOptions

logger = logging.getLogger("mtpo")


@dataclass
class MTPOConfig(TrainingArguments, MTPOOptions):
    """Options shared by `mtpo dpo`, `mtpo kto` and `mtpo sft` (plus every `TrainingArguments` field)."""

    def __post_init__(self):
        if self.output_dir is None:
            self.output_dir = "outputs/mtpo"
        # Our batches carry explicit masks, not the model's forward arguments: keep every column.
        self.remove_unused_columns = False
        pick_cpu_for_multiprocess(self)
        super().__post_init__()  # TrainingArguments'
        self.validate()


@dataclass
class ReferenceConfig(MTPOConfig, ReferenceOptions):
    """Options of the trainers that compare the policy with a reference (`mtpo dpo`, `mtpo kto`)."""


def accelerator_available() -> bool:
    """A CUDA / XPU / MPS device torch can use (what TrainingArguments would pick over the CPU)."""
    import torch

    if torch.cuda.is_available():
        return True
    if hasattr(torch, "xpu") and torch.xpu.is_available():
        return True
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def pick_cpu_for_multiprocess(config) -> None:
    """`torchrun --nproc_per_node N` on a machine without an accelerator: train distributed on CPU.

    Without `use_cpu`, transformers then neither uses a device nor sets up DDP: each process would
    train alone on all the data, all writing to one output_dir. With `use_cpu` (and gloo, the CPU
    backend), the N processes form one data-parallel run, exactly as with `use_cpu: true` given.
    """
    if config.use_cpu or int(os.environ.get("WORLD_SIZE", "1")) <= 1 or accelerator_available():
        return
    config.use_cpu = True
    if config.ddp_backend in (None, "", "gloo"):
        config.ddp_backend = "gloo"
    else:
        raise ConfigError(f"ddp_backend={config.ddp_backend} needs an accelerator; this machine has none "
                          "(CPU runs use gloo)")
    if int(os.environ.get("RANK", "0")) == 0:
        logger.warning("%s processes and no GPU: training distributed on CPU (use_cpu: true, ddp_backend: gloo)",
                       os.environ["WORLD_SIZE"])
