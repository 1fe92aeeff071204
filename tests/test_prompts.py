"""Prompt loading: GSM8K and MATH layouts, configurable fields, ids, system prompt, clear errors."""

from __future__ import annotations

import json
import os

import pytest

from mtpo.agent.prompts import load_prompts
from mtpo.data import RecordError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write(tmp_path, rows, name="p.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_gsm8k_and_math_layouts_are_recognised():
    gsm = load_prompts(os.path.join(ROOT, "examples", "data", "gsm8k_mini.jsonl"))
    assert len(gsm) == 8 and gsm[0].prompt_id == "gsm8k_mini/0" and gsm[0].gold == "18"
    assert gsm[0].messages == [{"role": "user", "content": gsm[0].messages[0]["content"]}]
    assert gsm[0].messages[0]["content"].startswith("Janet")
    math = load_prompts(os.path.join(ROOT, "examples", "data", "math_mini.jsonl"), system_prompt="Use Python.")
    assert math[0].gold == "2" and math[0].meta == {"subject": "Algebra", "level": "Level 3"}
    assert math[0].messages[0] == {"role": "system", "content": "Use Python."}


def test_custom_fields_ids_formats_and_parquet(tmp_path):
    rows = [{"q": "1+1?", "a": " 2 ", "uid": "x1"}, {"q": "2+2?", "a": "4", "uid": "x2"}]
    ps = load_prompts(write(tmp_path, rows), question_field="q", answer_field="a", id_field="uid")
    assert [(p.prompt_id, p.gold) for p in ps] == [("x1", "2"), ("x2", "4")]
    ps = load_prompts(write(tmp_path, [{"question": "q", "answer": "The sum is \\boxed{5}"}]), answer_format="math",
                      name="mine")
    assert ps[0].gold == "5" and ps[0].prompt_id == "mine/0"
    import datasets

    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    assert load_prompts(str(tmp_path / "p.parquet"), question_field="q", answer_field="a", limit=1)[0].gold == "2"


@pytest.mark.parametrize("rows, kwargs, match", [
    ([{"text": "x"}], {}, "row 0: unknown prompt layout"),
    ([{"question": "q", "answer": "#### 1"}, {"question": "q"}], {}, "row 1: missing field `answer`"),
    ([{"question": 3, "answer": "#### 1"}], {}, "row 0: field `question` must be a string"),
    ([{"problem": "p", "solution": "no box here"}], {}, "row 0: field `solution`: cannot read the gold"),
    ([{"q": "a", "a": "1", "id": 1}, {"q": "b", "a": "2", "id": 1}],
     {"question_field": "q", "answer_field": "a", "id_field": "id"}, "row 1: duplicate prompt id '1'"),
])
def test_errors_name_the_row_and_field(tmp_path, rows, kwargs, match):
    with pytest.raises(RecordError, match=match):
        load_prompts(write(tmp_path, rows), **kwargs)
