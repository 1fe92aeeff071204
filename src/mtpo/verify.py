"""A second, independent computation of the trainable mask, to check `render.ChatRenderer` on real data.

`render.py` finds message boundaries as *character* positions in the rendered text and maps tokens to
them through the tokenizer's offsets. The method here uses neither characters nor offsets, only
token lists of the template's own renderings (the token-prefix method):

    head_k = tokens(template(messages[:k], add_generation_prompt=True))
    upto_k = tokens(template(messages[:k + 1]))
    full   = tokens(template(messages))

The tokens assistant message k adds after its generation prompt, `full[len(head_k) : end_k]`, are
what the policy emitted, where `end_k` is where `upto_k` and the rest of the conversation part ways
(the common token prefix of `upto_k` and `full`; for the last message, of `upto_k` and the same
conversation continued by one more user turn, so that a closing token the template writes only at
the very end — Phi-3's eos — is not credited to the turn), minus trailing whitespace tokens.
With `end_of_turn` = last / none, the end-of-turn token(s) come off too.

What it cannot check, it says so instead of guessing ("unverified", with the reason): a trained
message whose role is not assistant (only its content is trained, which token lists cannot isolate),
or a generation prompt that is not a token prefix of the conversation (a token merging across the
boundary, which `render.py` resolves by characters).

Used by `mtpo inspect --verify` (every row) and by the trainers' `verify_masks` option (first rows).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace

import numpy as np

from mtpo.data import Conversation, RecordError, parse_conversation, parse_labeled, parse_pair
from mtpo.render import ChatRenderer, Rendered

logger = logging.getLogger("mtpo")
_PROBE_TURN = {"role": "user", "content": "MTPO_VERIFY_NEXT_TURN"}


class Unverifiable(Exception):
    """The token-prefix method cannot compute this conversation's mask (the reason says why)."""


@dataclass
class Finding:
    row: int
    side: str
    status: str  # "mismatch" | "unverified"
    detail: str

    def __str__(self) -> str:
        return f"row {self.row}, {self.side}: {self.detail}"


@dataclass
class VerifyReport:
    checked: int = 0  # sides compared
    mismatches: list[Finding] = field(default_factory=list)
    unverified: list[Finding] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)  # rows that did not render (their RecordError)

    def lines(self) -> list[str]:
        out = [f"{self.checked} trajectories checked: {self.checked - len(self.mismatches) - len(self.unverified)} "
               f"agree, {len(self.mismatches)} disagree, {len(self.unverified)} could not be checked, "
               f"{len(self.failed)} rows failed to render"]
        out += [f"MISMATCH {f}" for f in self.mismatches]
        out += [f"not checked: {f}" for f in self.unverified]
        out += [f"render error: {e}" for e in self.failed]
        return out


# --------------------------------------------------------------------------------------------
# The token-prefix method


