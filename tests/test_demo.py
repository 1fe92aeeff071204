"""`mtpo demo`: the task generator, the tokenizer + template masks, and the whole pipeline in miniature."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
from random import Random

import pytest

from mtpo.demo import task

PACKAGED = os.path.join(os.path.dirname(task.__file__), "model")


# ------------------------------------------------------------------------------------------ task


def _numbers(text: str) -> list[int]:
    return [int(x) for x in re.findall(r"\d+", text)]


# Each kind's answer recomputed from the question text alone, independently of the generator.
BY_KIND = {
    "product": lambda n: n[0] * n[1],
    "remainder": lambda n: n[0] % n[1],
    "expression": lambda n: (n[0] + n[1]) * n[2],
    "warehouse": lambda n: n[0] - n[1] + n[2],
    "power_mod": lambda n: pow(n[0], n[1], n[2]),
    "shopping": lambda n: n[0] * n[1] + n[2] * n[3],
}


def _run_python(code: str) -> str:
    """Real Python (trusted generator code only) — a second opinion on `task.evaluate`."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, "<demo>", "exec"), {})
    return out.getvalue().strip()


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_answers_match_the_question_and_real_python(split):
    problems = task.make_problems(7, 120, split)
    assert {p.kind for p in problems} == set(task.KINDS)
    for p in problems:
        assert str(BY_KIND[p.kind](_numbers(p.question))) == p.answer, p.question
        messages, answer = task.run_plan(p.correct)
        assert answer == p.answer
        for m in messages:
            code = re.search(r"```python\n(.*?)```", m["content"], re.S)
            if code:  # every tool output in the trajectory is what Python prints for that code
                assert _run_python(code.group(1)) == task.evaluate(code.group(1).strip())
        assert messages[-1]["content"].count(f"\\boxed{{{p.answer}}}") == 1


def test_misconceptions_are_wrong_and_need_the_tool():
    problems = task.make_problems(3, 300, "train")
    wrong = [task.run_plan(p.wrong)[1] != p.answer for p in problems]
    assert sum(wrong) / len(wrong) > 0.97  # a misconception may hit the answer by chance, rarely
    assert all(len(p.answer.lstrip("-")) >= 2 for p in problems if p.kind in ("product", "expression", "shopping"))


def test_split_is_disjoint_and_seeded():
    train = {p.question for s in range(3) for p in task.make_problems(s, 200, "train")}
    held = {p.question for s in range(3) for p in task.make_problems(s, 100, "heldout")}
    assert not train & held
    assert all(task.split_of(q) == "heldout" for q in held)
    a, b = task.make_problems(5, 40), task.make_problems(5, 40)
    assert [(p.question, p.answer) for p in a] == [(p.question, p.answer) for p in b]
    assert [p.question for p in a] != [p.question for p in task.make_problems(6, 40)]
    assert len({p.question for p in a}) == 40
    with pytest.raises(ValueError, match="unknown problem kinds"):
        task.make_problems(0, 1, kinds=["nope"])


def test_sft_trajectories_follow_the_error_profile():
    r = Random(0)
    problems = task.make_problems(1, 1200, "train", kinds=["remainder", "product"])
    stats = {"remainder": [], "product": []}
    for p in problems:
        messages, correct = task.sft_trajectory(p, r)
        assert messages[0] == {"role": "user", "content": p.question}
        assert correct == (f"\\boxed{{{p.answer}}}" in messages[-1]["content"])
        stats[p.kind].append(correct)
    for kind, flags in stats.items():  # correct ≈ (1 − misconception) · (1 − slip)², ±4 standard errors
        expect = (1 - task.MISCONCEPTION_RATE[kind]) * (1 - task.SLIP_RATE) ** 2
        assert abs(sum(flags) / len(flags) - expect) < 4 * (expect * (1 - expect) / len(flags)) ** 0.5 + 0.01


# ------------------------------------------------------------------------------------------ tokenizer


@pytest.fixture(scope="module")
def demo_tok():
    from mtpo.demo.tokenizer import build_tokenizer

    r = Random(0)
    texts = [m["content"] for p in task.make_problems(0, 300) for m in task.sft_trajectory(p, r)[0]]
    return build_tokenizer(texts + ["user\nmodel\n"])


