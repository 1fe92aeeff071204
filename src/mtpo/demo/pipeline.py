"""The demo run: `mtpo iterate` on the synthetic task, once per method, plus the table and plots.

    OUT/prompts/{train,heldout}.jsonl   problems (train: iterations × train_prompts, split by iterate)
    OUT/m_dpo/         `mtpo iterate` run, M-DPO: iter_0/eval (the SFT model), iter_k/{rollouts, pairs,
                       model, eval} for k = 1..K, reference = the SFT model
    OUT/dpo_no_mask/   the same loop, DPO with tool outputs trained
    OUT/m_kto/         the same loop, M-KTO (labelled trajectories, class-weighted)
    OUT/results.{json,md}  OUT/accuracy.png  OUT/training.png

The three loops differ in the loss or the mask only: same SFT model, same prompts, same seeds, and
iteration 1 trains on identical samples (the controls start from M-DPO's iteration-1 rollouts).
"DPO without masking" marks every tool-output message `"train": true` in the pair rows (mtpo's
per-message override): the tool outputs' content tokens then count in the trajectory log-probs, as a
single-turn trainer that treats everything after the question as the completion would count them
(the role headers of later turns stay untrained; mtpo never trains a header).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field

from tqdm.auto import tqdm

from mtpo.agent import iterate as I
from mtpo.agent import pairs as P
from mtpo.config import ConfigError
from mtpo.data import load_rows
from mtpo.demo import report, task

PACKAGED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")
HELDOUT_SEED = 0  # one held-out set for every run seed: seeds then differ in training only


@dataclass
class DemoConfig:
    """`mtpo demo` options (any of them as --key=value)."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Run folder (reruns resume finished stages)."})
    seed: int = field(default=0, metadata={"help": "Training prompts, sampling and training order derive from it."})
    model: str = field(default=PACKAGED_MODEL, metadata={"help": "The SFT model folder."})
    iterations: int = field(default=3, metadata={"help": "Iterations K of each method's loop."})
    train_prompts: int = field(default=48, metadata={"help": "Prompts sampled per iteration."})
    heldout_prompts: int = field(default=240, metadata={"help": "Held-out problems (greedy, one sample each)."})
    samples_per_prompt: int = field(default=8, metadata={"help": "Trajectories sampled per prompt."})
    pairs_per_prompt: int = field(default=2, metadata={"help": "(correct, wrong) pairs per prompt, at most."})
    beta: float = field(default=0.1, metadata={"help": "β of DPO and KTO."})
    learning_rate: float = field(default=1e-4, metadata={"help": "DPO / KTO learning rate (cosine schedule)."})
    epochs: float = field(default=1.0, metadata={"help": "Epochs over each iteration's pairs."})
    nll_coef: float = field(default=1.0, metadata={"help": "NLL of the chosen trajectory added to DPO (anchors it)."})
    batch_size: int = field(default=8, metadata={"help": "Pairs (KTO: rows) per optimizer step."})
    compare: bool = field(default=True, metadata={"help": "Also run the DPO-without-masking and M-KTO loops."})
    raft: bool = field(default=False, metadata={"help": "Also run RAFT (SFT on the correct samples): is a gain "
                       "the preference loss's own?"})
    generation_batch_size: int = field(default=128, metadata={"help": "Rows per generate call."})
    sandbox_workers: int = field(default=4, metadata={"help": "Python sessions running cells in parallel."})
    max_new_tokens: int = field(default=64, metadata={"help": "Tokens per assistant turn."})

    def __post_init__(self):
        for key in ("iterations", "train_prompts", "heldout_prompts", "pairs_per_prompt", "batch_size",
                    "generation_batch_size", "sandbox_workers", "max_new_tokens"):
            if getattr(self, key) < 1:
                raise ConfigError(f"{key} must be at least 1, got {getattr(self, key)}")
        if self.samples_per_prompt < 2:
            raise ConfigError("samples_per_prompt must be at least 2 (a pair needs a correct and a wrong sample)")
        if not os.path.isfile(os.path.join(self.model, "config.json")):
            raise ConfigError(f"model: no model at {self.model} (make it with `python -m mtpo.demo.make_model`)")


# ------------------------------------------------------------------------------------------ configs


def rollout_options(config: DemoConfig) -> dict:
    """What generation and evaluation share: the tool loop, the sandbox, the answer format."""
    return {"answer_format": "plain", "id_field": "prompt_id", "max_tool_calls": 3,
            "max_new_tokens": config.max_new_tokens, "max_length": 512, "stop": [], "device": "cpu",
            "dtype": "float32", "batch_size": config.generation_batch_size, "prompts_per_round": 64,
            "sandbox_workers": config.sandbox_workers, "sandbox": {"timeout_s": 10}}


def train_options(config: DemoConfig, algorithm: str) -> dict:
    values = {"learning_rate": config.learning_rate, "lr_scheduler_type": "cosine",
              "warmup_steps": 0.1, "num_train_epochs": config.epochs, "per_device_train_batch_size": config.batch_size,
              "max_length": 512, "logging_steps": 2, "save_strategy": "no", "report_to": "none", "use_cpu": True,
              "dtype": "float32", "weight_decay": 0.0}
    if algorithm in ("dpo", "kto"):
        values["beta"] = config.beta
    if algorithm == "dpo":
        values["nll_coef"] = config.nll_coef
    return values


