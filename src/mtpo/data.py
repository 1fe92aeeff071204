"""Rows in, typed records out.

Every loader returns plain Python rows (dicts); every parser validates one row into a typed record
and raises `RecordError` naming the row index (and message index / field) when the row is malformed.
Nothing here knows about tokenizers or torch.

Record formats accepted (see README, "Data formats"):
- preference, TRL conversational:  {"prompt": [msgs], "chosen": [msgs], "rejected": [msgs], "tools"?}
- preference, original research:   {"chosen": [msgs], "rejected": [msgs]}  (shared leading prompt)
- unpaired (KTO):                  {"prompt": [msgs], "completion": [msgs], "label": bool}
                                   {"messages": [msgs], "label": bool}
- conversation (SFT):              {"messages": [msgs]} (+ optional "label" / "score")
A message is {"role", "content", "train"?, "tool_calls"?, "name"?, "tool_call_id"?, ...}; extra keys
are passed through to the chat template untouched.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

KNOWN_ROLES = ("system", "developer", "user", "assistant", "tool", "ipython", "function")


class DataError(ValueError):
    """A data source is unusable (unreadable file, malformed JSON line, ...). The message names the
    file (and line); `mtpo dpo|kto|sft` and `mtpo inspect` print it as one line and exit 2."""


class RecordError(DataError):
    """A row (or one of its messages) is malformed. The message always names the row."""

    def __init__(self, row: int | None, msg: str, message: int | None = None, side: str | None = None):
        where = "row ?" if row is None else f"row {row}"
        if side is not None:
            where += f", {side}"
        if message is not None:
            where += f", message {message}"
        super().__init__(f"{where}: {msg}")
        self.row, self.message, self.side = row, message, side


@dataclass
class Message:
    role: str
    content: str | None
    train: bool | None = None  # per-message override of the role rule
    extra: dict[str, Any] = field(default_factory=dict)  # tool_calls, name, tool_call_id, ...

    def to_template(self) -> dict[str, Any]:
        """The dict handed to the chat template (no `train` key: templates never see it)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content}
        out.update(self.extra)
        return out


@dataclass
class Conversation:
    messages: list[Message]
    tools: list[dict] | None = None
    index: int = 0  # row index in the source, for error messages
    label: bool | None = None
    score: float | None = None


@dataclass
class PreferencePair:
    prompt: list[Message]
    chosen: list[Message]  # completion only (after the prompt)
    rejected: list[Message]
    tools: list[dict] | None = None
    index: int = 0
    margin: float | None = None

    def chosen_conversation(self) -> Conversation:
        return Conversation(self.prompt + self.chosen, self.tools, self.index)

    def rejected_conversation(self) -> Conversation:
        return Conversation(self.prompt + self.rejected, self.tools, self.index)


@dataclass
class LabeledTrajectory:
    prompt: list[Message]
    completion: list[Message]
    label: bool
    tools: list[dict] | None = None
    index: int = 0

    def conversation(self) -> Conversation:
        return Conversation(self.prompt + self.completion, self.tools, self.index, self.label)


# --------------------------------------------------------------------------------------------
# Loading rows


def load_rows(source: str, split: str = "train") -> list[dict]:
    """Rows from a JSONL / JSON / Parquet file, a `datasets.save_to_disk` folder, or a Hub name.

    Local paths are tried first; anything that is not an existing path is treated as a Hub dataset
    name (which needs network access).
    """
    source = os.path.expanduser(source)
    if os.path.isdir(source):
        return _load_dataset_dir(source, split)
    if os.path.isfile(source):
        lower = source.lower()
        if lower.endswith((".jsonl", ".jsonl.gz")) or lower.endswith(".ndjson"):
            return _load_jsonl(source)
        if lower.endswith(".json"):
            return _load_json(source)
        if lower.endswith(".parquet"):
            import datasets

            return list(datasets.Dataset.from_parquet(source))
        raise DataError(f"{source}: unknown file type (expected .jsonl, .json, .parquet or a dataset folder)")
    if source.startswith((".", "/", "~")) or source.lower().endswith((".jsonl", ".jsonl.gz", ".ndjson", ".json", ".parquet")):
        raise FileNotFoundError(f"data file not found: {source}")
    import datasets  # a Hub dataset name, for users who are online

    return list(datasets.load_dataset(source, split=split))


