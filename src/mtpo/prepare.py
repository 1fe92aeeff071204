"""Rows → rendered examples ready to collate, with an honest account of what was skipped.

Nothing is dropped silently: every row that does not make it is counted in `SkipReport` under a
reason, and the trainers log and save the report. By default a malformed row is an error (naming the
row); `invalid_rows="skip"` turns those errors into counted skips.
"""

from __future__ import annotations

import json
import logging
import random
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from tqdm.auto import tqdm

from mtpo.data import (Conversation, LabeledTrajectory, RecordError, pairs_to_labeled, parse_conversation,
                       parse_labeled, parse_pair)
from mtpo.render import ChatRenderer, Rendered
from mtpo.render_turns import per_turn_count

logger = logging.getLogger(__name__)
TRUNCATION_MODES = ("drop", "keep_start")
INVALID_ROW_MODES = ("error", "skip")


@dataclass
class SkipReport:
    total: int = 0
    kept: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: dict[str, int] = field(default_factory=dict)  # reason → first row index

    def skip(self, reason: str, row: int) -> None:
        self.reasons[reason] += 1
        self.examples.setdefault(reason, row)

    @property
    def skipped(self) -> int:
        return sum(self.reasons.values())

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.kept}/{self.total} rows kept"
        parts = ", ".join(f"{n} {r} (first: row {self.examples[r]})" for r, n in self.reasons.most_common())
        return f"{self.kept}/{self.total} rows kept; skipped {self.skipped}: {parts}"

    def to_dict(self) -> dict:
        return {"total": self.total, "kept": self.kept, "skipped": self.skipped, "reasons": dict(self.reasons)}


@dataclass
class PairExample:
    chosen: Rendered
    rejected: Rendered
    index: int  # source row
    margin: float | None = None
    position: int = -1  # index in the prepared list (set by `_run`)
    ref_logps: tuple[float, float] | None = None  # precomputed reference (chosen, rejected)


@dataclass
class LabeledExample:
    completion: Rendered
    label: bool
    index: int  # source row
    record: LabeledTrajectory | None = None  # kept for building mismatched (KTO) pairs
    position: int = -1  # index in the prepared list (set by `_run`)
    ref_logps: float | None = None  # precomputed reference log-prob
    kl: Rendered | None = None  # this prompt + another example's completion (KTO's KL baseline; `add_mismatched`)
    kl_partner: int = -1  # position of the example whose completion `kl` borrows
    ref_kl_logps: float | None = None  # precomputed reference log-prob of `kl`


def fit_length(r: Rendered, max_length: int | None, truncation: str) -> tuple[Rendered | None, str | None]:
    """Apply the truncation policy; returns (rendered or None, reason it was dropped). Per-turn
    trajectories (`render_turns.TurnSequences`) fit when each of their sequences does."""
    if max_length is None or len(r) <= max_length:
        return r, None
    if truncation == "drop":
        return None, f"longer than max_length={max_length}"
    cut = r.truncated(max_length)
    if cut.num_trainable == 0:
        return None, f"no trainable tokens left after truncating to max_length={max_length}"
    return cut, None


def _run(rows: list[dict], build: Callable, report: SkipReport, invalid_rows: str, desc: str) -> list:
    if invalid_rows not in INVALID_ROW_MODES:
        raise ValueError(f"invalid_rows must be one of {INVALID_ROW_MODES}, got {invalid_rows!r}")
    out = []
    for i, row in enumerate(tqdm(rows, desc=desc, unit="row", disable=len(rows) < 256, leave=False)):
        report.total += 1
        try:
            made, reason = build(row, i)
        except RecordError as e:
            if invalid_rows == "error":
                raise
            made, reason = None, f"invalid ({str(e).split(': ', 1)[-1]})"
            logger.warning("skipping %s", e)
        if made is None:
            report.skip(reason, i)
        else:
            out.extend(made if isinstance(made, list) else [made])
    for position, example in enumerate(out):
        if hasattr(example, "position"):
            example.position = position
    report.kept = report.total - report.skipped
    logger.info("%s: %s", desc, report.summary())
    per_turn, seqs = per_turn_count(out)
    if per_turn:
        logger.info("%s: %d trajectories scored per turn as %d sequences (their template rewrites history; "
                    "see render_mode)", desc, per_turn, seqs)
    return out


def prepare_pairs(rows: list[dict], renderer: ChatRenderer, max_length: int | None = None,
                  truncation: str = "drop", invalid_rows: str = "error") -> tuple[list[PairExample], SkipReport]:
    """Preference rows → rendered pairs. A pair is dropped if either side does not fit."""
    _check_truncation(truncation)
    report = SkipReport()

    def build(row, i):
        pair = parse_pair(row, i)
        chosen, rejected = renderer.render_pair(pair)
        chosen, why_c = fit_length(chosen, max_length, truncation)
        rejected, why_r = fit_length(rejected, max_length, truncation)
        if chosen is None or rejected is None:
            return None, why_c or why_r
        return PairExample(chosen, rejected, i, pair.margin), None

    return _run(rows, build, report, invalid_rows, "rendering pairs"), report


