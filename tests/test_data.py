"""Loaders (JSONL / JSON / Parquet / save_to_disk folder) and row validation into typed records."""

from __future__ import annotations

import gzip
import json

import pytest

from mtpo.data import (LabeledTrajectory, Message, PreferencePair, RecordError, load_rows, pairs_to_labeled,
                       parse_conversation, parse_labeled, parse_messages, parse_pair, split_prompt)

U = {"role": "user", "content": "What is 2+3?"}
A = {"role": "assistant", "content": "```python\nprint(2+3)\n```"}
T = {"role": "user", "content": "```output\n5\n```"}
F = {"role": "assistant", "content": "\\boxed{5}"}
BAD = {"role": "assistant", "content": "\\boxed{6}"}
ROWS = [{"chosen": [U, A, T, F], "rejected": [U, BAD]}, {"chosen": [U, F], "rejected": [U, BAD], "margin": 0.5}]


# ------------------------------------------------------------------------------------------------
# Loaders


def test_jsonl_roundtrip_and_blank_lines(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n  \n" + json.dumps(ROWS[1]) + "\n", encoding="utf-8")
    assert load_rows(str(path)) == ROWS


def test_jsonl_gz(tmp_path):
    path = tmp_path / "rows.jsonl.gz"
    with gzip.open(path, "wt", encoding="utf-8") as f:
        f.write("\n".join(json.dumps(r) for r in ROWS))
    assert load_rows(str(path)) == ROWS


def test_jsonl_bad_line_names_file_and_line(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n" + json.dumps(ROWS[1]) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{path}:3: invalid JSON"):
        load_rows(str(path))
    path.write_text(json.dumps(ROWS[0]) + "\n[1, 2]\n", encoding="utf-8")
    with pytest.raises(ValueError, match=rf"^{path}:2: each line must be a JSON object, got list"):
        load_rows(str(path))


def test_json_list_and_data_key(tmp_path):
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps(ROWS), encoding="utf-8")
    b.write_text(json.dumps({"data": ROWS, "version": 1}), encoding="utf-8")
    assert load_rows(str(a)) == ROWS == load_rows(str(b))
    a.write_text(json.dumps({"rows": ROWS}), encoding="utf-8")
    with pytest.raises(ValueError, match="expected a JSON list of objects"):
        load_rows(str(a))


def test_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    path = tmp_path / "rows.parquet"
    rows = [{"prompt": [U], "completion": [F], "label": True}, {"prompt": [U], "completion": [BAD], "label": False}]
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    loaded = load_rows(str(path))
    assert [r["label"] for r in loaded] == [True, False]
    assert [parse_labeled(r, i).completion[0].content for i, r in enumerate(loaded)] == [F["content"], BAD["content"]]


def test_save_to_disk_folder_and_split(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"messages": [U, F]}, {"messages": [U, BAD]}]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "plain"))
    assert [parse_conversation(r, i).messages[1].content for i, r in enumerate(load_rows(str(tmp_path / "plain")))] \
        == [F["content"], BAD["content"]]
    dd = datasets.DatasetDict({"train": datasets.Dataset.from_list(rows), "test": datasets.Dataset.from_list(rows[:1])})
    dd.save_to_disk(str(tmp_path / "dict"))
    assert len(load_rows(str(tmp_path / "dict"))) == 2 and len(load_rows(str(tmp_path / "dict"), split="test")) == 1
    with pytest.raises(ValueError, match=r"split 'validation' not found"):
        load_rows(str(tmp_path / "dict"), split="validation")


