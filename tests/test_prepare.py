"""Rows → rendered examples: truncation policies, invalid-row policies, and the SkipReport's counts."""

from __future__ import annotations

import numpy as np
import pytest

from mtpo.data import RecordError, parse_pair
from mtpo.prepare import (LabeledExample, PairExample, SkipReport, fit_length, prepare_conversations,
                          prepare_labeled, prepare_pairs)
from mtpo.render import ChatRenderer, RenderOptions

U = {"role": "user", "content": "What is 2+3?"}
A = {"role": "assistant", "content": "Let me compute.\n```python\nprint(2+3)\n```"}
T = {"role": "user", "content": "```output\n5\n```"}
F = {"role": "assistant", "content": "The answer is \\boxed{5}."}
BAD = {"role": "assistant", "content": "6"}
LONG = {"role": "assistant", "content": "Let me think about this very carefully, step by step. " * 8 + "\\boxed{5}"}


@pytest.fixture(scope="module")
def rend(llama3_tok, template):
    return ChatRenderer(llama3_tok, RenderOptions(chat_template=template("llama3")))


def pair_row(chosen, rejected, **extra):
    return {"chosen": [U, *chosen], "rejected": [U, *rejected], **extra}


def lengths(rend, row, i=0):
    c, r = rend.render_pair(parse_pair(row, i))
    return len(c), len(r)


def test_prepare_pairs_keeps_everything(rend):
    rows = [pair_row([A, T, F], [BAD]), pair_row([F], [BAD], margin=1.5)]
    out, report = prepare_pairs(rows, rend)
    assert [type(e) for e in out] == [PairExample, PairExample] and [e.index for e in out] == [0, 1]
    assert out[1].margin == 1.5 and out[0].margin is None
    assert (report.total, report.kept, report.skipped) == (2, 2, 0) and report.summary() == "2/2 rows kept"
    assert out[0].chosen.num_trainable > out[0].rejected.num_trainable > 0


def test_truncation_drop_counts_rows_and_names_first(rend):
    short, long_ = pair_row([F], [BAD]), pair_row([LONG], [BAD])
    n_short, n_long = max(lengths(rend, short)), lengths(rend, long_)[0]
    assert n_long > n_short
    rows = [short, long_, short, long_]
    out, report = prepare_pairs(rows, rend, max_length=n_short)
    assert [e.index for e in out] == [0, 2]
    reason = f"longer than max_length={n_short}"
    assert report.reasons == {reason: 2} and report.examples == {reason: 1}
    assert (report.total, report.kept, report.skipped) == (4, 2, 2)
    assert report.summary() == f"2/4 rows kept; skipped 2: 2 {reason} (first: row 1)"
    assert report.to_dict() == {"total": 4, "kept": 2, "skipped": 2, "reasons": {reason: 2}}
    # a pair goes whole: the long side is the rejected one here
    out, report = prepare_pairs([pair_row([BAD], [LONG])], rend, max_length=n_short)
    assert out == [] and report.skipped == 1
    # exactly max_length fits
    out, _ = prepare_pairs([long_], rend, max_length=n_long)
    assert len(out) == 1 and len(out[0].chosen) == n_long


def test_truncation_keep_start(rend, llama3_tok):
    row = pair_row([A, T, LONG], [BAD])
    full_c, full_r = rend.render_pair(parse_pair(row, 0))
    cut = len(full_c) - 20
    out, report = prepare_pairs([row], rend, max_length=cut, truncation="keep_start")
    assert report.kept == 1
    c, r = out[0].chosen, out[0].rejected
    assert len(c) == cut and c.input_ids.tolist() == full_c.input_ids[:cut].tolist()
    np.testing.assert_array_equal(c.trainable, full_c.trainable[:cut])
    assert c.offsets.shape == (cut, 2) and c.prompt_tokens == full_c.prompt_tokens
    assert len(r) == len(full_r)  # the side that fits is untouched
    # the last turn's end-of-turn token is cut off: what remains trained is A + eot + a prefix of LONG
    text = llama3_tok.decode(c.input_ids[c.trainable])
    assert text.startswith(A["content"] + "<|eot_id|>Let me think") and not text.endswith("<|eot_id|>")