def prepare_labeled(rows: list[dict], renderer: ChatRenderer, max_length: int | None = None,
                    truncation: str = "drop", invalid_rows: str = "error",
                    from_pairs: bool = False) -> tuple[list[LabeledExample], SkipReport]:
    """Unpaired rows (or preference rows split into one desirable + one undesirable) → rendered."""
    _check_truncation(truncation)
    report = SkipReport()

    def build(row, i):
        trajs = pairs_to_labeled([parse_pair(row, i)]) if from_pairs else [parse_labeled(row, i)]
        made = []
        for traj in trajs:
            r, why = fit_length(renderer.render_labeled(traj), max_length, truncation)
            if r is None:
                return None, why
            made.append(LabeledExample(r, traj.label, i, traj))
        return made, None

    return _run(rows, build, report, invalid_rows, "rendering trajectories"), report


KL_PARTNER_TRIES = 8  # partners tried per example for a mismatched pair that fits max_length


def add_mismatched(examples: list[LabeledExample], renderer: ChatRenderer, max_length: int | None = None,
                   seed: int = 0) -> None:
    """Give every example its KTO KL pair `kl`: its own prompt + the completion of another example.

    KTO's reference point z0 is estimated from (prompt, completion) pairs that do not belong together.
    TRL pairs row i with row i+1 of the same batch, which fails at one row per device (the "pair" is the
    row with itself). Here the partners are fixed once, over the whole dataset: walk a seeded random
    permutation cyclically and give each example the completion of the next one whose prompt (messages
    and tools) differs. Any batch size works, including 1, and reference log-probs of the pairs can be
    precomputed. Each pair is a new Conversation rendered by the chat template, so its mask comes from
    rendering. Of up to `KL_PARTNER_TRIES` partners the first whose pair fits `max_length` is used; if
    none fits, the first is truncated to `max_length` (it is a sample for the baseline, not a target).
    """
    if not examples:
        return
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    keys = _prompt_ids([examples[i].record for i in order])
    if len(set(keys)) < 2:
        raise RecordError(examples[0].index, "KTO's KL baseline needs trajectories of at least two different "
                          "prompts (mismatched pairs); every example has the same prompt")
    following = _next_different(keys)
    for k, i in enumerate(order):
        example = examples[i]
        fallback = None
        for c in _candidates(k, keys, following):
            j = order[c]
            kl = _render_mismatched(renderer, example, examples[j])
            if max_length is None or len(kl) <= max_length:
                example.kl, example.kl_partner = kl, examples[j].position
                break
            fallback = fallback or (kl, j)
        else:
            kl, j = fallback
            kl = kl.truncated(max_length)
            if kl.num_trainable == 0:
                raise RecordError(example.index, f"mismatched pair with row {examples[j].index} has no trainable "
                                  f"token within max_length={max_length}")
            example.kl, example.kl_partner = kl, examples[j].position


def _prompt_ids(records: list[LabeledTrajectory]) -> list[int]:
    """One id per distinct prompt (messages + tools)."""
    ids: dict[str, int] = {}
    out = []
    for r in records:
        key = json.dumps([[m.to_template() for m in r.prompt], r.tools], sort_keys=True, default=str)
        out.append(ids.setdefault(key, len(ids)))
    return out


def _next_different(keys: list[int]) -> list[int]:
    """following[k] = first position after k (cyclically) whose key differs from keys[k]."""
    n = len(keys)
    following = [0] * n
    nxt = None
    for p in range(2 * n - 1, -1, -1):  # two passes over the doubled list handle the wrap-around
        k = p % n
        if nxt is not None:
            following[k] = nxt % n if keys[nxt % n] != keys[k] else following[nxt % n]
        nxt = p
    return following


def _candidates(k: int, keys: list[int], following: list[int]):
    """Up to KL_PARTNER_TRIES positions after k (cyclically) whose prompt differs from k's."""
    c = following[k]
    for _ in range(KL_PARTNER_TRIES):
        yield c
        c = (c + 1) % len(keys)
        if keys[c] == keys[k]:
            c = following[c]


def _render_mismatched(renderer: ChatRenderer, example: LabeledExample, partner: LabeledExample) -> Rendered:
    own, other = example.record, partner.record
    traj = LabeledTrajectory(own.prompt, other.completion, example.label, own.tools, example.index)
    try:
        return renderer.render_labeled(traj)
    except RecordError as e:
        raise RecordError(example.index, f"mismatched pair (this prompt + the completion of row {partner.index}) "
                          f"for KTO's KL baseline does not render: {str(e).split(': ', 1)[-1]}") from None


def prepare_conversations(rows: list[dict], renderer: ChatRenderer, max_length: int | None = None,
                          truncation: str = "drop", invalid_rows: str = "error",
                          keep: Callable[[Conversation], bool] | None = None) -> tuple[list[Rendered], SkipReport]:
    """SFT rows → rendered conversations; `keep` filters (e.g. label == True for RAFT)."""
    _check_truncation(truncation)
    report = SkipReport()

    def build(row, i):
        conv = parse_conversation(row, i)
        if keep is not None and not keep(conv):
            return None, "filtered out (label/score)"
        return fit_length(renderer.render_trajectory(conv), max_length, truncation)

    return _run(rows, build, report, invalid_rows, "rendering conversations"), report


def _check_truncation(truncation: str) -> None:
    if truncation not in TRUNCATION_MODES:
        raise ValueError(f"truncation must be one of {TRUNCATION_MODES}, got {truncation!r}")

