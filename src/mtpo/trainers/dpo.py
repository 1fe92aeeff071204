"""M-DPO: DPO on whole trajectories, log-probs summed over policy-generated tokens only.

    Δ = (logπ(w) − logπ(l)) − (logπ_ref(w) − logπ_ref(l)),   loss = ℓ(β·Δ)   (ℓ per `loss_type`)

With a fixed SFT reference this optimises the KL-regularised trajectory objective; with the
reference reset to the previous iteration's model each round (`ref_model_name_or_path` = last
iteration's output) it optimises the non-regularised one (Xiong et al., ICLR 2025).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from mtpo import losses as L
from mtpo.collate import ListDataset, PairCollator, split_pair
from mtpo.config import ConfigError, MTPOConfig
from mtpo.prepare import prepare_pairs
from mtpo.render import ChatRenderer
from mtpo.trainers.base import MTPOTrainer, disable_dropout
from mtpo.trainers.setup import (apply_peft, finish, load_causal_lm, load_examples, load_tokenizer,
                                 resolve_resume, run_cli)


@dataclass
class DPOConfig(MTPOConfig):
    """`mtpo dpo` options. Names follow TRL's DPOConfig where the meaning is the same."""

    beta: float = field(default=0.1, metadata={"help": "Strength of the KL regularisation (β)."})
    loss_type: str = field(default="sigmoid", metadata={"help": f"One of {sorted(L.PREFERENCE_LOSSES)}."})
    label_smoothing: float = field(default=0.0, metadata={"help": "Conservative DPO (sigmoid only): label noise ε."})
    margin: float = field(default=L.DEFAULT_MARGIN, metadata={"help": "Per-row margin for margin-aware losses when a row has no `margin`."})
    nll_coef: float = field(default=0.0, metadata={"help": "Weight of the NLL term on chosen trajectories (RPO)."})
    length_penalty: float = field(default=0.0, metadata={"help": "α in logπ − α·(trainable tokens), per side."})
    ref_model_name_or_path: str | None = field(default=None, metadata={"help": "Reference (default: policy's start)."})
    precompute_ref_log_probs: bool = field(default=False, metadata={"help": "Compute reference log-probs once, before training."})
    disable_dropout: bool = field(default=True, metadata={"help": "Turn dropout off in policy and reference."})

    def __post_init__(self):
        super().__post_init__()
        if self.loss_type not in L.PREFERENCE_LOSSES:
            raise ConfigError(f"loss_type must be one of {sorted(L.PREFERENCE_LOSSES)}, got {self.loss_type!r}")
        if self.beta <= 0:
            raise ConfigError(f"beta must be positive, got {self.beta}")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss_type != "sigmoid":
            raise ConfigError("label_smoothing only applies to loss_type: sigmoid")
        if self.use_peft and self.ref_model_name_or_path:
            raise ConfigError("with use_peft the reference is the adapter-disabled policy; drop ref_model_name_or_path")


class PairRefLayout:
    """How precomputed reference log-probs of a pair batch map to examples: (chosen, rejected)."""

    width = 2

    @staticmethod
    def per_example(logps: torch.Tensor) -> torch.Tensor:
        return torch.stack(split_pair(logps), dim=1)  # (B, 2)

    @staticmethod
    def store(example, row: torch.Tensor) -> None:
        example.ref_logps = (float(row[0]), float(row[1]))


class DPOTrainer(MTPOTrainer):
    args: DPOConfig

    def loss_and_metrics(self, model, inputs):
        args = self.args
        raw_logps, counts = self.policy_logps(model, inputs)  # (2B,), (2B,) stacked [chosen; rejected]
        ref_logps = self.reference_logps(model, inputs)
        logps = raw_logps
        if args.length_penalty:
            logps = L.length_penalty(logps, counts, alpha=args.length_penalty)
            ref_logps = L.length_penalty(ref_logps, counts, alpha=args.length_penalty)
        chosen, rejected = split_pair(logps)
        ref_chosen, ref_rejected = split_pair(ref_logps)
        chosen_counts, rejected_counts = split_pair(counts)
        losses, chosen_rewards, rejected_rewards = L.preference_loss(
            args.loss_type, chosen, rejected, ref_chosen, ref_rejected, beta=args.beta,
            label_smoothing=args.label_smoothing,
            margin=inputs["margin"] if L.PREFERENCE_LOSSES[args.loss_type].needs_margin else None)
        loss = losses.mean()
        nll = L.nll_loss(split_pair(raw_logps)[0], chosen_counts)
        if args.nll_coef:
            loss = loss + args.nll_coef * nll
        metrics = {
            "rewards/chosen": chosen_rewards, "rewards/rejected": rejected_rewards,
            "rewards/margins": chosen_rewards - rejected_rewards,
            "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
            "logps/chosen": chosen.detach(), "logps/rejected": rejected.detach(), "nll": nll.detach(),
            "tokens/chosen": chosen_counts.float(), "tokens/rejected": rejected_counts.float(),
        }
        return loss, metrics


def train_dpo(config: DPOConfig) -> dict:
    """Train a policy with multi-turn DPO; returns the run summary."""
    started = time.time()
    config.check_paths()
    tokenizer = load_tokenizer(config)
    renderer = ChatRenderer(tokenizer, config.render_options())
    train_examples, train_report = load_examples(config, renderer, prepare_pairs, "train")
    eval_examples, eval_report = load_examples(config, renderer, prepare_pairs, "eval")

    model = load_causal_lm(config.model_name_or_path, config)
    ref_model = None
    if not config.use_peft and not (config.precompute_ref_log_probs and not config.ref_model_name_or_path):
        ref_model = load_causal_lm(config.ref_model_name_or_path or config.model_name_or_path, config)
    model = apply_peft(model, config)
    if config.disable_dropout:
        for m in (model, ref_model):
            if m is not None:
                disable_dropout(m)

    train_ds = ListDataset(train_examples)
    eval_ds = ListDataset(eval_examples) if eval_examples else None
    trainer = DPOTrainer(model=model, args=config, train_dataset=train_ds, eval_dataset=eval_ds,
                         processing_class=tokenizer, ref_model=ref_model,
                         data_collator=PairCollator(tokenizer.pad_token_id, config.margin),
                         data_report=train_report.to_dict())
    if config.precompute_ref_log_probs:
        trainer.precompute_reference(train_ds, PairRefLayout)
        trainer.precompute_reference(eval_ds, PairRefLayout)
        trainer.ref_model = None  # no reference model in memory while training
    trainer.train(resume_from_checkpoint=resolve_resume(config))
    return finish(trainer, config, {"train": train_report, "eval": eval_report}, started)


def cli(argv: list[str]) -> int:
    return run_cli("dpo", DPOConfig, train_dpo, argv)
