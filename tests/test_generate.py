"""`mtpo generate` / `mtpo eval` end to end: the real HF backend on the tiny example model (seeded
determinism, batch independence, resume, sharding, CLI), maj@k grouping by equivalence, and the
vLLM glue against a fake engine."""

from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from test_rollout import FakeExecutor, ScriptedBackend

from mtpo.agent.backends import Generated, HFBackend, SamplingParams, VLLMBackend, split_finish
from mtpo.agent.evaluate import EvalConfig, majority_vote, run_eval
from mtpo.agent.generate import GenerateConfig, in_shard, read_complete, run_generate
from mtpo.agent.rollout import Rollout, RolloutConfig, turn_seed
from mtpo.config import load_config
from mtpo.render import ChatRenderer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "examples", "tiny-model")
GSM8K = os.path.join(ROOT, "examples", "data", "gsm8k_mini.jsonl")


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny models: one torch thread (conftest)


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(TINY).eval()


def gen_config(tmp_path, name="out.jsonl", **kw) -> GenerateConfig:
    values = {"model_name_or_path": TINY, "prompts": GSM8K, "limit": 4, "samples_per_prompt": 2,
              "max_new_tokens": 8, "max_length": 512, "device": "cpu", "output_file": str(tmp_path / name), **kw}
    return GenerateConfig(**values)


def generate(cfg, model, tok, **kw) -> list[dict]:
    run_generate(cfg, model=model, tokenizer=tok, executor=FakeExecutor(), **kw)
    with open(cfg.output_file, encoding="utf-8") as f:
        return sorted((json.loads(line) for line in f), key=lambda r: (r["prompt_id"], r["sample"]))


def test_hf_run_is_seeded_and_independent_of_batching(tmp_path, tiny_model, tiny_tok):
    a = generate(gen_config(tmp_path, "a.jsonl"), tiny_model, tiny_tok)
    b = generate(gen_config(tmp_path, "b.jsonl", batch_size=3, prompts_per_round=1), tiny_model, tiny_tok)
    c = generate(gen_config(tmp_path, "c.jsonl", seed=1), tiny_model, tiny_tok)
    assert len(a) == 8 and [(r["prompt_id"], r["sample"]) for r in a][:2] == [("gsm8k_mini/0", 0), ("gsm8k_mini/0", 1)]
    assert a == b  # each trajectory samples from its own seeded stream: batch composition does not matter
    assert [r["messages"] for r in a] != [r["messages"] for r in c]
    assert a[0]["messages"][1] != a[1]["messages"][1]  # two samples of one prompt differ
    assert {r["finish_reason"] for r in a} <= {"max_tokens", "no_code", "answered"}
    assert all(0 < r["num_generated_tokens"] <= 8 for r in a)


def test_resume_keeps_complete_prompts_and_regenerates_the_rest(tmp_path, tiny_model, tiny_tok):
    cfg = gen_config(tmp_path, "full.jsonl")
    full = generate(cfg, tiny_model, tiny_tok)
    lines = open(cfg.output_file, encoding="utf-8").read().splitlines(keepends=True)
    kill = gen_config(tmp_path, "killed.jsonl")
    with open(kill.output_file, "w", encoding="utf-8") as f:  # prompt 0 complete, half of another, a torn line
        f.writelines(lines[:3])
        f.write(lines[3][:40])
    kept_first = lines[:2]
    summary = run_generate(kill, model=tiny_model, tokenizer=tiny_tok, executor=FakeExecutor())
    assert summary["prompts_generated_now"] == 3 and summary["trajectories"] == 8
    resumed = open(kill.output_file, encoding="utf-8").read().splitlines(keepends=True)
    assert resumed[:2] == kept_first  # untouched
    assert sorted(map(json.loads, resumed), key=lambda r: (r["prompt_id"], r["sample"])) == full
    again = run_generate(kill, model=tiny_model, tokenizer=tiny_tok, executor=FakeExecutor())
    assert again["prompts_generated_now"] == 0 and open(kill.output_file).read().splitlines(keepends=True) == resumed


def test_shards_union_is_the_unsharded_run(tmp_path, tiny_model, tiny_tok):
    whole = generate(gen_config(tmp_path, "all.jsonl", limit=8, samples_per_prompt=1), tiny_model, tiny_tok)
    parts = [generate(gen_config(tmp_path, f"s{i}.jsonl", limit=8, samples_per_prompt=1, shard=f"{i}/3"),
                      tiny_model, tiny_tok) for i in range(3)]
    assert all(parts) and sum(map(len, parts)) == len(whole) == 8
    assert sorted((r for p in parts for r in p), key=lambda r: r["prompt_id"]) == whole
    for i, part in enumerate(parts):
        assert all(in_shard(r["prompt_id"], (i, 3)) for r in part)


