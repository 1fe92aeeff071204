"""Whole runs of `mtpo dpo` as a user starts them (subprocesses): interrupt + resume, one run per
output_dir, the final summary's eval metrics, and LoRA's merged checkpoint (`mtpo.runs`,
`mtpo.trainers.setup`).

The interrupted run receives its signal from inside the run, at the end of step 2 (a callback that
calls os.kill on its own process), so the test does not depend on timing; what happens next is
the real signal path: the handler, the checkpoint, the one-line message, the exit status.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtpo.runs import truncate_metrics

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "examples" / "tiny-model"
DATA = ROOT / "examples" / "data"
STEPS = 6

# Runs `mtpo <argv>`; with KILL_AT_STEP=N the process sends itself KILL_SIGNAL at the end of step N.
LAUNCHER = """
import os, signal, sys
from transformers import TrainerCallback
if os.environ.get("KILL_AT_STEP"):
    from mtpo.trainers.base import MTPOTrainer

    class Kill(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step == int(os.environ["KILL_AT_STEP"]):
                os.kill(os.getpid(), getattr(signal, os.environ["KILL_SIGNAL"]))

    init = MTPOTrainer.__init__
    def patched(self, *a, **k):
        init(self, *a, **k)
        self.add_callback(Kill())
    MTPOTrainer.__init__ = patched
from mtpo.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _rows(name: str, n: int) -> list[str]:
    with open(DATA / name, encoding="utf-8") as f:
        return f.readlines()[:n]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("runs_data")
    (root / "train.jsonl").write_text("".join(_rows("dpo_research.jsonl", 8)), encoding="utf-8")
    (root / "eval.jsonl").write_text("".join(_rows("eval_dpo.jsonl", 4)), encoding="utf-8")
    return root


def mtpo(data: Path, out: Path, *args: str, kill: tuple[int, str] | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", CUDA_VISIBLE_DEVICES="",
               PYTHONPATH=os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "KILL_AT_STEP", "KILL_SIGNAL"):
        env.pop(key, None)
    if kill:
        env["KILL_AT_STEP"], env["KILL_SIGNAL"] = str(kill[0]), kill[1]
    cmd = [sys.executable, "-c", LAUNCHER, "dpo", f"--model_name_or_path={TINY}", f"--train_data={data / 'train.jsonl'}",
           f"--output_dir={out}", "--per_device_train_batch_size=2", "--learning_rate=5e-3", f"--max_steps={STEPS}",
           "--lr_scheduler_type=linear", "--logging_steps=1", "--save_strategy=no", "--eval_strategy=no", "--seed=3",
           "--use_cpu", "--report_to=none", "--disable_tqdm", "--max_length=1024", *args]
    return subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)


