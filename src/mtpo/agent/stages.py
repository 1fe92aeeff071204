"""The stages `mtpo iterate` runs, one command each: their options, seeds, prompt files and runners.

A stage is a command (`generate`, `dpo`/`kto`/`sft`, `eval`) plus its option values. `stage_values`
builds those values from the loop's config (the user's nested block + what the loop sets: models,
paths, seeds); `write_stage_yaml` saves them as `iter_k/<stage>.yaml`, the exact command to rerun
by hand; a runner executes it — `subprocess_runner` (`python -m mtpo <command> <yaml>`, the model
dies with the process) or `run_stage_inprocess`. `run_stage` makes any stage resumable with a
completion marker written last, atomically.
"""

from __future__ import annotations

import gc
import hashlib
import importlib
import json
import logging
import os
import subprocess
import sys
import time
from typing import Callable

import yaml

from mtpo.agent import pairs as P
from mtpo.config import ConfigError, build_config
from mtpo.data import load_rows

logger = logging.getLogger("mtpo")

SPLIT_ID_FIELD = "prompt_id"  # the id column of a split prompt file (iter_k/prompts.jsonl)
# algorithm → (trainer module, its config class, its train function, the pairs output it trains on)
TRAINERS = {"dpo": ("mtpo.trainers.dpo", "DPOConfig", "train_dpo", "dpo"),
            "kto": ("mtpo.trainers.kto", "KTOConfig", "train_kto", "kto"),
            "sft": ("mtpo.trainers.sft", "SFTConfig", "train_sft", "sft")}
# Keys iterate sets in each nested block (a user value would silently fight the loop, so it is an error).
MANAGED = {"generate": ("model_name_or_path", "prompts", "output_file", "samples_per_prompt", "seed", "shard"),
           "pairs": ("rollouts", "output_dir", "seed"),
           "train": ("model_name_or_path", "ref_model_name_or_path", "train_data", "output_dir", "seed",
                     "resume_from_checkpoint"),
           "eval": ("model_name_or_path", "prompts", "output_dir", "seed")}


def stage_class(stage: str, algorithm: str) -> type:
    if stage == "train":
        module, cls, _, _ = TRAINERS[algorithm]
        return getattr(importlib.import_module(module), cls)
    return {"generate": lambda: importlib.import_module("mtpo.agent.generate").GenerateConfig,
            "eval": lambda: importlib.import_module("mtpo.agent.evaluate").EvalConfig,
            "pairs": lambda: P.PairsConfig}[stage]()