def test_cli_prints_the_summary(tmp_path, capsys):
    from mtpo.agent.generate import cli

    out = tmp_path / "cli.jsonl"
    code = cli([os.path.join(ROOT, "examples", "generate.yaml"), f"--output_file={out}", "--limit=2",
                "--max_new_tokens=8", f"--prompts={GSM8K}", f"--model_name_or_path={TINY}"])
    summary = json.loads(capsys.readouterr().out)
    assert code == 0 and summary["trajectories"] == 4 and summary["prompts"] == 2
    assert sum(summary["finish_reasons"].values()) == 4 and summary["tokens_per_second"] > 0
    assert summary["generated_tokens_now"] == sum(r["num_generated_tokens"] for r in map(json.loads, open(out)))
    assert cli([os.path.join(ROOT, "examples", "generate.yaml"), "--sampels_per_prompt=2"]) == 2
    assert "did you mean 'samples_per_prompt'" in capsys.readouterr().err


def test_config_loading_and_validation(tmp_path):
    cfg = load_config(GenerateConfig, os.path.join(ROOT, "examples", "generate.yaml"), ["--shard=1/4"])
    assert cfg.shard == "1/4" and cfg.sandbox["timeout_s"] == 5
    from mtpo.config import ConfigError

    for bad in (["--shard=4/4"], ["--backend=tgi"], ["--samples_per_prompt=0"]):
        with pytest.raises(ConfigError):
            load_config(GenerateConfig, None, bad)
    assert load_config(EvalConfig, os.path.join(ROOT, "examples", "eval.yaml")).max_tool_calls == 4
    assert EvalConfig().max_tool_calls == 4 and GenerateConfig().max_tool_calls == 6


def test_hf_backend_stops_on_a_stop_string(tiny_model, tiny_tok):
    """Whatever the random model writes, a piece of it used as stop string must cut right there."""
    renderer = ChatRenderer(tiny_tok)
    backend = HFBackend(tiny_model, tiny_tok, renderer.end_of_turn_texts)
    ctx = renderer.generation_context([{"role": "user", "content": "What is 6 times 7?"}])[1]
    free = backend.generate([ctx], SamplingParams(1.0, 1.0, ()), [3], [24])[0]
    text = tiny_tok.decode(free.token_ids)
    stop = text[10:14]
    assert stop.strip() and stop not in text[:13]
    cut = backend.generate([ctx], SamplingParams(1.0, 1.0, (stop,)), [3], [24])[0]
    assert cut.finish == "stop" and cut.token_ids == free.token_ids[: len(cut.token_ids)]
    assert stop in tiny_tok.decode(cut.token_ids) and stop not in tiny_tok.decode(cut.token_ids[:-1])


def test_split_finish(tiny_tok):
    dec = lambda ids: tiny_tok.decode(ids)  # noqa: E731
    ids = tiny_tok.encode("x = 1\n```\n```output\nmore", add_special_tokens=False)
    g = split_finish(ids + [0, 0], [2], ["```output"], dec)
    assert g.finish == "stop" and dec(g.token_ids).endswith("```output")
    g = split_finish(ids[:3] + [2, 0, 0], [2], ["```output"], dec)
    assert g.finish == "eos" and g.token_ids == ids[:3] + [2]
    assert split_finish(ids[:3], [2], ["zzz"], dec).finish == "length"


# ---------------------------------------------------------------------------------------------- eval


def test_majority_vote_groups_by_equivalence():
    from mtpo.agent.grade import is_equivalent

    votes = ["3", "\\frac{1}{2}", "3", "0.5", None, "1/2"]
    assert majority_vote(votes, is_equivalent) == ("\\frac{1}{2}", 3)
    assert majority_vote(votes, lambda a, b: a == b) == ("3", 2)  # what string equality would pick
    assert majority_vote(["8", "7", "8", "7.0"], is_equivalent) == ("8", 2)  # a tie: the first group
    assert majority_vote([None, None], is_equivalent) == (None, 0)


