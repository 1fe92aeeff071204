"""Rendered examples → padded tensors. Attention mask (real tokens) ≠ loss mask (trainable tokens).

Padding never decides anything: both masks are carried explicitly, so `pad_token_id == eos` is harmless.
Preference batches stack chosen and rejected in ONE batch, chosen first: rows [0, B) are chosen and
rows [B, 2B) the matching rejected sides; `split_pair` is the one place they are split again.

A trajectory scored per turn (`mtpo.render_turns.TurnSequences`) is several sequences. The collator
flattens them and adds `seq_owner` (S,): the trajectory row each sequence belongs to; the trainer sums
the sequences' log-probs per row (`sum_by_owner`), so losses still see one value per trajectory.
Without per-turn trajectories in a batch there is no `seq_owner` and sequence i is row i.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset

from mtpo.render import Rendered
from mtpo.render_turns import sequences

SEQUENCE_KEYS = ("input_ids", "attention_mask", "trainable", "seq_owner")  # one row per sequence, not per trajectory


def pad_rendered(seqs: list[Rendered], pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence: input_ids (N, T) long, attention_mask and trainable (N, T) bool."""
    longest = max(len(s) for s in seqs)
    if pad_to_multiple_of:
        longest = -(-longest // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = np.full((len(seqs), longest), pad_token_id, dtype=np.int64)
    attention = np.zeros((len(seqs), longest), dtype=bool)
    trainable = np.zeros((len(seqs), longest), dtype=bool)
    for i, s in enumerate(seqs):
        n = len(s)
        input_ids[i, :n] = s.input_ids
        attention[i, :n] = True
        trainable[i, :n] = s.trainable
    return {"input_ids": torch.from_numpy(input_ids), "attention_mask": torch.from_numpy(attention),
            "trainable": torch.from_numpy(trainable)}


def pad_trajectories(trajectories: list, pad_token_id: int, pad_to_multiple_of: int | None = None) -> dict:
    """`pad_rendered` over every sequence of every trajectory, plus `seq_owner` when a trajectory has several."""
    seqs, owner = [], []
    for row, t in enumerate(trajectories):
        parts = sequences(t)
        seqs += parts
        owner += [row] * len(parts)
    batch = pad_rendered(seqs, pad_token_id, pad_to_multiple_of)
    if len(seqs) != len(trajectories):
        batch["seq_owner"] = torch.tensor(owner, dtype=torch.long)
    return batch


def sum_by_owner(values: torch.Tensor, owner: torch.Tensor | None) -> torch.Tensor:
    """Per-sequence values (S,) → per-trajectory sums (R,) (`owner` None: already per trajectory)."""
    if owner is None:
        return values
    rows = int(owner.max()) + 1 if owner.numel() else 0
    return torch.zeros(rows, dtype=values.dtype, device=values.device).index_add(0, owner.to(values.device), values)


def split_pair(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(2B, ...) stacked [chosen; rejected] → (chosen (B, ...), rejected (B, ...))."""
    half = x.shape[0] // 2
    return x[:half], x[half:]


class ListDataset(Dataset):
    """A plain list as a map-style dataset (examples are already rendered)."""

    def __init__(self, items: list):
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        return self.items[i]


@dataclass
class PairCollator:
    """PairExample list → {input_ids, attention_mask, trainable: (2B, T) (or (S, T) + seq_owner (S,), see the
    module docstring); margin, idx: (B,); ref_logps?: (2B,)}."""

    pad_token_id: int
    default_margin: float = 0.0
    pad_to_multiple_of: int | None = None

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        batch = pad_trajectories([e.chosen for e in examples] + [e.rejected for e in examples],
                                 self.pad_token_id, self.pad_to_multiple_of)
        margins = [self.default_margin if e.margin is None else e.margin for e in examples]
        batch["margin"] = torch.tensor(margins, dtype=torch.float32)
        batch["idx"] = torch.tensor([e.position for e in examples], dtype=torch.long)
        if all(e.ref_logps is not None for e in examples):  # precomputed reference, chosen first
            ref = [e.ref_logps[0] for e in examples] + [e.ref_logps[1] for e in examples]
            batch["ref_logps"] = torch.tensor(ref, dtype=torch.float32)
        return batch


@dataclass
class LabeledCollator:
    """KTO: LabeledExample list → {input_ids, attention_mask, trainable: (2B, T) stacked [completions; KL pairs];
    label (bool), idx: (B,); ref_logps?: (2B,)}. Rows [B, 2B) are each example's mismatched pair (`kl`),
    rendered during data preparation (`mtpo.prepare.add_mismatched`), so this only pads."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        if any(e.kl is None for e in examples):
            raise ValueError("examples have no mismatched KL pair; run mtpo.prepare.add_mismatched first")
        batch = pad_trajectories([e.completion for e in examples] + [e.kl for e in examples],
                                 self.pad_token_id, self.pad_to_multiple_of)
        batch["label"] = torch.tensor([e.label for e in examples], dtype=torch.bool)
        batch["idx"] = torch.tensor([e.position for e in examples], dtype=torch.long)
        if all(e.ref_logps is not None and e.ref_kl_logps is not None for e in examples):
            ref = [e.ref_logps for e in examples] + [e.ref_kl_logps for e in examples]
            batch["ref_logps"] = torch.tensor(ref, dtype=torch.float32)
        return batch


@dataclass
class ConversationCollator:
    """SFT: Rendered list → {input_ids, attention_mask, trainable: (B, T)}."""

    pad_token_id: int
    pad_to_multiple_of: int | None = None

    def __call__(self, examples) -> dict[str, torch.Tensor]:
        return pad_trajectories(list(examples), self.pad_token_id, self.pad_to_multiple_of)
