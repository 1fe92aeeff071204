"""M-DPO trainer (`mtpo.trainers.dpo`): the loss against hand computations, then whole runs.

Unit level (an in-memory tiny Llama, policy and reference with different weights):
  * single-turn sigmoid loss + rewards == textbook DPO (full logits → log_softmax → gather);
  * multi-turn per-row log-probs == a brute-force sum, one forward per trainable token;
  * margin column, length penalty and NLL term against hand formulas on the per-row metrics.
Run level (`train_dpo` / `mtpo dpo` on CPU): YAML end-to-end, resume, gradient accumulation,
the three reference options, the per-iteration recipe and every loss type.
"""

from __future__ import annotations

import gc
import json
import math
import warnings
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel

from mtpo import losses as L
from mtpo.cli import main as cli_main
from mtpo.collate import ListDataset, PairCollator
from mtpo.config import load_config
from mtpo.prepare import prepare_pairs
from mtpo.render import ChatRenderer
from mtpo.trainers.dpo import DPOConfig, DPOTrainer, train_dpo

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny-model"
EXAMPLE_YAML = ROOT / "examples" / "dpo.yaml"
LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------- helpers


def arith_rows(n: int, *, multi_turn: bool = True, margins: list | None = None) -> list[dict]:
    """Short research-format pairs; multi-turn ones have a tool output as a user turn."""
    rows = []
    for i in range(n):
        a, b = 3 + 7 * i, 11 + 5 * i
        q = {"role": "user", "content": f"What is {a} + {b}?"}
        if multi_turn:
            chosen = [q, {"role": "assistant", "content": f"```python\nprint({a} + {b})\n```"},
                      {"role": "user", "content": f"```output\n{a + b}\n```"},
                      {"role": "assistant", "content": f"The answer is {a + b}."}]
            rejected = [q, {"role": "assistant", "content": f"```python\nprint({a} - {b})\n```"},
                        {"role": "user", "content": f"```output\n{a - b}\n```"},
                        {"role": "assistant", "content": f"So it must be {a * b}, I guess."}]
        else:
            chosen = [q, {"role": "assistant", "content": f"{a} + {b} = {a + b}."}]
            rejected = [q, {"role": "assistant", "content": f"I think it is {a * b}, roughly."}]
        row = {"chosen": chosen, "rejected": rejected}
        if margins is not None and margins[i] is not None:
            row["margin"] = margins[i]
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]


def tiny_llama(seed: int) -> LlamaForCausalLM:
    """A 1-layer Llama over the example tokenizer's 1000 ids; `initializer_range` large enough
    that different seeds give clearly different distributions."""
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=512,
                         initializer_range=0.2, tie_word_embeddings=True, pad_token_id=0, eos_token_id=2,
                         bos_token_id=None)
    return LlamaForCausalLM(config).float()


def trainer_args(tmp_path, **overrides) -> DPOConfig:
    values = dict(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", max_steps=1,
                  per_device_train_batch_size=2, save_strategy="no", logging_steps=1, disable_tqdm=True)
    return load_config(DPOConfig, **{**values, **overrides})


def direct_trainer(tmp_path, tok, rows, policy=None, ref=None, **overrides):
    """A DPOTrainer over rendered `rows` (no files), policy seed 0 and reference seed 1."""
    args = trainer_args(tmp_path, **overrides)
    examples, _ = prepare_pairs(rows, ChatRenderer(tok))
    trainer = DPOTrainer(model=policy if policy is not None else tiny_llama(0), args=args,
                         ref_model=ref if ref is not None else tiny_llama(1),
                         train_dataset=ListDataset(examples), processing_class=tok,
                         data_collator=PairCollator(tok.pad_token_id, args.margin))
    return trainer, examples


def run(config: DPOConfig):
    """`train_dpo(config)`, also returning the trainer it built."""
    seen = []
    original = DPOTrainer.train

    def spy(self, *args, **kwargs):
        seen.append(self)
        return original(self, *args, **kwargs)

    with mock.patch.object(DPOTrainer, "train", spy):
        summary = train_dpo(config)
    return summary, seen[0]