def test_run_eval_pass1_majk_and_breakdown(tmp_path, tiny_tok):
    rows = [{"problem": "Half of one?", "solution": "It is $\\boxed{\\frac12}$.", "type": "Algebra", "level": "Level 1"},
            {"problem": "Seven?", "solution": "$\\boxed{7}$", "type": "Geometry", "level": "Level 2"}]
    data = tmp_path / "math.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    answers = {"math/0": ["0.5", "\\frac{1}{2}", "3", "3", "1/2"],  # greedy (sample 0) right; maj right
               "math/1": ["8", "7", "8", "none", "7.0"]}  # greedy wrong; maj tie 8 vs 7 → 8 (first); pass@5 right

    class Voter(ScriptedBackend):
        def generate(self, prompts_ids, params, seeds, max_new_tokens):
            outs = []
            for seed in seeds:
                pid, s = sample_of[seed]
                a = answers[pid][s]
                text = "No idea." if a == "none" else f"So \\boxed{{{a}}}."
                outs.append(Generated(tiny_tok.encode(text, add_special_tokens=False) + [self.eot], "eos"))
            return outs

    sample_of = {turn_seed(0, pid, s, 0): (pid, s) for pid in answers for s in range(5)}
    cfg = EvalConfig(model_name_or_path=TINY, prompts=str(data), maj_k=5, output_dir=str(tmp_path / "eval"))
    res = run_eval(cfg, tokenizer=tiny_tok, backend=Voter(ChatRenderer(tiny_tok), {}), executor=FakeExecutor())
    assert (res["pass@1"], res["maj@5"], res["pass@5"]) == (0.5, 0.5, 1.0)
    assert res["by_subject"]["Algebra"]["maj@5"] == 1.0 and res["by_subject"]["Geometry"]["maj@5"] == 0.0
    assert res["by_level"]["Level 2"] == {"problems": 1, "pass@1": 0.0, "maj@5": 0.0, "pass@5": 1.0}
    assert res["summaries"]["samples"]["finish_reasons"] == {"answered": 9, "no_code": 1}
    md = (tmp_path / "eval" / "results.md").read_text()
    assert "| **all** | 2 | 50.0 | 50.0 | 100.0 |" in md and "| Geometry | 1 | 0.0 | 0.0 | 100.0 |" in md
    assert json.loads((tmp_path / "eval" / "results.json").read_text())["maj@5"] == 0.5


# ---------------------------------------------------------------------------------------------- vLLM


class FakeSamplingParams:
    def __init__(self, **kw):
        self.kw = kw


class FakeLLM:
    """vLLM's `LLM.generate` surface: RequestOutput-like objects, one per prompt, in order."""

    def __init__(self, replies):
        self.replies, self.calls = replies, []

    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self.calls.append((prompts, sampling_params))
        return [SimpleNamespace(outputs=[SimpleNamespace(**self.replies[i % len(self.replies)])])
                for i, _ in enumerate(prompts)]


def test_vllm_glue_against_a_fake_engine(tiny_tok):
    renderer = ChatRenderer(tiny_tok)
    eot = tiny_tok.convert_tokens_to_ids("<|im_end|>")
    code = tiny_tok.encode("```python\nprint(6 * 7)\n```\n```output", add_special_tokens=False)
    answer = tiny_tok.encode("So \\boxed{42}.", add_special_tokens=False) + [eot]
    replies = [{"token_ids": code, "text": "", "finish_reason": "stop", "stop_reason": "```output"},
               {"token_ids": answer, "text": "", "finish_reason": "stop", "stop_reason": None}]
    engine = FakeLLM(replies)
    backend = VLLMBackend(tokenizer=tiny_tok, end_texts=renderer.end_of_turn_texts, engine=engine,
                          sampling_params_cls=FakeSamplingParams)
    assert backend.eos_ids == [eot]
    outs = backend.generate([[1, 2], [3]], SamplingParams(0.5, 0.9), [11, 12], [100, 7])
    assert [o.finish for o in outs] == ["stop", "eos"] and outs[1].token_ids == answer
    prompts, params = engine.calls[0]
    assert prompts == [{"prompt_token_ids": [1, 2]}, {"prompt_token_ids": [3]}]
    assert [p.kw["seed"] for p in params] == [11, 12] and [p.kw["max_tokens"] for p in params] == [100, 7]
    assert params[0].kw["stop"] == ["```output"] and params[0].kw["stop_token_ids"] == [eot]
    assert params[0].kw["temperature"] == 0.5 and params[0].kw["top_p"] == 0.9
    length = VLLMBackend(tokenizer=tiny_tok, engine=FakeLLM([{"token_ids": [5], "text": "", "finish_reason": "length",
                                                              "stop_reason": None}]), sampling_params_cls=FakeSamplingParams)
    assert length.generate([[1]], SamplingParams(), [0], [1])[0].finish == "length"
    # the whole loop through the vLLM backend: code turn, tool turn, answer
    from mtpo.agent.prompts import Prompt

    rollout = Rollout(VLLMBackend(tokenizer=tiny_tok, end_texts=renderer.end_of_turn_texts, engine=_TurnEngine(replies),
                                  sampling_params_cls=FakeSamplingParams), renderer, FakeExecutor(), RolloutConfig())
    (rec,) = rollout.run([Prompt("p/0", [{"role": "user", "content": "6*7?"}], "42")])
    assert (rec["finish_reason"], rec["correct"], rec["num_tool_calls"], rec["consistency"]) == ("answered", True, 1, "ok")


class _TurnEngine(FakeLLM):
    def generate(self, prompts, sampling_params=None, use_tqdm=True):
        self.replies, first = self.replies[1:] + self.replies[:1], self.replies[0]
        return [SimpleNamespace(outputs=[SimpleNamespace(**first)]) for _ in prompts]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="vLLM needs a GPU")
