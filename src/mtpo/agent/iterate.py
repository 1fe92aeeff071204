"""`mtpo iterate config.yaml`: the paper's online iterative loop (M-DPO / M-KTO / RAFT-style SFT).

Iteration k (1 … K):  sample with iteration k−1's model (k = 1: the starting model) → grade →
pairs → train → (optional) evaluate. The reference is the starting model in every iteration
(`reference: fixed`, the KL-regularised objective) or iteration k−1's model (`previous`, the
non-regularised one). Run directory (docs/iterate.md):

    OUT/iter_k/  prompts.jsonl (when one file is split) · generate.yaml · rollouts.jsonl ·
                 pairs.jsonl kto.jsonl sft.jsonl pairs_report.json · train.yaml · model/ (+ metrics.jsonl)
                 · eval.yaml · eval/ · stages/<stage>.json (completion markers) · metrics.json
    OUT/iterations.jsonl   one line per iteration      OUT/final → iter_K/model (relative symlink)

Resume: every stage writes its completion marker last and atomically; rerunning the same command
skips finished stages, generation resumes per prompt (`mtpo generate` skips prompts already in its
output) and training from its newest checkpoint (`resume_from_checkpoint: auto`). Every stage's seed
is derived from `seed`, the iteration and the stage, so a resumed run repeats an uninterrupted one.

GPU memory: stages never share a process when CUDA is present (`stage_process: auto`): each stage is
`python -m mtpo generate|dpo|kto|sft|eval <iter_k/stage.yaml>`, so its model is gone when the next
stage starts — the same commands a cluster scheduler runs (docs/iterate.md). On CPU they run
in-process (no interpreter start-up per stage), freeing the model between stages.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field

import yaml

from mtpo.agent import pairs as P
from mtpo.agent.stages import (MANAGED, StageRunner, run_stage, run_stage_inprocess,  # noqa: F401
                               stage_class, stage_values, subprocess_runner, write_stage_yaml)  # (re-exported)
from mtpo.config import ConfigError, build_config
from mtpo.options import looks_local

logger = logging.getLogger("mtpo")

ALGORITHMS = ("dpo", "kto", "sft")
REFERENCES = ("fixed", "previous")
STAGE_PROCESS = ("auto", "subprocess", "inprocess")


@dataclass
class IterateConfig:
    """`mtpo iterate` options. Nested blocks take any option of that stage's own command."""

    model_name_or_path: str | None = field(default=None, metadata={"help": "Starting policy (the SFT model)."})
    output_dir: str = field(default="outputs/iterate", metadata={"help": "Run directory (iter_1/, iter_2/, …)."})
    prompts: list[str] = field(default_factory=list, metadata={"help": "One prompt file per iteration, or one file."})
    split_prompts: bool = field(default=True, metadata={"help": "One file: split it into `iterations` disjoint "
                                "parts (seeded shuffle); false: every iteration uses the whole file."})
    iterations: int = field(default=3, metadata={"help": "Number of iterations K."})
    samples_per_prompt: int = field(default=8, metadata={"help": "Trajectories sampled per prompt."})
    algorithm: str = field(default="dpo", metadata={"help": "dpo | kto | sft (RAFT: correct trajectories only)."})
    reference: str = field(default="fixed", metadata={"help": "fixed (starting model) | previous (last iteration's)."})
    seed: int = field(default=42, metadata={"help": "Every stage's seed is derived from this."})
    generate: dict = field(default_factory=dict, metadata={"help": "`mtpo generate` options: sampling, sandbox, grading."})
    pairs: dict = field(default_factory=dict, metadata={"help": "`mtpo pairs` options (pairs_per_prompt, filters, …)."})
    train: dict = field(default_factory=dict, metadata={"help": "`mtpo dpo|kto|sft` options (β, lr, batch, …)."})
    eval_prompts: str | None = field(default=None, metadata={"help": "Optional eval set: pass@1 after each iteration."})
    eval: dict = field(default_factory=dict, metadata={"help": "`mtpo eval` options."})
    eval_start_model: bool = field(default=True, metadata={"help": "With eval_prompts: also evaluate the starting model."})
    stage_process: str = field(default="auto", metadata={"help": "auto (subprocess with CUDA, else in-process) | "
                               "subprocess | inprocess."})
    train_launch: list[str] = field(default_factory=list, metadata={"help": "Launcher for the training stage, e.g. "
                                    "[accelerate, launch, --num_processes, '8'] (runs `… -m mtpo dpo train.yaml`)."})
    keep_checkpoints: bool = field(default=False, metadata={"help": "Keep model/checkpoint-* after training finished."})

    def __post_init__(self):
        if isinstance(self.prompts, str):
            self.prompts = [self.prompts]
        for key, value, allowed in (("algorithm", self.algorithm, ALGORITHMS), ("reference", self.reference, REFERENCES),
                                    ("stage_process", self.stage_process, STAGE_PROCESS)):
            if value not in allowed:
                raise ConfigError(f"{key} must be one of {list(allowed)}, got {value!r}")
        if self.train_launch and self.stage_process == "inprocess":
            raise ConfigError("train_launch needs stage_process: subprocess (or auto)")
        if self.iterations < 1 or self.samples_per_prompt < 1:
            raise ConfigError("iterations and samples_per_prompt must be at least 1")
        if self.samples_per_prompt < 2 and self.algorithm != "sft":
            raise ConfigError(f"algorithm {self.algorithm} needs samples_per_prompt >= 2 to pair correct with wrong")
        for block in MANAGED:
            value = getattr(self, block)
            if not isinstance(value, dict):
                raise ConfigError(f"{block}: expected a mapping of option: value, got {value!r}")
            taken = sorted(set(value) & set(MANAGED[block]))
            if taken:
                raise ConfigError(f"{block}.{taken[0]} is set by mtpo iterate for each iteration; remove it "
                                  "(the seed: use the top-level `seed`)")

    def check(self) -> None:
        """Everything that can be checked before a model is loaded: paths and every nested block."""
        if not self.model_name_or_path:
            raise ConfigError("model_name_or_path is required")
        if not self.prompts:
            raise ConfigError("prompts: give one file per iteration, or one file")
        if len(self.prompts) not in (1, self.iterations):
            raise ConfigError(f"prompts: {len(self.prompts)} files for {self.iterations} iterations (give 1 or "
                              f"{self.iterations})")
        for path in self.prompts + ([self.eval_prompts] if self.eval_prompts else []):
            if looks_local(path) and not os.path.exists(path):  # else a Hub dataset name
                raise ConfigError(f"prompt file not found: {path}")
        self.check_blocks()
        self.check_prompt_rows()

    def check_prompt_rows(self) -> None:
        """Every local prompt file read as its stage reads it: a bad row fails now, naming the user's file
        and row — not in iteration k after k−1 trainings, as a row of iter_k/prompts.jsonl."""
        for stage, paths in (("generate", self.prompts), ("eval", [self.eval_prompts] if self.eval_prompts else [])):
            settings = build_config(stage_class(stage, self.algorithm), stage_values(self, stage, placeholders=True))
            if stage == "generate":  # a split file's part k may hold any row of the whole file
                settings.limit = None
            for path in (p for p in paths if looks_local(p)):
                settings.prompts = path
                settings.load_prompts()

    def check_blocks(self) -> None:
        """Each nested block against its command's config class: a typo fails before anything runs."""
        if self.train.get("use_peft"):
            raise ConfigError("train.use_peft: not supported by mtpo iterate (each iteration samples from full weights)")
        for stage in ("generate", "pairs", "train") + (("eval",) if self.eval_prompts else ()):
            try:
                build_config(stage_class(stage, self.algorithm), stage_values(self, stage, placeholders=True))
            except ConfigError as e:
                raise ConfigError(f"{stage}: {e}") from None


