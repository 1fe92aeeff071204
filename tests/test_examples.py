"""The embedded example assets (examples/) are valid, render with their own tokenizer, and are
exactly what examples/make_examples.py produces. Regenerate with:

    python examples/make_examples.py
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MODEL_DIR = EXAMPLES / "tiny-model"
# file -> (number of rows, keys every row has)
FILES = {
    "dpo_research": (128, {"chosen", "rejected"}),
    "dpo_tools": (64, {"prompt", "chosen", "rejected", "tools"}),
    "kto": (128, {"prompt", "completion", "label"}),
    "sft": (128, {"messages", "label"}),
    "eval_dpo": (16, {"chosen", "rejected"}),
}


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def conversations(name: str) -> list[tuple[list[dict], list[dict] | None]]:
    """Every full conversation of a file as (messages, tools)."""
    convs = []
    for row in read_jsonl(EXAMPLES / "data" / f"{name}.jsonl"):
        for key in ("chosen", "rejected", "completion", "messages"):
            if key in row:
                convs.append((row.get("prompt", []) + row[key], row.get("tools")))
    return convs


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)


@pytest.mark.parametrize("name", FILES)
def test_rows_have_expected_keys_and_roles(name):
    n_rows, keys = FILES[name]
    rows = read_jsonl(EXAMPLES / "data" / f"{name}.jsonl")
    assert len(rows) == n_rows
    for row in rows:
        assert set(row) == keys
        if "label" in row:
            assert isinstance(row["label"], bool)
    for messages, _ in conversations(name):
        assert messages[-1]["role"] == "assistant"
        assert {m["role"] for m in messages} <= {"system", "user", "assistant", "tool"}
        assert all(isinstance(m["content"], str) for m in messages)


def test_research_format_shares_prompt_and_uses_output_fences():
    for name in ("dpo_research", "eval_dpo"):
        for row in read_jsonl(EXAMPLES / "data" / f"{name}.jsonl"):
            first_user = [m["role"] for m in row["chosen"]].index("user")
            assert row["chosen"][: first_user + 1] == row["rejected"][: first_user + 1]
            for side in (row["chosen"], row["rejected"]):
                tool_turns = [m for m in side[first_user + 1:] if m["role"] == "user"]
                assert 1 <= len(tool_turns) <= 3
                assert all(m["content"].startswith("```output\n") and m["content"].endswith("\n```")
                           for m in tool_turns)
    train = {r["chosen"][1 if r["chosen"][0]["role"] == "system" else 0]["content"]
             for r in read_jsonl(EXAMPLES / "data" / "dpo_research.jsonl")}
    held_out = {r["chosen"][1 if r["chosen"][0]["role"] == "system" else 0]["content"]
                for r in read_jsonl(EXAMPLES / "data" / "eval_dpo.jsonl")}
    assert not train & held_out


def test_tools_format_has_dict_arguments_and_parallel_calls():
    n_parallel = 0
    for row in read_jsonl(EXAMPLES / "data" / "dpo_tools.jsonl"):
        assert row["tools"][0]["function"]["name"] == "python"
        for side in (row["chosen"], row["rejected"]):
            for i, m in enumerate(side):
                for call in m.get("tool_calls", []):
                    assert isinstance(call["function"]["arguments"]["code"], str)
                if m.get("tool_calls"):  # each call is answered by one tool message, in order
                    answers = side[i + 1: i + 1 + len(m["tool_calls"])]
                    assert [a["role"] for a in answers] == ["tool"] * len(m["tool_calls"])
            n_parallel += any(len(m.get("tool_calls", [])) == 2 for m in side)
    assert n_parallel >= 3


def test_labels_are_balanced_and_correct_means_boxed_answer():
    kto = [r["label"] for r in read_jsonl(EXAMPLES / "data" / "kto.jsonl")]
    assert sum(kto) == len(kto) // 2
    for row in read_jsonl(EXAMPLES / "data" / "sft.jsonl"):
        if row["label"]:
            assert "\\boxed{" in row["messages"][-1]["content"]


def test_special_tokens_and_model_config(tokenizer):
    assert len(tokenizer) == 1000
    assert tokenizer.bos_token is None
    assert tokenizer.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>"]) == [0, 1, 2]
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tokenizer("<tool_call></tool_call>").input_ids == tokenizer.convert_tokens_to_ids(
        ["<tool_call>", "</tool_call>"])
    model = AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True)
    assert model.dtype == torch.float32 and model.config.vocab_size == len(tokenizer)
    assert model.config.bos_token_id is None
    assert model.config.eos_token_id == model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id
    ids = tokenizer.apply_chat_template(conversations("dpo_tools")[0][0], return_dict=True)["input_ids"]
    logits = model(torch.tensor([ids])).logits  # (1, T, V)
    assert logits.shape == (1, len(ids), len(tokenizer)) and torch.isfinite(logits).all()


def test_template_renders_chatml_with_tools_and_generation_prompt(tokenizer):
    msgs = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "function": {"name": "python", "arguments": {"code": "print(2+2)"}}},
                {"type": "function", "function": {"name": "python", "arguments": '{"code": "print(4)"}'}}]},
            {"role": "tool", "name": "python", "content": "4"},
            {"role": "tool", "name": "python", "content": "4"},
            {"role": "assistant", "content": "\\boxed{4}"}]
    text = tokenizer.apply_chat_template(msgs, tokenize=False)
    assert text == (
        "<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n<tool_call>\n"
        '{"name": "python", "arguments": {"code": "print(2+2)"}}\n</tool_call>\n<tool_call>\n'
        '{"name": "python", "arguments": {"code": "print(4)"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n4\n</tool_response>\n<tool_response>\n4\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n\\boxed{4}<|im_end|>\n")
    assert tokenizer.apply_chat_template(msgs[:1], tokenize=False, add_generation_prompt=True).endswith(
        "<|im_end|>\n<|im_start|>assistant\n")
    tools = [{"type": "function", "function": {"name": "python", "parameters": {}}}]
    with_tools = tokenizer.apply_chat_template(msgs[:1], tools=tools, tokenize=False)
    assert with_tools.startswith("<|im_start|>system\n# Tools") and '"name": "python"' in with_tools
    # {% generation %} marks exactly the assistant turns, each closed by <|im_end|>
    out = tokenizer.apply_chat_template(msgs, return_dict=True, return_assistant_tokens_mask=True)
    kept = tokenizer.decode([i for i, m in zip(out["input_ids"], out["assistant_masks"]) if m])
    assert kept.count("<|im_end|>") == 2 and kept.endswith("\\boxed{4}<|im_end|>")


@pytest.mark.parametrize("name", FILES)
def test_every_conversation_renders_and_round_trips(tokenizer, name):
    longest = 0
    for i, (messages, tools) in enumerate(conversations(name)):
        text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
        assert text.endswith("<|im_end|>\n")
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        longest = max(longest, len(enc.input_ids))
        if i % 8 == 0:  # byte-level BPE: decoding gives back the exact text, offsets tile it
            assert tokenizer.decode(enc.input_ids) == text
            assert "".join(text[a:b] for a, b in enc.offset_mapping) == text
    assert longest < 1024


def test_round_trips_text_never_seen_in_training(tokenizer):
    for text in ["  two  spaces\t\ttabs\n\n\r\n", "€ × ü 数学 🙂", "<|im_start|>x<|im_end|><tool_call>",
                 "\\boxed{\\frac{12}{7}}", ""]:
        assert tokenizer.decode(tokenizer(text).input_ids) == text


def test_script_is_deterministic_and_committed_assets_are_current(tmp_path, monkeypatch):
    # In-process (a subprocess would pay the transformers import again); dataclasses need the
    # module registered while it executes.
    spec = importlib.util.spec_from_file_location("make_examples", EXAMPLES / "make_examples.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "make_examples", module)
    spec.loader.exec_module(module)
    module.main(["--out", str(tmp_path)])
    for name in FILES:  # byte-identical data
        assert (tmp_path / "data" / f"{name}.jsonl").read_bytes() == \
            (EXAMPLES / "data" / f"{name}.jsonl").read_bytes(), name
    assert (tmp_path / "tiny-model" / "chat_template.jinja").read_bytes() == \
        (MODEL_DIR / "chat_template.jinja").read_bytes()
    # Tokenizer and weights compared by content, not bytes: serialisation details may vary by version.
    fresh = AutoTokenizer.from_pretrained(tmp_path / "tiny-model", local_files_only=True)
    committed = AutoTokenizer.from_pretrained(MODEL_DIR, local_files_only=True)
    assert fresh.get_vocab() == committed.get_vocab()
    text = tmp_path.joinpath("data", "sft.jsonl").read_text(encoding="utf-8")[:5000]
    assert fresh(text).input_ids == committed(text).input_ids
    new = AutoModelForCausalLM.from_pretrained(tmp_path / "tiny-model", local_files_only=True).state_dict()
    old = AutoModelForCausalLM.from_pretrained(MODEL_DIR, local_files_only=True).state_dict()
    assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)