def _load_jsonl(path: str) -> list[dict]:
    rows = []
    opener = _open_maybe_gzip(path)
    with opener as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{lineno}: each line must be a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _open_maybe_gzip(path: str):
    if path.endswith(".gz"):
        import gzip

        return gzip.open(path, "rt", encoding="utf-8")
    return open(path, encoding="utf-8")


def _load_json(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise DataError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
    return data


def _load_dataset_dir(path: str, split: str) -> list[dict]:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path}: split {split!r} not found (have {sorted(ds)})")
        ds = ds[split]
    return list(ds)


# --------------------------------------------------------------------------------------------
# Validating messages


def parse_messages(value: Any, row: int, side: str) -> list[Message]:
    """Validate a list of chat messages. For TRL's standard (non-conversational) format a bare string
    is one message of the side's role: `prompt` → user; `chosen`/`rejected`/`completion` → assistant.
    A whole conversation (`messages`) must be a list."""
    if isinstance(value, str) and side in ("prompt", "chosen", "rejected", "completion"):
        role = "user" if side == "prompt" else "assistant"
        value = [{"role": role, "content": value}]
    if not isinstance(value, list):
        raise RecordError(row, f"`{side}` must be a list of messages, got {type(value).__name__}")
    return [_parse_message(m, row, side, i) for i, m in enumerate(value)]


def _parse_message(m: Any, row: int, side: str, i: int) -> Message:
    if not isinstance(m, dict):
        raise RecordError(row, f"message must be an object, got {type(m).__name__}", i, side)
    m = dict(m)
    role = m.pop("role", None)
    if role not in KNOWN_ROLES:
        raise RecordError(row, f"unknown role {role!r} (expected one of {', '.join(KNOWN_ROLES)})", i, side)
    content = m.pop("content", None)
    train = m.pop("train", None)
    if train is not None and not isinstance(train, bool):
        raise RecordError(row, f"`train` must be true or false, got {train!r}", i, side)
    tool_calls = m.get("tool_calls")
    if tool_calls is not None:
        if role != "assistant":
            raise RecordError(row, f"`tool_calls` only allowed on assistant messages, not {role!r}", i, side)
        m["tool_calls"] = _check_tool_calls(tool_calls, row, side, i)
    if content is None or (content == "" and not tool_calls):
        if not tool_calls:
            raise RecordError(row, "empty content (and no tool_calls)", i, side)
    elif not isinstance(content, str):
        raise RecordError(row, f"content must be a string, got {type(content).__name__}", i, side)
    return Message(role=role, content=content, train=train, extra=m)


def _check_tool_calls(calls: Any, row: int, side: str, i: int) -> list[dict]:
    if not isinstance(calls, list) or not calls:
        raise RecordError(row, "malformed tool_calls: expected a non-empty list", i, side)
    out = []
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RecordError(row, f"malformed tool_calls[{k}]: needs {{'function': {{'name': str, 'arguments': ...}}}}", i, side)
        args = fn.get("arguments", {})
        if isinstance(args, str):  # OpenAI sends arguments as a JSON string; templates want a dict
            try:
                args = json.loads(args)
            except json.JSONDecodeError:
                raise RecordError(row, f"malformed tool_calls[{k}]: arguments is not valid JSON", i, side) from None
        if not isinstance(args, dict):
            raise RecordError(row, f"malformed tool_calls[{k}]: arguments must be an object", i, side)
        out.append({**call, "type": call.get("type", "function"), "function": {**fn, "arguments": args}})
    return out


def _parse_tools(row_dict: dict, row: int) -> list[dict] | None:
    tools = row_dict.get("tools")
    if tools is None:
        return None
    if isinstance(tools, str):  # some datasets store the schema list as a JSON string
        try:
            tools = json.loads(tools)
        except json.JSONDecodeError:
            raise RecordError(row, "`tools` is a string but not valid JSON") from None
    if not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools):
        raise RecordError(row, "`tools` must be a list of JSON-schema objects")
    return tools


# --------------------------------------------------------------------------------------------
# Rows → records


def split_prompt(messages: list[Message]) -> int:
    """Index of the first assistant message: everything before it is the prompt."""
    for i, m in enumerate(messages):
        if m.role == "assistant":
            return i
    return len(messages)