def default_runner(config: IterateConfig) -> StageRunner:
    """Subprocesses when asked, when a launcher is given, or (auto) when CUDA is present; else in-process."""
    if config.stage_process == "auto" and not config.train_launch:
        import torch

        if not torch.cuda.is_available():
            return run_stage_inprocess
    if config.stage_process == "inprocess":
        return run_stage_inprocess
    return subprocess_runner(config.train_launch)


# ------------------------------------------------------------------------------------------ the loop


def train_rows(config: IterateConfig, report: dict) -> tuple[int, str | None]:
    """How many rows the trainer would get, and why training is impossible (None if it is possible)."""
    if config.algorithm == "dpo":
        n = report["pairs"]
        return n, None if n else "no preference pairs (no prompt had both a correct and a wrong kept sample)"
    if config.algorithm == "kto":
        d, u = report["kto_rows"]["desirable"], report["kto_rows"]["undesirable"]
        return d + u, None if d and u else f"KTO needs both classes, got {d} desirable and {u} undesirable"
    n = report["sft_rows"]
    return n, None if n else "no correct trajectory to fine-tune on"


def last_train_metrics(model_dir: str) -> dict:
    """Final logged loss / reward metrics of a training run (its metrics.jsonl; a resumed run's last line
    is the same step as an uninterrupted run's)."""
    path = os.path.join(model_dir, "metrics.jsonl")
    last = {}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            records = [json.loads(line) for line in f if line.strip()]
        last = next((r for r in reversed(records) if "loss" in r), {})
    out = {"train_loss": last.get("loss"), "train_steps": last.get("step"),
           "reward_accuracy": last.get("rewards/accuracies")}
    out["train_rewards"] = {k: v for k, v in last.items() if k.startswith("rewards/")}
    return out