def test_numbers_are_three_digit_chunks(demo_tok):
    pieces = demo_tok.convert_ids_to_tokens(demo_tok("x 1694012 y", add_special_tokens=False)["input_ids"])
    assert pieces[pieces.index("169"):pieces.index("169") + 3] == ["169", "401", "2"]
    for text in ("print(7429 * 9105)", "The product is \\boxed{67641045}.", "unseen wordz ~ \t"):
        assert demo_tok.decode(demo_tok(text, add_special_tokens=False)["input_ids"]) == text


def test_template_masks_exactly_the_assistant_turns(demo_tok):
    from mtpo.data import parse_conversation
    from mtpo.render import ChatRenderer

    renderer = ChatRenderer(demo_tok)
    assert renderer.generation_prompt == "<start_of_turn>model\n"
    assert renderer.end_of_turn_texts[0] == "<end_of_turn>" == demo_tok.eos_token
    p = task.make_problems(0, 6)[5]  # shopping: two tool calls
    messages, _ = task.run_plan(p.correct)
    conversation = {"messages": [{"role": "user", "content": p.question}] + messages}
    rendered = renderer.render(parse_conversation(conversation, 0))
    assert rendered.text.startswith("<bos><start_of_turn>user\n")
    ids, mask = rendered.input_ids, rendered.trainable
    runs, current = [], []
    for i, keep in zip(ids, mask):  # consecutive trained tokens = one assistant turn
        if keep:
            current.append(int(i))
        elif current:
            runs.append(demo_tok.decode(current))
            current = []
    expected = [m["content"] + "<end_of_turn>" for m in messages if m["role"] == "assistant"]
    assert runs == expected
    untrained = demo_tok.decode([int(i) for i, k in zip(ids, mask) if not k])
    assert "```output" in untrained and p.question in untrained


# ------------------------------------------------------------------------------------------ pipeline


@pytest.mark.skipif(not os.path.isfile(os.path.join(PACKAGED, "model.safetensors")), reason="demo model not built")
def test_demo_pipeline_in_miniature(tmp_path):
    from mtpo.demo import cli

    out = tmp_path / "demo"
    argv = [f"--output_dir={out}", "--seed=3", "--iterations=1", "--train_prompts=6", "--samples_per_prompt=4",
            "--heldout_prompts=12", "--sandbox_workers=2", "--epochs=1", "--batch_size=4", "--raft=true"]
    assert cli(argv) == 0
    results = json.loads((out / "results.json").read_text())
    methods = [(r["method"], r["iteration"]) for r in results["rows"]]
    assert methods == [("sft", 0), ("dpo_no_mask", 1), ("m_dpo", 1), ("m_kto", 1), ("raft", 1)]
    for r in results["rows"]:
        assert 0 <= r["heldout_accuracy"] <= 1 and 0 <= r["sampling_accuracy"] <= 1
    trained = [r for r in results["rows"] if r["method"] != "sft"]
    assert all(r["train_loss"] is not None and r["pairs"] > 0 for r in trained)
    # the models differ from the SFT model and from one another: each control really trained
    import safetensors.torch as st

    weights = [st.load_file(os.path.join(r["model"], "model.safetensors")) for r in results["rows"]]
    keys = sorted(weights[0])
    assert all(any(not (w[k] == weights[0][k]).all() for k in keys) for w in weights[1:])
    # the unmasked control trained tool-output tokens: its pair rows say so
    rows = [json.loads(line) for line in open(out / "dpo_no_mask" / "iter_1" / "pairs.unmasked.jsonl")]
    assert any(m.get("train") is True and m["content"].startswith("```output") for r in rows for m in r["chosen"])
    assert "| M-DPO | 1 |" in (out / "results.md").read_text()
    for png in ("accuracy.png", "training.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_make_model_script_writes_a_loadable_model(tmp_path):
    """The script that made the shipped model, at toy size: tokenizer + weights + record, loadable."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mtpo.demo.make_model import make_model

    record = make_model(str(tmp_path), n=48, steps=2, seed=0, hidden=32, layers=1, lr=1e-3, batch_size=4)
    tok = AutoTokenizer.from_pretrained(tmp_path)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.vocab_size == len(tok) == record["vocab_size"]
    assert tok.eos_token == "<end_of_turn>" and "<start_of_turn>" in tok.chat_template
    assert json.loads((tmp_path / "make_model.json").read_text())["steps"] == 2