def train_logs(output_dir) -> list[dict]:
    return [r for r in read_jsonl(Path(output_dir) / "metrics.jsonl") if "loss" in r and "train_loss" not in r]


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float) -> None:
    """Every tensor of `b` equals `a`'s (a state dict may hold tied weights a file leaves out)."""
    assert set(b) <= set(a), set(b) - set(a)
    for name in b:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=lambda m: f"{name}: {m}")


# ----------------------------------------------------------------------------------- fixtures


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one torch thread (conftest)


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(TINY)


@pytest.fixture(scope="module")
def files(tmp_path_factory, tok):
    """Two tiny checkpoints with different weights (policy, ref) + 8 multi-turn training pairs."""
    root = tmp_path_factory.mktemp("dpo_files")
    for name, seed in (("policy", 0), ("ref", 1)):
        tiny_llama(seed).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    write_jsonl(root / "train.jsonl", arith_rows(8))
    return root


def run_config(files, out, **overrides) -> DPOConfig:
    values = dict(model_name_or_path=str(files / "policy"), train_data=str(files / "train.jsonl"),
                  output_dir=str(out), per_device_train_batch_size=2, learning_rate=1e-3,
                  lr_scheduler_type="constant", max_steps=2, logging_steps=1, save_strategy="no", seed=7,
                  use_cpu=True, report_to="none", disable_tqdm=True)
    return load_config(DPOConfig, **{**values, **overrides})


# ----------------------------------------------------------------------------------- the loss


def _textbook_logps(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """log π(completion | prompt) the textbook way: full logits, log_softmax, gather."""
    ids = torch.tensor([prompt_ids + completion_ids])  # (1, T)
    logits = model(input_ids=ids).logits[0].float()  # (T, V)
    token_logps = torch.log_softmax(logits[:-1], dim=-1).gather(-1, ids[0, 1:, None]).squeeze(-1)  # (T-1,)
    return token_logps[len(prompt_ids) - 1:].sum()  # entries that predict completion tokens


def test_sigmoid_loss_matches_textbook_dpo_on_single_turn_pairs(tmp_path, tok):
    rows = arith_rows(3, multi_turn=False)
    beta = 0.3
    trainer, examples = direct_trainer(tmp_path, tok, rows, beta=beta, per_device_train_batch_size=3)
    policy, ref = trainer.model, trainer.ref_model
    loss, metrics = trainer.loss_and_metrics(policy, trainer.data_collator(examples))

    expected = {}
    with torch.no_grad():
        for side in ("chosen", "rejected"):
            pol, rf = [], []
            for row, example in zip(rows, examples):
                prompt = tok.apply_chat_template(row[side][:1], add_generation_prompt=True, tokenize=True)["input_ids"]
                completion = tok(row[side][1]["content"] + "<|im_end|>", add_special_tokens=False)["input_ids"]
                rendered = getattr(example, side)
                # the trainer sees the same tokens (plus the template's trailing newline, not trained)
                assert rendered.input_ids[: len(prompt) + len(completion)].tolist() == prompt + completion
                assert rendered.trainable.sum() == len(completion)
                pol.append(_textbook_logps(policy, prompt, completion))
                rf.append(_textbook_logps(ref, prompt, completion))
            expected[side] = torch.stack(pol), torch.stack(rf)
    (pw, rw), (pl, rl) = expected["chosen"], expected["rejected"]
    textbook_loss = -F.logsigmoid(beta * ((pw - rw) - (pl - rl))).mean()

    close = dict(rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(metrics["logps/chosen"], pw, **close)
    torch.testing.assert_close(metrics["logps/rejected"], pl, **close)
    torch.testing.assert_close(loss.detach(), textbook_loss, **close)
    torch.testing.assert_close(metrics["rewards/chosen"], beta * (pw - rw), **close)
    torch.testing.assert_close(metrics["rewards/rejected"], beta * (pl - rl), **close)
    assert abs(textbook_loss.item() - LN2) > 1e-3  # policy ≠ reference: not the trivial value
    assert loss.requires_grad


def _brute_force_logps(model, rendered) -> float:
    """Σ over trainable tokens t of log π(x_t | x_<t), one forward pass per token (no masks, no batching)."""
    ids = torch.as_tensor(rendered.input_ids)
    total = 0.0
    for t in np.flatnonzero(rendered.trainable):
        logits = model(input_ids=ids[None, :t]).logits[0, -1].double()  # (V,)
        total += torch.log_softmax(logits, dim=-1)[ids[t]].item()
    return total


def _full_logits_logps(model, rendered) -> float:
    ids = torch.as_tensor(rendered.input_ids)[None]  # (1, T)
    token_logps = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1).gather(-1, ids[0, 1:, None])
    return token_logps.squeeze(-1)[torch.as_tensor(rendered.trainable[1:])].sum().item()


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask.astype(int), [0]])))
    return list(zip(edges[::2], edges[1::2]))