def stage_seed(seed: int, iteration: int, stage: str) -> int:
    """A seed per (run seed, iteration, stage): stable across runs and resumes, different per stage."""
    digest = hashlib.sha256(f"{seed}/{iteration}/{stage}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 1)


def stage_values(config, stage: str, *, iteration: int = 1, workdir: str = ".",
                 policy: str | None = None, reference: str | None = None, placeholders: bool = False) -> dict:
    """The option values one stage runs with: the user's block + what the loop sets."""
    policy = policy or config.model_name_or_path
    seed = stage_seed(config.seed, iteration, stage)
    if stage == "generate":
        prompts = prompts_for(config, iteration, workdir, placeholders)
        values = {**config.generate, "model_name_or_path": policy, "prompts": prompts,
                  "output_file": os.path.join(workdir, "rollouts.jsonl"),
                  "samples_per_prompt": config.samples_per_prompt, "seed": seed}
        if prompts != config.prompts[min(iteration, len(config.prompts)) - 1] and not config.generate.get("id_field"):
            values["id_field"] = SPLIT_ID_FIELD
        return values
    if stage == "pairs":
        return {**config.pairs, "rollouts": [os.path.join(workdir, "rollouts.jsonl")], "output_dir": workdir,
                "seed": seed}
    if stage == "train":
        data = os.path.join(workdir, P.OUTPUT_FILES[TRAINERS[config.algorithm][3]])
        # Log every step unless told otherwise: iterations.jsonl reports the last logged step's loss.
        values = {"logging_steps": 1, **config.train, "model_name_or_path": policy, "train_data": data,
                  "output_dir": os.path.join(workdir, "model"), "seed": seed, "resume_from_checkpoint": "auto"}
        if config.algorithm != "sft":
            values["ref_model_name_or_path"] = reference or config.model_name_or_path
        return values
    return {**config.eval, "model_name_or_path": policy, "prompts": config.eval_prompts or "",
            "output_dir": os.path.join(workdir, "eval"), "seed": stage_seed(config.seed, 0, "eval")}


def prompts_for(config, iteration: int, workdir: str, placeholder: bool = False) -> str:
    """Iteration k's prompt file: the k-th file, the whole file, or part k of one file (written to workdir)."""
    if len(config.prompts) > 1 or not config.split_prompts or config.iterations == 1:
        return config.prompts[min(iteration, len(config.prompts)) - 1]
    path = os.path.join(workdir, "prompts.jsonl")
    if placeholder:
        return config.prompts[0]
    rows = load_rows(config.prompts[0])
    if len(rows) < config.iterations:
        raise ConfigError(f"{config.prompts[0]}: {len(rows)} prompts cannot be split into {config.iterations} parts")
    order = list(range(len(rows)))
    P.prompt_rng(config.seed, "split").shuffle(order)
    part = order[(iteration - 1) * len(rows) // config.iterations: iteration * len(rows) // config.iterations]
    if not config.generate.get("id_field"):  # keep the ids of the whole file ("<name>/<row>"): traceable
        from mtpo.agent.prompts import _default_name  # the naming `mtpo generate` uses

        name = config.generate.get("prompt_name") or _default_name(config.prompts[0])
        rows = [{**row, SPLIT_ID_FIELD: f"{name}/{i}"} for i, row in enumerate(rows)]
    P.atomic_write_jsonl(path, [rows[i] for i in sorted(part)])
    return path


StageRunner = Callable[[str, dict, str], None]  # (command, values, yaml path)


def subprocess_runner(train_launch: list[str] | None = None) -> StageRunner:
    """Each stage as `python -m mtpo <command> <yaml>` (training: `<train_launch> -m mtpo …` when given):
    the model lives and dies with that process."""

    def run(command: str, values: dict, yaml_path: str) -> None:
        launch = list(train_launch) if train_launch and command in TRAINERS else [sys.executable]
        cmd = launch + ["-m", "mtpo", command, yaml_path]
        logger.info("stage: %s", " ".join(cmd))
        result = subprocess.run(cmd)
        if result.returncode != 0:
            raise RuntimeError(f"stage `{' '.join(cmd)}` failed with exit code {result.returncode}")

    return run


def run_stage_inprocess(command: str, values: dict, yaml_path: str) -> None:
    """The stage's library function in this process; its model is freed (and the CUDA cache emptied) after."""

    stage = {"generate": "generate", "eval": "eval"}.get(command, "train")
    algorithm = command if stage == "train" else "dpo"
    config = build_config(stage_class(stage, algorithm), values)
    if stage == "train":
        module, _, fn, _ = TRAINERS[command]
        getattr(importlib.import_module(module), fn)(config)
    elif stage == "generate":
        importlib.import_module("mtpo.agent.generate").run_generate(config)
    else:
        importlib.import_module("mtpo.agent.evaluate").run_eval(config)
    del config
    gc.collect()
    free_cuda_cache()


def free_cuda_cache() -> None:
    if "torch" in sys.modules:
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def run_stage(workdir: str, name: str, fn: Callable[[], dict | None]) -> dict:
    """Run `fn` unless its completion marker exists; the marker (its result + seconds) is written last,
    atomically, so a killed stage never looks finished."""
    marker = os.path.join(workdir, "stages", f"{name}.json")
    if os.path.isfile(marker):
        with open(marker, encoding="utf-8") as f:
            done = json.load(f)
        logger.info("%s: %s already done (%s), skipped", workdir, name, marker)
        return done
    logger.info("==== %s: %s", workdir, name)
    started = time.time()
    result = dict(fn() or {})
    result["seconds"] = round(time.time() - started, 2)
    P.atomic_write_text(marker, json.dumps(result, indent=2) + "\n")
    return result


def write_stage_yaml(workdir: str, name: str, values: dict) -> str:
    """The stage's options as a YAML file: the exact command this stage runs, repeatable by hand."""
    path = os.path.join(workdir, f"{name}.yaml")
    P.atomic_write_text(path, yaml.safe_dump(values, sort_keys=True, allow_unicode=True))
    return path
