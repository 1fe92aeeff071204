"""Masked multi-turn SFT: loss vs brute force, masking, accumulation invariance, RAFT filters, end to end."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from mtpo.collate import ConversationCollator, ListDataset
from mtpo.config import load_config
from mtpo.prepare import prepare_conversations
from mtpo.render import ChatRenderer
from mtpo.trainers import sft
from mtpo.trainers.sft import SFTConfig, SFTTrainer, keep_rows, train_sft

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "tiny-model")
SFT_DATA = os.path.join(ROOT, "examples", "data", "sft.jsonl")


def read_rows(n=None):
    with open(SFT_DATA, encoding="utf-8") as f:
        return [json.loads(line) for line in f][:n]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def renderer():
    return ChatRenderer(AutoTokenizer.from_pretrained(TINY))


def tiny_lm(vocab: int, seed: int = 0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, initializer_range=0.2)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def make_trainer(tmp_path, model, **args):
    config = SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **args)
    return SFTTrainer(model=model, args=config, data_collator=ConversationCollator(0))


def test_loss_is_the_per_token_mean_over_trained_tokens(tmp_path, renderer):
    examples, _ = prepare_conversations(read_rows(4), renderer)
    model = tiny_lm(len(renderer.tokenizer))
    loss, metrics = make_trainer(tmp_path, model, logprob_chunk_size=50).loss_and_metrics(
        model, ConversationCollator(0)(examples))
    total, count = 0.0, 0
    for r in examples:  # brute force: full logits of the unpadded row, loop over trained positions
        with torch.no_grad():
            logp = model(input_ids=torch.from_numpy(r.input_ids)[None]).logits[0].double().log_softmax(-1)
        for t in range(1, len(r)):
            if r.trainable[t]:
                total += logp[t - 1, r.input_ids[t]].item()
                count += 1
    assert loss.item() == pytest.approx(-total / count, rel=1e-5)
    assert metrics["tokens"].sum().item() == count


def _rendered(ids, trainable_from):
    from mtpo.render import Rendered

    ids = np.asarray(ids, dtype=np.int64)
    mask = np.arange(len(ids)) >= trainable_from
    return Rendered(ids, mask, "", np.zeros((len(ids), 2), np.int64), [], 0)


def _contrasting_rows(model, vocab):
    """Two rows the per-token mean tells apart from any per-row average: a long row of the model's own
    greedy tokens (per-token NLL ≈ 0) and a short row of its least likely tokens (per-token NLL ≫ 1)."""
    easy, hard = [1, 2, 3], [4, 5, 6]
    with torch.no_grad():
        for _ in range(60):
            easy.append(int(model(input_ids=torch.tensor([easy])).logits[0, -1].argmax()))
        for _ in range(3):
            hard.append(int(model(input_ids=torch.tensor([hard])).logits[0, -1].argmin()))
    return [_rendered(easy, 3), _rendered(hard, 3)]


def _per_row_nll(model, rows):
    """(Σ −log π, count) of each row: full logits of the unpadded row, loop over its trained positions."""
    out = []
    for r in rows:
        with torch.no_grad():
            logp = model(input_ids=torch.from_numpy(r.input_ids)[None]).logits[0].double().log_softmax(-1)
        nll = [-logp[t - 1, r.input_ids[t]].item() for t in range(1, len(r)) if r.trainable[t]]
        out.append((sum(nll), len(nll)))
    return out


def test_per_token_mean_is_not_a_per_row_mean(tmp_path):
    """60 trained tokens at NLL ≈ 0 and 3 at NLL ≫ 1: the per-token mean, the mean of per-row means and
    the mean of per-row sums differ by large factors, so only the per-token mean passes (through the
    trainer's loss, and through a training step with gradient accumulation 1×2)."""
    vocab = 64
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, initializer_range=1.0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    rows = _contrasting_rows(model, vocab)
    (easy_sum, easy_n), (hard_sum, hard_n) = _per_row_nll(model, rows)
    per_token = (easy_sum + hard_sum) / (easy_n + hard_n)
    per_row = (easy_sum / easy_n + hard_sum / hard_n) / 2
    per_row_sum = (easy_sum + hard_sum) / 2
    assert (easy_n, hard_n) == (60, 3) and hard_sum / hard_n > 50 * easy_sum / easy_n
    assert per_row > 3 * per_token and per_row_sum > 3 * per_token  # the test can tell them apart

    loss, metrics = make_trainer(tmp_path, model).loss_and_metrics(model, ConversationCollator(0)(rows))
    assert loss.item() == pytest.approx(per_token, rel=1e-4)
    assert metrics["tokens"].tolist() == [60.0, 3.0]

    trainer = SFTTrainer(model=model, args=SFTConfig(
        output_dir=str(tmp_path / "ga"), report_to="none", use_cpu=True, max_steps=1, logging_steps=1,
        per_device_train_batch_size=1, gradient_accumulation_steps=2, learning_rate=0.0, save_strategy="no",
        disable_tqdm=True), train_dataset=ListDataset(rows), data_collator=ConversationCollator(0))
    trainer.train()
    assert trainer.state.log_history[0]["loss"] == pytest.approx(per_token, rel=1e-4)


def test_external_tokens_get_no_gradient(tmp_path, renderer):
    examples, _ = prepare_conversations(read_rows(4), renderer)
    model = tiny_lm(len(renderer.tokenizer))
    trainer = make_trainer(tmp_path, model)
    batch = ConversationCollator(0)(examples)
    captured = []
    hook = model.model.norm.register_forward_hook(lambda m, a, out: captured.append(out) or out.retain_grad())
    loss, _ = trainer.loss_and_metrics(model, batch)
    hook.remove()
    loss.backward()
    (hidden,) = captured
    feeds_target = torch.zeros(hidden.shape[:2], dtype=torch.bool)
    feeds_target[:, :-1] = batch["trainable"][:, 1:]  # hidden[t] predicts token t + 1
    grad_norm = hidden.grad.norm(dim=-1)
    assert (grad_norm[~feeds_target] == 0).all() and (grad_norm[feeds_target] > 0).all()
    # user turns, tool outputs and role headers are all external: the mask is not "everything after the prompt"
    assert (~batch["trainable"] & batch["attention_mask"]).sum() > 3 * len(examples)
    # tokens after the last trained one (template's trailing newline) are targets nobody trains on
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    changed = {k: v.clone() for k, v in batch.items()}
    for b in range(len(examples)):
        last, real = int(batch["trainable"][b].nonzero().max()), int(batch["attention_mask"][b].sum())
        assert real > last + 1
        changed["input_ids"][b, last + 1:real] = 5
    loss2, _ = trainer.loss_and_metrics(model, changed)
    loss2.backward()
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g)