def metrics(out: Path) -> list[dict]:
    with open(out / "metrics.jsonl", encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.fixture(scope="module")
def full(data, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The uninterrupted run (with an evaluation at its last step, for the summary test)."""
    out = tmp_path_factory.mktemp("runs") / "full"
    proc = mtpo(data, out, f"--eval_data={data / 'eval.jsonl'}", "--eval_strategy=steps", f"--eval_steps={STEPS}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, proc


def test_sigterm_saves_a_checkpoint_and_resume_equals_the_uninterrupted_run(data, full, tmp_path):
    out = tmp_path / "run"
    first = mtpo(data, out, "--resume_from_checkpoint=auto", kill=(2, "SIGTERM"))
    assert first.returncode == 143, first.stderr[-3000:]
    assert "resume_from_checkpoint=auto: no checkpoint" in first.stderr and "starting fresh" in first.stderr
    last = first.stderr.strip().splitlines()[-1]
    assert last.startswith("mtpo dpo: stopped by SIGTERM at step 2: checkpoint saved to ")
    assert last.endswith("--resume_from_checkpoint=auto") and "Traceback" not in first.stderr
    assert (out / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (out / "model.safetensors").exists()  # stopped, not finished

    second = mtpo(data, out, "--resume_from_checkpoint=auto")
    assert second.returncode == 0, second.stderr[-3000:]
    assert f"resuming from {out / 'checkpoint-2'} (step 2)" in second.stderr
    assert "missing keys" not in second.stderr  # tied embeddings (lm_head = embed_tokens) are not missing
    records = metrics(out)
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))  # each step once
    assert sum("train_runtime" in r for r in records) == 1  # one run's summary, not the stopped one's too
    full_losses = [r["loss"] for r in metrics(full[0]) if "loss" in r]
    assert [r["loss"] for r in records if "loss" in r] == pytest.approx(full_losses, rel=1e-5)
    assert_same_weights(out, full[0])


def test_sigint_saves_a_checkpoint_and_exits_130(data, tmp_path):
    out = tmp_path / "run"
    proc = mtpo(data, out, kill=(1, "SIGINT"))
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "KeyboardInterrupt" not in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("mtpo dpo: stopped by SIGINT at step 1: checkpoint saved")
    assert (out / "checkpoint-1" / "model.safetensors").is_file()


def test_final_summary_includes_eval_metrics(full):
    out, proc = full
    lines = proc.stdout.splitlines()
    done = next(i for i, line in enumerate(lines) if line.startswith("done: "))
    summary = "\n".join(lines[done:])
    for key in ("eval_loss", "eval_rewards/accuracies", "eval_rewards/margins"):
        assert f"  {key} " in summary, summary
    evals = [r for r in metrics(out) if "eval_loss" in r]
    shown = next(line for line in lines[done:] if line.strip().startswith("eval_loss "))
    assert float(shown.split()[-1]) == pytest.approx(evals[-1]["eval_loss"], abs=1e-4)


def test_a_finished_output_dir_is_refused_unless_resuming_or_overwriting(data, full, tmp_path):
    import shutil

    out = tmp_path / "copy"
    shutil.copytree(full[0], out)
    again = mtpo(data, out)
    assert again.returncode == 2
    assert again.stderr.strip().splitlines() == [
        f"mtpo dpo: error: output_dir {out} already holds a run (metrics.jsonl, mtpo_config.yaml); continue it "
        "with --resume_from_checkpoint=auto, start over with --overwrite_output_dir=true, or choose another output_dir"]
    over = mtpo(data, out, "--overwrite_output_dir=true", "--max_steps=1")
    assert over.returncode == 0, over.stderr[-3000:]
    assert [r["step"] for r in metrics(out) if "loss" in r] == [1]  # the old run's records are gone


def test_truncate_metrics_keeps_what_the_checkpoint_had_logged(tmp_path):
    path = tmp_path / "metrics.jsonl"
    records = [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.9}, {"step": 2, "eval_loss": 0.8},
               {"step": 2, "train_runtime": 3.0}, {"step": 3, "loss": 0.7}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    truncate_metrics(str(path), 2)
    assert metrics(tmp_path) == records[:3]


def test_lora_save_merged_writes_a_plain_model_with_the_adapters_logits(data, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "lora"
    proc = mtpo(data, out, "--use_peft", "--save_merged", "--max_steps=2", "--learning_rate=5e-2", "--lora_r=4",
                "--lora_target_modules=[q_proj,v_proj,down_proj]")
    assert proc.returncode == 0, proc.stderr[-3000:]
    merged_dir = out / "merged"
    assert (merged_dir / "model.safetensors").is_file() and not (merged_dir / "adapter_config.json").exists()
    tok = AutoTokenizer.from_pretrained(merged_dir)
    assert tok.chat_template == AutoTokenizer.from_pretrained(TINY).chat_template
    text = tok.apply_chat_template([{"role": "user", "content": "What is 2 + 3?"},
                                    {"role": "assistant", "content": "It is 5."}], tokenize=False)
    ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32)
    base = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(ids).logits
        adapter = PeftModel.from_pretrained(base, out)
        adapter_logits, merged_logits = adapter(ids).logits, merged(ids).logits
    assert (adapter_logits - base_logits).abs().max() > 1e-3  # the adapter changed the model: not vacuous
    torch.testing.assert_close(merged_logits, adapter_logits, rtol=1e-4, atol=1e-4)
