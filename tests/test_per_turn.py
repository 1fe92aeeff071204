"""Per-turn trajectories (`mtpo.render_turns`) through everything that consumes them: Qwen3 thinking
trajectories with a tiny Qwen2 model (ChatML tokenizer of examples/tiny-model, 1000 ids).

Independent checks: the trainer-side log-prob of a trajectory equals Σ over turns of log π(produced | its
generation context), computed here with one full-logits forward per turn on the ids the rollout side
(`ChatRenderer.generation_context`) gives plus the produced text tokenized on its own; DPO/KTO runs with
precomputed reference log-probs equal live-reference runs; SFT's logged NLL equals the hand computation.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from mtpo.collate import LabeledCollator, PairCollator, sum_by_owner
from mtpo.config import load_config
from mtpo.data import RecordError, parse_conversation
from mtpo.logprobs import sequence_logps
from mtpo.prepare import add_mismatched, fit_length, prepare_labeled, prepare_pairs
from mtpo.render import ChatRenderer, RenderOptions
from mtpo.render_turns import TurnSequences, sequences, trained_turns
from mtpo.trainers.parallel import batch_examples, first_examples

from conftest import read_template

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny-model"


def thinking_trajectory(i: int, good: bool = True, rounds: int = 2) -> list[dict]:
    """Research format, Qwen3-style: every assistant turn opens with its reasoning, kept as generated."""
    a, b = 3 + 7 * i, 11 + 5 * i
    msgs = [{"role": "user", "content": f"What is {a} + {b}?"}]
    for r in range(rounds):
        op = "+" if good else "-"
        msgs.append({"role": "assistant", "content": f"<think>\nStep {r}: compute {a} {op} {b}.\n</think>\n\n"
                                                     f"```python\nprint({a} {op} {b})\n```"})
        msgs.append({"role": "user", "content": f"```output\n{a + b if good else a - b}\n```"})
    answer = a + b if good else a * b
    msgs.append({"role": "assistant", "content": f"<think>\nThe output is the answer.\n</think>\n\nIt is {answer}."})
    return msgs


def pair_rows(n: int) -> list[dict]:
    return [{"chosen": thinking_trajectory(i), "rejected": thinking_trajectory(i, good=False)} for i in range(n)]


def tiny_qwen(seed: int) -> Qwen2ForCausalLM:
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         initializer_range=0.2, tie_word_embeddings=True, pad_token_id=0, eos_token_id=2)
    return Qwen2ForCausalLM(config).float().eval()


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one torch thread (conftest)


@pytest.fixture(scope="module")
def tok():
    if not (TINY / "tokenizer.json").is_file():
        pytest.skip("examples/tiny-model not built")
    return AutoTokenizer.from_pretrained(TINY)


@pytest.fixture(scope="module")
def qwen3(tok):
    return ChatRenderer(tok, RenderOptions(chat_template=read_template("qwen3")))


def _turn_runs(part):
    mask = np.concatenate([[False], part.trainable, [False]]).astype(np.int8)
    d = np.diff(mask)
    return list(zip(np.flatnonzero(d == 1).tolist(), np.flatnonzero(d == -1).tolist()))


# ------------------------------------------------------------------------------------------ rendering


def test_rollout_contexts_equal_trainer_contexts(tok, qwen3):
    """Each turn is scored after exactly the tokens the rollout fed the policy, with its reasoning."""
    msgs = thinking_trajectory(0, rounds=2)
    out = qwen3.render_trajectory(parse_conversation({"messages": msgs}, 0))
    assert isinstance(out, TurnSequences) and len(out.parts) == 3  # qwen3 drops earlier reasoning: 1 turn each
    turns = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
    runs = [(p, s, e) for p in out.parts for s, e in _turn_runs(p)]
    assert len(runs) == len(turns)
    assert [(k, part, start) for k, part, start, _ in trained_turns(out)] == [(k, p, s) for k, (p, s, _) in
                                                                            zip(turns, runs)]
    for k, (part, start, end) in zip(turns, runs):
        _, context = qwen3.generation_context(msgs[:k])
        assert part.input_ids[:start].tolist() == context
        assert tok.decode(part.input_ids[start:end]) == msgs[k]["content"] + "<|im_end|>"
    # the full rendering of the same trajectory has lost the earlier reasoning: single mode must refuse it
    single = ChatRenderer(tok, RenderOptions(chat_template=read_template("qwen3"), render_mode="single"))
    with pytest.raises(RecordError, match="^row 0, message 2: chat template is not prefix-stable"):
        single.render_trajectory(parse_conversation({"messages": msgs}, 0))


def test_prefix_stable_turns_share_one_sequence(tok):
    """qwen3_training keeps history: per_turn mode gives the single rendering, one sequence."""
    msgs = thinking_trajectory(1)
    opts = dict(chat_template=read_template("qwen3_training"))
    single = ChatRenderer(tok, RenderOptions(**opts, render_mode="single")).render(parse_conversation({"messages": msgs}, 0))
    forced = ChatRenderer(tok, RenderOptions(**opts, render_mode="per_turn")).render_trajectory(
        parse_conversation({"messages": msgs}, 0))
    assert not isinstance(forced, TurnSequences)
    np.testing.assert_array_equal(forced.input_ids, single.input_ids)
    np.testing.assert_array_equal(forced.trainable, single.trainable)


def test_end_of_turn_last_means_the_trajectorys_last_turn(tok):
    r = ChatRenderer(tok, RenderOptions(chat_template=read_template("qwen3"), end_of_turn="last"))
    out = r.render_trajectory(parse_conversation({"messages": thinking_trajectory(2)}, 0))
    trained = [tok.decode(p.input_ids[s:e]) for p in out.parts for s, e in _turn_runs(p)]
    assert [t.endswith("<|im_end|>") for t in trained] == [False, False, True]


def test_switch_is_logged_once(tok, caplog):
    r = ChatRenderer(tok, RenderOptions(chat_template=read_template("qwen3")))
    with caplog.at_level(logging.WARNING, logger="mtpo"):
        prepare_pairs(pair_rows(3), r)
    switched = [rec for rec in caplog.records if "scoring such rows per turn" in rec.getMessage()]
    assert len(switched) == 1 and "row 0" in switched[0].getMessage()


def test_truncation_of_per_turn_rows(tok, qwen3):
    out = qwen3.render_trajectory(parse_conversation({"messages": thinking_trajectory(0)}, 0))
    longest = len(out)
    assert longest == max(len(p) for p in out.parts) and len(out.parts[0]) < longest
    assert fit_length(out, longest, "drop")[0] is out
    dropped, why = fit_length(out, longest - 1, "drop")
    assert dropped is None and f"max_length={longest - 1}" in why
    cut, _ = fit_length(out, len(out.parts[0]) + 3, "keep_start")  # first part whole, second cut, third gone
    assert [len(p) for p in cut.parts] == [len(out.parts[0]), len(out.parts[0]) + 3]


# ------------------------------------------------------------------------------------------ log-probs


def _independent_logp(model, tok, renderer, msgs) -> float:
    """Σ over assistant turns of log π(produced | generation context): one full-logits forward per turn."""
    total = 0.0
    for k, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        _, context = renderer.generation_context(msgs[:k])
        produced = tok(m["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + produced])
        with torch.no_grad():
            logp = model(ids).logits[0, :-1].float().log_softmax(-1)
        targets = ids[0, 1:]
        total += logp[torch.arange(len(targets)), targets][len(context) - 1:].sum().item()
    return total


def test_trajectory_logp_is_the_sum_over_turns(tok, qwen3):
    model = tiny_qwen(0)
    rows = pair_rows(2)
    examples, _ = prepare_pairs(rows, qwen3)
    batch = PairCollator(tok.pad_token_id)(examples)
    assert batch["input_ids"].shape[0] == 12 and batch["seq_owner"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    with torch.no_grad():
        logps, counts = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["trainable"])
    per_row = sum_by_owner(logps, batch["seq_owner"])
    expected = [_independent_logp(model, tok, qwen3, r[side]) for side in ("chosen", "rejected") for r in rows]
    np.testing.assert_allclose(per_row.numpy(), expected, rtol=1e-5, atol=1e-4)
    assert sum_by_owner(counts, batch["seq_owner"]).tolist() == [e.num_trainable for e in
                                                                 [x.chosen for x in examples] + [x.rejected for x in examples]]


def test_first_examples_keeps_the_sequences_of_kept_rows():
    """Evaluation padding rows dropped from a per-turn batch: sequences follow their owners."""
    owner = torch.tensor([0, 0, 1, 2, 2, 2, 3])  # 2 examples × [chosen; rejected]
    ids = torch.arange(7)[:, None].repeat(1, 3)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids, dtype=torch.bool),
              "trainable": torch.ones_like(ids, dtype=torch.bool), "seq_owner": owner, "idx": torch.tensor([5, 6]),
              "ref_logps": torch.tensor([1.0, 2.0, 3.0, 4.0])}
    out = first_examples(inputs, batch_examples(inputs), 1)
    assert out["input_ids"][:, 0].tolist() == [0, 1, 3, 4, 5]
    assert out["seq_owner"].tolist() == [0, 0, 1, 1, 1]
    assert out["idx"].tolist() == [5] and out["ref_logps"].tolist() == [1.0, 3.0]
    sft = {k: v for k, v in inputs.items() if k not in ("idx", "ref_logps")}
    assert batch_examples(sft) == 4


def test_kto_mismatched_pairs_are_per_turn_too(tok, qwen3):
    rows = [{"messages": thinking_trajectory(i, good=i % 2 == 0), "label": i % 2 == 0} for i in range(4)]
    examples, _ = prepare_labeled(rows, qwen3)
    add_mismatched(examples, qwen3)
    assert all(isinstance(e.completion, TurnSequences) and isinstance(e.kl, TurnSequences) for e in examples)
    batch = LabeledCollator(tok.pad_token_id)(examples)
    owner = batch["seq_owner"]
    assert owner.tolist() == sorted(owner.tolist()) and int(owner.max()) == 7
    model = tiny_qwen(0)
    with torch.no_grad():
        per_row = sum_by_owner(sequence_logps(model, batch["input_ids"], batch["attention_mask"],
                                              batch["trainable"])[0], owner)
    for e, value in zip(examples, per_row[4:].tolist()):  # the KL pairs: this prompt + the partner's completion
        partner = examples[e.kl_partner].record
        msgs = [m.to_template() for m in e.record.prompt + partner.completion]
        assert value == pytest.approx(_independent_logp(model, tok, qwen3, msgs), rel=1e-5, abs=1e-4)


# ------------------------------------------------------------------------------------------ whole runs


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok):
    root = tmp_path_factory.mktemp("per_turn")
    for name, seed in (("policy", 0), ("ref", 1)):
        tiny_qwen(seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    (root / "qwen3.jinja").write_text(read_template("qwen3"), encoding="utf-8")
    lines = lambda rows: "".join(json.dumps(r) + "\n" for r in rows)  # noqa: E731
    (root / "pairs.jsonl").write_text(lines(pair_rows(4)), encoding="utf-8")
    kto = [{"messages": thinking_trajectory(i, good=i % 2 == 0), "label": i % 2 == 0} for i in range(4)]
    (root / "kto.jsonl").write_text(lines(kto), encoding="utf-8")
    (root / "sft.jsonl").write_text(lines([{"messages": thinking_trajectory(i)} for i in range(3)]), encoding="utf-8")
    return root


def _config(cls, files, out, data, **overrides):
    values = dict(model_name_or_path=str(files / "policy"), train_data=str(files / data),
                  chat_template=str(files / "qwen3.jinja"), output_dir=str(out), per_device_train_batch_size=2,
                  learning_rate=1e-3, lr_scheduler_type="constant", max_steps=2, logging_steps=1,
                  save_strategy="no", seed=7, use_cpu=True, report_to="none", disable_tqdm=True)
    return load_config(cls, **{**values, **overrides})


def _logs(out) -> list[dict]:
    rows = [json.loads(x) for x in (Path(out) / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]
    return [r for r in rows if "loss" in r and "train_loss" not in r]


@pytest.mark.parametrize("trainer", ["dpo", "kto"])
def test_precomputed_reference_equals_live_reference(files, tmp_path, trainer):
    if trainer == "dpo":
        from mtpo.trainers.dpo import DPOConfig as cls, train_dpo as train
        data, keys = "pairs.jsonl", ("loss", "rewards/chosen", "rewards/rejected", "logps/chosen", "tokens/chosen")
    else:
        from mtpo.trainers.kto import KTOConfig as cls, train_kto as train
        data, keys = "kto.jsonl", ("loss", "kl", "logps/desirable", "logps/undesirable", "tokens")
    ref = str(files / "ref")
    train(_config(cls, files, tmp_path / "live", data, ref_model_name_or_path=ref))
    train(_config(cls, files, tmp_path / "pre", data, ref_model_name_or_path=ref, precompute_ref_log_probs=True))
    live, pre = _logs(tmp_path / "live"), _logs(tmp_path / "pre")
    assert len(live) == len(pre) == 2
    for a, b in zip(live, pre):
        for key in keys:
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a["step"], key)
    assert live[0]["loss"] == live[0]["loss"] and live[-1]["loss"] != live[0]["loss"]  # finite, and it trains


def test_sft_nll_is_the_per_turn_hand_computation(files, tmp_path):
    from mtpo.trainers.sft import SFTConfig, train_sft

    train_sft(_config(SFTConfig, files, tmp_path / "sft", "sft.jsonl", per_device_train_batch_size=3, max_steps=1))
    logged = _logs(tmp_path / "sft")[0]
    model = tiny_qwen(0)
    tok = AutoTokenizer.from_pretrained(files / "policy")  # what the run loads (a Qwen2 config: Qwen2's digit rule)
    renderer = ChatRenderer(tok, RenderOptions(chat_template=read_template("qwen3")))
    trajectories = [thinking_trajectory(i) for i in range(3)]
    total = sum(_independent_logp(model, tok, renderer, t) for t in trajectories)
    tokens = sum(len(tok(m["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"])
                 for t in trajectories for m in t if m["role"] == "assistant")
    assert logged["tokens"] * 3 == tokens  # logged: mean per row
    assert logged["nll"] == pytest.approx(-total / tokens, rel=1e-5)


# ------------------------------------------------------------------------------------------ inspect


def test_inspect_shows_each_turn_in_its_own_context(files, tmp_path, capsys, tok):
    from mtpo.inspect import cli

    args = [str(files / "pairs.jsonl"), "--tokenizer", str(TINY), "--chat-template", str(files / "qwen3.jinja"),
            "--rows", "2"]
    assert cli(args + ["--format", "json"]) == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["row"], r["side"]) for r in records] == [(0, "chosen"), (0, "rejected"), (1, "chosen"), (1, "rejected")]
    rows = pair_rows(2)
    for rec in records:
        msgs = rows[rec["row"]][rec["side"]]
        turns = [k for k, m in enumerate(msgs) if m["role"] == "assistant"]
        assert rec["mode"] == "per_turn" and len(rec["sequences"]) == len(turns)
        assert rec["num_trainable"] == sum(s["num_trainable"] for s in rec["sequences"])
        for k, seq in zip(turns, rec["sequences"]):
            ids, mask = np.array(seq["input_ids"]), np.array(seq["trainable"], dtype=bool)
            start = int(np.flatnonzero(mask)[0])
            assert ids[:start].tolist() == ChatRenderer(tok, RenderOptions(chat_template=read_template("qwen3"))) \
                .generation_context(msgs[:k])[1]
            assert tok.decode(ids[mask]) == msgs[k]["content"] + "<|im_end|>"
    assert cli(args + ["--color", "never", "--html", str(tmp_path / "out.html")]) == 0
    text = capsys.readouterr().out
    assert text.count("--- chosen [turn sequence") == 2 * 3 and "chosen [turn sequence 3/3]" in text
    assert "⟦<think>↵\nThe output is the answer." in text  # the last turn's reasoning, trained, in its own context
    page = (tmp_path / "out.html").read_text(encoding="utf-8")
    assert page.count("rejected [turn sequence") == 2 * 3
    assert cli(args + ["--render-mode", "single"]) == 1  # forcing one sequence: Qwen3 rows are refused
    assert "chat template is not prefix-stable" in capsys.readouterr().err


def test_reasoning_a_template_ignores_is_reported(tok, caplog):
    """Qwen2.5's template has no place for `reasoning_content`: not trained, and said so (once)."""
    r = ChatRenderer(tok, RenderOptions(chat_template=read_template("qwen2_5")))
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A", "reasoning_content": "hidden"}]
    with caplog.at_level(logging.WARNING, logger="mtpo"):
        for row in range(2):
            out = r.render_trajectory(parse_conversation({"messages": msgs}, row))
    assert "hidden" not in out.text
    warned = [rec.getMessage() for rec in caplog.records if "reasoning field" in rec.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("row 0, message 1:")
    caplog.clear()
    q3 = ChatRenderer(tok, RenderOptions(chat_template=read_template("qwen3")))
    with caplog.at_level(logging.WARNING, logger="mtpo"):
        q3.render_trajectory(parse_conversation({"messages": msgs}, 0))
    assert not [rec for rec in caplog.records if "reasoning field" in rec.getMessage()]


def test_prefilled_think_is_rebuilt_or_refused(tok):
    """DeepSeek-R1: the generation prompt prefills "<think>\\n", the history drops the reasoning. The turn is
    the content as generated (minus the prefill) + the end of turn; without the reasoning it is refused."""
    r = ChatRenderer(tok, RenderOptions(chat_template=read_template("deepseek_r1_distill")))
    raw = "<think>\nAdd them.\n</think>\n\nIt is 5."
    msgs = [{"role": "user", "content": "2+3?"}, {"role": "assistant", "content": raw},
            {"role": "user", "content": "And 3+4?"}, {"role": "assistant", "content": "Add.\n</think>\n\n7."}]
    out = r.render_trajectory(parse_conversation({"messages": msgs}, 0))
    trained = [tok.decode(p.input_ids[p.trainable]) for p in sequences(out)]
    assert trained == ["Add them.\n</think>\n\nIt is 5.<｜end▁of▁sentence｜>", "Add.\n</think>\n\n7.<｜end▁of▁sentence｜>"]
    for k, part in zip((1, 3), sequences(out)):
        start = int(np.flatnonzero(part.trainable)[0])
        assert part.input_ids[:start].tolist() == r.generation_context(msgs[:k])[1]
    msgs[3]["content"] = "7."  # the reasoning the policy must have written after "<think>\n" is missing
    with pytest.raises(RecordError, match=r"^row 2, message 3: cannot rebuild .* opens <think> and the content does "
                                          r"not close it"):
        r.render_trajectory(parse_conversation({"messages": msgs}, 2))


def test_prepare_counts_per_turn_rows(tok, qwen3, caplog):
    rows = pair_rows(2) + [{"chosen": thinking_trajectory(5, rounds=0), "rejected": thinking_trajectory(5, False, 0)}]
    with caplog.at_level(logging.INFO, logger="mtpo"):
        examples, _ = prepare_pairs(rows, qwen3)
    assert not isinstance(examples[2].chosen, TurnSequences)  # one turn: nothing rewritten, one sequence
    assert any("4 trajectories scored per turn as 12 sequences" in r.getMessage() for r in caplog.records)


def test_a_template_without_end_of_turn_is_still_refused(tok):
    """Only templates that stop a turn with the next role tag (GLM) may leave the final turn without a stop
    token; a template that writes no end of turn at all is an error, per turn as in one sequence."""
    tpl = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    r = ChatRenderer(tok, RenderOptions(chat_template=tpl))
    msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}]
    with pytest.raises(RecordError, match=r"^row 3, message 1: none of the end-of-turn texts"):
        r.render_trajectory(parse_conversation({"messages": msgs}, 3))