@pytest.mark.parametrize("name", ["missing.jsonl", "missing.json", "missing.parquet", "missing.jsonl.gz", "./missing"])
def test_missing_file(tmp_path, name, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        load_rows(name)
    with pytest.raises(FileNotFoundError):
        load_rows(str(tmp_path / name))


def test_unknown_extension(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="unknown file type"):
        load_rows(str(path))


# ------------------------------------------------------------------------------------------------
# Messages


def test_message_fields_pass_through_and_train_is_hidden_from_template():
    [m] = parse_messages([{"role": "tool", "content": "5", "name": "python", "tool_call_id": "c1", "train": True}], 0, "x")
    assert m == Message("tool", "5", True, {"name": "python", "tool_call_id": "c1"})
    assert m.to_template() == {"role": "tool", "content": "5", "name": "python", "tool_call_id": "c1"}


def test_bare_string_sides():
    assert parse_messages("hi", 0, "prompt")[0].role == "user"
    assert parse_messages("hi", 0, "chosen")[0].role == "assistant"


@pytest.mark.parametrize("message, pattern", [
    ({"role": "bot", "content": "x"}, r"^row 3, chosen, message 1: unknown role 'bot'"),
    ({"content": "x"}, r"^row 3, chosen, message 1: unknown role None"),
    ({"role": "assistant", "content": ""}, r"^row 3, chosen, message 1: empty content"),
    ({"role": "assistant"}, r"^row 3, chosen, message 1: empty content"),
    ({"role": "assistant", "content": None}, r"^row 3, chosen, message 1: empty content"),
    ({"role": "assistant", "content": 5}, r"^row 3, chosen, message 1: content must be a string, got int"),
    ({"role": "assistant", "content": [{"type": "text", "text": "x"}]}, r"^row 3, chosen, message 1: content must be a string, got list"),
    ({"role": "assistant", "content": "x", "train": "yes"}, r"^row 3, chosen, message 1: `train` must be true or false"),
    ("just text", r"^row 3, chosen, message 1: message must be an object, got str"),
])
def test_bad_message_names_row_side_and_message(message, pattern):
    with pytest.raises(RecordError, match=pattern) as e:
        parse_pair({"chosen": [U, message], "rejected": [U, BAD]}, 3)
    assert (e.value.row, e.value.side, e.value.message) == (3, "chosen", 1)


def test_side_not_a_list():
    with pytest.raises(RecordError, match=r"^row 0: `chosen` must be a list of messages, got int"):
        parse_pair({"chosen": 5, "rejected": [U, BAD]}, 0)


CALL = {"type": "function", "function": {"name": "python", "arguments": {"code": "print(1)"}}}


def test_tool_calls_normalised():
    [m] = parse_messages([{"role": "assistant", "content": None,
                           "tool_calls": [{"function": {"name": "python", "arguments": '{"code": "print(1)"}'}}]}], 0, "c")
    assert m.content is None  # content may be absent when there are tool calls
    assert m.extra["tool_calls"] == [{"type": "function", "function": {"name": "python", "arguments": {"code": "print(1)"}}}]
    [m] = parse_messages([{"role": "assistant", "content": "", "tool_calls": [CALL, CALL]}], 0, "c")
    assert len(m.extra["tool_calls"]) == 2 and m.content == ""


@pytest.mark.parametrize("calls, pattern", [
    ([], r"malformed tool_calls: expected a non-empty list"),
    ({"function": {"name": "f"}}, r"malformed tool_calls: expected a non-empty list"),
    (["f"], r"malformed tool_calls\[0\]: needs"),
    ([CALL, {"function": {"arguments": {}}}], r"malformed tool_calls\[1\]: needs"),
    ([{"function": {"name": "", "arguments": {}}}], r"malformed tool_calls\[0\]: needs"),
    ([{"function": {"name": "f", "arguments": "{oops"}}], r"malformed tool_calls\[0\]: arguments is not valid JSON"),
    ([{"function": {"name": "f", "arguments": "[1]"}}], r"malformed tool_calls\[0\]: arguments must be an object"),
    ([{"function": {"name": "f", "arguments": 3}}], r"malformed tool_calls\[0\]: arguments must be an object"),
])
def test_malformed_tool_calls(calls, pattern):
    with pytest.raises(RecordError, match=rf"^row 4, messages, message 1: {pattern}"):
        parse_conversation({"messages": [U, {"role": "assistant", "content": "x", "tool_calls": calls}]}, 4)


def test_tool_calls_only_on_assistant():
    with pytest.raises(RecordError, match=r"^row 2, messages, message 0: `tool_calls` only allowed on assistant"):
        parse_conversation({"messages": [{"role": "user", "content": "x", "tool_calls": [CALL]}, F]}, 2)


def test_tools_field():
    row = {"prompt": [U], "chosen": [F], "rejected": [BAD], "tools": json.dumps([{"type": "function"}])}
    assert parse_pair(row, 0).tools == [{"type": "function"}]
    with pytest.raises(RecordError, match=r"^row 1: `tools` is a string but not valid JSON"):
        parse_pair({**row, "tools": "[oops"}, 1)
    with pytest.raises(RecordError, match=r"^row 1: `tools` must be a list"):
        parse_pair({**row, "tools": {"type": "function"}}, 1)


# ------------------------------------------------------------------------------------------------
# Rows → records


def test_research_format_pair_splits_shared_prompt():
    system = {"role": "system", "content": "Be brief."}
    p = parse_pair({"chosen": [system, U, A, T, F], "rejected": [system, U, BAD]}, 5)
    assert isinstance(p, PreferencePair) and p.index == 5 and p.margin is None
    assert [m.role for m in p.prompt] == ["system", "user"]
    assert [m.content for m in p.chosen] == [A["content"], T["content"], F["content"]]
    assert [m.content for m in p.rejected] == [BAD["content"]]
    assert [m.content for m in p.chosen_conversation().messages] == [m["content"] for m in (system, U, A, T, F)]
    assert p.rejected_conversation().index == 5


def test_trl_format_pair():
    p = parse_pair({"prompt": [U], "chosen": [A, T, F], "rejected": "\\boxed{6}", "margin": 2}, 0)
    assert [m.role for m in p.rejected] == ["assistant"] and p.margin == 2.0
    assert len(p.chosen) == 3 and len(p.prompt) == 1


@pytest.mark.parametrize("rejected, message", [
    ([{"role": "user", "content": "What is 2+4?"}, BAD], 0),
    ([{"role": "system", "content": "Hi"}, U, BAD], 0),
    ([U, {"role": "user", "content": "more"}, BAD], 1),
    ([BAD], 0),
])
def test_research_prompts_differ(rejected, message):
    with pytest.raises(RecordError, match=rf"^row 6, rejected, message {message}: chosen and rejected prompts differ"):
        parse_pair({"chosen": [U, F], "rejected": rejected}, 6)


def test_research_prompt_differs_in_extra_keys():
    with pytest.raises(RecordError, match="prompts differ"):
        parse_pair({"chosen": [U, F], "rejected": [{**U, "name": "alice"}, BAD]}, 0)


@pytest.mark.parametrize("row, pattern", [
    ({"chosen": [U, F]}, r"^row 1: missing field `rejected`"),
    ({"chosen": [F], "rejected": [BAD]}, r"^row 1: no prompt"),
    ({"chosen": [U], "rejected": [U]}, r"^row 1, chosen: empty completion"),
    ({"prompt": [U], "chosen": [F], "rejected": []}, r"^row 1, rejected: empty completion"),
    ({"prompt": [U], "chosen": [F], "rejected": [BAD], "margin": "big"}, r"^row 1: `margin` must be a number"),
])
def test_bad_pairs(row, pattern):
    with pytest.raises(RecordError, match=pattern):
        parse_pair(row, 1)


def test_labeled_formats():
    a = parse_labeled({"prompt": [U], "completion": [A, T, F], "label": True}, 0)
    b = parse_labeled({"messages": [U, A, T, F], "label": True}, 0)
    assert isinstance(a, LabeledTrajectory)
    assert [m.to_template() for m in a.conversation().messages] == [m.to_template() for m in b.conversation().messages]
    assert a.conversation().label is True and len(b.prompt) == 1 and len(b.completion) == 3


@pytest.mark.parametrize("row, pattern", [
    ({"messages": [U, F]}, r"^row 2: missing field `label`"),
    ({"messages": [U, F], "label": 1}, r"^row 2: `label` must be true or false"),
    ({"messages": [U], "label": True}, r"^row 2: empty completion"),
    ({"messages": [F], "label": True}, r"^row 2: no prompt"),
    ({"prompt": [U], "label": True}, r"^row 2: missing field `completion`"),
])
def test_bad_labeled(row, pattern):
    with pytest.raises(RecordError, match=pattern):
        parse_labeled(row, 2)


def test_conversations():
    c = parse_conversation({"messages": [U, F], "label": False, "score": 3}, 7)
    assert (c.index, c.label, c.score, len(c.messages)) == (7, False, 3.0, 2)
    c = parse_conversation({"prompt": [U], "completion": [F]}, 8)
    assert [m.role for m in c.messages] == ["user", "assistant"] and c.label is None
    for row, pattern in [({"text": "x"}, r"^row 9: missing field `messages`"),
                         ({"messages": [U, F], "label": "yes"}, r"^row 9: `label` must be true or false"),
                         ({"messages": [U, F], "score": True}, r"^row 9: `score` must be a number")]:
        with pytest.raises(RecordError, match=pattern):
            parse_conversation(row, 9)


def test_pairs_to_labeled():
    pairs = [parse_pair(r, i) for i, r in enumerate(ROWS)]
    out = pairs_to_labeled(pairs)
    assert [(t.label, t.index) for t in out] == [(True, 0), (False, 0), (True, 1), (False, 1)]
    assert out[0].completion is pairs[0].chosen and out[1].completion is pairs[0].rejected


def test_split_prompt():
    msgs = parse_messages([U, T, A], 0, "messages")
    assert split_prompt(msgs) == 2 and split_prompt(msgs[:2]) == 2


def test_record_error_fields():
    e = RecordError(None, "boom")
    assert str(e) == "row ?: boom" and isinstance(e, ValueError)
    e = RecordError(3, "boom", 2, "rejected")
    assert str(e) == "row 3, rejected, message 2: boom" and (e.row, e.message, e.side) == (3, 2, "rejected")


def test_home_relative_path(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "rows.jsonl").write_text(json.dumps(ROWS[0]) + "\n", encoding="utf-8")
    assert load_rows("~/rows.jsonl") == ROWS[:1]


def test_messages_as_a_bare_string_is_refused():
    # a string is a message only where TRL's standard format allows it (prompt / completion sides)
    with pytest.raises(RecordError, match=r"^row 4: `messages` must be a list of messages, got str"):
        parse_conversation({"messages": "not a list"}, 4)
