"""M-KTO: KTO on whole trajectories, log-probs summed over policy-generated tokens only.

With r = logπ(y|x) − logπ_ref(y|x) (masked trajectory log-ratio) and the reference point
z0 = max(0, mean r over mismatched (prompt, completion) pairs), detached:

    desirable   (label true)   w_d · (1 − σ(β(r − z0)))
    undesirable (label false)  w_u · (1 − σ(β(z0 − r)))

How z0 is estimated (docs/kto.md): every example carries one mismatched pair — its prompt followed
by another example's completion, fixed once during data preparation (`mtpo.prepare.add_mismatched`)
and rendered with the chat template. Each step, z0 is the mean over the pairs of the micro-batch on
*all* processes (sums and counts all-reduced), clamped at 0. One row per device works: the pair is
never the row with itself.
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass

import torch

from mtpo import losses as L
from mtpo.collate import LabeledCollator, split_pair
from mtpo.config import ConfigError
from mtpo.options import KTO_DATA_FORMATS, KTOOptions
from mtpo.prepare import LabeledExample, add_mismatched, prepare_labeled
from mtpo.render import ChatRenderer
from mtpo.trainers.args import ReferenceConfig
from mtpo.trainers.base import MTPOTrainer
from mtpo.trainers.dpo import PairRefLayout
from mtpo.trainers.setup import run_cli, run_training

logger = logging.getLogger("mtpo")
DATA_FORMATS = KTO_DATA_FORMATS
RECOMMENDED_RATIO = (1.0, 4 / 3)  # KTO paper: w_d·n_d / (w_u·n_u) in [1, 4/3]


@dataclass
class KTOConfig(ReferenceConfig, KTOOptions):
    """`mtpo kto` options (fields and checks: `mtpo.options.KTOOptions`) + `TrainingArguments`."""


class KTORefLayout(PairRefLayout):
    """Precomputed reference log-probs of a KTO batch: (completion, mismatched KL pair) per example."""

    @staticmethod
    def store(example: LabeledExample, row: torch.Tensor) -> None:
        example.ref_logps, example.ref_kl_logps = float(row[0]), float(row[1])


class KTOTrainer(MTPOTrainer):
    args: KTOConfig

    def kl_baseline(self, policy_kl_logps: torch.Tensor, ref_kl_logps: torch.Tensor) -> torch.Tensor:
        """z0 = max(0, mean(logπ − logπ_ref)) over the mismatched pairs of this micro-batch on every
        process; detached, 0-dim, equal on all processes. Sums and counts are all-reduced before dividing,
        so it is the mean over all pairs even when processes hold different numbers of rows."""
        diff = (policy_kl_logps - ref_kl_logps).detach().float()  # (B,)
        if self.padding_batch:  # evaluation: this process holds only accelerate's padding duplicates
            diff = diff[:0]
        total = torch.stack([diff.sum(), torch.tensor(float(diff.numel()), device=diff.device)])
        total = self.accelerator.reduce(total, reduction="sum")  # (2,) on every process
        if total[1] == 0:
            raise RuntimeError("KTO KL baseline: no mismatched pair in the batch on any process")
        return (total[0] / total[1]).clamp(min=0)

    def loss_and_metrics(self, model, inputs):
        args = self.args
        labels = inputs["label"]  # (B,) bool
        n = labels.shape[0]
        ref_logps, ref_kl_logps = split_pair(self.reference_logps(model, inputs))  # (B,), (B,)
        with torch.no_grad():  # z0 is detached: no graph for the KL pairs
            kl_logps, _ = self.policy_logps(model, _rows(inputs, slice(n, 2 * n)))
        z0 = self.kl_baseline(kl_logps, ref_kl_logps)
        logps, counts = self.policy_logps(model, _rows(inputs, slice(0, n)))  # (B,), (B,)
        losses, rewards = L.kto_loss(logps, ref_logps, labels, z0, beta=args.beta,
                                     desirable_weight=args.desirable_weight,
                                     undesirable_weight=args.undesirable_weight)
        counted = labels[:0] if self.padding_batch else labels  # padding duplicates are not counted
        class_counts = self.accelerator.reduce(torch.stack([counted.sum(), (~counted).sum()]).float(), "sum")
        logps = logps.detach()
        metrics = {  # per-class metrics get only that class's rows (possibly none), so means are per class
            "rewards/desirable": rewards[labels], "rewards/undesirable": rewards[~labels],
            "logps/desirable": logps[labels], "logps/undesirable": logps[~labels],
            "kl": z0, "count/desirable": class_counts[0], "count/undesirable": class_counts[1],
            "tokens": counts.float(),
        }
        return losses.mean(), metrics


def _rows(inputs: dict, rows: slice) -> dict:
    """input_ids / attention_mask / trainable of some trajectory rows (all their sequences, with `seq_owner`
    renumbered from 0 when trajectories are per turn), without padding columns none of them uses."""
    owner = inputs.get("seq_owner")
    if owner is None:
        select = rows
    else:
        select = ((owner >= rows.start) & (owner < rows.stop)).nonzero().squeeze(-1)
    mask = inputs["attention_mask"][select]  # right-padded
    width = int(mask.sum(-1).max())
    out = {k: inputs[k][select, :width] for k in ("input_ids", "attention_mask", "trainable")}
    if owner is not None:
        out["seq_owner"] = owner[select] - rows.start
    return out


# ------------------------------------------------------------------------------------------ data


def detect_format(rows: list[dict]) -> str:
    """`pairs` when every row has chosen + rejected, `unpaired` when none has; mixed data is an error."""
    paired = ["chosen" in r and "rejected" in r for r in rows]
    if all(paired):
        return "pairs"
    if not any(paired):
        return "unpaired"
    raise ConfigError(f"data mixes preference pairs (e.g. row {paired.index(True)}) and unpaired rows (e.g. row "
                      f"{paired.index(False)}); set data_format: pairs or unpaired")


def prepare_kto(rows: list[dict], renderer: ChatRenderer, *, data_format: str = "auto", seed: int = 0,
                max_length: int | None = None, **kwargs) -> tuple[list[LabeledExample], object]:
    """Rows → labeled trajectories (pairs converted) with their mismatched KL pairs rendered."""
    fmt = detect_format(rows) if data_format == "auto" else data_format
    examples, report = prepare_labeled(rows, renderer, max_length=max_length, from_pairs=fmt == "pairs", **kwargs)
    if fmt == "pairs":
        logger.info("converted %d pairs into %d desirable + %d undesirable trajectories",
                    report.kept, sum(e.label for e in examples), sum(not e.label for e in examples))
    add_mismatched(examples, renderer, max_length, seed)
    return examples, report


def check_balance(examples: list[LabeledExample], config: KTOConfig) -> tuple[int, int]:
    """Both classes must be present; warn when w_d·n_d / (w_u·n_u) is outside the paper's [1, 4/3]."""
    n_d = sum(e.label for e in examples)
    n_u = len(examples) - n_d
    if not n_d or not n_u:
        missing = "undesirable (label false)" if n_d else "desirable (label true)"
        raise ConfigError(f"train data has {n_d} desirable and {n_u} undesirable trajectories: KTO needs both, no "
                          f"{missing} row found (for desirable-only data use `mtpo sft`)")
    w_d, w_u = config.desirable_weight, config.undesirable_weight
    ratio = w_d * n_d / (w_u * n_u)
    low, high = RECOMMENDED_RATIO
    if not low - 1e-9 <= ratio <= high + 1e-9:
        fit = w_u * n_u / n_d  # the desirable_weight giving a ratio of 1
        logger.warning("desirable_weight·n_desirable / (undesirable_weight·n_undesirable) = %g·%d / (%g·%d) = %.3f "
                       "is outside [1, 4/3], the KTO paper's recommendation; e.g. desirable_weight in [%.3g, %.3g] "
                       "with undesirable_weight %g", w_d, n_d, w_u, n_u, ratio, fit * low, fit * high, w_u)
    return n_d, n_u


# ------------------------------------------------------------------------------------------ entry points


def train_kto(config: KTOConfig) -> dict:
    """Train a policy with multi-turn KTO on labeled trajectories; returns the run summary."""
    return run_training(config, prepare=functools.partial(prepare_kto, data_format=config.data_format, seed=config.seed),
                        trainer_cls=KTOTrainer, ref_layout=KTORefLayout,
                        collator=lambda tokenizer: LabeledCollator(tokenizer.pad_token_id),
                        check_data=lambda examples: check_balance(examples, config))


def cli(argv: list[str]) -> int:
    return run_cli("kto", KTOConfig, train_kto, argv)