def prefix_diff_mask(renderer: ChatRenderer, conv: Conversation, continue_last: bool = True
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(input_ids, trainable) of `conv` from token lists of prefix renderings only. The last message's
    end is found by rendering one more turn after it (`continue_last`), or, for a per-turn sequence
    (which ends with its turn, and whose template may rewrite it once another turn follows), at the
    end of the rendering less trailing whitespace."""
    tok, msgs, tools = renderer.tokenizer, [m.to_template() for m in conv.messages], conv.tools
    roles = renderer.options.trainable_roles
    trained = [k for k, m in enumerate(conv.messages) if (m.train if m.train is not None else m.role in roles)]
    if any(conv.messages[k].role != "assistant" for k in trained):
        k = next(k for k in trained if conv.messages[k].role != "assistant")
        raise Unverifiable(f"message {k} ({conv.messages[k].role}) is trained; the token-prefix method only "
                           "checks assistant turns")
    full = _ids(renderer, msgs, tools, False)
    special = set(tok.all_special_ids)
    mask = np.zeros(len(full), dtype=bool)
    for k in trained:
        head = _ids(renderer, msgs[:k], tools, True)
        if full[: len(head)] != head:
            raise Unverifiable(f"the generation prompt before message {k} is not a token prefix of the conversation "
                               "(a token merges across the boundary)")
        upto = _ids(renderer, msgs[: k + 1], tools, False)
        rest = full if k + 1 < len(msgs) else _continued(renderer, msgs, tools, upto) if continue_last else upto
        end = _common_prefix(upto, rest)
        while end > len(head) and full[end - 1] not in special and not tok.decode(full[end - 1: end]).strip():
            end -= 1  # whitespace the template writes after the end-of-turn token
        mode = renderer.options.end_of_turn
        if mode == "none" or (mode == "last" and k != trained[-1]):
            end -= _end_of_turn_tokens(renderer, full, len(head), end, special, k)
        mask[len(head): end] = True
    mask[:1] = False  # nothing predicts the first token
    return np.asarray(full, dtype=np.int64), mask


def _ids(renderer: ChatRenderer, msgs: list[dict], tools, gen: bool) -> list[int]:
    if not renderer.template:  # e.g. mistral-common's own encoder
        raise Unverifiable("this renderer does not use a chat template; the token-prefix method needs one")
    if not msgs and not gen:
        return []
    text = renderer.tokenizer.apply_chat_template(msgs, tools=tools, chat_template=renderer.template, tokenize=False,
                                                  add_generation_prompt=gen)
    return list(renderer.tokenizer(text, add_special_tokens=False)["input_ids"])


def _continued(renderer, msgs, tools, upto) -> list[int]:
    """Tokens of the conversation continued by one more user turn (`upto` itself if the template refuses)."""
    try:
        return _ids(renderer, msgs + [_PROBE_TURN], tools, False)
    except Exception:
        return upto


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if len(diff) else n


def _end_of_turn_tokens(renderer, full, start, end, special, k) -> int:
    """How many tokens at full[:end] are the turn's end-of-turn text (a special token: one)."""
    if end > start and full[end - 1] in special:
        return 1
    for n in range(1, end - start + 1):
        tail = renderer.tokenizer.decode(full[end - n: end])
        if any(tail.strip() == eot.strip() for eot in renderer.end_of_turn_texts):
            return n
    raise Unverifiable(f"message {k}: no end-of-turn token found at the end of the turn")


# --------------------------------------------------------------------------------------------
# Comparing with render.py


def compare(renderer: ChatRenderer, conv: Conversation, rendered) -> str | None:
    """None if `rendered` agrees with the token-prefix method, else where they first differ. A side
    scored per turn (`render_turns.TurnSequences`) is checked sequence by sequence."""
    parts = getattr(rendered, "parts", None)
    if parts is None:
        return _compare_one(renderer, conv, rendered)
    for n, part in enumerate(parts):
        detail = _compare_one(*_part_conversation(renderer, conv, part, parts), part, rebuilt_ok=True)
        if detail:
            return f"turn sequence {n + 1}/{len(parts)}: {detail}"
    return None


def _part_conversation(renderer: ChatRenderer, conv: Conversation, part: Rendered, parts: list[Rendered]):
    """(renderer, conversation) that one per-turn sequence is the single rendering of: the messages up to
    its last one, with only its own turns trained (the trained segments say which)."""
    from mtpo.render_turns import _variant

    last = max(seg.messages[-1] for seg in part.segments)
    own = {k for seg in part.segments if seg.trained for k in seg.messages}
    messages = [replace(m, train=(k in own)) if m.role == "assistant" or m.train else m
                for k, m in enumerate(conv.messages[: last + 1])]
    turns = [k for k, m in enumerate(conv.messages) if m.role == "assistant"]
    if renderer.options.end_of_turn == "last" and turns and turns[-1] not in own:
        renderer = _variant(renderer, "none")  # `last` means the trajectory's last turn, not this sequence's
    return renderer, replace(conv, messages=messages)


def _compare_one(renderer: ChatRenderer, conv: Conversation, rendered: Rendered, rebuilt_ok: bool = False):
    ids, mask = prefix_diff_mask(renderer, conv, continue_last=not rebuilt_ok)
    if rebuilt_ok and not np.array_equal(ids, rendered.input_ids):
        # a turn rebuilt from its generation context (DeepSeek's prefilled <think>) is no rendering of
        # a conversation: the token-prefix method has nothing to compare it with
        raise Unverifiable("a turn rebuilt from its generation context (not a rendering of the conversation)")
    if not np.array_equal(ids, rendered.input_ids):
        n = min(len(ids), len(rendered.input_ids))
        t = next((i for i in range(n) if ids[i] != rendered.input_ids[i]), n)
        return f"token ids differ from the template's own tokenization at token {t}"
    diff = np.flatnonzero(mask != rendered.trainable)
    if not len(diff):
        return None
    t = int(diff[0])
    piece = renderer.tokenizer.decode(ids[t: t + 1])

    def fate(trained):
        return "trained" if trained else "external"

    return (f"{len(diff)} tokens disagree; first at token {t} {piece!r} (id {ids[t]}): mtpo's mask says "
            f"{fate(rendered.trainable[t])}, the token-prefix method says {fate(mask[t])}")


def _conversations(row: dict, index: int, kind: str) -> list[tuple[str, Conversation]]:
    """The conversations of a row, in the order `inspect.render_row` returns its sides."""
    if kind == "pair":
        pair = parse_pair(row, index)
        return [("chosen", pair.chosen_conversation()), ("rejected", pair.rejected_conversation())]
    if kind == "labeled":
        return [("completion", parse_labeled(row, index).conversation())]
    return [("messages", parse_conversation(row, index))]


def check_row(row: dict, index: int, kind: str, renderer: ChatRenderer) -> list[Finding]:
    """Render the row as the trainers do and compare each side; RecordError if it does not render."""
    from mtpo.inspect import render_row  # the trainers' rendering path (render_pair shares the prompt)

    sides = render_row(row, index, kind, renderer)
    findings = []
    for (name, conv), side in zip(_conversations(row, index, kind), sides):
        try:
            detail = compare(renderer, conv, side.rendered)
            if detail:
                findings.append(Finding(index, name, "mismatch", detail))
        except Unverifiable as e:
            findings.append(Finding(index, name, "unverified", str(e)))
        except Exception as e:  # the template failing on a prefix the renderer did not need
            findings.append(Finding(index, name, "unverified", f"{type(e).__name__}: {e}"))
    return findings


def verify_rows(rows: list[dict], renderer: ChatRenderer, indices=None, kind: str | None = None,
                progress: bool = False) -> VerifyReport:
    """Check rows (all, or `indices`); each row's kind is detected unless `kind` is given."""
    from tqdm.auto import tqdm

    from mtpo.inspect import row_kind

    report = VerifyReport()
    indices = range(len(rows)) if indices is None else indices
    for i in tqdm(indices, desc="verifying masks", disable=not progress, unit="row"):
        row_k = kind or row_kind(rows[i]) or "conversation"
        try:
            findings = check_row(rows[i], i, row_k, renderer)
        except RecordError as e:
            report.failed.append(str(e))
            continue
        report.checked += 2 if row_k == "pair" else 1
        for f in findings:
            (report.mismatches if f.status == "mismatch" else report.unverified).append(f)
    return report


def check_first_rows(rows: list[dict], renderer: ChatRenderer, n: int) -> VerifyReport | None:
    """The trainers' `verify_masks`: check the first `n` rows; a disagreement stops training."""
    if n <= 0 or not rows:
        return None
    report = verify_rows(rows, renderer, range(min(n, len(rows))))
    if report.mismatches:
        f = report.mismatches[0]
        raise RecordError(f.row, f"the trainable mask disagrees with an independent check (verify_masks): {f.detail}. "
                          "Inspect it with `mtpo inspect DATA --tokenizer ... --verify`; set verify_masks: 0 to "
                          "train anyway", side=f.side)
    if report.unverified:
        logger.warning("verify_masks: %d of %d trajectories could not be checked, e.g. %s", len(report.unverified),
                       report.checked, report.unverified[0])
    logger.info("verify_masks: %s", report.lines()[0])
    return report
