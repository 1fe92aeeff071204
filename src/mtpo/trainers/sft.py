"""Masked multi-turn SFT: next-token loss on policy-generated tokens only.

    loss = − Σ_{trainable tokens t of the global batch} log π(token_t | tokens_<t)  /  N

N is the number of trainable tokens in the whole global batch — every micro-batch of the optimizer
step (gradient accumulation) on every process — so one micro-batch of 8 × 8 accumulation steps
trains exactly like one batch of 64. Tool outputs, user turns and role headers are context only.

Also the rejection-sampling / RAFT baseline: keep only trajectories with `label: true`
(`filter_label`) or with `score ≥ min_score`; filtered rows are counted in the data report.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from mtpo import losses as L
from mtpo.collate import ConversationCollator
from mtpo.options import SFTOptions
from mtpo.data import Conversation, RecordError
from mtpo.prepare import prepare_conversations
from mtpo.trainers.args import MTPOConfig
from mtpo.trainers.base import MTPOTrainer
from mtpo.trainers.setup import run_cli, run_training


@dataclass
class SFTConfig(MTPOConfig, SFTOptions):
    """`mtpo sft` options (fields and checks: `mtpo.options.SFTOptions`) + `TrainingArguments`."""


class SFTTrainer(MTPOTrainer):
    args: SFTConfig
    eval_loss_metric = "nll"  # eval_loss = Σ −logπ / Σ tokens over the whole evaluation set

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_is_scaled_for_ga = True  # each micro-batch loss is already divided by the step's token count
        self._step_tokens = None

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        """Fetch the step's micro-batches and count their target tokens (all processes when
        `average_tokens_across_devices`): Trainer only counts `labels != -100`, and we have no labels."""
        batches, _ = super().get_batch_samples(epoch_iterator, num_batches, device)
        tokens = sum(_target_tokens(b) for b in batches)
        tokens = torch.tensor(float(tokens), device=device)
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            tokens = self.accelerator.reduce(tokens, reduction="sum")
        return batches, tokens

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None, mode=None):
        self._step_tokens = num_items_in_batch  # None outside training (evaluation): per-batch mean
        return super().compute_loss(model, inputs, return_outputs, num_items_in_batch, mode)

    def loss_and_metrics(self, model, inputs):
        logps, counts = self.policy_logps(model, inputs)  # (B,), (B,)
        if self._step_tokens is None:
            loss = L.sft_loss(logps, counts)
        else:
            # Σ over this micro-batch / tokens of the global batch; DDP/FSDP/DeepSpeed then *average*
            # gradients over processes, which the factor undoes when the count spans all of them.
            across = self.args.average_tokens_across_devices and self.args.world_size > 1
            loss = L.sft_loss(logps, counts, num_tokens=self._step_tokens)
            loss = loss * (self.accelerator.num_processes if across else 1)
        # (numerators, denominators): logged as Σ −logπ / Σ tokens over every row of every process
        return loss, {"nll": (-logps.detach(), counts.float()), "tokens": counts.float()}


def _target_tokens(batch: dict) -> int:
    """Tokens `sequence_logps` scores: trainable and preceded by a real token."""
    trainable, real = batch["trainable"], batch["attention_mask"].bool()
    return int((trainable[:, 1:] & real[:, :-1]).sum())


def keep_rows(config: SFTConfig):
    """The row filter of `filter_label` / `min_score` (None when neither is set)."""
    if not config.filter_label and config.min_score is None:
        return None

    def keep(conv: Conversation) -> bool:
        if config.filter_label:
            if conv.label is None:
                raise RecordError(conv.index, "filter_label is true but the row has no `label`")
            if not conv.label:
                return False
        if config.min_score is not None:
            if conv.score is None:
                raise RecordError(conv.index, f"min_score is {config.min_score} but the row has no `score`")
            return conv.score >= config.min_score
        return True

    return keep


def train_sft(config: SFTConfig) -> dict:
    """Masked multi-turn SFT (or RAFT with filter_label / min_score); returns the run summary."""
    return run_training(config, prepare=functools.partial(prepare_conversations, keep=keep_rows(config)),
                        trainer_cls=SFTTrainer, collator=lambda tokenizer: ConversationCollator(tokenizer.pad_token_id))


def cli(argv: list[str]) -> int:
    return run_cli("sft", SFTConfig, train_sft, argv)