def test_keep_start_with_all_trainable_tokens_cut_is_dropped_and_counted(rend):
    row = pair_row([F], [BAD])
    c, _ = rend.render_pair(parse_pair(row, 0))
    cut = c.prompt_tokens + 1  # only the first (untrainable) header token of the completion remains
    assert not c.trainable[:cut].any()
    rows = [pair_row([LONG], [BAD]), row]
    out, report = prepare_pairs(rows, rend, max_length=cut, truncation="keep_start")
    reason = f"no trainable tokens left after truncating to max_length={cut}"
    assert out == [] and report.reasons == {reason: 2} and report.examples[reason] == 0


def test_fit_length_direct(rend):
    r, _ = rend.render_pair(parse_pair(pair_row([F], [BAD]), 0))
    assert fit_length(r, None, "drop") == (r, None)
    assert fit_length(r, len(r), "drop") == (r, None)
    assert fit_length(r, len(r) - 1, "drop") == (None, f"longer than max_length={len(r) - 1}")
    kept, why = fit_length(r, len(r) - 1, "keep_start")
    assert why is None and len(kept) == len(r) - 1 and kept.num_trainable == r.num_trainable - 1


def test_invalid_rows_error_names_row(rend):
    rows = [pair_row([F], [BAD]), pair_row([F], [{"role": "robot", "content": "x"}])]
    with pytest.raises(RecordError, match=r"^row 1, rejected, message 1: unknown role 'robot'"):
        prepare_pairs(rows, rend)


def test_invalid_rows_skip_counts(rend):
    rows = [
        pair_row([F], [BAD]),
        pair_row([F], [{"role": "robot", "content": "x"}]),  # parse error
        {"chosen": [U, F], "rejected": [{"role": "user", "content": "other"}, BAD]},  # prompts differ
        pair_row([F], [{**BAD, "train": False}]),  # render error: zero trainable tokens
        pair_row([F], [{"role": "robot", "content": "y"}]),
    ]
    out, report = prepare_pairs(rows, rend, invalid_rows="skip")
    assert [e.index for e in out] == [0]
    assert (report.total, report.kept, report.skipped) == (5, 1, 4)
    assert report.reasons["invalid (chosen and rejected prompts differ (first difference here))"] == 1
    assert report.examples["invalid (no trainable tokens (no assistant message, or all marked train: false))"] == 3
    robot = [r for r in report.reasons if "unknown role 'robot'" in r]
    assert len(robot) == 1 and report.reasons[robot[0]] == 2 and report.examples[robot[0]] == 1


def test_template_errors_are_skippable(chatml_tok, template):
    rend = ChatRenderer(chatml_tok, RenderOptions(chat_template=template("qwen3"), render_mode="single"))
    rows = [pair_row([F], [BAD]), pair_row([A, T, F], [BAD])]  # the second rewrites history under qwen3
    with pytest.raises(RecordError, match=r"^row 1, chosen, message 2: chat template is not prefix-stable"):
        prepare_pairs(rows, rend)
    out, report = prepare_pairs(rows, rend, invalid_rows="skip")
    assert [e.index for e in out] == [0] and report.skipped == 1
    assert "not prefix-stable" in next(iter(report.reasons))


def test_bad_modes(rend):
    with pytest.raises(ValueError, match="truncation"):
        prepare_pairs([], rend, truncation="keep_end")
    with pytest.raises(ValueError, match="invalid_rows"):
        prepare_pairs([pair_row([F], [BAD])], rend, invalid_rows="ignore")


