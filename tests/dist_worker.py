"""Worker for tests/test_distributed.py: run mtpo trainers end to end and dump what they did as JSON.

    python tests/dist_worker.py SPEC.json                                        # one process
    python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py SPEC.json   # two (gloo)

SPEC.json = {"world_size": N, "jobs": [{"name", "trainer": "dpo"|"kto"|"sft", "config": {...},
"result": "path.json"}, ...]}. Each job calls the library's own `train_<trainer>(config)` (the code
path `mtpo dpo|kto|sft` runs); the worker only *observes*, through thin wrappers installed on
`MTPOTrainer`, and writes `<result>.rank<r>.json` per process:

    world_size, rank          as seen by torch.distributed AND by the Trainer (must equal SPEC's)
    log_history               trainer.state.log_history (every rank, to check logs agree)
    ref_logps                 {"train"|"eval": {position: value}} after precompute_ref_log_probs
    kl_baselines              KTO: z0 of every training micro-batch, as this process computed it
    summary                   train_<trainer>'s return value (data reports: skipped rows ...)
    param_checksums           {name: [sum, sum of squares]} of this rank's final weights

The worker fails loudly (exit 1) when the world size is not what the spec says — e.g. under
`accelerate launch --cpu --num_processes 2`, which silently starts ONE process.
"""

from __future__ import annotations

import json
import os
import sys
import traceback

import torch


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class Observer:
    """Wrappers around MTPOTrainer methods that record (never change) what happens."""

    def __init__(self):
        from mtpo.trainers.base import MTPOTrainer

        self.cls = MTPOTrainer
        self.originals = {"train": MTPOTrainer.train, "precompute_reference": MTPOTrainer.precompute_reference}
        self.reset()
        observer = self

        def train(trainer, *args, **kwargs):
            observer.trainer = trainer
            return observer.originals["train"](trainer, *args, **kwargs)

        def precompute_reference(trainer, dataset, layout):
            observer.trainer = trainer
            out = observer.originals["precompute_reference"](trainer, dataset, layout)
            if dataset is not None and len(dataset):
                split = "train" if dataset is trainer.train_dataset else "eval"
                observer.ref_logps[split] = {str(e.position): _plain(e.ref_logps) for e in dataset.items}
            return out

        MTPOTrainer.train = train
        MTPOTrainer.precompute_reference = precompute_reference
        try:
            from mtpo.trainers.kto import KTOTrainer
        except ImportError:
            return
        kl_baseline = KTOTrainer.kl_baseline

        def observed_kl_baseline(trainer, *args, **kwargs):
            z0 = kl_baseline(trainer, *args, **kwargs)
            if trainer.model.training:
                observer.kl_baselines.append(float(z0))
            return z0

        KTOTrainer.kl_baseline = observed_kl_baseline

    def reset(self):
        self.trainer = None
        self.ref_logps = {}
        self.kl_baselines = []


def _plain(value):
    if isinstance(value, (tuple, list)):
        return [float(v) for v in value]
    return None if value is None else float(value)


def _train_fn(trainer: str):
    import importlib

    module = importlib.import_module(f"mtpo.trainers.{trainer}")
    config_cls = next(getattr(module, n) for n in dir(module) if n.lower() == f"{trainer}config")
    return config_cls, getattr(module, f"train_{trainer}")


def run_job(job: dict, expected_world: int, observer: Observer) -> dict:
    from mtpo.config import MTPOConfig, build_config

    if job["trainer"] == "probe":  # only start the processes and report what they see
        config = build_config(MTPOConfig, dict(job["config"]))
        return {"world_size": _world_size(), "trainer_world_size": config.world_size, "rank": config.process_index,
                "mixed_precision": config.mixed_precision}
    config_cls, train = _train_fn(job["trainer"])
    config = build_config(config_cls, dict(job["config"]))
    if config.world_size != expected_world:
        raise RuntimeError(f"Trainer sees world_size={config.world_size}, expected {expected_world}")
    observer.reset()
    summary = train(config)
    trainer = observer.trainer
    model = trainer.accelerator.unwrap_model(trainer.model)
    checksums = {n: [p.detach().double().sum().item(), p.detach().double().pow(2).sum().item()]
                 for n, p in model.named_parameters()}
    return {"world_size": _world_size(), "trainer_world_size": config.world_size,
            "rank": config.process_index, "log_history": trainer.state.log_history,
            "ref_logps": observer.ref_logps, "kl_baselines": observer.kl_baselines, "summary": summary, "param_checksums": checksums}


def main(spec_path: str) -> int:
    with open(spec_path, encoding="utf-8") as f:
        spec = json.load(f)
    expected = int(spec["world_size"])
    torch.set_num_threads(1)
    observer = Observer()
    for job in spec["jobs"]:
        if expected == 1:  # one process: a failing job must not take the others' results with it
            try:
                result = run_job(job, expected, observer)
            except Exception:
                with open(f"{job['result']}.rank0.json", "w", encoding="utf-8") as f:
                    json.dump({"error": traceback.format_exc()}, f)
                continue
        else:
            result = run_job(job, expected, observer)
        if result["world_size"] != expected:
            raise RuntimeError(f"{job['name']}: world size {result['world_size']}, expected {expected} "
                               "(`accelerate launch --cpu --num_processes N` starts ONE process; use torchrun)")
        path = f"{job['result']}.rank{result['rank']}.json"
        with open(path, "w", encoding="utf-8") as f:
            json.dump(result, f, default=str)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1]))
    except Exception:
        traceback.print_exc()
        sys.stderr.flush()
        os._exit(1)  # do not hang in a collective the other rank will never join
