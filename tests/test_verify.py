"""`mtpo.verify`: the token-prefix check agrees with render.py on real templates and catches wrong masks.

The check must be able to fail: every test that expects agreement has a twin in which render.py is
replaced by a wrong renderer (mask shifted by one token, end-of-turn token dropped) and the check
must name the row, the side and the first differing token.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from mtpo import inspect as inspect_mod
from mtpo.data import RecordError, parse_conversation
from mtpo.render import ChatRenderer, RenderOptions
from mtpo.verify import check_first_rows, prefix_diff_mask, verify_rows

from test_render import RESEARCH, TOOLS, research_messages, tool_messages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "tiny-model")

FAMILIES = {  # the real templates of conftest: (tokenizer fixture, template, renders tool calls)
    "llama3": ("llama3_tok", "llama3", False),
    "gemma": ("gemma_tok", "gemma", False),
    "chatml": ("chatml_tok", "qwen2_5", True),
    "mistral": ("mistral_toks", "mistral_instruct", False),
}


@pytest.fixture(params=list(FAMILIES))
def family_renderer(request, template):
    fixture, name, tools = FAMILIES[request.param]
    tok = request.getfixturevalue(fixture)
    tok = tok["v3"][0] if fixture == "mistral_toks" else tok
    return (lambda **opts: ChatRenderer(tok, RenderOptions(chat_template=template(name), **opts))), tools


def family_rows(tools: bool) -> list[dict]:
    """Research-format pairs (tool outputs as user turns), a labeled row, a conversation; tool calls
    and parallel `tool` messages where the template renders them."""
    rows = [{"chosen": research_messages(2), "rejected": research_messages(1)},
            {"messages": research_messages(3), "label": False},
            {"messages": RESEARCH}]
    if tools:
        rows.append({"messages": tool_messages(2), "tools": TOOLS})
    return rows


def shifted(render):
    """A wrong renderer: every trained run starts and ends one token late."""
    def wrong(self, conv, prompt_len=0, _memo=None):
        out = render(self, conv, prompt_len, _memo)
        out.trainable = np.concatenate([[False], out.trainable[:-1]])
        return out
    return wrong


def without_last_token_of_each_run(render):
    """A wrong renderer: the end-of-turn token is not trained (what `end_of_turn: none` would give)."""
    def wrong(self, conv, prompt_len=0, _memo=None):
        out = render(self, conv, prompt_len, _memo)
        m = out.trainable
        out.trainable = m & np.concatenate([m[1:], [False]])
        return out
    return wrong


@pytest.mark.parametrize("end_of_turn", ["every", "last", "none"])
def test_agrees_on_real_templates(family_renderer, end_of_turn):
    make, tools = family_renderer
    rows = family_rows(tools)
    report = verify_rows(rows, make(end_of_turn=end_of_turn))
    assert not report.failed and not report.unverified, report.lines()
    assert not report.mismatches, report.lines()
    assert report.checked == len(rows) + 1  # the pair has two sides


@pytest.mark.parametrize("corrupt", [shifted, without_last_token_of_each_run])
def test_catches_a_wrong_mask(family_renderer, monkeypatch, corrupt):
    make, tools = family_renderer
    # `single`: in `auto` mode a corrupted `render` is itself noticed (a turn's tokens no longer follow
    # its generation context) and every turn is rebuilt per turn without it, so nothing wrong is trained
    renderer = make(render_mode="single")
    rows = family_rows(tools)
    monkeypatch.setattr(ChatRenderer, "render", corrupt(ChatRenderer.render))
    report = verify_rows(rows, renderer)
    sides = {(f.row, f.side) for f in report.mismatches}
    assert sides == {(0, "chosen"), (0, "rejected"), (1, "completion")} | {(i, "messages") for i in range(2, len(rows))}
    assert all("first at token" in f.detail and "the token-prefix method says" in f.detail for f in report.mismatches)


def test_first_differing_token_is_named(llama3_tok, template, monkeypatch):
    renderer = ChatRenderer(llama3_tok, RenderOptions(chat_template=template("llama3"), render_mode="single"))
    conv = parse_conversation({"messages": RESEARCH}, 0)
    ids, mask = prefix_diff_mask(renderer, conv)
    first = int(np.flatnonzero(mask)[0])
    monkeypatch.setattr(ChatRenderer, "render", shifted(ChatRenderer.render))
    (finding,) = [f for f in verify_rows([{"messages": RESEARCH}], renderer).mismatches]
    assert finding.row == 0 and finding.side == "messages"
    assert f"first at token {first} " in finding.detail
    assert "mtpo's mask says external, the token-prefix method says trained" in finding.detail


def test_boundary_merge_is_reported_as_unverified_not_as_agreement(chatml_tok, template):
    """Content starting with a newline merges with the header's newline into one token: token lists
    cannot place the boundary, so the row is reported as not checked (render.py decides by characters)."""
    renderer = ChatRenderer(chatml_tok, RenderOptions(chat_template=template("qwen2_5")))
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\n\nHello"}]
    report = verify_rows([{"messages": msgs}], renderer)
    assert report.unverified and "not a token prefix" in report.unverified[0].detail
    assert not report.mismatches and report.checked == 1


def test_auto_mode_routes_around_a_corrupted_render(llama3_tok, template, monkeypatch):
    """With `render` corrupted, `auto` scores every turn per turn, rebuilt from its generation context:
    the masks trained are right, and the check (sequence by sequence) agrees."""
    renderer = ChatRenderer(llama3_tok, RenderOptions(chat_template=template("llama3")))
    monkeypatch.setattr(ChatRenderer, "render", shifted(ChatRenderer.render))
    report = verify_rows(family_rows(False), renderer)
    assert report.checked == 4 and not report.mismatches and not report.unverified, report.lines()


def test_per_turn_side_checked_sequence_by_sequence(chatml_tok, template, monkeypatch):
    """Qwen3 drops old reasoning: sides are scored per turn; a corrupted per-turn mask is caught."""
    import mtpo.render_turns as RT

    renderer = ChatRenderer(chatml_tok, RenderOptions(chat_template=template("qwen3")))
    msgs = [dict(m) for m in research_messages(2)]
    for m in msgs:
        if m["role"] == "assistant":
            m["content"] = "<think>\nlet me think\n</think>\n\n" + m["content"]
    rows = [{"messages": msgs}]
    report = verify_rows(rows, renderer)
    assert report.checked == 1 and not report.mismatches, report.lines()
    real = RT.render_per_turn

    def corrupted(*a, **k):
        out = real(*a, **k)
        last = out.parts[-1]
        last.trainable = np.concatenate([[False], last.trainable[:-1]])
        return out
    monkeypatch.setattr(RT, "render_per_turn", corrupted)
    report = verify_rows(rows, renderer)
    assert [f.side for f in report.mismatches] == ["messages"], report.lines()
    assert "turn sequence" in report.mismatches[0].detail


def test_trained_user_message_is_unverified(llama3_tok, template):
    renderer = ChatRenderer(llama3_tok, RenderOptions(chat_template=template("llama3")))
    msgs = [dict(m) for m in RESEARCH]
    msgs[2]["train"] = True
    report = verify_rows([{"messages": msgs}], renderer)
    assert [f.status for f in report.unverified] == ["unverified"] and "message 2 (user)" in report.unverified[0].detail


# ------------------------------------------------------------------------------ CLI and training


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_inspect_verify_cli(tmp_path, capsys, monkeypatch):
    data = write_rows(tmp_path / "d.jsonl", [{"messages": research_messages(i)} for i in range(1, 8)])
    assert inspect_mod.cli([data, "--tokenizer", TINY, "--verify"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("7 trajectories checked: 7 agree, 0 disagree")  # every row, not the 5 shown
    monkeypatch.setattr(ChatRenderer, "render", shifted(ChatRenderer.render))
    # (`single`: `auto` would route around the corrupted render, see above)
    assert inspect_mod.cli([data, "--tokenizer", TINY, "--verify", "--start", "2", "--rows", "3",
                            "--render-mode", "single"]) == 1
    out = capsys.readouterr().out
    assert "3 trajectories checked: 0 agree, 3 disagree" in out
    assert [line.split(":")[0] for line in out.splitlines()[1:]] == [f"MISMATCH row {i}, messages" for i in (2, 3, 4)]


def test_check_first_rows_stops_training_data_with_a_wrong_mask(tiny_tok, monkeypatch):
    renderer = ChatRenderer(tiny_tok, RenderOptions(render_mode="single"))
    rows = [{"chosen": research_messages(2), "rejected": research_messages(1)}] * 20
    assert check_first_rows(rows, renderer, 4).checked == 8
    assert check_first_rows(rows, renderer, 0) is None
    monkeypatch.setattr(ChatRenderer, "render", shifted(ChatRenderer.render))
    with pytest.raises(RecordError, match=r"^row 0, chosen: the trainable mask disagrees with an independent check"):
        check_first_rows(rows, renderer, 4)


def test_training_option_runs_before_the_model_loads(tmp_path, capsys, monkeypatch):
    from mtpo.trainers import setup, sft

    data = write_rows(tmp_path / "d.jsonl", [{"messages": research_messages(2)}] * 3)
    monkeypatch.setattr(ChatRenderer, "render", shifted(ChatRenderer.render))
    monkeypatch.setattr(setup, "load_models", lambda *a, **k: pytest.fail("model loaded before the mask check"))
    argv = [f"--model_name_or_path={TINY}", f"--train_data={data}", f"--output_dir={tmp_path / 'o'}",
            "--use_cpu=true", "--report_to=none", "--render_mode=single"]  # auto routes around it
    assert sft.cli(argv) == 2
    assert "row 0, messages: the trainable mask disagrees" in capsys.readouterr().err


def test_renderer_without_chat_template_is_unverified_not_an_error(tiny_tok, caplog):
    """A renderer that encodes without a Jinja template (mistral-common's): nothing to compare with."""
    import logging

    renderer = ChatRenderer(tiny_tok)
    renderer.template = None
    rows = [{"messages": RESEARCH}] * 3
    with caplog.at_level(logging.WARNING, logger="mtpo"):
        report = check_first_rows(rows, renderer, 16)
    assert report.checked == 3 and len(report.unverified) == 3 and not report.mismatches
    assert "3 of 3 trajectories could not be checked" in caplog.text and "needs one" in caplog.text
