"""The options mtpo adds to transformers' `TrainingArguments`, as plain dataclasses, with their checks.

Light on purpose: nothing here imports torch or transformers. `mtpo dpo --help` and config errors
(unknown option, wrong type or value, missing file, missing logger package, an output_dir that holds
another run) are answered from these classes in well under a second, before the ~5 s of importing
torch + transformers' `TrainingArguments`. The trainers' config classes add `TrainingArguments`:

    DPOConfig = DPOOptions + ReferenceOptions + MTPOOptions + TrainingArguments   (mtpo.trainers.dpo)

and run the same `validate()` after `TrainingArguments.__post_init__`. Each field is written once,
here, with its help text (shown by `--help`).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

from mtpo.config import ConfigError

DTYPES = ("auto", "float32", "bfloat16", "float16")
LOSS_TYPES = ("hellinger", "hinge", "ipo", "kl", "rev_kl", "sigmoid", "tv")  # = mtpo.losses.PREFERENCE_LOSSES (tested)
DEFAULT_MARGIN = 0.5  # = mtpo.losses.DEFAULT_MARGIN (tested)
KTO_DATA_FORMATS = ("auto", "unpaired", "pairs")


def _one_of(key: str, value: Any, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")


@dataclass
class MTPOOptions:
    """Options shared by `mtpo dpo`, `mtpo kto` and `mtpo sft`."""

    # --- model
    model_name_or_path: str | None = field(default=None, metadata={"help": "Policy: Hub name or local folder."})
    tokenizer_name_or_path: str | None = field(default=None, metadata={"help": "Tokenizer (default: the model's)."})
    chat_template: str | None = field(default=None, metadata={"help": "A .jinja file overriding the tokenizer's template."})
    mistral_format: bool | None = field(default=None, metadata={"help": "Mistral model dirs with tekken.json: "
        "true = mistral-common's encoder, false = the HF tokenizer + Jinja template, null = auto (mistral-common "
        "when installed and tekken.json exists, unless chat_template is set)."})
    dtype: str = field(default="auto", metadata={"help": "Weights dtype: auto (checkpoint's), float32, bfloat16, float16."})
    attn_implementation: str | None = field(default=None, metadata={"help": "e.g. sdpa, eager, flash_attention_2."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the Hub."})
    # --- data
    train_data: str | None = field(default=None, metadata={"help": "JSONL/JSON/Parquet file, dataset folder or Hub name."})
    eval_data: str | None = field(default=None, metadata={"help": "Optional evaluation data (same formats)."})
    max_length: int | None = field(default=2048, metadata={"help": "Max tokens per trajectory (each side of a pair)."})
    truncation: str = field(default="drop", metadata={"help": "Rows over max_length: drop (counted) or keep_start."})
    invalid_rows: str = field(default="error", metadata={"help": "Malformed rows: error (stop, naming the row) or skip (count)."})
    max_skipped_fraction: float = field(default=0.5, metadata={"help": "Stop with the reasons when more than this "
                                        "fraction of a split's rows is skipped (invalid, too long); 1 = never."})
    trainable_roles: list[str] = field(default_factory=lambda: ["assistant"], metadata={"help": "Roles the policy generated."})
    end_of_turn: str = field(default="every", metadata={"help": "Train the end-of-turn token on every / last / none turn."})
    end_of_turn_text: list[str] = field(default_factory=list, metadata={"help": "End-of-turn strings (default: detected)."})
    render_mode: str = field(default="auto", metadata={"help": "auto: one sequence per trajectory where the template is prefix-stable, else each assistant turn in its own generation context (per_turn); or force single / per_turn."})
    verify_masks: int = field(default=16, metadata={"help": "Check the masks of the first N training rows with an independent method (token-prefix differences) before training; a disagreement stops. 0: off."})
    # --- compute
    logprob_chunk_size: int | None = field(default=None, metadata={"help": "Rows through the LM head at once. Unset: sized by device and vocabulary (rows × V ≤ 2^25 logits on CPU, 2^27 on GPU). A number: at most that many (rows × V ≤ 2^27)."})
    # --- LoRA (needs `pip install mtpo[peft]`)
    use_peft: bool = field(default=False, metadata={"help": "Train a LoRA adapter instead of all weights."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"], metadata={"help": "Modules to adapt."})
    save_merged: bool = field(default=False, metadata={"help": "With use_peft: also write the merged model (+ tokenizer "
                              "and chat template) to <output_dir>/merged, a plain checkpoint."})
    # --- run folder
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Start over in an output_dir that holds "
                                       "another run (its metrics.jsonl and checkpoint-* are deleted)."})

    def validate(self) -> None:
        """Value checks; also run on a light instance (before torch is imported), where the
        `TrainingArguments` values given in the config are plain attributes (absent ones: defaults)."""
        from mtpo.prepare import INVALID_ROW_MODES, TRUNCATION_MODES  # tqdm: not needed for --help
        from mtpo.render import END_OF_TURN_MODES, RENDER_MODES

        _one_of("dtype", self.dtype, DTYPES)
        _one_of("truncation", self.truncation, TRUNCATION_MODES)
        _one_of("invalid_rows", self.invalid_rows, INVALID_ROW_MODES)
        _one_of("end_of_turn", self.end_of_turn, END_OF_TURN_MODES)
        _one_of("render_mode", self.render_mode, RENDER_MODES)
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length must be at least 2, got {self.max_length}")
        if not 0 <= self.max_skipped_fraction <= 1:
            raise ConfigError(f"max_skipped_fraction must be in [0, 1], got {self.max_skipped_fraction}")
        if self.verify_masks < 0:
            raise ConfigError(f"verify_masks must be 0 (off) or a number of rows, got {self.verify_masks}")
        if self.logprob_chunk_size is not None and self.logprob_chunk_size < 1:
            raise ConfigError(f"logprob_chunk_size must be positive, got {self.logprob_chunk_size}")
        if not self.trainable_roles:
            raise ConfigError("trainable_roles is empty: nothing would be trained")
        bf16, fp16 = getattr(self, "bf16", False), getattr(self, "fp16", False)
        if (bf16 and self.dtype == "float16") or (fp16 and self.dtype == "bfloat16"):
            raise ConfigError(f"dtype={self.dtype} contradicts {'bf16' if bf16 else 'fp16'}=true")
        if self.mistral_format and self.chat_template:
            raise ConfigError("chat_template needs the HF tokenizer; it contradicts mistral_format: true")
        if self.save_merged and not self.use_peft:
            raise ConfigError("save_merged needs use_peft: true (without LoRA the output is already a plain model)")

    def render_options(self):
        from mtpo.render import RenderOptions

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
            if value and looks_local(value) and not os.path.exists(value):
                raise ConfigError(f"{key}: path not found: {value}")
        strategy = getattr(getattr(self, "eval_strategy", "no"), "value", getattr(self, "eval_strategy", "no"))
        if strategy != "no" and not self.eval_data:
            raise ConfigError(f"eval_strategy={strategy} needs eval_data (or set eval_strategy: 'no')")
        check_report_to(getattr(self, "report_to", "none"))


@dataclass
class ReferenceOptions(MTPOOptions):
    """Options of the trainers that compare the policy with a reference (`mtpo dpo`, `mtpo kto`)."""

    ref_model_name_or_path: str | None = field(default=None, metadata={"help": "Reference (default: policy's start)."})
    precompute_ref_log_probs: bool = field(default=False, metadata={"help": "Compute reference log-probs once, before training."})
    disable_dropout: bool = field(default=True, metadata={"help": "Turn dropout off in policy and reference."})

    def validate(self) -> None:
        super().validate()
        if self.use_peft and self.ref_model_name_or_path:
            raise ConfigError("with use_peft the reference is the adapter-disabled policy; drop ref_model_name_or_path")


@dataclass
class DPOOptions(ReferenceOptions):
    """`mtpo dpo` options. Names follow TRL's DPOConfig where the meaning is the same."""

    beta: float = field(default=0.1, metadata={"help": "Strength of the KL regularisation (β)."})
    loss_type: str = field(default="sigmoid", metadata={"help": f"One of {list(LOSS_TYPES)}."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Conservative DPO (sigmoid only): label noise ε."})
    margin: float = field(default=DEFAULT_MARGIN, metadata={"help": "Per-row margin for margin-aware losses when a row has no `margin`."})
    nll_coef: float = field(default=0.0, metadata={"help": "Weight of the per-token NLL of chosen trajectories, mean over pairs (RPO)."})
    length_penalty: float = field(default=0.0, metadata={"help": "α: policy log-probs pay α per trainable token, Δ − α(|w| − |l|)."})

    def validate(self) -> None:
        super().validate()
        _one_of("loss_type", self.loss_type, LOSS_TYPES)
        if self.beta <= 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError("label_smoothing only applies to loss_type: sigmoid")


@dataclass
class KTOOptions(ReferenceOptions):
    """`mtpo kto` options. Names follow TRL's KTOConfig where the meaning is the same."""

    beta: float = field(default=0.1, metadata={"help": "Strength of the KL regularisation (β)."})
    desirable_weight: float = field(default=1.0, metadata={"help": "w_d: weight of desirable (label true) rows."})
    undesirable_weight: float = field(default=1.0, metadata={"help": "w_u: weight of undesirable (label false) rows."})
    data_format: str = field(default="auto", metadata={"help": "unpaired ({prompt, completion, label} or {messages, "
                             "label}), pairs ({chosen, rejected}: each pair → 1 desirable + 1 undesirable) or auto."})

    def validate(self) -> None:
        super().validate()
        if self.beta <= 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")
        for key in ("desirable_weight", "undesirable_weight"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"{key} must be positive, got {getattr(self, key)}")
        _one_of("data_format", self.data_format, KTO_DATA_FORMATS)


@dataclass
class SFTOptions(MTPOOptions):
    """`mtpo sft` options."""

    filter_label: bool = field(default=False, metadata={"help": "RAFT: train only on rows with label: true."})
    min_score: float | None = field(default=None, metadata={"help": "Keep rows with score ≥ this."})

    def validate(self) -> None:
        super().validate()
        if self.min_score is not None and self.min_score != self.min_score:
            raise ConfigError("min_score is NaN")


TRAINER_OPTIONS = {"dpo": DPOOptions, "kto": KTOOptions, "sft": SFTOptions}


def looks_local(value: str) -> bool:
    return value.startswith((".", "/", "~")) or value.endswith((".jsonl", ".json", ".parquet", ".jinja", ".yaml"))


# transformers' `report_to` names → the package each needs (transformers checks only once the model is loaded)
REPORT_TO_PACKAGES = {"wandb": ("wandb",), "tensorboard": ("tensorboard", "tensorboardX"), "mlflow": ("mlflow",),
                      "comet_ml": ("comet_ml",), "clearml": ("clearml",), "dvclive": ("dvclive",),
                      "neptune": ("neptune",), "codecarbon": ("codecarbon",), "swanlab": ("swanlab",),
                      "trackio": ("trackio",), "azure_ml": ("azureml",), "dagshub": ("dagshub",),
                      "flyte": ("flytekit",), "kubeflow": ("kubeflow",)}


def check_report_to(report_to) -> None:
    """`report_to: wandb` without wandb installed fails now, not after the model has loaded."""
    names = [report_to] if isinstance(report_to, str) or report_to is None else list(report_to)
    for name in names:
        if name in (None, "none", "all"):
            continue
        if name not in REPORT_TO_PACKAGES:
            raise ConfigError(f"report_to: unknown integration {name!r} (known: none, all, "
                              f"{', '.join(REPORT_TO_PACKAGES)})")
        packages = REPORT_TO_PACKAGES[name]
        if not any(importlib.util.find_spec(p) is not None for p in packages):
            raise ConfigError(f"report_to: {name} is not installed (pip install {packages[0]}), "
                              "or set report_to: none")