def test_vllm_real_engine(tmp_path):
    pytest.importorskip("vllm")
    cfg = gen_config(tmp_path, backend="vllm", device="cuda", limit=2, max_new_tokens=16, gpu_memory_utilization=0.3)
    summary = run_generate(cfg, executor=FakeExecutor())
    assert summary["trajectories"] == 4 and summary["generated_tokens_now"] > 0


def test_prompt_ids_survive_resume_reading(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text('{"prompt_id": "a", "sample": 0}\n{"prompt_id": "a", "sample": 1}\n{"prompt_id": "b", "sample": 0}\n')
    assert list(read_complete(str(path), 2)) == ["a"]
    assert path.read_text().count("\n") == 2  # the incomplete prompt was removed from the file


def test_eval_cli_on_the_example(tmp_path, capsys):
    from mtpo.agent.evaluate import cli

    out = tmp_path / "eval"
    code = cli([os.path.join(ROOT, "examples", "eval.yaml"), f"--output_dir={out}", "--limit=2", "--maj_k=2",
                "--max_new_tokens=4", f"--model_name_or_path={TINY}",
                f"--prompts={os.path.join(ROOT, 'examples', 'data', 'math_mini.jsonl')}"])
    table = capsys.readouterr().out
    assert code == 0 and table.startswith("| group | problems | pass@1 | maj@2 | pass@2 |")
    assert "| Algebra | 1 |" in table and "| Level 1 | 1 |" in table
    assert (out / "results.md").read_text() == table
    assert len((out / "samples.jsonl").read_text().splitlines()) == 4


def test_bad_prompt_rows_and_sandbox_typos_are_one_line_errors(tmp_path, capsys):
    """QA: the error names the prompt file as well as the row (eval and iterate read several files);
    a `sandbox:` typo fails when the config is read, not after the model loaded."""
    from mtpo.agent.generate import cli
    from mtpo.config import ConfigError

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "#### 1"}) + "\n" + json.dumps({"question": "q2"}) + "\n")
    assert cli([os.path.join(ROOT, "examples", "generate.yaml"), f"--prompts={bad}",
                f"--output_file={tmp_path / 'o.jsonl'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"mtpo generate: error: {bad}: row 1: missing field `answer` (have ['question'])"
    assert not (tmp_path / "o.jsonl").exists()
    from mtpo.agent.evaluate import cli as eval_cli

    assert eval_cli([os.path.join(ROOT, "examples", "eval.yaml"), f"--prompts={bad}",  # before the model loads
                     f"--output_dir={tmp_path / 'ev'}", "--model_name_or_path=/nonexistent"]) == 2
    assert capsys.readouterr().err.strip() == err.replace("mtpo generate", "mtpo eval")
    assert not (tmp_path / "ev").exists()
    for sandbox, match in (({"timeout": 5}, r"sandbox: unknown option 'timeout' \(did you mean 'timeout_s'\?\)"),
                           ({"timeout_s": "five"}, r"sandbox.timeout_s: expected a number, got 'five'")):
        with pytest.raises(ConfigError, match=match):
            load_config(EvalConfig, None, [f"--sandbox={json.dumps(sandbox)}"])
    assert load_config(GenerateConfig, None, ["--sandbox={timeout_s: 3, memory_mb: 512}"]).sandbox == \
        {"timeout_s": 3.0, "memory_mb": 512}


def test_grader_warm_up_runs_in_the_background(tmp_path, tiny_model, tiny_tok):
    """GRADE's suggestion: the math-verify workers start while the model loads (a fake grader without
    `warm_up` is left alone)."""
    import threading

    from mtpo.agent import grade as G

    started = threading.Event()

    class Grader:
        extract_answer, grade = staticmethod(G.extract_answer), staticmethod(G.grade)

        @staticmethod
        def warm_up():
            assert threading.current_thread() is not threading.main_thread()
            started.set()

    generate(gen_config(tmp_path, limit=1, samples_per_prompt=1), tiny_model, tiny_tok, grader=Grader)
    assert started.wait(10)


def test_eval_results_are_replaced_atomically(tmp_path, monkeypatch):
    """QA: a failure (or kill) while writing must leave the previous results.json whole, not truncated."""
    from mtpo.agent import evaluate

    results = {"problems": 1, "pass@1": 1.0, "per_problem": []}
    evaluate.write_results(results, str(tmp_path))
    monkeypatch.setattr(evaluate.json, "dumps", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        evaluate.write_results({**results, "pass@1": 0.0}, str(tmp_path))
    assert json.loads((tmp_path / "results.json").read_text()) == results
    assert sorted(os.listdir(tmp_path)) == ["results.json", "results.md"]