def parse_pair(row: dict, index: int) -> PreferencePair:
    """A preference row in the TRL conversational format or the original research format."""
    for key in ("chosen", "rejected"):
        if key not in row:
            raise RecordError(index, f"missing field `{key}` (have {sorted(row)})")
    tools = _parse_tools(row, index)
    chosen = parse_messages(row["chosen"], index, "chosen")
    rejected = parse_messages(row["rejected"], index, "rejected")
    if row.get("prompt") is not None:
        prompt = parse_messages(row["prompt"], index, "prompt")
    else:  # research format: both sides carry the same leading prompt messages
        cut_c, cut_r = split_prompt(chosen), split_prompt(rejected)
        for side, msgs, cut in (("chosen", chosen, cut_c), ("rejected", rejected, cut_r)):
            if cut == len(msgs):  # else reported as differing prompts, hiding the real cause
                raise RecordError(index, "empty completion: no assistant message (research format: the prompt "
                                  "is everything before the first assistant message)", side=side)
        _check_same_prompt(chosen[:cut_c], rejected[:cut_r], index)
        prompt, chosen, rejected = chosen[:cut_c], chosen[cut_c:], rejected[cut_r:]
    if not prompt:
        raise RecordError(index, "no prompt: the conversation starts with an assistant message")
    for side, msgs in (("chosen", chosen), ("rejected", rejected)):
        if not msgs:
            raise RecordError(index, "empty completion: no messages after the prompt", side=side)
    margin = row.get("margin")
    if margin is not None and not isinstance(margin, (int, float)):
        raise RecordError(index, f"`margin` must be a number, got {margin!r}")
    return PreferencePair(prompt, chosen, rejected, tools, index, None if margin is None else float(margin))


def _check_same_prompt(a: list[Message], b: list[Message], index: int) -> None:
    for i in range(max(len(a), len(b))):
        if i >= len(a) or i >= len(b) or a[i].to_template() != b[i].to_template():
            raise RecordError(index, "chosen and rejected prompts differ (first difference here)", i, "rejected")


def parse_labeled(row: dict, index: int) -> LabeledTrajectory:
    """An unpaired KTO row: {"prompt", "completion", "label"} or {"messages", "label"}."""
    if "label" not in row:
        raise RecordError(index, "missing field `label` (true = desirable, false = undesirable)")
    label = row["label"]
    if not isinstance(label, bool):
        raise RecordError(index, f"`label` must be true or false, got {label!r}")
    tools = _parse_tools(row, index)
    if "messages" in row and "completion" not in row:
        messages = parse_messages(row["messages"], index, "messages")
        cut = split_prompt(messages)
        prompt, completion = messages[:cut], messages[cut:]
    else:
        for key in ("prompt", "completion"):
            if key not in row:
                raise RecordError(index, f"missing field `{key}` (or give `messages`)")
        prompt = parse_messages(row["prompt"], index, "prompt")
        completion = parse_messages(row["completion"], index, "completion")
    if not prompt:
        raise RecordError(index, "no prompt: the conversation starts with an assistant message")
    if not completion:
        raise RecordError(index, "empty completion: no assistant message")
    return LabeledTrajectory(prompt, completion, label, tools, index)


def parse_conversation(row: dict, index: int) -> Conversation:
    """An SFT row: {"messages": [...]} with optional "label" (bool) and "score" (number)."""
    if "messages" not in row:
        if "prompt" in row and "completion" in row:
            lab = parse_labeled({**row, "label": row.get("label", True)}, index)
            conv = lab.conversation()
            conv.label = row.get("label")
            conv.score = _parse_score(row, index)
            return conv
        raise RecordError(index, f"missing field `messages` (have {sorted(row)})")
    label = row.get("label")
    if label is not None and not isinstance(label, bool):
        raise RecordError(index, f"`label` must be true or false, got {label!r}")
    messages = parse_messages(row["messages"], index, "messages")
    return Conversation(messages, _parse_tools(row, index), index, label, _parse_score(row, index))


def _parse_score(row: dict, index: int) -> float | None:
    score = row.get("score")
    if score is not None and (isinstance(score, bool) or not isinstance(score, (int, float))):
        raise RecordError(index, f"`score` must be a number, got {score!r}")
    return None if score is None else float(score)


def pairs_to_labeled(pairs: Iterable[PreferencePair]) -> list[LabeledTrajectory]:
    """Each pair becomes one desirable (chosen) and one undesirable (rejected) trajectory."""
    out = []
    for p in pairs:
        out.append(LabeledTrajectory(p.prompt, p.chosen, True, p.tools, p.index))
        out.append(LabeledTrajectory(p.prompt, p.rejected, False, p.tools, p.index))
    return out