def one_step(tmp_path, name, data, batch, accumulation):
    out = tmp_path / name
    config = SFTConfig(model_name_or_path=TINY, train_data=data, output_dir=str(out), report_to="none",
                       use_cpu=True, max_steps=1, per_device_train_batch_size=batch,
                       gradient_accumulation_steps=accumulation, optim="sgd", learning_rate=1.0,
                       lr_scheduler_type="constant", max_grad_norm=0.0, logging_steps=1, save_strategy="no")
    summary = train_sft(config)
    return summary["first_log"]["loss"], load_file(str(out / "model.safetensors"))


def test_gradient_accumulation_1x8_equals_8x1(tmp_path, renderer):
    rows = [r for r in read_rows(24) if r["label"]][:8]
    data = write_rows(tmp_path / "eight.jsonl", rows)
    loss_81, w_81 = one_step(tmp_path, "8x1", data, batch=8, accumulation=1)
    loss_18, w_18 = one_step(tmp_path, "1x8", data, batch=1, accumulation=8)
    start = load_file(os.path.join(TINY, "model.safetensors"))
    # the loss logged for the step is the per-token mean over all 8 rows, computed independently
    examples, _ = prepare_conversations(rows, renderer)
    model = AutoModelForCausalLM.from_pretrained(TINY)
    with torch.no_grad():
        logps = [model(input_ids=torch.from_numpy(e.input_ids)[None]).logits[0].log_softmax(-1) for e in examples]
    nll = -sum(lp[:-1].gather(-1, torch.tensor(e.input_ids[1:])[:, None])[:, 0][torch.tensor(e.trainable[1:])].sum()
               for lp, e in zip(logps, examples)) / sum(e.num_trainable for e in examples)
    assert loss_81 == pytest.approx(nll.item(), rel=1e-4) and loss_18 == pytest.approx(nll.item(), rel=1e-4)
    moved = 0.0
    for name, w in w_81.items():
        torch.testing.assert_close(w_18[name], w, rtol=1e-4, atol=1e-6)
        moved = max(moved, (w - start[name]).abs().max().item())
    assert moved > 1e-3  # the step did change the weights


