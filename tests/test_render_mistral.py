"""mistral-common's encoder path (`mtpo.render_mistral`), proved against mistral-common itself.

For every tokenizer file mistral-common ships (SentencePiece v1, v2, v3, v7, v7m1 and both tekken
files), loaded the way transformers loads it (`MistralCommonBackend`):

* ids: exactly `MistralTokenizer.encode_chat_completion` of a separately loaded reference tokenizer;
* mask: an independent prefix difference written here: mistral-common's normalizer + instruct
  encoder (no validator, no modes) on messages[:k] and messages[:k+1]; the tokens in between are
  assistant message k's (all trained, `</s>` included);
* plus what the mask must mean: no control token of a user/tool/system turn is trained, every
  trained run ends with `</s>`, tool-call turns start with `[TOOL_CALLS]`, content decodes back.
Conversations: the research format (tool outputs as user turns) and mistral-common's tool format
(tool_calls + tool messages with tool_call_id; parallel calls where the version allows them).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

from mtpo.data import RecordError, parse_conversation, parse_pair
from mtpo.inspect import token_pieces
from mtpo.render import RenderOptions, _special_token_pattern, make_renderer
from mtpo.render_mistral import MistralRenderer

from conftest import mistral_data_file

FILES = {"v1": "tokenizer.model.v1", "v2": "mistral_instruct_tokenizer_240216.model.v2",
         "v3": "mistral_instruct_tokenizer_240323.model.v3", "v7": "mistral_instruct_tokenizer_241114.model.v7",
         "v7m1": "mistral_instruct_tokenizer_241114.model.v7m1", "tekken_240718": "tekken_240718.json",
         "tekken_240911": "tekken_240911.json"}
SYSTEM_STABLE = {"v1", "v7", "v7m1"}  # v2/v3 (and these tekken files, v3) move the system prompt to the last user turn
TOOLS = [{"type": "function", "function": {"name": "python", "description": "Run Python code.",
                                            "parameters": {"type": "object", "properties": {"code": {"type": "string"}},
                                                           "required": ["code"]}}}]


def test_every_shipped_tokenizer_file_is_covered():
    import mistral_common

    shipped = set(os.listdir(os.path.join(os.path.dirname(mistral_common.__file__), "data")))
    assert shipped == set(FILES.values())


@pytest.fixture(scope="module", params=sorted(FILES))
def mc(request):
    """(name, HF MistralCommonBackend, MistralRenderer, reference MistralTokenizer in finetuning mode)."""
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from transformers.tokenization_mistral_common import MistralCommonBackend

    path = mistral_data_file(FILES[request.param])
    tok = MistralCommonBackend(path)
    ref = MistralTokenizer.from_file(path, mode=ValidationMode.finetuning)
    return request.param, tok, make_renderer(tok), ref


# ------------------------------------------------------------------------------------------ conversations


def research(rounds: int, system: bool = False) -> list[dict]:
    msgs = [{"role": "system", "content": "Answer in \\boxed{}."}] if system else []
    msgs.append({"role": "user", "content": "Alice is 3× Bob's age; together 32. Bob? 🙂"})
    for i in range(rounds):
        msgs.append({"role": "assistant", "content": f"Step {i + 1}.\n```python\nprint(32 // 4 + {i})\n```"})
        msgs.append({"role": "user", "content": f"```output\n{8 + i}\n```"})
    msgs.append({"role": "assistant", "content": "Bob is \\boxed{8} (ça va)."})
    return msgs


def tool_format(name: str, system: bool = False) -> list[dict]:
    """Two tool rounds; round 1 makes parallel calls where the version allows several results (v3+),
    and v7+ assistant turns carry text and tool calls together."""
    both = name.startswith("v7")
    n_calls = 1 if name == "v2" else 2
    msgs = [{"role": "system", "content": "Use the tool."}] if system else []
    msgs.append({"role": "user", "content": "Compute 6*7 and 2**10, then add them."})
    for r in range(2):
        calls = [{"id": f"call{r}{j}abc", "type": "function",
                  "function": {"name": "python", "arguments": {"code": f"print({r} + {j})"}}}
                 for j in range(n_calls if r == 0 else 1)]
        msgs.append({"role": "assistant", "content": f"Round {r + 1}." if both else None, "tool_calls": calls})
        msgs += [{"role": "tool", "name": "python", "tool_call_id": c["id"], "content": str(r + j)}
                 for j, c in enumerate(calls)]
    msgs.append({"role": "assistant", "content": "The total is \\boxed{1066}."})
    return msgs


def conversations(name: str) -> list[tuple[list[dict], list | None]]:
    convs = [(research(1), None), (research(3), None), (research(2, system=True), None)]
    if name in SYSTEM_STABLE:
        convs = convs[:2] + [(research(2, system=True), None)]
    else:
        convs = convs[:2]
    if name != "v1":  # v1 has no tools
        convs += [(tool_format(name), TOOLS), (tool_format(name, system=True), TOOLS)]
    return convs


# ------------------------------------------------------------------------------------------ oracles


def instruct_ids(ref, msgs, tools) -> list[int]:
    """mistral-common's normalizer + instruct encoder: no validator, so no serving/finetuning mode."""
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    request = ChatCompletionRequest.from_openai(msgs, tools=tools)
    instruct = ref._instruct_request_normalizer.from_chat_completion_request(request)
    return ref.instruct_tokenizer.encode_instruct(instruct).tokens