def train_stage(config: IterateConfig, k: int, workdir: str, policy: str, reference: str, report: dict,
                runner: StageRunner) -> dict:
    n, why_not = train_rows(config, report)
    if why_not:
        msg = f"iteration {k}: {why_not} — training SKIPPED; iteration {k}'s model stays {policy}"
        logger.warning("!" * 8 + " %s", msg)
        print(f"\n!!!!!!!! {msg}\n", flush=True)
        return {"model": policy, "train_rows": n, "train_skipped": why_not}
    values = stage_values(config, "train", iteration=k, workdir=workdir, policy=policy, reference=reference)
    runner(config.algorithm, values, write_stage_yaml(workdir, "train", values))
    model_dir = values["output_dir"]
    if not config.keep_checkpoints:
        drop_checkpoints(model_dir)
    return {"model": model_dir, "train_rows": n, "train_skipped": None, **last_train_metrics(model_dir)}


def drop_checkpoints(model_dir: str) -> None:
    """Delete a finished run's checkpoints. Each is renamed first (atomic), so a kill mid-deletion never
    leaves a half-deleted `checkpoint-N` that a resumed run would try to load; a rerun then resumes from
    an intact checkpoint or trains again from the start — the same result either way."""
    for name in sorted(os.listdir(model_dir)):
        path = os.path.join(model_dir, name)
        if name.startswith("checkpoint-") and os.path.isdir(path):
            os.replace(path, os.path.join(model_dir, f".deleting-{name}"))
    for name in os.listdir(model_dir):
        if name.startswith(".deleting-checkpoint-"):
            shutil.rmtree(os.path.join(model_dir, name), ignore_errors=True)


def eval_stage(config: IterateConfig, k: int, workdir: str, policy: str, runner: StageRunner) -> dict:
    values = stage_values(config, "eval", iteration=k, workdir=workdir, policy=policy)
    runner("eval", values, write_stage_yaml(workdir, "eval", values))
    return {"eval": read_eval_results(values["output_dir"])}