def test_multi_turn_logps_sum_only_assistant_tokens(tmp_path, tok):
    rows = arith_rows(2)
    beta = 0.5
    trainer, examples = direct_trainer(tmp_path, tok, rows, beta=beta)
    loss, metrics = trainer.loss_and_metrics(trainer.model, trainer.data_collator(examples))

    brute = {}
    with torch.no_grad():
        for side in ("chosen", "rejected"):
            for row, example in zip(rows, examples):
                rendered = getattr(example, side)
                # trainable tokens are exactly the assistant messages + their end-of-turn token:
                # the tool output (a user turn) and every role header are outside the loss
                trained_text = [tok.decode(rendered.input_ids[a:b]) for a, b in _runs(rendered.trainable)]
                assert trained_text == [m["content"] + "<|im_end|>" for m in row[side] if m["role"] == "assistant"]
                assert len(rendered) - rendered.trainable.sum() > 20
            # policy: brute force; reference: one unbatched full-logits pass summed over the same positions
            brute[side] = (torch.tensor([_brute_force_logps(trainer.model, getattr(e, side)) for e in examples],
                                        dtype=torch.float64),
                           torch.tensor([_full_logits_logps(trainer.ref_model, getattr(e, side)) for e in examples],
                                        dtype=torch.float64))
    (pw, rw), (pl, rl) = brute["chosen"], brute["rejected"]
    close = dict(rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(metrics["logps/chosen"].double(), pw, **close)
    torch.testing.assert_close(metrics["logps/rejected"].double(), pl, **close)
    hand_loss = -F.logsigmoid(beta * ((pw - rw) - (pl - rl))).mean()
    torch.testing.assert_close(loss.detach().double(), hand_loss, **close)


def test_margin_column_reaches_margin_aware_losses(tmp_path, tok):
    rows = arith_rows(3, margins=[2.0, -1.0, None])
    trainer, examples = direct_trainer(tmp_path, tok, rows, loss_type="rev_kl", margin=0.25, per_device_train_batch_size=3)
    batch = trainer.data_collator(examples)
    assert batch["margin"].tolist() == [2.0, -1.0, 0.25]  # a row's own margin, else the configured default

    loss, metrics = trainer.loss_and_metrics(trainer.model, batch)
    x = metrics["rewards/margins"]  # β·Δ per row
    target = torch.sigmoid(torch.tensor([2.0, -1.0, 0.25]))  # p* = σ(margin)
    hand = (-target * F.logsigmoid(x) - (1 - target) * F.logsigmoid(-x)).mean()
    torch.testing.assert_close(loss.detach(), hand, rtol=1e-5, atol=1e-6)
    default = torch.sigmoid(torch.tensor(0.25))
    assert abs(loss.item() - (-default * F.logsigmoid(x) - (1 - default) * F.logsigmoid(-x)).mean().item()) > 1e-3


def test_length_penalty_and_nll_term_against_hand_computation(tmp_path, tok):
    rows = arith_rows(3, multi_turn=False)
    beta, alpha, coef = 0.2, 0.05, 0.7
    trainer, examples = direct_trainer(tmp_path, tok, rows, beta=beta, per_device_train_batch_size=3)
    batch = trainer.data_collator(examples)
    with torch.no_grad():
        base_loss, m = trainer.loss_and_metrics(trainer.model, batch)
        trainer.args.length_penalty = alpha
        penalized_loss, m_pen = trainer.loss_and_metrics(trainer.model, batch)
        trainer.args.length_penalty, trainer.args.nll_coef = 0.0, coef
        nll_loss, m_nll = trainer.loss_and_metrics(trainer.model, batch)

    length_gap = m["tokens/chosen"] - m["tokens/rejected"]
    assert (length_gap != 0).all()
    torch.testing.assert_close(base_loss, -F.logsigmoid(m["rewards/margins"]).mean(), rtol=1e-6, atol=1e-6)
    # Δ − α(|w| − |l|): the policy is charged α per trainable token, the reference is not
    hand = -F.logsigmoid(m["rewards/margins"] - beta * alpha * length_gap).mean()
    torch.testing.assert_close(penalized_loss, hand, rtol=1e-5, atol=1e-6)
    assert abs(penalized_loss - base_loss) > 1e-2
    for key in ("rewards/chosen", "rewards/rejected", "logps/chosen"):  # metrics stay the raw quantities
        torch.testing.assert_close(m_pen[key], m[key])
    # NLL: per-token negative log-likelihood of each chosen trajectory, mean over pairs
    nll_rows = -m["logps/chosen"] / m["tokens/chosen"]
    torch.testing.assert_close(m_nll["nll"], nll_rows)
    torch.testing.assert_close(nll_loss, base_loss + coef * nll_rows.mean(), rtol=1e-6, atol=1e-5)


def test_logged_metrics_explain_the_logged_loss(tmp_path, tok):
    """One pair per step: each metrics.jsonl record satisfies the loss formula on its own values."""
    beta, alpha, coef = 0.1, 0.02, 0.3
    trainer, _ = direct_trainer(tmp_path, tok, arith_rows(3), beta=beta, length_penalty=alpha, nll_coef=coef,
                                per_device_train_batch_size=1, max_steps=3, learning_rate=1e-2)
    trainer.train()
    records = train_logs(tmp_path / "out")
    assert len(records) == 3
    for r in records:
        x = torch.tensor(r["rewards/margins"] - beta * alpha * (r["tokens/chosen"] - r["tokens/rejected"]))
        assert r["nll"] == pytest.approx(-r["logps/chosen"] / r["tokens/chosen"], rel=1e-5)
        assert r["loss"] == pytest.approx(-F.logsigmoid(x).item() + coef * r["nll"], rel=1e-4), r


def test_label_smoothing_reaches_the_trained_loss(tmp_path, tok):
    """Conservative DPO through the trainer: each logged step's loss is (1 − ε)·ℓ(x) + ε·ℓ(−x) on its own
    logged β·Δ, which plain DPO's ℓ(x) = −log σ(x) misses by about ε·|x| (asserted to be large)."""
    eps = 0.3
    trainer, _ = direct_trainer(tmp_path, tok, arith_rows(2), label_smoothing=eps, per_device_train_batch_size=1,
                                max_steps=2, learning_rate=1e-2)
    assert trainer.args.label_smoothing == eps
    trainer.train()
    records = train_logs(tmp_path / "out")
    assert len(records) == 2
    for r in records:
        x = torch.tensor(r["rewards/margins"])
        smoothed = -(1 - eps) * F.logsigmoid(x) - eps * F.logsigmoid(-x)
        assert abs(smoothed - (-F.logsigmoid(x))) > 0.02  # the margin is large enough to tell them apart
        assert r["loss"] == pytest.approx(smoothed.item(), rel=1e-4), r


@pytest.mark.parametrize("loss_type", sorted(L.PREFERENCE_LOSSES))
def test_every_loss_type_trains_one_step(tmp_path, tok, loss_type):
    trainer, _ = direct_trainer(tmp_path, tok, arith_rows(2, margins=[1.5, -0.5]), loss_type=loss_type,
                                learning_rate=1e-2)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    log = trainer.state.log_history[0]
    assert math.isfinite(log["loss"]) and log["loss"] > 0, log
    assert math.isfinite(log["grad_norm"]) and log["grad_norm"] > 0, log
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert changed, f"{loss_type}: no parameter changed"


# ----------------------------------------------------------------------------------- whole runs


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """`mtpo dpo examples/dpo.yaml` with overrides: 8 research-format pairs, 10 steps, evaluated on
    the same pairs at the end (so eval metrics are "on the training pairs")."""
    root = tmp_path_factory.mktemp("dpo_e2e")
    rows = read_jsonl(ROOT / "examples" / "data" / "dpo_research.jsonl")[:8]
    data = write_jsonl(root / "train8.jsonl", rows)
    out = root / "iter1"
    rc = cli_main(["dpo", str(EXAMPLE_YAML), f"--model_name_or_path={TINY}", f"--train_data={data}",
                   f"--eval_data={data}", f"--output_dir={out}", "--max_steps=10", "--per_device_train_batch_size=4",
                   "--per_device_eval_batch_size=8", "--learning_rate=2e-3", "--warmup_ratio=0", "--logging_steps=1",
                   "--eval_strategy=steps", "--eval_steps=10", "--disable_tqdm=true"])
    return rc, out, data


def test_end_to_end_from_yaml(e2e):
    rc, out, _ = e2e
    assert rc == 0
    logs = train_logs(out)
    assert [r["step"] for r in logs] == list(range(1, 11))
    assert logs[0]["loss"] == pytest.approx(LN2, abs=1e-6)  # policy == reference at step 1
    assert logs[-1]["loss"] < logs[0]["loss"] - 0.2
    final_eval = [r for r in read_jsonl(out / "metrics.jsonl") if "eval_loss" in r][-1]
    assert final_eval["step"] == 10
    assert final_eval["eval_rewards/accuracies"] >= 0.75
    assert final_eval["eval_rewards/margins"] > 0 and final_eval["eval_loss"] < LN2 - 0.1

    for name in ("model.safetensors", "config.json", "tokenizer.json", "mtpo_config.yaml", "metrics.jsonl",
                 "data_report.json"):
        assert (out / name).is_file(), name
    report = json.loads((out / "data_report.json").read_text())
    assert report["train"] == {"total": 8, "kept": 8, "skipped": 0, "reasons": {}}
    config = load_config(DPOConfig, str(out / "mtpo_config.yaml"))
    assert isinstance(config, DPOConfig)
    assert (config.beta, config.loss_type, config.learning_rate, config.max_steps) == (0.1, "sigmoid", 2e-3, 10)

    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(TINY).chat_template
    trained, start = model.state_dict(), weights(TINY)
    assert any(not torch.equal(trained[k], start[k]) for k in start)


def test_next_iteration_uses_previous_output_as_policy_and_reference(e2e, tmp_path):
    """Iterative M-DPO: iteration 2 starts from iteration 1's output, which is also its reference."""
    rc, iter1, data = e2e
    assert rc == 0
    config = load_config(DPOConfig, str(EXAMPLE_YAML), [
        f"--model_name_or_path={iter1}", f"--ref_model_name_or_path={iter1}", f"--train_data={data}",
        "--eval_data=null", "--eval_strategy=no", f"--output_dir={tmp_path / 'iter2'}", "--max_steps=1", "--per_device_train_batch_size=8",
        "--logging_steps=1", "--disable_tqdm=true"])
    _, trainer = run(config)
    first = train_logs(tmp_path / "iter2")[0]
    assert first["rewards/chosen"] == 0 and first["rewards/rejected"] == 0
    assert first["loss"] == pytest.approx(LN2, abs=1e-6)
    # the policy really is iteration 1's model: the same log-probs its final evaluation measured
    final_eval = [r for r in read_jsonl(iter1 / "metrics.jsonl") if "eval_loss" in r][-1]
    assert first["logps/chosen"] == pytest.approx(final_eval["eval_logps/chosen"], rel=1e-4)
    assert_same_weights(trainer.ref_model.state_dict(), weights(iter1), atol=0)


def test_resume_matches_uninterrupted_run(files, tmp_path):
    n = 3  # 8 rows / batch 2 = 4 steps per epoch: the resumed run crosses an epoch boundary
    full, part, resumed = tmp_path / "full", tmp_path / "part", tmp_path / "resumed"
    common = dict(save_strategy="steps", save_steps=n, learning_rate=5e-3)
    run(run_config(files, full, max_steps=2 * n, **common))
    run(run_config(files, part, max_steps=n, resume_from_checkpoint="auto", **common))  # auto: none yet
    assert_same_weights(weights(full / f"checkpoint-{n}"), weights(part / f"checkpoint-{n}"), atol=0)

    # an explicit checkpoint folder, into a fresh output_dir
    run(run_config(files, resumed, max_steps=2 * n, resume_from_checkpoint=str(part / f"checkpoint-{n}"), **common))
    assert [r["step"] for r in train_logs(resumed)] == list(range(n + 1, 2 * n + 1))  # really resumed
    assert_same_weights(weights(resumed), weights(full), atol=1e-6)

    # `auto`: the newest checkpoint in output_dir
    run(run_config(files, part, max_steps=2 * n, resume_from_checkpoint="auto", **common))
    assert [r["step"] for r in train_logs(part)] == list(range(1, 2 * n + 1))
    assert_same_weights(weights(part), weights(full), atol=1e-6)
    assert_same_weights(weights(part / f"checkpoint-{2 * n}"), weights(full / f"checkpoint-{2 * n}"), atol=1e-6)


@pytest.mark.parametrize("nll_coef", [0.0, 0.5])
def test_gradient_accumulation_matches_one_big_batch(tmp_path, tok, nll_coef):
    rows = arith_rows(8)
    final = {}
    for bs, ga in ((4, 1), (1, 4)):
        trainer, _ = direct_trainer(tmp_path / f"{bs}x{ga}", tok, rows, per_device_train_batch_size=bs,
                                    gradient_accumulation_steps=ga, max_steps=2, optim="sgd", learning_rate=2.0,
                                    lr_scheduler_type="constant", nll_coef=nll_coef, seed=11)
        trainer.train()
        final[bs, ga] = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
        losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
        final[bs, ga, "loss"] = losses
    start = dict(tiny_llama(0).named_parameters())
    moved = max((final[4, 1][n] - start[n]).abs().max().item() for n in start)
    assert moved > 1e-2
    for name in start:
        torch.testing.assert_close(final[1, 4][name], final[4, 1][name], rtol=0, atol=1e-5 * max(1.0, moved))
    assert final[1, 4, "loss"] == pytest.approx(final[4, 1, "loss"], abs=1e-5)


def test_precomputed_reference_equals_live_reference(files, tmp_path):
    live_summary, live = run(run_config(files, tmp_path / "live", max_steps=3))
    pre_summary, pre = run(run_config(files, tmp_path / "pre", max_steps=3, precompute_ref_log_probs=True))
    assert live.ref_model is not None and pre.ref_model is None  # no reference model kept in memory
    assert all(e.ref_logps is not None for e in pre.train_dataset.items)
    live_logs, pre_logs = train_logs(tmp_path / "live"), train_logs(tmp_path / "pre")
    assert len(live_logs) == len(pre_logs) == 3
    for a, b in zip(live_logs, pre_logs):
        for key in ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "nll"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-5), (a["step"], key)
    assert live_logs[-1]["rewards/margins"] != 0  # the later steps compare against a non-trivial reference


