"""M-KTO: loss vs brute force, the mismatched KL pairs, masking, templates, bad input, end to end."""

from __future__ import annotations

import copy
import json
import logging
import math
import os

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from mtpo import losses as L
from mtpo.collate import LabeledCollator, ListDataset
from mtpo.config import ConfigError, load_config
from mtpo.data import Conversation, RecordError, parse_labeled
from mtpo.prepare import LabeledExample
from mtpo.render import ChatRenderer, Rendered, RenderOptions
from mtpo.trainers import kto
from mtpo.trainers.kto import KTOConfig, KTORefLayout, KTOTrainer, check_balance, prepare_kto, train_kto

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "tiny-model")
KTO_DATA = os.path.join(ROOT, "examples", "data", "kto.jsonl")
PAIR_DATA = os.path.join(ROOT, "examples", "data", "dpo_research.jsonl")


def read_rows(path, n=None):
    with open(path, encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    return rows[:n]


def tiny_lm(vocab: int, seed: int = 0, init: float = 0.2):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=16, initializer_range=init)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()


def make_trainer(tmp_path, policy, ref=None, **args):
    config = KTOConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True, **args)
    return KTOTrainer(model=policy, args=config, ref_model=ref, data_collator=LabeledCollator(0))


def brute_logp(model, ids, mask) -> float:
    """Full logits, log_softmax, explicit loop over the trainable positions."""
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([list(ids)])).logits[0].double().log_softmax(-1)  # (T, V)
    return sum(logp[t - 1, ids[t]].item() for t in range(1, len(ids)) if mask[t])


def sigmoid(x):
    return 1 / (1 + math.exp(-x))


# ------------------------------------------------------------------------- hand-built batch

V = 48
PROMPTS = [[1, 5, 9, 3], [2, 7, 7], [4, 11, 6, 8, 10], [3, 3, 12]]
COMPLETIONS = [  # (ids, mask): G = generated (trained), E = external (tool output)
    ([20, 21, 22, 30, 31, 23], "GGGEEG"),
    ([24, 25], "GG"),
    ([26, 27, 32, 33, 28, 29], "GGEEGG"),
    ([40, 41, 42], "GGG"),
]
LABELS = [True, False, True, False]


def hand_rendered(ids, mask, index=0):
    ids = np.asarray(ids, dtype=np.int64)
    return Rendered(ids, np.asarray(mask, dtype=bool), "", np.zeros((len(ids), 2), np.int64), [], index)


def seq(i, j):
    """Prompt of row i + completion of row j, as ids and trainable mask (prompt external)."""
    ids, pattern = COMPLETIONS[j]
    return PROMPTS[i] + ids, [False] * len(PROMPTS[i]) + [c == "G" for c in pattern]


def hand_examples(rows=range(4)):
    out = []
    for pos, i in enumerate(rows):
        e = LabeledExample(hand_rendered(*seq(i, i), i), LABELS[i], i, position=pos)
        e.kl = hand_rendered(*seq(i, (i + 1) % 4), i)  # TRL's in-batch pairing, built by hand
        out.append(e)
    return out


def expected_kto(policy, ref, rows, beta, w_d, w_u):
    kl = [brute_logp(policy, *seq(i, (i + 1) % 4)) - brute_logp(ref, *seq(i, (i + 1) % 4)) for i in rows]
    z0 = max(0.0, sum(kl) / len(kl))
    losses, rewards = [], []
    for i in rows:
        r = brute_logp(policy, *seq(i, i)) - brute_logp(ref, *seq(i, i))
        losses.append(w_d * (1 - sigmoid(beta * (r - z0))) if LABELS[i] else w_u * (1 - sigmoid(beta * (z0 - r))))
        rewards.append(beta * r)
    return sum(losses) / len(losses), z0, sum(kl) / len(kl), rewards