def read_eval_results(eval_dir: str) -> dict:
    """The overall numbers (problems, pass@1, maj@k, pass@k) of the results.json `mtpo eval` writes."""
    path = os.path.join(eval_dir, "results.json")
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return {k: v for k, v in data.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def run_iteration(config: IterateConfig, k: int, policy: str, runner: StageRunner) -> dict:
    """One iteration: sample with `policy` → pairs → train (→ eval); returns its iterations.jsonl line."""
    workdir = os.path.join(config.output_dir, f"iter_{k}")
    reference = config.model_name_or_path if config.reference == "fixed" else policy
    gen_values = stage_values(config, "generate", iteration=k, workdir=workdir, policy=policy)
    gen = run_stage(workdir, "generate", lambda: runner("generate", gen_values,
                                                        write_stage_yaml(workdir, "generate", gen_values)))
    pairs_values = stage_values(config, "pairs", iteration=k, workdir=workdir)
    report = run_stage(workdir, "pairs", lambda: P.run_pairs(build_config(P.PairsConfig, pairs_values)))
    train = run_stage(workdir, "train", lambda: train_stage(config, k, workdir, policy, reference, report, runner))
    evaluated = {}
    if config.eval_prompts:
        evaluated = run_stage(workdir, "eval", lambda: eval_stage(config, k, workdir, train["model"], runner))
    line = {"iteration": k, "sampled_from": policy, "reference": None if config.algorithm == "sft" else reference,
            "model": train["model"], "sampling_accuracy": report["accuracy"], "trajectories": report["trajectories"],
            "prompts": report["prompts"], "pairs": report["pairs"], "kto_rows": report["kto_rows"],
            "sft_rows": report["sft_rows"], "filtered": report["filtered"], "prompts_skipped": report["prompts_skipped"],
            **{key: train.get(key) for key in ("train_rows", "train_skipped", "train_loss", "reward_accuracy",
                                               "train_steps", "train_rewards")},
            "eval": evaluated.get("eval"),
            "seconds": {"generate": gen["seconds"], "pairs": report["seconds"], "train": train["seconds"],
                        **({"eval": evaluated["seconds"]} if evaluated else {})}}
    P.atomic_write_text(os.path.join(workdir, "metrics.json"), json.dumps(line, indent=2) + "\n")
    return line


def check_same_run(config: IterateConfig) -> None:
    """A rerun into an existing run directory must be the same run (else resuming would mix two runs)."""
    path = os.path.join(config.output_dir, "iterate_config.yaml")
    ignore = ("stage_process", "keep_checkpoints")
    current = {k: v for k, v in vars(config).items() if k not in ignore}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            before = {k: v for k, v in (yaml.safe_load(f) or {}).items() if k not in ignore}
        diff = sorted(k for k in set(before) | set(current) if before.get(k) != current.get(k))
        if diff:
            raise ConfigError(f"{config.output_dir} holds a run with a different config ({diff[0]}: "
                              f"{before.get(diff[0])!r} there, {current.get(diff[0])!r} now); use another output_dir")
        return
    P.atomic_write_text(path, yaml.safe_dump(vars(config), sort_keys=True, allow_unicode=True))


def link_final(output_dir: str, model: str) -> str | None:
    """`final` → the last iteration's model: a symlink (no multi-GB copy), replaced atomically. When no
    iteration trained, that is the starting model (linked if it is a local folder)."""
    final = os.path.join(output_dir, "final")
    if not os.path.isdir(model):
        logger.warning("final model %s is not a local folder (no iteration trained?): no `final` link", model)
        return None
    if os.path.isdir(final) and not os.path.islink(final):
        raise RuntimeError(f"{final} is a real folder, not the link mtpo iterate makes; move it away")
    tmp = final + ".tmp"
    if os.path.lexists(tmp):
        os.remove(tmp)
    target, root = os.path.abspath(model), os.path.abspath(output_dir)
    inside = os.path.commonpath([target, root]) == root  # relative inside the run: the run folder can move
    os.symlink(os.path.relpath(target, root) if inside else target, tmp)
    os.replace(tmp, final)
    return final


def run_iterate(config: IterateConfig, runner: StageRunner | None = None) -> list[dict]:
    """The whole loop (resumable); returns the iterations.jsonl lines. `runner` runs a stage's command
    (default: a subprocess with CUDA, in-process otherwise)."""
    config.check()
    check_same_run(config)
    runner = runner or default_runner(config)
    lines = []
    if config.eval_prompts and config.eval_start_model:
        workdir = os.path.join(config.output_dir, "iter_0")
        start = run_stage(workdir, "eval", lambda: eval_stage(config, 0, workdir, config.model_name_or_path, runner))
        lines.append({"iteration": 0, "model": config.model_name_or_path, "eval": start["eval"],
                      "seconds": {"eval": start["seconds"]}})
    policy = config.model_name_or_path
    for k in range(1, config.iterations + 1):
        lines.append(run_iteration(config, k, policy, runner))
        policy = lines[-1]["model"]
        P.atomic_write_jsonl(os.path.join(config.output_dir, "iterations.jsonl"), lines)
    final = link_final(config.output_dir, policy)
    print(format_table(lines), flush=True)
    print(f"→ {os.path.join(config.output_dir, 'iterations.jsonl')}" + (f"; final model: {final} → {policy}" if final
                                                                        else ""), flush=True)
    return lines


def format_table(lines: list[dict]) -> str:
    def num(v, fmt="{:.3f}"):
        return "-" if v is None else fmt.format(v)

    head = f"{'iter':>4} {'sample acc':>10} {'pairs':>6} {'no pair (✓/✗/∅)':>16} {'filtered':>8} " \
           f"{'loss':>8} {'reward acc':>10} {'pass@1':>7}  seconds (gen/pairs/train/eval)"
    rows = [head, "-" * len(head)]
    for line in lines:
        skip = line.get("prompts_skipped")
        secs = line["seconds"]
        rows.append(" ".join([
            f"{line['iteration']:>4}", f"{num(line.get('sampling_accuracy')):>10}", f"{num(line.get('pairs'), '{}'):>6}",
            f"{'/'.join(str(skip[k]) for k in ('all_correct', 'all_wrong', 'none_kept')) if skip else '-':>16}",
            f"{num(sum(line['filtered'].values()) if line.get('filtered') else None, '{}'):>8}",
            f"{num(line.get('train_loss'), '{:.4f}'):>8}", f"{num(line.get('reward_accuracy')):>10}",
            f"{num((line.get('eval') or {}).get('pass@1')):>7}",
            " " + "/".join(num(secs.get(s), "{:.0f}") for s in ("generate", "pairs", "train", "eval")),
        ]) + ("   (training skipped)" if line.get("train_skipped") else ""))
    return "\n".join(rows)


def cli(argv: list[str]) -> int:
    from mtpo.cli import run_config_command

    def iterate(config: IterateConfig) -> None:
        """The paper's online loop: sample with the tool → grade → pairs → train → repeat (resumable)."""
        run_iterate(config)

    return run_config_command("iterate", IterateConfig, iterate, argv, config_required=True)
