"""M-DPO: DPO on whole trajectories, log-probs summed over policy-generated tokens only.

    Δ = (logπ(w) − logπ(l)) − (logπ_ref(w) − logπ_ref(l)),   loss = ℓ(β·Δ)   (ℓ per `loss_type`)

With a fixed SFT reference this optimises the KL-regularised trajectory objective; with the
reference reset to the previous iteration's model each round (`ref_model_name_or_path` = last
iteration's output) it optimises the non-regularised one (Xiong et al., ICLR 2025).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from mtpo import losses as L
from mtpo.collate import PairCollator, split_pair
from mtpo.options import DPOOptions
from mtpo.prepare import prepare_pairs
from mtpo.trainers.args import ReferenceConfig
from mtpo.trainers.base import MTPOTrainer
from mtpo.trainers.setup import run_cli, run_training


@dataclass
class DPOConfig(ReferenceConfig, DPOOptions):
    """`mtpo dpo` options (fields and checks: `mtpo.options.DPOOptions`) + `TrainingArguments`."""


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
        logps, counts = self.policy_logps(model, inputs)  # (2B,), (2B,) stacked [chosen; rejected]
        ref_logps = self.reference_logps(model, inputs)
        chosen, rejected = split_pair(logps)
        ref_chosen, ref_rejected = split_pair(ref_logps)
        chosen_counts, rejected_counts = split_pair(counts)
        # The length penalty charges the *policy* only: Δ − α(|w| − |l|), as in the original code.
        # (Charging the reference too would cancel it exactly.) Rewards stay β·(logπ − logπ_ref).
        penalized = [L.length_penalty(x, n, alpha=args.length_penalty) if args.length_penalty else x
                     for x, n in ((chosen, chosen_counts), (rejected, rejected_counts))]
        losses, _, _ = L.preference_loss(
            args.loss_type, *penalized, ref_chosen, ref_rejected, beta=args.beta,
            label_smoothing=args.label_smoothing,
            margin=inputs["margin"] if L.PREFERENCE_LOSSES[args.loss_type].needs_margin else None)
        chosen_rewards = args.beta * (chosen - ref_chosen).detach()  # (B,)
        rejected_rewards = args.beta * (rejected - ref_rejected).detach()  # (B,)
        # NLL per token of each chosen trajectory, then a mean over pairs (like the preference loss),
        # so that gradient accumulation and data parallelism give the same gradient as one big batch.
        nll = -chosen / chosen_counts.clamp(min=1)  # (B,)
        loss = losses.mean()
        if args.nll_coef:
            loss = loss + args.nll_coef * nll.mean()
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
    return run_training(config, prepare=prepare_pairs, trainer_cls=DPOTrainer, ref_layout=PairRefLayout,
                        collator=lambda tokenizer: PairCollator(tokenizer.pad_token_id, config.margin))


def cli(argv: list[str]) -> int:
    return run_cli("dpo", DPOConfig, train_dpo, argv)
