"""`mtpo eval config.yaml`: greedy pass@1 and maj@k with the Python tool, per MATH subject and level.

    results = run_eval(load_config(EvalConfig, "examples/eval.yaml"))

Both passes are `run_generate` runs (so they are resumable and write their trajectories to
`output_dir/greedy.jsonl` and `output_dir/samples.jsonl`):

- pass@1: one greedy trajectory per problem (temperature 0), graded;
- maj@k (`maj_k` > 0): k sampled trajectories per problem; the answers of the trajectories that
  finished with an answer are grouped by *mathematical equivalence* (`grade.is_equivalent`, so
  `\\frac{1}{2}`, `0.5` and `1/2` are one vote group, not three); the largest group wins (a tie goes
  to the group whose first member came first, by sample index); the problem counts as solved if the
  winner is equivalent to the gold answer. pass@k (any sample correct) comes for free.

Results go to `output_dir/results.json` and a Markdown table `output_dir/results.md`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import defaultdict
from dataclasses import dataclass, field

from mtpo.agent.generate import (GenerateConfig, RolloutSettings, build_backend, build_executor, build_renderer,
                                 load_tokenizer, read_complete, run_generate, warm_up_grader)
from mtpo.config import ConfigError

logger = logging.getLogger("mtpo")


@dataclass
class EvalConfig(RolloutSettings):
    """`mtpo eval`: greedy pass@1 (+ maj@k) with the tool loop."""

    max_tool_calls: int = field(default=4, metadata={"help": "Cells run per trajectory at most (paper: 4 at eval)."})
    maj_k: int = field(default=0, metadata={"help": "Samples per problem for maj@k (0: pass@1 only)."})
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature of the maj@k samples."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling of the maj@k samples."})
    seed: int = field(default=0, metadata={"help": "Seed of the maj@k samples."})
    output_dir: str = field(default="outputs/eval", metadata={"help": "greedy.jsonl, samples.jsonl, results.{json,md}."})

    def __post_init__(self):
        super().__post_init__()
        if self.maj_k < 0:
            raise ConfigError(f"maj_k must be >= 0, got {self.maj_k}")


def majority_vote(answers: list[str | None], equivalent) -> tuple[str | None, int]:
    """(representative of the largest equivalence group, its size); None answers do not vote."""
    groups: list[list[str]] = []
    for a in answers:
        if a is None:
            continue
        home = next((g for g in groups if equivalent(a, g[0])), None)
        if home is None:
            groups.append([a])
        else:
            home.append(a)
    if not groups:
        return None, 0
    best = max(groups, key=len)  # max keeps the first of equal-sized groups
    return best[0], len(best)


def run_eval(config: EvalConfig, *, model=None, tokenizer=None, backend=None, executor=None, grader=None) -> dict:
    """Greedy pass@1 and (maj_k > 0) maj@k / pass@k, overall and per subject / level."""
    if grader is None:
        from mtpo.agent import grade as grader
    config.check_paths()
    prompts = {p.prompt_id: p for p in config.load_prompts()}  # a bad row fails before the model loads
    os.makedirs(config.output_dir, exist_ok=True)
    common = {f.name: getattr(config, f.name) for f in dataclasses.fields(RolloutSettings)}
    passes = {"greedy": GenerateConfig(**common, samples_per_prompt=1, temperature=0.0, seed=config.seed,
                                       output_file=os.path.join(config.output_dir, "greedy.jsonl"))}
    if config.maj_k:
        passes["samples"] = GenerateConfig(**common, samples_per_prompt=config.maj_k, temperature=config.temperature,
                                           top_p=config.top_p, seed=config.seed,
                                           output_file=os.path.join(config.output_dir, "samples.jsonl"))
    own_executor = executor is None
    executor = executor or build_executor(config)  # so does a sandbox error
    summaries, records = {}, {}
    try:
        warm_up_grader(grader)
        renderer = build_renderer(config, load_tokenizer(config, tokenizer))
        backend = backend or build_backend(config, renderer, model)
        for name, gen_config in passes.items():
            summaries[name] = run_generate(gen_config, tokenizer=renderer.tokenizer, backend=backend,
                                           executor=executor, grader=grader)
            records[name] = read_complete(gen_config.output_file, gen_config.samples_per_prompt)
    finally:
        if own_executor:
            executor.shutdown()
    results = score(prompts, records["greedy"], records.get("samples"), config.maj_k, grader.is_equivalent)
    results["summaries"] = summaries
    write_results(results, config.output_dir)
    logger.info("eval: %s", {k: results[k] for k in ("problems", "pass@1", f"maj@{config.maj_k}") if k in results})
    return results


def score(prompts: dict, greedy: dict, samples: dict | None, k: int, equivalent) -> dict:
    """Per-problem verdicts → overall and per-group rates."""
    rows = []
    for pid, prompt in prompts.items():
        row = {"prompt_id": pid, "subject": prompt.meta.get("subject"), "level": prompt.meta.get("level"),
               "pass@1": bool(greedy[pid][0]["correct"])}
        if samples is not None:
            recs = samples[pid]
            votes = [r["answer"] if r["finish_reason"] == "answered" else None for r in recs]
            winner, size = majority_vote(votes, equivalent)
            row.update({f"maj@{k}": winner is not None and equivalent(winner, prompt.gold),
                        f"pass@{k}": any(r["correct"] for r in recs), "votes": size, "majority": winner})
        rows.append(row)
    metrics = ["pass@1"] + ([f"maj@{k}", f"pass@{k}"] if samples is not None else [])
    out = {"problems": len(rows), **_rates(rows, metrics)}
    for group in ("subject", "level"):
        buckets = defaultdict(list)
        for row in rows:
            if row[group] is not None:
                buckets[row[group]].append(row)
        if buckets:
            out[f"by_{group}"] = {name: {"problems": len(b), **_rates(b, metrics)} for name, b in sorted(buckets.items())}
    out["per_problem"] = rows
    return out


def _rates(rows: list[dict], metrics: list[str]) -> dict:
    return {m: sum(r[m] for r in rows) / len(rows) if rows else 0.0 for m in metrics}


def write_results(results: dict, output_dir: str) -> None:
    """Each file under a temporary name, then renamed: a kill never leaves half a results.json."""
    from mtpo.agent.pairs import atomic_write_text

    atomic_write_text(os.path.join(output_dir, "results.json"), json.dumps(results, indent=1, ensure_ascii=False))
    atomic_write_text(os.path.join(output_dir, "results.md"), markdown(results))


def markdown(results: dict) -> str:
    metrics = [m for m in results if m.startswith(("pass@", "maj@"))]
    lines = ["| group | problems | " + " | ".join(metrics) + " |", "|---|---:|" + "---:|" * len(metrics)]

    def line(name, r):
        lines.append(f"| {name} | {r['problems']} | " + " | ".join(f"{100 * r[m]:.1f}" for m in metrics) + " |")

    line("**all**", results)
    for group in ("by_subject", "by_level"):
        for name, r in results.get(group, {}).items():
            line(name, r)
    return "\n".join(lines) + "\n"


def cli(argv: list[str]) -> int:
    from mtpo.cli import run_config_command

    def evaluate(config: EvalConfig) -> None:
        """Greedy pass@1 and maj@k with the Python tool; the Markdown table is printed."""
        print(markdown(run_eval(config)), end="")

    return run_config_command("eval", EvalConfig, evaluate, argv)