def test_filters_count_rows(renderer):
    rows = read_rows(8)
    rows = [{**r, "score": float(i)} for i, r in enumerate(rows)]
    n_true = sum(r["label"] for r in rows)
    out, report = prepare_conversations(rows, renderer, keep=keep_rows(SFTConfig(output_dir="x", filter_label=True)))
    assert len(out) == n_true < 8 and report.skipped == 8 - n_true
    out, report = prepare_conversations(rows, renderer, keep=keep_rows(SFTConfig(output_dir="x", min_score=5)))
    assert [e.index for e in out] == [5, 6, 7] and report.reasons == {"filtered out (label/score)": 5}
    both = keep_rows(SFTConfig(output_dir="x", min_score=5, filter_label=True))
    out, _ = prepare_conversations(rows, renderer, keep=both)
    assert [e.index for e in out] == [i for i in (5, 6, 7) if rows[i]["label"]]
    assert keep_rows(SFTConfig(output_dir="x")) is None


def test_filters_need_the_field_they_filter_on(tmp_path, capsys):
    rows = read_rows(4)
    rows[2] = {k: v for k, v in rows[2].items() if k != "label"}
    data = write_rows(tmp_path / "d.jsonl", rows)
    common = [f"--model_name_or_path={TINY}", f"--train_data={data}", f"--output_dir={tmp_path}", "--use_cpu=true"]
    assert sft.cli(common + ["--filter_label=true"]) == 2
    assert "row 2: filter_label is true but the row has no `label`" in capsys.readouterr().err
    assert sft.cli(common + ["--min_score=0.5"]) == 2
    assert "row 0: min_score is 0.5 but the row has no `score`" in capsys.readouterr().err
    rows = [{**r, "label": False} for r in rows]
    data = write_rows(tmp_path / "d.jsonl", rows)
    assert sft.cli(common + ["--filter_label=true"]) == 2
    assert "every row was dropped" in capsys.readouterr().err


def test_end_to_end_from_yaml(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)
    out = tmp_path / "sft"
    config = load_config(SFTConfig, "examples/sft.yaml", [f"--output_dir={out}", "--max_steps=30",
                                                           "--per_device_train_batch_size=4", "--logging_steps=10"])
    summary = train_sft(config)
    assert summary["steps"] == 30
    assert summary["data"]["train"]["kept"] == 96 and summary["data"]["train"]["skipped"] == 32
    first, last = summary["first_log"]["loss"], summary["last_log"]["loss"]
    assert last < first - 0.5
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    examples, _ = prepare_conversations(read_rows(8), ChatRenderer(tok))
    batch = ConversationCollator(tok.pad_token_id)(examples)
    trained = make_trainer(tmp_path, reloaded).loss_and_metrics(reloaded, batch)[0].item()
    start = AutoModelForCausalLM.from_pretrained(TINY)
    untrained = make_trainer(tmp_path, start).loss_and_metrics(start, batch)[0].item()
    assert trained < untrained - 0.5
    assert np.isfinite(trained)