@pytest.mark.parametrize("swap", [False, True])
def test_loss_equals_brute_force(tmp_path, swap):
    a, b = tiny_lm(V, seed=0), tiny_lm(V, seed=1)
    policy, ref = (b, a) if swap else (a, b)
    beta, w_d, w_u = 0.5, 1.5, 0.7
    trainer = make_trainer(tmp_path, policy, ref, beta=beta, desirable_weight=w_d, undesirable_weight=w_u,
                           logprob_chunk_size=3)
    batch = LabeledCollator(0)(hand_examples())
    loss, metrics = trainer.loss_and_metrics(policy, batch)
    want, z0, raw_mean, rewards = expected_kto(policy, ref, range(4), beta, w_d, w_u)
    assert loss.item() == pytest.approx(want, abs=1e-5)
    assert metrics["kl"].item() == pytest.approx(z0, abs=1e-4)
    assert metrics["rewards/desirable"].tolist() == pytest.approx([rewards[0], rewards[2]], abs=1e-4)
    assert metrics["rewards/undesirable"].tolist() == pytest.approx([rewards[1], rewards[3]], abs=1e-4)
    assert metrics["count/desirable"].item() == 2 and metrics["count/undesirable"].item() == 2
    # swapping policy and reference flips the sign of the raw mean: one of the two runs is clamped at 0
    assert abs(raw_mean) > 1e-3
    assert (z0 == 0.0) == (raw_mean < 0)


def test_batch_size_one_uses_a_real_mismatched_pair(tmp_path):
    policy, ref = tiny_lm(V, seed=0), tiny_lm(V, seed=1)
    trainer = make_trainer(tmp_path, policy, ref, beta=0.3)
    for i in range(4):
        (example,) = hand_examples([i])
        batch = LabeledCollator(0)([example])
        assert batch["input_ids"].shape[0] == 2 and not torch.equal(batch["input_ids"][0], batch["input_ids"][1])
        loss, metrics = trainer.loss_and_metrics(policy, batch)
        want, z0, _, _ = expected_kto(policy, ref, [i], 0.3, 1.0, 1.0)
        assert loss.item() == pytest.approx(want, abs=1e-5)
        assert metrics["kl"].item() == pytest.approx(z0, abs=1e-4)


def test_class_metrics_are_means_over_that_class_only(tmp_path):
    policy, ref = tiny_lm(V, seed=0), tiny_lm(V, seed=1)
    trainer = make_trainer(tmp_path, policy, ref)
    _, metrics = trainer.loss_and_metrics(policy, LabeledCollator(0)(hand_examples([0, 2])))  # desirable only
    trainer.store_metrics(metrics, "train")
    sums = trainer._metric_sums["train"]
    assert sums["rewards/undesirable"] == [0.0, 0.0] and sums["logps/undesirable"] == [0.0, 0.0]
    assert sums["rewards/desirable"][1] == 2 and sums["count/desirable"] == [2.0, 1.0]


def test_kl_baseline_is_the_clamped_mean(tmp_path):
    trainer = make_trainer(tmp_path, tiny_lm(V))
    pol, ref = torch.tensor([-3.0, -1.0, -2.0], requires_grad=True), torch.tensor([-4.0, -1.5, -2.0])
    z0 = trainer.kl_baseline(pol, ref)
    assert z0.item() == pytest.approx(0.5) and not z0.requires_grad and z0.dim() == 0
    assert torch.equal(z0, L.kto_kl_baseline(pol, ref))
    assert trainer.kl_baseline(ref, pol).item() == 0.0  # negative mean → clamped


def test_precomputed_reference_equals_reference_model(tmp_path):
    policy, ref = tiny_lm(V, seed=0), tiny_lm(V, seed=1)
    examples = hand_examples()
    trainer = make_trainer(tmp_path, policy, ref, per_device_eval_batch_size=3)
    want, _ = trainer.loss_and_metrics(policy, LabeledCollator(0)(examples))
    trainer.train_dataset = ListDataset(examples)
    trainer.precompute_references(KTORefLayout)
    assert trainer.ref_model is None
    for i, e in enumerate(examples):
        assert e.ref_logps == pytest.approx(brute_logp(ref, *seq(i, i)), abs=1e-4)
        assert e.ref_kl_logps == pytest.approx(brute_logp(ref, *seq(i, (i + 1) % 4)), abs=1e-4)
    batch = LabeledCollator(0)(examples)
    assert batch["ref_logps"].shape == (8,)
    got, _ = trainer.loss_and_metrics(policy, batch)
    assert got.item() == pytest.approx(want.item(), abs=1e-5)


