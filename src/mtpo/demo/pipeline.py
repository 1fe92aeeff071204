"""The demo run: the same stages `mtpo iterate` runs, on the synthetic task, plus the paper's controls.

    OUT/prompts/{train,heldout}.jsonl   problems (train: iterations × train_prompts, split by iterate)
    OUT/m_dpo/                          `mtpo iterate` run: iter_0/eval (SFT), iter_k/{rollouts, pairs,
                                        model, eval} for k = 1..K (reference = the SFT model)
    OUT/dpo_no_mask/iter_1/             DPO on iteration 1's pairs with tool outputs trained
    OUT/m_kto/iter_1/                   M-KTO on iteration 1's samples (kto.jsonl)
    OUT/results.{json,md}  OUT/accuracy.png  OUT/training.png

The controls train on exactly the samples M-DPO's first iteration trained on, from the same SFT
model, with the same seed: only the loss (KTO) or the mask (tool outputs trained) differs.
"DPO without masking" marks every tool-output message `"train": true` in the pair rows (mtpo's
per-message override): the tool outputs' content tokens then count in the trajectory log-probs, as a
single-turn trainer that treats everything after the question as the completion would count them
(the role headers of later turns stay untrained; mtpo never trains a header).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field

from mtpo.agent import iterate as I
from mtpo.agent import pairs as P
from mtpo.config import ConfigError, load_config
from mtpo.data import RecordError, load_rows
from mtpo.demo import report, task

PACKAGED_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model")
HELDOUT_SEED = 0  # one held-out set for every run seed: seeds then differ in training only


@dataclass
class DemoConfig:
    """`mtpo demo` options (any of them as --key=value)."""

    output_dir: str = field(default="outputs/demo", metadata={"help": "Run folder (reruns resume finished stages)."})
    seed: int = field(default=0, metadata={"help": "Training prompts, sampling and training order derive from it."})
    model: str = field(default=PACKAGED_MODEL, metadata={"help": "The SFT model (default: the packaged one)."})
    iterations: int = field(default=2, metadata={"help": "M-DPO iterations K."})
    train_prompts: int = field(default=128, metadata={"help": "Prompts sampled per iteration."})
    heldout_prompts: int = field(default=240, metadata={"help": "Held-out problems (greedy, one sample each)."})
    samples_per_prompt: int = field(default=8, metadata={"help": "Trajectories sampled per prompt."})
    pairs_per_prompt: int = field(default=2, metadata={"help": "(correct, wrong) pairs per prompt, at most."})
    beta: float = field(default=0.1, metadata={"help": "β of DPO and KTO."})
    learning_rate: float = field(default=5e-4, metadata={"help": "DPO / KTO learning rate (cosine schedule)."})
    epochs: float = field(default=2.0, metadata={"help": "Epochs over each iteration's pairs."})
    nll_coef: float = field(default=1.0, metadata={"help": "NLL of the chosen trajectory added to DPO (anchors it)."})
    batch_size: int = field(default=8, metadata={"help": "Pairs (KTO: rows) per optimizer step."})
    compare: bool = field(default=True, metadata={"help": "Also run DPO without masking and M-KTO."})
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
    values = {"beta": config.beta, "learning_rate": config.learning_rate, "lr_scheduler_type": "cosine",
              "warmup_steps": 0.1, "num_train_epochs": config.epochs, "per_device_train_batch_size": config.batch_size,
              "max_length": 512, "logging_steps": 2, "save_strategy": "no", "report_to": "none", "use_cpu": True,
              "dtype": "float32", "weight_decay": 0.0}
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


def run_control(config: DemoConfig, prompts: dict, name: str, algorithm: str, first: dict) -> dict:
    """Train + evaluate one control on M-DPO iteration 1's samples, with iterate's own stage functions."""
    ctl = iterate_config(config, prompts, algorithm, iterations=1, name=name)
    kto = first["pairs_report"]["kto_rows"]
    if algorithm == "kto" and kto["desirable"]:
        # the KTO paper's class weighting: w_d·n_d = w_u·n_u (correct samples are the minority here)
        ctl.train["desirable_weight"] = round(kto["undesirable"] / kto["desirable"], 4)
    workdir = os.path.join(ctl.output_dir, "iter_1")
    source = os.path.join(config.output_dir, "m_dpo", "iter_1")
    os.makedirs(workdir, exist_ok=True)
    data = P.OUTPUT_FILES[I.TRAINERS[algorithm][3]]
    if name == "dpo_no_mask":
        rows, marked = unmask_tool_outputs(load_rows(os.path.join(source, data)))
        P.atomic_write_jsonl(os.path.join(workdir, data), rows)
        logging.getLogger("mtpo").info("dpo_no_mask: %d tool-output messages marked train: true", marked)
    else:
        shutil.copy(os.path.join(source, data), os.path.join(workdir, data))
    pairs_report = first["pairs_report"]
    runner = I.run_stage_inprocess
    train = I.run_stage(workdir, "train", lambda: I.train_stage(ctl, 1, workdir, ctl.model_name_or_path,
                                                                ctl.model_name_or_path, pairs_report, runner))
    evaluated = I.run_stage(workdir, "eval", lambda: I.eval_stage(ctl, 1, workdir, train["model"], runner))
    return {"train": train, "eval": evaluated["eval"], "seconds": train["seconds"] + evaluated["seconds"]}


# ------------------------------------------------------------------------------------------ the run


def run_demo(config: DemoConfig) -> dict:
    """The whole demo; returns {"rows": [...], "seconds": {...}} (also written to results.json)."""
    started = time.time()
    os.makedirs(config.output_dir, exist_ok=True)
    prompts = write_prompts(config)
    lines = I.run_iterate(iterate_config(config, prompts))
    first = {"pairs_report": _read_json(os.path.join(config.output_dir, "m_dpo", "iter_1", "pairs_report.json"))}
    controls = {}
    if config.compare:
        for name, algorithm in (("dpo_no_mask", "dpo"), ("m_kto", "kto")):
            controls[name] = run_control(config, prompts, name, algorithm, first)
    results = report.collect(config, lines, controls)
    results["seconds"] = {"total": round(time.time() - started, 1)}
    report.write_all(config.output_dir, results, asdict(config))
    return results


def _read_json(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="mtpo demo", description=__doc__.strip().split("\n")[0],
                                     epilog="Any option as --key=value, e.g. --iterations=3 --train_prompts=64.")
    parser.add_argument("--help-options", action="store_true", help="list every option with its default")
    args, overrides = parser.parse_known_args(argv)
    if args.help_options:
        for f in DemoConfig.__dataclass_fields__.values():
            print(f"  --{f.name}={f.default!r}: {f.metadata.get('help', '')}")
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        config = load_config(DemoConfig, None, overrides)
        results = run_demo(config)
    except (ConfigError, RecordError, OSError) as e:
        print(f"mtpo demo: error: {e}", file=sys.stderr)
        return 2
    print(report.format_table(results["rows"]))
    print(f"\n{results['seconds']['total']:.0f} s → {config.output_dir}/results.md, results.json, accuracy.png, "
          "training.png")
    return 0
