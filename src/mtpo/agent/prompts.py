"""Math problems (+ gold answers) in, `Prompt`s out — what rollouts start from.

Rows come from `mtpo.data.load_rows` (JSONL / JSON / Parquet / `datasets` folder). Two layouts are
recognised without configuration:

- GSM8K: `question` + `answer` (gold = the number after `####`);
- MATH:  `problem` + `solution` (gold = the last `\\boxed{}` of the solution; `type` and `level`
  become `meta["subject"]` and `meta["level"]` for the evaluation breakdown).

Anything else: name the fields (`question_field`, `answer_field`) and how to read the gold
(`answer_format`: gsm8k, math or plain = the field is the answer itself). A row that lacks a field or
whose gold cannot be read is an error naming the row and the field — never silently dropped.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from mtpo.data import RecordError, load_rows

ANSWER_FORMATS = ("auto", "gsm8k", "math", "plain")
# layout name → (question field, answer field, answer format)
LAYOUTS = {"gsm8k": ("question", "answer", "gsm8k"), "math": ("problem", "solution", "math")}


@dataclass
class Prompt:
    prompt_id: str
    messages: list[dict]  # the prompt conversation: optional system message, then the user question
    gold: str
    meta: dict = field(default_factory=dict)


def load_prompts(source: str, *, name: str | None = None, question_field: str | None = None,
                 answer_field: str | None = None, answer_format: str = "auto", id_field: str | None = None,
                 system_prompt: str | None = None, split: str = "train", limit: int | None = None) -> list[Prompt]:
    """Prompts from a file / dataset folder. `prompt_id` is `row[id_field]` or "<name>/<row index>"
    (`name` defaults to the file name without extension), so it is stable across runs and shards."""
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")
    rows = load_rows(source, split=split)
    if limit is not None:
        rows = rows[:limit]
    name = name or _default_name(source)
    prompts, seen = [], {}
    try:
        if rows:  # the layout is the first row's: a later row that lacks a field is an error about that field
            question_field, answer_field, answer_format = _layout(rows[0], 0, question_field, answer_field,
                                                                  answer_format)
        for i, row in enumerate(rows):
            p = prompt_from_row(row, i, name=name, question_field=question_field, answer_field=answer_field,
                                answer_format=answer_format, id_field=id_field, system_prompt=system_prompt)
            if p.prompt_id in seen:  # resume and sharding key on the id: duplicates would be merged silently
                raise RecordError(i, f"duplicate prompt id {p.prompt_id!r} (also row {seen[p.prompt_id]})")
            seen[p.prompt_id] = i
            prompts.append(p)
    except RecordError as e:  # "row 6: ..." alone does not say which file (eval and iterate read several)
        e.args = (f"{source}: {e}",)
        raise
    return prompts


def prompt_from_row(row: dict, index: int, *, name: str = "prompts", question_field: str | None = None,
                    answer_field: str | None = None, answer_format: str = "auto", id_field: str | None = None,
                    system_prompt: str | None = None) -> Prompt:
    q_key, a_key, fmt = _layout(row, index, question_field, answer_field, answer_format)
    question = _field(row, index, q_key)
    gold = _gold(_field(row, index, a_key), fmt, index, a_key)
    if id_field is not None:
        prompt_id = str(_field(row, index, id_field, str_only=False))
    else:
        prompt_id = f"{name}/{index}"
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question})
    meta = {}
    if row.get("type") is not None:  # MATH's subject
        meta["subject"] = str(row["type"])
    if row.get("level") is not None:
        meta["level"] = str(row["level"])
    return Prompt(prompt_id, messages, gold, meta)


def _layout(row: dict, index: int, question_field, answer_field, answer_format) -> tuple[str, str, str]:
    """Which fields hold the question and the answer, and how to read the gold."""
    detected = next((layout for layout in LAYOUTS.values() if layout[0] in row and layout[1] in row), None)
    if question_field is None or answer_field is None:
        if detected is None:
            raise RecordError(index, f"unknown prompt layout (fields {sorted(row)}); expected question/answer "
                              "(GSM8K) or problem/solution (MATH), or set question_field and answer_field")
    q = question_field or detected[0]
    a = answer_field or detected[1]
    if answer_format != "auto":
        return q, a, answer_format
    by_field = {layout[1]: layout[2] for layout in LAYOUTS.values()}
    return q, a, by_field.get(a, "plain")


def _field(row: dict, index: int, key: str, str_only: bool = True):
    if key not in row or row[key] is None:
        raise RecordError(index, f"missing field `{key}` (have {sorted(row)})")
    value = row[key]
    if str_only and not isinstance(value, str):
        raise RecordError(index, f"field `{key}` must be a string, got {type(value).__name__}")
    if str_only and not value.strip():
        raise RecordError(index, f"field `{key}` is empty")
    return value


def _gold(answer: str, fmt: str, index: int, key: str) -> str:
    from mtpo.agent.grade import gold_from_gsm8k, gold_from_math  # lazy: no grader needed to import prompts

    try:
        gold = {"gsm8k": gold_from_gsm8k, "math": gold_from_math, "plain": str.strip}[fmt](answer)
    except Exception as e:  # the grader's helpers raise on an answer without #### / \boxed{}
        raise RecordError(index, f"field `{key}`: cannot read the gold answer as {fmt} ({e})") from None
    if not gold:
        raise RecordError(index, f"field `{key}`: empty gold answer ({fmt} format)")
    return gold


def _default_name(source: str) -> str:
    base = os.path.basename(os.path.normpath(source))
    for ext in (".jsonl.gz", ".jsonl", ".ndjson", ".json", ".parquet"):
        if base.lower().endswith(ext):
            return base[: -len(ext)]
    return base