def token_logps(model, ids) -> np.ndarray:
    """log π(ids[t] | ids[:t]) for every t ≥ 1 (entry 0 is 0): one full-logits pass, no masks, no chunks."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([list(ids)])).logits[0, :-1].float()  # (T-1, V)
    ids = torch.as_tensor(np.asarray(ids))
    logp = logits.gather(-1, ids[1:, None])[:, 0] - logits.logsumexp(-1)  # (T-1,)
    return np.concatenate([[0.0], logp.double().numpy()])


def expected_from_examples(policy, ref, examples, beta, w_d=1.0, w_u=1.0, masks=(None,)):
    """Brute-force KTO losses and z0 of a batch of rendered examples, one per mask rule in `masks`
    (None: each trajectory's own mask; else `mask(rendered)`). Per-row log-probs are sums over the
    masked positions of full-logits token log-probs; z0 comes from the mismatched KL pairs. `ref(fn)`
    runs `fn` with the reference in place (a frozen copy, or the PEFT policy with its adapter off)."""
    diffs = {}
    for e in examples:
        for r in (e.completion, e.kl):
            diffs[id(r)] = token_logps(policy, r.input_ids) - ref(lambda m: token_logps(m, r.input_ids))
    out = []
    for mask in masks:
        def reward(r):
            return float(diffs[id(r)][1:][np.asarray(mask(r) if mask else r.trainable)[1:]].sum())

        kl = [reward(e.kl) for e in examples]
        z0 = max(0.0, sum(kl) / len(kl))
        losses = [w_d * (1 - sigmoid(beta * (reward(e.completion) - z0))) if e.label
                  else w_u * (1 - sigmoid(beta * (z0 - reward(e.completion)))) for e in examples]
        out.append((sum(losses) / len(losses), z0))
    return out


def after_prompt(r):
    """A plausible wrong mask: every token after the prompt (tool outputs and role headers included)."""
    return np.arange(len(r)) >= r.prompt_tokens


def test_peft_reference_is_the_adapter_free_policy(tmp_path):
    """An adapter that is not the identity (lora_B random, as after some training): the reference is the
    adapter-free base, and the loss equals brute force over the masks — not 0.5 whatever the masks."""
    from peft import LoraConfig, get_peft_model

    policy = get_peft_model(tiny_lm(V), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj"],
                                                   init_lora_weights=False))
    beta, w_d = 2.0, 1.2
    trainer = make_trainer(tmp_path, policy, None, beta=beta, desirable_weight=w_d)
    examples = hand_examples()
    loss, metrics = trainer.loss_and_metrics(policy, LabeledCollator(0)(examples))

    def base(fn):
        with policy.disable_adapter():
            return fn(policy)

    (want, z0), (wrong, _) = expected_from_examples(policy, base, examples, beta, w_d,
                                                    masks=(None, lambda r: np.arange(len(r)) > 0))
    assert loss.item() == pytest.approx(want, abs=1e-5)
    assert metrics["kl"].item() == pytest.approx(z0, abs=1e-4)
    assert abs(want - (1.2 * 0.5 * 2 + 0.5 * 2) / 4) > 1e-2  # the adapter matters ...
    assert abs(wrong - want) > 1e-2  # ... and so do the masks


# ------------------------------------------------------------------------- data: mismatched pairs


@pytest.fixture(scope="module")
def tiny_renderer():
    from transformers import AutoTokenizer

    return ChatRenderer(AutoTokenizer.from_pretrained(TINY))


def test_mismatched_pairs_render_the_new_conversation(tiny_renderer):
    rows = read_rows(KTO_DATA, 12)
    examples, report = prepare_kto(rows, tiny_renderer, seed=3)
    assert report.kept == 12 and all(e.kl is not None for e in examples)
    for e in examples:
        partner = examples[e.kl_partner]
        assert partner.index != e.index and partner.record.prompt != e.record.prompt
        conv = Conversation(e.record.prompt + partner.record.completion, e.record.tools, e.index)
        direct = tiny_renderer.render(conv)  # masks from rendering the new conversation, not spliced ids
        assert np.array_equal(e.kl.input_ids, direct.input_ids) and np.array_equal(e.kl.trainable, direct.trainable)
        p = e.completion.prompt_tokens
        assert p > 0 and np.array_equal(e.kl.input_ids[:p], e.completion.input_ids[:p])
        assert not e.kl.trainable[:p].any() and e.kl.num_trainable > 0
    # deterministic given the seed; another seed pairs differently
    again, _ = prepare_kto(rows, tiny_renderer, seed=3)
    other, _ = prepare_kto(rows, tiny_renderer, seed=4)
    assert [e.kl_partner for e in again] == [e.kl_partner for e in examples]
    assert [e.kl_partner for e in other] != [e.kl_partner for e in examples]


def test_pairs_convert_and_never_pair_with_the_same_prompt(tiny_renderer, caplog):
    rows = read_rows(PAIR_DATA, 5)
    with caplog.at_level(logging.INFO, logger="mtpo"):
        examples, _ = prepare_kto(rows, tiny_renderer)  # data_format auto → pairs
    assert "converted 5 pairs into 5 desirable + 5 undesirable trajectories" in caplog.text
    assert [e.label for e in examples] == [True, False] * 5
    assert all(examples[e.kl_partner].index != e.index for e in examples)
    with pytest.raises(RecordError, match="row 0: missing field `label`"):
        prepare_kto(rows, tiny_renderer, data_format="unpaired")
    with pytest.raises(ConfigError, match="mixes preference pairs"):
        prepare_kto(rows + read_rows(KTO_DATA, 2), tiny_renderer)


def test_mismatched_pairs_respect_max_length(tiny_renderer):
    rows = read_rows(KTO_DATA, 16)
    examples, _ = prepare_kto(rows, tiny_renderer)
    lengths = sorted(len(e.completion) for e in examples)
    limit = lengths[len(lengths) // 2]  # half of the completions (and many pairs) are longer
    kept, report = prepare_kto(rows, tiny_renderer, max_length=limit, truncation="drop")
    assert 0 < report.kept < 16
    assert all(len(e.kl) <= limit and e.kl.num_trainable > 0 for e in kept)


def test_one_prompt_only_is_an_error(tiny_renderer):
    row = read_rows(KTO_DATA, 1)[0]
    with pytest.raises(RecordError, match="at least two different prompts"):
        prepare_kto([row, {**row, "label": not row["label"]}], tiny_renderer)


# ------------------------------------------------------------------------- masking


def test_external_tokens_get_no_gradient(tmp_path, tiny_renderer):
    examples, _ = prepare_kto(read_rows(KTO_DATA, 4), tiny_renderer)
    policy, ref = tiny_lm(len(tiny_renderer.tokenizer), seed=0), tiny_lm(len(tiny_renderer.tokenizer), seed=1)
    trainer = make_trainer(tmp_path, policy, ref)
    batch = LabeledCollator(0)(examples)
    captured = []

    def keep_graph_output(module, args, out):  # the LM head's input (B, T, H), when it has a graph
        if out.requires_grad:
            out.retain_grad()
            captured.append(out)

    hook = policy.model.norm.register_forward_hook(keep_graph_output)
    loss, _ = trainer.loss_and_metrics(policy, batch)
    hook.remove()
    loss.backward()
    (hidden,) = captured  # only the completion rows have a graph; the KL rows ran without one
    n, width = hidden.shape[:2]
    feeds_target = torch.zeros(n, width, dtype=torch.bool)
    feeds_target[:, :-1] = batch["trainable"][:n, 1:width]  # hidden[t] predicts token t + 1
    grad_norm = hidden.grad.norm(dim=-1)  # (B, T)
    assert (grad_norm[~feeds_target] == 0).all()
    assert (grad_norm[feeds_target] > 0).all()
    # Changing external target tokens after the last trained one (template's trailing newline)
    # changes neither loss nor gradients.
    grads = [p.grad.clone() for p in policy.parameters()]
    policy.zero_grad()
    changed = {k: v.clone() for k, v in batch.items()}
    moved = 0
    for b in range(n):
        last = int(batch["trainable"][b].nonzero().max())
        real = int(batch["attention_mask"][b].sum())
        changed["input_ids"][b, last + 1:real] = 7
        moved += real - last - 1
    assert moved > 0
    loss2, _ = trainer.loss_and_metrics(policy, changed)
    loss2.backward()
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)
    for g, p in zip(grads, policy.parameters()):
        torch.testing.assert_close(p.grad, g)


# ------------------------------------------------------------------------- other chat templates


FAMILIES = {"llama3": ("llama3_tok", "llama3"), "chatml": ("chatml_tok", "qwen2_5"),
            "gemma": ("gemma_tok", "gemma"), "mistral": ("mistral_v3", "mistral_instruct")}


@pytest.fixture
def family_tokenizer(request, template, tmp_path):
    fixture, name = FAMILIES[request.param]
    if fixture == "mistral_v3":
        import shutil

        from conftest import MISTRAL_FILES, mistral_data_file
        from transformers import LlamaTokenizer

        shutil.copy(mistral_data_file(MISTRAL_FILES["v3"]), tmp_path / "tokenizer.model")
        return LlamaTokenizer.from_pretrained(str(tmp_path), legacy=False), template(name)
    return request.getfixturevalue(fixture), template(name)


@pytest.mark.parametrize("family_tokenizer", list(FAMILIES), indirect=True)
def test_kto_step_on_other_templates(tmp_path, family_tokenizer):
    tok, chat_template = family_tokenizer
    renderer = ChatRenderer(tok, RenderOptions(chat_template=chat_template))
    rows = read_rows(KTO_DATA)
    rows = [next(r for r in rows if r["label"]), next(r for r in rows if not r["label"])]
    examples, _ = prepare_kto(rows, renderer)
    for e in examples:
        p = e.completion.prompt_tokens
        assert np.array_equal(e.kl.input_ids[:p], e.completion.input_ids[:p])
        assert e.completion.num_trainable > 0 and e.kl.num_trainable > 0
    batch = LabeledCollator(tok.pad_token_id or 0)(examples)
    assert 0 <= int(batch["input_ids"].min()) and int(batch["input_ids"].max()) < len(tok)
    policy = tiny_lm(len(tok), init=0.02)
    ref = copy.deepcopy(policy)
    torch.manual_seed(1)
    with torch.no_grad():  # a reference that differs from the policy, so that the masks matter
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    beta = 0.5
    trainer = make_trainer(tmp_path, policy, ref, beta=beta, logprob_chunk_size=128)
    loss, metrics = trainer.loss_and_metrics(policy, batch)
    (want, z0), (wrong, _) = expected_from_examples(policy, lambda fn: fn(ref), examples, beta,
                                                    masks=(None, after_prompt))
    assert loss.item() == pytest.approx(want, abs=1e-4)  # float32 logits over a 128k vocabulary
    assert metrics["kl"].item() == pytest.approx(z0, abs=1e-3)
    assert abs(want - 0.5) > 1e-2  # not the value of a reference equal to the policy
    assert abs(wrong - want) > 2e-3  # a mask covering tool outputs and headers gives another loss (≥ 20× tol.)
    loss.backward()
    assert policy.lm_head.weight.grad.abs().sum() > 0


# ------------------------------------------------------------------------- bad input, balance


def run_cli(tmp_path, rows, capsys, *extra):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    rc = kto.cli([f"--model_name_or_path={TINY}", f"--train_data={data}", f"--output_dir={tmp_path / 'out'}",
                  "--use_cpu=true", "--report_to=none", *extra])
    return rc, capsys.readouterr().err


def test_bad_labels_are_errors_naming_the_row(tmp_path, capsys):
    rows = read_rows(KTO_DATA, 4)
    rc, err = run_cli(tmp_path, [r if i != 2 else {k: v for k, v in r.items() if k != "label"}
                                 for i, r in enumerate(rows)], capsys)
    assert rc == 2 and "row 2: missing field `label`" in err
    rc, err = run_cli(tmp_path, [r if i != 1 else {**r, "label": "yes"} for i, r in enumerate(rows)], capsys)
    assert rc == 2 and "row 1: `label` must be true or false, got 'yes'" in err
    rc, err = run_cli(tmp_path, [{**r, "label": True} for r in rows], capsys)
    assert rc == 2 and "4 desirable and 0 undesirable" in err and "KTO needs both" in err
    rc, err = run_cli(tmp_path, [{**r, "label": False} for r in rows], capsys)
    assert rc == 2 and "0 desirable and 4 undesirable" in err


def test_weight_ratio_warning(caplog):
    def ex(label):
        return LabeledExample(hand_rendered([1, 2], [False, True]), label, 0)

    data = [ex(True)] * 3 + [ex(False)]
    with caplog.at_level(logging.WARNING, logger="mtpo"):
        assert check_balance(data, KTOConfig(output_dir="unused", use_cpu=True)) == (3, 1)
    assert "= 1·3 / (1·1) = 3.000 is outside [1, 4/3]" in caplog.text
    assert "desirable_weight in [0.333, 0.444]" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="mtpo"):
        check_balance(data, KTOConfig(output_dir="unused", use_cpu=True, desirable_weight=0.4))
    assert caplog.text == ""


def test_config_validation():
    with pytest.raises(ConfigError, match="data_format"):
        KTOConfig(output_dir="unused", data_format="paired")
    with pytest.raises(ConfigError, match="undesirable_weight must be positive"):
        KTOConfig(output_dir="unused", undesirable_weight=0)


# ------------------------------------------------------------------------- end to end


def test_end_to_end_from_yaml(tmp_path, monkeypatch):
    """30 steps of `mtpo kto examples/kto.yaml`, then an evaluation on 32 of the training rows: the
    policy's implicit reward β·r is higher on desirable than on undesirable trajectories."""
    monkeypatch.chdir(ROOT)
    out, eval_data = tmp_path / "kto", tmp_path / "eval.jsonl"
    eval_data.write_text("".join(json.dumps(r) + "\n" for r in read_rows(KTO_DATA, 32)))
    config = load_config(KTOConfig, "examples/kto.yaml", [
        f"--output_dir={out}", "--max_steps=30", "--per_device_train_batch_size=4", "--learning_rate=1e-3",
        "--logging_steps=10", f"--eval_data={eval_data}", "--eval_strategy=steps", "--eval_steps=30",
        "--per_device_eval_batch_size=16"])
    summary = train_kto(config)
    assert summary["steps"] == 30
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (final,) = [log for log in logs if "eval_rewards/desirable" in log]
    assert final["eval_rewards/desirable"] > final["eval_rewards/undesirable"] + 0.3
    assert final["eval_count/desirable"] + final["eval_count/undesirable"] == 16  # rows per eval batch
    assert summary["last_log"]["count/desirable"] + summary["last_log"]["count/undesirable"] == 4
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    start = AutoModelForCausalLM.from_pretrained(TINY)
    assert any(not torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), start.state_dict().values()))


def test_parse_labeled_rejects_before_training():
    with pytest.raises(RecordError, match="row 5: `label` must be true or false, got 1"):
        parse_labeled({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
                       "label": 1}, 5)
