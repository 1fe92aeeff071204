"""`mtpo iterate` on CPU: the real loop (generate → grade → pairs → train) with a scripted policy.

The examples' tiny model has random weights and almost never answers correctly, so sampling here
goes through the real `run_generate` / rollout / grader with a scripted backend: it reads the
question from the rendered context, writes a ```python cell, then answers — correctly with
probability 1/2, drawn from the rollout's own per-turn seed. Every turn also spells the first hex
digits of the sampling model's weights, so the rollouts prove which model they were sampled from.
Training is real: the tiny model, a few steps.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from concurrent.futures import Future
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file

from mtpo.agent import iterate as it
from mtpo.agent.backends import Generated
from mtpo.config import ConfigError, build_config, load_config
from mtpo.data import RecordError

TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "tiny-model")
TRAIN = {"max_steps": 2, "per_device_train_batch_size": 2, "learning_rate": 1e-3, "logging_steps": 1,
         "save_strategy": "no", "report_to": "none", "use_cpu": True, "max_length": 512, "dtype": "float32"}


def weights_sha(model_dir: str) -> str:
    with open(os.path.join(model_dir, "model.safetensors"), "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()[:12]


class ScriptedBackend:
    """A policy: cell first, then a boxed answer, right with probability 1/2 (per-turn seed)."""

    def __init__(self, tokenizer, model_dir: str, kill_at_call: int | None = None):
        self.tok, self.tag, self.kill_at_call, self.calls = tokenizer, weights_sha(model_dir), kill_at_call, 0

    def generate(self, prompts_ids, params, seeds, max_new_tokens):
        self.calls += 1
        if self.calls == self.kill_at_call:
            raise Killed("killed during generation")
        outs = []
        for ids, seed in zip(prompts_ids, seeds):
            context = self.tok.decode(ids)
            a, b = map(int, re.findall(r"What is (\d+) \+ (\d+)\?", context)[-1])
            rng = random.Random(seed)
            if "```output" not in context:
                text = f"[{self.tag}] note {rng.randint(0, 999)}\n```python\nprint({a} + {b})\n```\n```output"
                outs.append(Generated(self.tok.encode(text, add_special_tokens=False), "stop", text))
            else:
                answer = a + b if rng.random() < 0.5 else a + b + 1
                text = f"[{self.tag}] The answer is \\boxed{{{answer}}}."
                ids_out = self.tok.encode(text, add_special_tokens=False) + [self.tok.convert_tokens_to_ids("<|im_end|>")]
                outs.append(Generated(ids_out, "eos", text))
        return outs


class EvalExecutor:
    """Runs `print(a + b)` cells by evaluating the sum (no sandbox needed for this fixed cell)."""

    def submit(self, key, code):
        fut = Future()
        a, b = map(int, re.findall(r"print\((\d+) \+ (\d+)\)", code)[0])
        fut.set_result(SimpleNamespace(output=f"{a + b}\n", ok=True, timed_out=False))
        return fut

    def close(self, key):
        pass

    def shutdown(self):
        pass


class Killed(Exception):
    """Stands in for SIGKILL: nothing after it runs."""


def make_runner(sampled: list, kill_generate: tuple[int, int] | None = None):
    """The in-process stage runner, with `generate` on the scripted backend; records what it sampled from."""
    from transformers import AutoTokenizer

    from mtpo.agent.evaluate import EvalConfig, run_eval
    from mtpo.agent.generate import GenerateConfig, run_generate

    def runner(command, values, yaml_path):
        if command not in ("generate", "eval"):
            return it.run_stage_inprocess(command, values, yaml_path)
        model = values["model_name_or_path"]
        sampled.append((command, model, weights_sha(model)))
        generations = sum(s[0] == "generate" for s in sampled)
        kill = kill_generate[1] if kill_generate and command == "generate" and generations == kill_generate[0] else None
        tok = AutoTokenizer.from_pretrained(model)
        stage = (run_generate, GenerateConfig) if command == "generate" else (run_eval, EvalConfig)
        stage[0](build_config(stage[1], values), tokenizer=tok, backend=ScriptedBackend(tok, model, kill),
                 executor=EvalExecutor())
    return runner


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one torch thread (conftest)


@pytest.fixture(scope="module")
def prompts_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "sums.jsonl"
    rng = random.Random(0)
    rows = [{"question": f"What is {a} + {b}?", "answer": f"#### {a + b}"}
            for a, b in ((rng.randint(10, 99), rng.randint(10, 99)) for _ in range(8))]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def config(out, prompts_file, **overrides) -> it.IterateConfig:
    values = {"model_name_or_path": TINY, "output_dir": str(out), "prompts": [prompts_file], "iterations": 2,
              "samples_per_prompt": 4, "seed": 3, "train": dict(TRAIN), "generate": {"prompts_per_round": 1},
              **overrides}
    return build_config(it.IterateConfig, values)


def run(out, prompts_file, sampled=None, kill_generate=None, **overrides):
    sampled = [] if sampled is None else sampled
    return it.run_iterate(config(out, prompts_file, **overrides), runner=make_runner(sampled, kill_generate)), sampled


def without_seconds(lines):
    return [{k: v for k, v in line.items() if k != "seconds"} for line in lines]


@pytest.fixture(scope="module")
def dpo_fixed(tmp_path_factory, prompts_file):
    out = tmp_path_factory.mktemp("dpo_fixed")
    lines, sampled = run(out, prompts_file)
    return out, lines, sampled


def check_loop(out, lines, sampled, reference: str | None):
    start = weights_sha(TINY)
    it1, it2 = str(out / "iter_1" / "model"), str(out / "iter_2" / "model")
    sampled = [s[1:] for s in sampled if s[0] == "generate"]
    assert [s[0] for s in sampled] == [TINY, it1]  # iteration 2 samples from iteration 1's model …
    assert sampled[1][1] == weights_sha(it1) != start  # … whose weights were trained
    tags = {json.loads(line)["messages"][-1]["content"][1:13] for line in open(out / "iter_2" / "rollouts.jsonl")}
    assert tags == {weights_sha(it1)}  # every iteration-2 trajectory was written by those weights
    for k, line in enumerate(lines, start=1):
        assert line["iteration"] == k and line["model"] == str(out / f"iter_{k}" / "model")
        assert line["train_rows"] > 0 and line["train_skipped"] is None and line["train_steps"] == 2
        assert 0 < line["sampling_accuracy"] < 1 and line["train_loss"] is not None
        assert line["reference"] == (None if reference is None else TINY if reference == "fixed" else
                                     [TINY, it1][k - 1])
        assert os.path.isfile(out / f"iter_{k}" / "stages" / "train.json")
        # the reported numbers, recomputed from the files they describe
        rollouts = [json.loads(x) for x in open(out / f"iter_{k}" / "rollouts.jsonl")]
        assert line["sampling_accuracy"] == sum(r["correct"] for r in rollouts) / len(rollouts)
        assert line["pairs"] == sum(1 for _ in open(out / f"iter_{k}" / "pairs.jsonl"))
        logged = [json.loads(x) for x in open(out / f"iter_{k}" / "model" / "metrics.jsonl")]
        assert line["train_loss"] == [r for r in logged if "loss" in r][-1]["loss"]
        assert not [n for n in os.listdir(out / f"iter_{k}" / "model") if n.startswith("checkpoint-")]
    assert os.path.realpath(out / "final") == os.path.realpath(it2)
    assert [json.loads(x) for x in open(out / "iterations.jsonl")][-2:] == lines
    # each iteration sampled its own half of the prompt file
    ids = [{json.loads(x)["prompt_id"] for x in open(out / f"iter_{k}" / "rollouts.jsonl")} for k in (1, 2)]
    assert len(ids[0]) == len(ids[1]) == 4 and not ids[0] & ids[1]


def test_dpo_fixed_reference(dpo_fixed):
    out, lines, sampled = dpo_fixed
    check_loop(out, lines, sampled, "fixed")
    assert all(line["pairs"] > 0 and line["reward_accuracy"] is not None for line in lines)
    train2 = load_config(it.stage_class("train", "dpo"), str(out / "iter_2" / "train.yaml"))
    assert train2.ref_model_name_or_path == TINY and train2.model_name_or_path == str(out / "iter_1" / "model")


def test_dpo_previous_reference_with_eval(tmp_path, prompts_file):
    lines, sampled = run(tmp_path, prompts_file, reference="previous", eval_prompts=prompts_file, eval={"limit": 3})
    assert lines[0]["iteration"] == 0 and lines[0]["model"] == TINY
    check_loop(tmp_path, lines[1:], sampled, "previous")
    evaluated = [s[1] for s in sampled if s[0] == "eval"]
    assert evaluated == [TINY] + [str(tmp_path / f"iter_{k}" / "model") for k in (1, 2)]
    for k, line in enumerate(lines):
        results = json.loads((tmp_path / f"iter_{k}" / "eval" / "results.json").read_text())
        assert line["eval"]["pass@1"] == results["pass@1"] and line["eval"]["problems"] == 3


def test_kto(tmp_path, prompts_file):
    lines, sampled = run(tmp_path, prompts_file, algorithm="kto")
    check_loop(tmp_path, lines, sampled, "fixed")
    assert all(line["kto_rows"]["desirable"] and line["kto_rows"]["undesirable"] for line in lines)


def assert_same_run(out, reference):
    ref_out, ref_lines, _ = reference
    lines = [json.loads(x) for x in open(out / "iterations.jsonl")]
    strip = lambda ls: json.loads(json.dumps(without_seconds(ls)).replace(str(out), "OUT"))  # noqa: E731
    assert strip(lines) == json.loads(json.dumps(without_seconds(ref_lines)).replace(str(ref_out), "OUT"))
    a, b = load_file(out / "final" / "model.safetensors"), load_file(ref_out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)


def test_killed_during_generation_resumes_to_the_same_result(tmp_path, prompts_file, dpo_fixed):
    sampled = []
    with pytest.raises(Killed):  # iteration 2's generation dies on its 5th backend call (3rd prompt)
        run(tmp_path, prompts_file, sampled, kill_generate=(2, 5))
    done = [json.loads(x)["prompt_id"] for x in open(tmp_path / "iter_2" / "rollouts.jsonl")]
    assert len(set(done)) == 2 and not (tmp_path / "iter_2" / "stages" / "generate.json").exists()
    run(tmp_path, prompts_file)
    assert_same_run(tmp_path, dpo_fixed)


KILL_IN_TRAINING = """
import os, signal, sys
sys.path.insert(0, {tests!r})
import torch
torch.set_num_threads(1)
import test_iterate as t
from mtpo.trainers.base import MTPOTrainer
real_step, calls = MTPOTrainer.training_step, []
def dying_step(self, *args, **kwargs):
    calls.append(1)
    if len(calls) == 4:  # iteration 2, step 2: checkpoint-1 exists
        os.kill(os.getpid(), signal.SIGKILL)
    return real_step(self, *args, **kwargs)