def test_precomputed_separate_reference_is_freed_before_training(files, tmp_path):
    ref_path = str(files / "ref")
    alive_at_train = []
    original = DPOTrainer.train

    def spy(self, *args, **kwargs):
        gc.collect()
        with warnings.catch_warnings():  # isinstance() on some deprecated module proxies warns
            warnings.simplefilter("ignore")
            alive_at_train.extend(o for o in gc.get_objects()
                                   if isinstance(o, PreTrainedModel) and o.name_or_path == ref_path)
        return original(self, *args, **kwargs)

    config = run_config(files, tmp_path / "pre_sep", max_steps=1, precompute_ref_log_probs=True,
                        ref_model_name_or_path=ref_path)
    with mock.patch.object(DPOTrainer, "train", spy):
        train_dpo(config)
    assert not alive_at_train, "the reference model is still in memory while training"
    first = train_logs(tmp_path / "pre_sep")[0]
    assert first["rewards/chosen"] != 0  # ... but its log-probs were used


def test_peft_reference_is_the_adapter_disabled_policy(files, tmp_path):
    _, trainer = run(run_config(files, tmp_path / "lora", use_peft=True, lora_r=4, lora_alpha=8, learning_rate=2e-2,
                             activation_checkpointing=True))
    assert trainer.ref_model is None
    logs = train_logs(tmp_path / "lora")
    assert logs[0]["rewards/chosen"] == 0 and logs[0]["rewards/rejected"] == 0  # lora_B starts at zero
    assert logs[0]["loss"] == LN2 or logs[0]["loss"] == pytest.approx(LN2, abs=1e-7)
    assert logs[1]["rewards/margins"] != 0

    start = weights(files / "policy")
    lora, base = {}, {}
    for name, p in trainer.model.named_parameters():
        (lora if "lora_" in name else base)[name] = p.detach()
        assert p.requires_grad == ("lora_" in name), name
    assert any(v.abs().max() > 0 for k, v in lora.items() if "lora_B" in k)  # the adapter learned
    for name, value in base.items():  # the base weights did not move
        key = name.removeprefix("base_model.model.").replace(".base_layer", "")
        assert torch.equal(value, start[key]), name
    assert len(base) == len(start)
    assert (tmp_path / "lora" / "adapter_model.safetensors").is_file()