def iterate_config(config: DemoConfig, prompts: dict[str, str], algorithm: str = "dpo", iterations: int | None = None,
                   name: str = "m_dpo") -> I.IterateConfig:
    return I.IterateConfig(
        model_name_or_path=config.model, output_dir=os.path.join(config.output_dir, name), prompts=[prompts["train"]],
        iterations=iterations or config.iterations, samples_per_prompt=config.samples_per_prompt, algorithm=algorithm,
        reference="fixed", seed=config.seed, generate={**rollout_options(config), "temperature": 1.0},
        pairs={"pairs_per_prompt": config.pairs_per_prompt}, train=train_options(config, algorithm),
        eval_prompts=prompts["heldout"], eval={**rollout_options(config), "temperature": 0.0},
        stage_process="inprocess")


def write_prompts(config: DemoConfig) -> dict[str, str]:
    folder = os.path.join(config.output_dir, "prompts")
    paths = {"train": os.path.join(folder, "train.jsonl"), "heldout": os.path.join(folder, "heldout.jsonl")}
    sets = {"train": task.make_problems(config.seed, config.iterations * config.train_prompts, "train"),
            "heldout": task.make_problems(HELDOUT_SEED, config.heldout_prompts, "heldout")}
    for split, problems in sets.items():
        P.atomic_write_jsonl(paths[split], [task.prompt_row(p, i, split) for i, p in enumerate(problems)])
    return paths


# ------------------------------------------------------------------------------------------ controls


def unmask_tool_outputs(rows: list[dict]) -> tuple[list[dict], int]:
    """Pair rows with every tool-output message marked `"train": true` (and how many were marked)."""
    marked, out = 0, []
    for row in rows:
        new = dict(row)
        for side in ("chosen", "rejected"):
            msgs = []
            for m in row[side]:
                if m["role"] in ("user", "tool") and m is not row[side][0] and m["content"].startswith("```output"):
                    m = {**m, "train": True}
                    marked += 1
                msgs.append(m)
            new[side] = msgs
        out.append(new)
    return out, marked


def runner_for(method: str) -> I.StageRunner:
    """iterate's in-process stage runner, with the method's one difference applied to the training data
    just before training: tool outputs trained (dpo_no_mask), or KTO's class weights (m_kto)."""
    def run(command: str, values: dict, yaml_path: str) -> None:
        if command in ("dpo", "kto") and method in ("dpo_no_mask", "m_kto"):
            rows = load_rows(values["train_data"])
            if method == "dpo_no_mask":
                rows, marked = unmask_tool_outputs(rows)
                path = values["train_data"].replace(".jsonl", ".unmasked.jsonl")
                P.atomic_write_jsonl(path, rows)
                logging.getLogger("mtpo").info("dpo_no_mask: %d tool-output messages marked train: true", marked)
                values = {**values, "train_data": path}
            else:  # the KTO paper's weighting w_d·n_d = w_u·n_u (here correct samples are the minority)
                n_d = sum(bool(r["label"]) for r in rows)
                values = {**values, "desirable_weight": round((len(rows) - n_d) / n_d, 4) if n_d else 1.0}
            I.write_stage_yaml(os.path.dirname(yaml_path), "train", values)  # the YAML says what really ran
        I.run_stage_inprocess(command, values, yaml_path)
    return run


def run_loop(config: DemoConfig, prompts: dict, method: str) -> list[dict]:
    """One method's `mtpo iterate` run. The controls start from M-DPO's iteration-1 samples (the
    same SFT model and seeds would sample exactly those again; copying them saves the time), so at
    iteration 1 all methods train on identical data; the SFT model is evaluated once, by M-DPO."""
    algorithm = {"m_kto": "kto", "raft": "sft"}.get(method, "dpo")
    loop = iterate_config(config, prompts, algorithm, name=method)
    if method != "m_dpo":
        loop.eval_start_model = False
        source = os.path.join(config.output_dir, "m_dpo", "iter_1")
        target = os.path.join(loop.output_dir, "iter_1")
        os.makedirs(target, exist_ok=True)
        for name in ("rollouts.jsonl", "prompts.jsonl"):
            if os.path.isfile(os.path.join(source, name)) and not os.path.exists(os.path.join(target, name)):
                shutil.copy(os.path.join(source, name), os.path.join(target, name))
    return I.run_iterate(loop, runner_for(method))


# ------------------------------------------------------------------------------------------ the run


def run_demo(config: DemoConfig) -> dict:
    """The whole demo; returns {"rows": [...], "seconds": {...}} (also written to results.json)."""
    started = time.time()
    os.makedirs(config.output_dir, exist_ok=True)
    prompts = write_prompts(config)
    methods = ["m_dpo"] + (["dpo_no_mask", "m_kto"] if config.compare else []) + (["raft"] if config.raft else [])
    lines, seconds = {}, {}
    for method in tqdm(methods, desc="demo: methods", unit="method", dynamic_ncols=True):
        t = time.time()
        lines[method] = run_loop(config, prompts, method)
        seconds[method] = round(time.time() - t, 1)
    results = report.collect(config, lines)
    results["seconds"] = {"total": round(time.time() - started, 1), **seconds}
    report.write_all(config.output_dir, results, asdict(config))
    return results


def cli(argv: list[str]) -> int:
    from mtpo.cli import run_config_command

    def demo(config: DemoConfig) -> None:
        """The paper in miniature on CPU: SFT → online M-DPO iterations, DPO without masking, M-KTO."""
        results = run_demo(config)
        print(report.format_table(results["rows"]))
        print(f"\n{results['seconds']['total']:.0f} s → {config.output_dir}/results.md, results.json, accuracy.png, "
              "training.png")

    return run_config_command("demo", DemoConfig, demo, argv, log_level=logging.WARNING)