def test_prepare_labeled_from_pairs_and_unpaired(rend):
    rows = [pair_row([A, T, F], [BAD]), pair_row([F], [BAD])]
    out, report = prepare_labeled(rows, rend, from_pairs=True)
    assert [(e.index, e.label) for e in out] == [(0, True), (0, False), (1, True), (1, False)]
    assert all(isinstance(e, LabeledExample) and e.record is not None for e in out)
    assert report.kept == 2 and report.total == 2
    un = [{"prompt": [U], "completion": [A, T, F], "label": True}, {"messages": [U, BAD], "label": False}]
    out, report = prepare_labeled(un, rend)
    assert [e.label for e in out] == [True, False] and report.kept == 2
    assert out[0].completion.num_trainable == out[0].completion.trainable[out[0].completion.prompt_tokens:].sum()


def test_prepare_labeled_drop_and_skip(rend):
    rows = [pair_row([LONG], [BAD]), pair_row([F], [BAD])]
    n = max(lengths(rend, rows[1]))
    out, report = prepare_labeled(rows, rend, max_length=n, from_pairs=True)
    assert [e.index for e in out] == [1, 1] and report.reasons == {f"longer than max_length={n}": 1}
    bad = [{"messages": [U, F]}, {"messages": [U, F], "label": True}]
    with pytest.raises(RecordError, match=r"^row 0: missing field `label`"):
        prepare_labeled(bad, rend)
    out, report = prepare_labeled(bad, rend, invalid_rows="skip")
    assert len(out) == 1 and report.skipped == 1 and report.examples == {
        "invalid (missing field `label` (true = desirable, false = undesirable))": 0}


def test_prepare_conversations_filter_and_truncation(rend):
    rows = [{"messages": [U, A, T, F], "label": True}, {"messages": [U, BAD], "label": False},
            {"messages": [U, LONG], "label": True}]
    out, report = prepare_conversations(rows, rend, keep=lambda c: c.label is True)
    assert [r.index for r in out] == [0, 2] and report.reasons == {"filtered out (label/score)": 1}
    n = len(out[0])
    out, report = prepare_conversations(rows, rend, max_length=n - 1, truncation="keep_start")
    assert [len(r) for r in out] == [n - 1, len(rend.render(parse_pair(pair_row([BAD], [BAD]), 1).chosen_conversation())),
                                     n - 1]
    assert report.kept == 3


def test_skip_report_summary_orders_by_count():
    rep = SkipReport(total=5)
    for reason, row in [("b", 3), ("a", 1), ("b", 4)]:
        rep.skip(reason, row)
    rep.kept = rep.total - rep.skipped
    assert rep.summary() == "2/5 rows kept; skipped 3: 2 b (first: row 3), 1 a (first: row 1)"


def test_add_mismatched_pairs_own_prompt_with_other_completion(rend, llama3_tok):
    from mtpo.prepare import add_mismatched

    rows = [{"prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
             "completion": [{"role": "assistant", "content": f"It is {2 * i}."}], "label": i % 2 == 0} for i in range(5)]
    rows.append({**rows[0], "label": False})  # a second row with row 0's prompt: never its partner
    examples, _ = prepare_labeled(rows, rend)
    add_mismatched(examples, rend, seed=3)
    for e in examples:
        partner = examples[e.kl_partner]
        assert partner.record.prompt[0].content != e.record.prompt[0].content
        p = e.completion.prompt_tokens
        assert e.kl.prompt_tokens == p and e.kl.input_ids[:p].tolist() == e.completion.input_ids[:p].tolist()
        assert llama3_tok.decode(e.kl.input_ids[e.kl.trainable]) == llama3_tok.decode(
            partner.completion.input_ids[partner.completion.trainable])


def test_add_mismatched_needs_two_prompts(rend):
    from mtpo.prepare import add_mismatched

    rows = [{"prompt": [U], "completion": [F], "label": True}, {"prompt": [U], "completion": [BAD], "label": False}]
    examples, _ = prepare_labeled(rows, rend)
    with pytest.raises(RecordError, match=r"^row 0: KTO's KL baseline needs trajectories of at least two different"):
        add_mismatched(examples, rend)