MTPOTrainer.training_step = dying_step
t.run({out!r}, {prompts!r}, train={train!r})
"""


def test_sigkilled_during_training_resumes_from_checkpoint(tmp_path, prompts_file, dpo_fixed, monkeypatch):
    """A real SIGKILL (no cleanup runs) of a separate process in training, then a fresh resume here."""
    import signal
    import subprocess
    import sys

    from mtpo.trainers.base import MTPOTrainer

    train = {**TRAIN, "save_strategy": "steps", "save_steps": 1}
    script = KILL_IN_TRAINING.format(tests=os.path.dirname(os.path.abspath(__file__)), out=str(tmp_path),
                                     prompts=prompts_file, train=train)
    killed = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"},
                            capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    model_dir = tmp_path / "iter_2" / "model"
    assert sorted(n for n in os.listdir(model_dir) if n.startswith("checkpoint-")) == ["checkpoint-1"]
    assert not (tmp_path / "iter_2" / "stages" / "train.json").exists()
    real_step, calls = MTPOTrainer.training_step, []

    def counting_step(self, *args, **kwargs):
        calls.append(self.args.output_dir)
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(MTPOTrainer, "training_step", counting_step)
    run(tmp_path, prompts_file, train=train)
    assert calls == [str(model_dir)]  # only step 2 ran again: step 1 came from checkpoint-1
    assert_same_run(tmp_path, dpo_fixed)


def test_iteration_without_pairs_skips_training_loudly(tmp_path, prompts_file, capsys, monkeypatch):
    monkeypatch.setattr(random.Random, "random", lambda self: 0.0)  # the scripted policy is always right
    lines, sampled = run(tmp_path, prompts_file)
    assert [line["pairs"] for line in lines] == [0, 0]
    assert all(line["train_skipped"].startswith("no preference pairs") for line in lines)
    assert [line["model"] for line in lines] == [TINY, TINY] and [s[1] for s in sampled] == [TINY, TINY]
    assert lines[0]["prompts_skipped"]["all_correct"] == 4
    assert "training SKIPPED" in capsys.readouterr().out
    assert os.path.realpath(tmp_path / "final") == os.path.realpath(TINY)  # nothing trained: the start


def test_bad_config_fails_before_anything_runs(tmp_path, prompts_file):
    with pytest.raises(ConfigError, match="train: unknown option 'betaa'"):
        config(tmp_path, prompts_file, train={"betaa": 0.1}).check()
    with pytest.raises(ConfigError, match="generate: unknown option"):
        config(tmp_path, prompts_file, generate={"temprature": 1.0}).check()
    with pytest.raises(ConfigError, match="train.output_dir is set by mtpo iterate"):
        config(tmp_path, prompts_file, train={"output_dir": "x"})
    with pytest.raises(ConfigError, match="3 files for 2 iterations"):
        config(tmp_path, prompts_file, prompts=[prompts_file] * 3).check()
    assert not os.listdir(tmp_path)


def test_rerun_with_a_different_config_is_refused(tmp_path, prompts_file):
    cfg = config(tmp_path, prompts_file, iterations=1, samples_per_prompt=2, train={**TRAIN, "max_steps": 1})
    it.check_same_run(cfg)
    with pytest.raises(ConfigError, match="different config \\(seed"):
        it.check_same_run(config(tmp_path, prompts_file, iterations=1, samples_per_prompt=2, seed=4,
                                 train={**TRAIN, "max_steps": 1}))
    shutil.rmtree(tmp_path)


@pytest.mark.parametrize("name", ["m-dpo-gemma-7b-fixed", "m-dpo-gemma-7b-previous"])
def test_paper_recipes(name):
    root = os.path.dirname(TINY).rsplit(os.sep, 1)[0]
    cfg = load_config(it.IterateConfig, os.path.join(root, "configs", "iterate", f"{name}.yaml"))
    cfg.train["use_cpu"] = True  # bf16 is refused on a machine without a GPU unless training is on CPU
    cfg.check_blocks()  # every nested option is one its command accepts
    train = build_config(it.stage_class("train", "dpo"), it.stage_values(cfg, "train", placeholders=True))
    processes = int(cfg.train_launch[cfg.train_launch.index("--num_processes") + 1])
    assert processes * train.per_device_train_batch_size * train.gradient_accumulation_steps == 32
    assert train.beta == 0.1 and 2e-7 <= train.learning_rate <= 4e-7 and train.max_length == 2048
    assert train.lr_scheduler_type.value == "cosine" and train.warmup_steps == 0.1
    assert cfg.iterations == len(cfg.prompts) == 3 and cfg.reference == name.rsplit("-", 1)[1]


def test_example_config_is_valid():
    root = os.path.dirname(TINY).rsplit(os.sep, 1)[0]
    cfg = load_config(it.IterateConfig, os.path.join(root, "examples", "iterate.yaml"))
    cfg.check_blocks()
    assert cfg.iterations == 2 and cfg.model_name_or_path == "examples/tiny-model"


def test_stage_yaml_reruns_by_hand_in_a_subprocess(dpo_fixed, tmp_path, monkeypatch):
    """iter_1/train.yaml is the exact command: `python -m mtpo dpo` on it retrains the same weights."""
    import yaml

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as in this process (thread count can change float sums)
    out = dpo_fixed[0]
    values = yaml.safe_load(open(out / "iter_1" / "train.yaml"))
    values["output_dir"] = str(tmp_path / "model")
    path = tmp_path / "train.yaml"
    path.write_text(yaml.safe_dump(values))
    it.subprocess_runner()("dpo", values, str(path))
    a, b = load_file(tmp_path / "model" / "model.safetensors"), load_file(out / "iter_1" / "model" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)


def test_stage_values_per_algorithm_and_reference(tmp_path, prompts_file):
    """What each trainer is given: its own rows file, the policy, and the reference of the mode."""
    for algorithm, data in (("dpo", "pairs.jsonl"), ("kto", "kto.jsonl"), ("sft", "sft.jsonl")):
        for reference in ("fixed", "previous"):
            cfg = config(tmp_path, prompts_file, algorithm=algorithm, reference=reference)
            cfg.check_blocks()
            values = it.stage_values(cfg, "train", iteration=2, workdir="w", policy="prev", reference="ref")
            assert values["train_data"] == os.path.join("w", data) and values["model_name_or_path"] == "prev"
            assert values.get("ref_model_name_or_path") == (None if algorithm == "sft" else "ref")
    def seeds():
        return {(k, s): it.stage_values(config(tmp_path, prompts_file), s, iteration=k, workdir=str(tmp_path))["seed"]
                for k in (1, 2) for s in ("generate", "pairs", "train")}

    assert len(set(seeds().values())) == 6  # a different seed per iteration and stage …
    assert seeds() == seeds()  # … the same on every run


def test_example_runs_with_the_real_hf_backend(tmp_path, capsys, monkeypatch):
    """examples/iterate.yaml as shipped (shortened): real sampling with the random tiny model, the
    default in-process runner; with no correct answer every iteration skips training, counted."""
    root = os.path.dirname(TINY).rsplit(os.sep, 1)[0]
    monkeypatch.chdir(root)
    cfg = load_config(it.IterateConfig, "examples/iterate.yaml",
                      [f"--output_dir={tmp_path}", "--samples_per_prompt=2", "--eval_prompts=null",
                       "--generate={max_new_tokens: 8, max_tool_calls: 1, max_length: 256, device: cpu, cpu_threads: 1}"])
    lines = it.run_iterate(cfg)
    assert [line["trajectories"] for line in lines] == [8, 8]  # 8 prompts split in 2 × 2 samples
    assert all(line["train_skipped"] and line["model"] == "examples/tiny-model" for line in lines)
    assert "(training skipped)" in capsys.readouterr().out


def test_drop_checkpoints_renames_before_deleting(tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    for name in ("checkpoint-1", "checkpoint-2", ".deleting-checkpoint-0"):  # the last: a killed earlier deletion
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text("{}")
    (tmp_path / "model.safetensors").write_text("weights")
    it.drop_checkpoints(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["model.safetensors"] and get_last_checkpoint(str(tmp_path)) is None


def test_a_bad_prompt_row_fails_before_anything_runs_naming_the_users_file(tmp_path, prompts_file):
    """QA: the row used to be reported in iter_k/prompts.jsonl numbering, when iteration k started
    (after k−1 trainings, or after the start model's eval)."""
    rows = [json.loads(line) for line in open(prompts_file)]
    del rows[6]["answer"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    with pytest.raises(RecordError, match=f"{bad}: row 6: missing field `answer`"):
        it.run_iterate(config(out, str(bad), eval_prompts=prompts_file), runner=make_runner([]))
    assert not out.exists()
    with pytest.raises(RecordError, match=f"{bad}: row 6: missing field `answer`"):  # the eval set too
        config(out, prompts_file, eval_prompts=str(bad), eval={"limit": 8}).check()