def _dropout_checkpoint(root: Path, tok) -> str:
    """A tiny Phi-3 with both kinds of dropout transformers models use: `nn.Dropout` modules (residual
    dropout) and a float the attention function reads (`attention_dropout`, as in Llama, Qwen, Gemma)."""
    from transformers import Phi3Config, Phi3ForCausalLM

    torch.manual_seed(0)
    config = Phi3Config(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                        resid_pdrop=0.3, attention_dropout=0.3, pad_token_id=0, eos_token_id=2, bos_token_id=1)
    Phi3ForCausalLM(config).save_pretrained(root)
    tok.save_pretrained(root)
    return str(root)


def _deterministic_in_train_mode(model) -> bool:
    """Two forward passes of `model` in training mode give identical logits (no dropout active)."""
    ids = torch.arange(3, 40)[None]
    was = model.training
    model.train()
    with torch.no_grad():
        a, b = model(input_ids=ids).logits, model(input_ids=ids).logits
    model.train(was)
    return torch.equal(a, b)


@pytest.mark.parametrize("disable", [True, False])
def test_disable_dropout_turns_it_off_in_policy_and_reference(files, tmp_path, tok, disable):
    path = _dropout_checkpoint(tmp_path / "phi3", tok)
    assert not _deterministic_in_train_mode(AutoModelForCausalLM.from_pretrained(path))  # dropout is live
    _, trainer = run(run_config(files, tmp_path / "out", model_name_or_path=path, max_steps=1,
                                disable_dropout=disable))
    assert trainer.ref_model is not None
    for model in (trainer.model, trainer.ref_model):
        assert _deterministic_in_train_mode(model) == disable


def test_separate_reference_model(files, tmp_path):
    _, trainer = run(run_config(files, tmp_path / "sep", ref_model_name_or_path=str(files / "ref")))
    assert_same_weights(trainer.ref_model.state_dict(), weights(files / "ref"), atol=0)
    assert not any(p.requires_grad for p in trainer.ref_model.parameters())
    first = train_logs(tmp_path / "sep")[0]
    assert first["rewards/chosen"] != 0 and first["loss"] != pytest.approx(LN2, abs=1e-4)