def prefix_diff_mask(ref, msgs, tools) -> np.ndarray:
    full = instruct_ids(ref, msgs, tools)
    mask = np.zeros(len(full), dtype=bool)
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before, upto = instruct_ids(ref, msgs[:k], tools), instruct_ids(ref, msgs[:k + 1], tools)
        assert upto[:len(before)] == before and full[:len(upto)] == upto, f"not prefix-stable at {k}"
        mask[len(before):len(upto)] = True
    mask[0] = False
    return mask


def runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def control_ids(ref) -> dict[str, int]:
    raw = ref.instruct_tokenizer.tokenizer
    out = {}
    for name in ("[INST]", "[/INST]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]",
                 "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "<s>", "</s>"):
        try:
            out[name] = raw.get_special_token(name)
        except Exception:  # not a control token of this version (v1 writes [INST] as text)
            pass
    return out


# ------------------------------------------------------------------------------------------ tests


def test_ids_and_mask_equal_mistral_commons(mc):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

    name, tok, renderer, ref = mc
    assert isinstance(renderer, MistralRenderer)
    ctrl = control_ids(ref)
    for row, (msgs, tools) in enumerate(conversations(name)):
        r = renderer.render(parse_conversation({"messages": msgs, "tools": tools}, row))
        expected = ref.encode_chat_completion(ChatCompletionRequest.from_openai(msgs, tools=tools)).tokens
        assert r.input_ids.tolist() == expected, (name, row)
        np.testing.assert_array_equal(r.trainable, prefix_diff_mask(ref, msgs, tools), err_msg=f"{name} row {row}")
        assistants = [m for m in msgs if m["role"] == "assistant"]
        trained_runs = runs(r.trainable)
        assert len(trained_runs) == len(assistants), (name, row)
        external = {ctrl[c] for c in ctrl if c not in ("[TOOL_CALLS]", "</s>")}
        assert not external & set(r.input_ids[r.trainable].tolist())
        for (a, b), m in zip(trained_runs, assistants):
            ids = r.input_ids[a:b].tolist()
            assert ids[-1] == ctrl["</s>"]
            if m.get("tool_calls"):
                assert ctrl["[TOOL_CALLS]"] in ids
            if m.get("content"):
                assert ref.decode(ids).strip().startswith(m["content"].strip()), (name, row, ref.decode(ids))
        # inspect's views rebuild the text from the offsets
        assert "".join(token_pieces(r, tok)) == r.text
        if name.startswith("tekken"):
            assert r.text == ref.decode(r.input_ids.tolist(), SpecialTokenPolicy.KEEP)


def test_generation_context_is_the_serving_encoding(mc):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    name, tok, renderer, ref = mc
    msgs = research(2)[:-1]  # ends with the tool output (a user turn)
    text, ids = renderer.generation_context(msgs)
    assert ids == tok.tokenizer.encode_chat_completion(ChatCompletionRequest.from_openai(msgs)).tokens
    assert tok.tokenizer.mode == ValidationMode.test and isinstance(tok.tokenizer, MistralTokenizer)
    full = renderer.render(parse_conversation({"messages": research(2)}, 0))
    assert full.input_ids[:len(ids)].tolist() == ids  # what rollouts generate after is what training masks
    assert not full.trainable[len(ids) - 1] and full.trainable[len(ids):].all()  # [/INST] external, answer trained
    assert full.text.startswith(text)
    # rollouts' control-token check works on this tokenizer too (v1 writes [INST] as text)
    assert name == "v1" or _special_token_pattern(tok).search("a [INST] b")


def test_pair_shares_prompt_tokens(mc):
    name, tok, renderer, ref = mc
    chosen, rejected = research(1), research(1)[:1] + [{"role": "assistant", "content": "Bob is \\boxed{9}."}]
    c, r = renderer.render_pair(parse_pair({"chosen": chosen, "rejected": rejected}, 4))
    assert c.prompt_tokens == r.prompt_tokens > 0
    assert c.input_ids[:c.prompt_tokens].tolist() == r.input_ids[:r.prompt_tokens].tolist()
    assert not c.trainable[:c.prompt_tokens].any() and c.trainable[c.prompt_tokens]


def test_history_moving_versions_give_a_clear_error(mc):
    name, tok, renderer, ref = mc
    if name in SYSTEM_STABLE:
        pytest.skip("system prompt stays in place")
    with pytest.raises(RecordError, match=r"row 5, message 2: .*not prefix-stable.*moves the system prompt into the "
                                          r"last user message"):
        renderer.render(parse_conversation({"messages": research(2, system=True)}, 5))
    with pytest.raises(RecordError, match=r"row 6.*AVAILABLE_TOOLS"):
        renderer.render(parse_conversation({"messages": research(2), "tools": TOOLS}, 6))


def test_render_turns_scores_every_turn_on_every_version(mc):
    """Per-turn sequences (the plug-in for per-turn scoring): exact for history-moving versions too."""
    name, tok, renderer, ref = mc
    msgs = research(2, system=True)
    turns = renderer.render_turns(parse_conversation({"messages": msgs}, 0))
    ends = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    assert len(turns) == len(ends)
    for r, k in zip(turns, ends):
        before, upto = instruct_ids(ref, msgs[:k], None), instruct_ids(ref, msgs[:k + 1], None)
        assert r.input_ids.tolist() == upto
        assert np.flatnonzero(r.trainable).tolist() == list(range(len(before), len(upto)))


def test_history_moving_versions_are_scored_per_turn_in_auto_mode(mc):
    """`render_trajectory` (what the trainers call): one sequence where the encoding is prefix-stable,
    per-turn sequences where the version moves the system prompt (auto), an error when forced single."""
    from dataclasses import replace

    from mtpo.render_turns import TurnSequences

    name, tok, renderer, ref = mc
    conv = parse_conversation({"messages": research(2, system=True)}, 5)
    out = renderer.render_trajectory(conv)
    if name in SYSTEM_STABLE:
        assert not isinstance(out, TurnSequences)
        assert out.input_ids.tolist() == renderer.render(conv).input_ids.tolist()
        return
    assert isinstance(out, TurnSequences)
    assert [p.input_ids.tolist() for p in out.parts] == [p.input_ids.tolist() for p in renderer.render_turns(conv)]
    assert out.num_trainable == sum(p.num_trainable for p in renderer.render_turns(conv))
    single = type(renderer)(tok, replace(renderer.options, render_mode="single"))
    with pytest.raises(RecordError, match="not prefix-stable"):
        single.render_trajectory(conv)


def test_consecutive_assistant_messages_are_merged_by_mistral_common(mc):
    name, tok, renderer, ref = mc
    msgs = research(1)[:2] + [{"role": "assistant", "content": "Bob is \\boxed{9}."}]
    with pytest.raises(RecordError, match=r"row 1, message 2: .*merges consecutive assistant messages"):
        renderer.render(parse_conversation({"messages": msgs}, 1))


def test_end_of_turn_modes_and_train_false():
    from transformers.tokenization_mistral_common import MistralCommonBackend

    tok = MistralCommonBackend(mistral_data_file(FILES["v7"]))
    eos = tok.tokenizer.instruct_tokenizer.tokenizer.eos_id
    conv = parse_conversation({"messages": research(2)}, 0)
    every = MistralRenderer(tok).render(conv)
    last = MistralRenderer(tok, RenderOptions(end_of_turn="last")).render(conv)
    none = MistralRenderer(tok, RenderOptions(end_of_turn="none")).render(conv)
    eos_at = np.flatnonzero(every.input_ids == eos)
    assert len(eos_at) == 3 and every.trainable[eos_at].all()
    assert last.trainable[eos_at].tolist() == [False, False, True] and not none.trainable[eos_at].any()
    assert (every.trainable & ~np.isin(np.arange(len(every)), eos_at) == none.trainable).all()
    msgs = research(2)
    msgs[1] = {**msgs[1], "train": False}
    off = MistralRenderer(tok).render(parse_conversation({"messages": msgs}, 0))
    assert len(runs(off.trainable)) == 2 and off.input_ids.tolist() == every.input_ids.tolist()


def test_bad_rows_and_options_name_the_row():
    from transformers.tokenization_mistral_common import MistralCommonBackend

    tok = MistralCommonBackend(mistral_data_file(FILES["v1"]))
    renderer = MistralRenderer(tok)
    with pytest.raises(RecordError, match=r"row 3: .*cannot encode.*Tools not implemented"):
        renderer.render(parse_conversation({"messages": tool_format("v3")}, 3))
    msgs = research(1)
    msgs[0] = {**msgs[0], "train": True}
    with pytest.raises(RecordError, match=r"row 2, message 0: `train: true` on a user message"):
        renderer.render(parse_conversation({"messages": msgs}, 2))
    with pytest.raises(ValueError, match="mistral_format: false"):
        make_renderer(tok, RenderOptions(chat_template="{{ messages }}"))
    with pytest.raises(ValueError, match="trainable_roles"):
        make_renderer(tok, RenderOptions(trainable_roles=("assistant", "user")))


def test_load_tokenizer_passes_mistral_format(monkeypatch, tmp_path):
    """`mistral_format` reaches transformers; a Jinja chat_template selects the HF tokenizer."""
    from transformers import AutoTokenizer

    from mtpo.config import ConfigError
    from mtpo.trainers import setup
    from mtpo.trainers.sft import SFTConfig

    seen = []

    class Tok:
        pad_token_id, chat_template = 0, None

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", lambda name, **kw: seen.append(kw["mistral_format"]) or Tok())
    template = tmp_path / "t.jinja"
    template.write_text("{{ messages }}")
    for value, chat_template, expected in ((None, None, None), (True, None, True), (False, None, False),
                                           (None, str(template), False)):
        setup.load_tokenizer(SFTConfig(model_name_or_path="m", mistral_format=value, chat_template=chat_template,
                                       report_to="none", use_cpu=True))
        assert seen[-1] is expected
    with pytest.raises(ConfigError, match="mistral_format"):
        SFTConfig(model_name_or_path="m", mistral_format=True, chat_template=str(template), report_to="none")


# ------------------------------------------------------------------------------------------ end to end


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def pair_rows() -> list[dict]:
    """Both data formats: research pairs and mistral-common tool-format pairs (tekken = v3: no text
    next to tool calls)."""
    rows = []
    for i in range(3):
        good = research(1)
        good[0] = {**good[0], "content": f"Question {i}: Alice is 3× Bob's age; together 32. Bob?"}
        bad = good[:-1] + [{"role": "assistant", "content": f"Bob is \\boxed{{{9 + i}}}."}]
        rows.append({"chosen": good, "rejected": bad})
    tools = tool_format("tekken")
    rows.append({"chosen": tools, "rejected": tools[:-1] + [{"role": "assistant", "content": "It is 7."}],
                 "tools": TOOLS})
    return rows


TEKKEN_VOCAB = 4096  # the e2e model's vocabulary: 1000 control tokens + the first 3096 BPE ranks


def small_tekken(path) -> None:
    """mistral-common's tekken_240718.json cut to its first ranks (the file's own `default_vocab_size`
    mechanism): same format, version, control tokens and pre-tokenizer, a vocabulary small enough for
    a fast CPU test (byte-level, so any text still encodes). The full files are covered above."""
    with open(mistral_data_file(FILES["tekken_240718"]), encoding="utf-8") as f:
        data = json.load(f)
    inner = TEKKEN_VOCAB - data["config"]["default_num_special_tokens"]
    data["vocab"] = data["vocab"][:inner]
    data["config"].update(num_vocab_tokens=inner, default_vocab_size=TEKKEN_VOCAB)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(data, f)


@pytest.fixture(scope="module")
def tekken_model(tmp_path_factory):
    """A tiny MistralForCausalLM directory as Mistral ships one: config.json (model_type mistral) +
    tekken.json, no tokenizer.json: transformers loads it as MistralCommonBackend."""
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    folder = tmp_path_factory.mktemp("tiny_mistral")
    torch.manual_seed(0)
    config = MistralConfig(vocab_size=TEKKEN_VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                           sliding_window=None, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    MistralForCausalLM(config).save_pretrained(folder)
    small_tekken(folder / "tekken.json")
    return folder


def test_dpo_end_to_end_on_a_tekken_model(tekken_model, tmp_path):
    from transformers import AutoTokenizer

    from mtpo.cli import main as cli_main

    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    out = tmp_path / "out"
    rc = cli_main(["dpo", f"--model_name_or_path={tekken_model}", f"--train_data={data}", f"--output_dir={out}",
                   "--max_steps=6", "--per_device_train_batch_size=4", "--learning_rate=5e-3", "--logging_steps=1",
                   "--save_strategy=no", "--report_to=none", "--use_cpu=true", "--disable_tqdm=true", "--seed=0"])
    assert rc == 0
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in logs if "loss" in r]
    assert len(losses) == 6 and losses[0] == pytest.approx(math.log(2), abs=1e-5)  # policy == reference
    assert losses[-1] < losses[0] - 0.05
    assert json.loads((out / "data_report.json").read_text())["train"]["kept"] == 4
    assert (out / "tekken.json").is_file()  # the output is a Mistral model dir again
    assert type(AutoTokenizer.from_pretrained(out)).__name__ == "MistralCommonBackend"


def test_inspect_on_the_tekken_model(tekken_model, tmp_path, capsys):
    from mtpo import inspect as mi

    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows()[-2:])
    assert mi.cli([str(data), "--tokenizer", str(tekken_model), "--format", "json", "--rows", "all"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tekken_model)
    renderer = make_renderer(tok)
    chosen, _ = renderer.render_pair(parse_pair(pair_rows()[-1], 1))
    assert len(records) == 4 and records[2]["side"] == "chosen"
    assert records[2]["input_ids"] == chosen.input_ids.tolist()
    assert records[2]["trainable"] == chosen.trainable.astype(int).tolist()

    html_path = tmp_path / "view.html"
    assert mi.cli([str(data), "--tokenizer", str(tekken_model), "--color", "never", "--html", str(html_path)]) == 0
    text = capsys.readouterr().out
    assert "⟦[TOOL_CALLS][{" in text and "</s>⟧[TOOL_RESULTS]" in text and "[INST]Question 2" in text
    assert "⟦Bob is \\boxed{8} (ça va).</s>⟧" in text
    page = html_path.read_text()
    assert 'class="tok tr' in page and "[/INST]" in page and "[TOOL_CALLS]" in page

    # the switch reaches transformers: the HF tokenizer (converted from tekken.json) has no template
    assert mi.cli([str(data), "--tokenizer", str(tekken_model), "--mistral-format", "false"]) == 2
    assert "has no chat template" in capsys.readouterr().err
