"""Scale-out correctness: two processes (gloo, CPU) train exactly like one process on the same global batch.

Each trainer runs twice through its real entry point (`train_dpo` / `train_kto` / `train_sft`, what the
CLI calls), driven by tests/dist_worker.py:

    one process  × per-device batch 4                  (python tests/dist_worker.py)
    two processes × per-device batch 2                 (python -m torch.distributed.run --nproc_per_node 2)
    one process  × per-device 2 × grad-accumulation 2  (DPO and SFT; KTO's z0 is per micro-batch, see below)

on 15 training rows of which 2 are skipped (one malformed, one over max_length) and 7 evaluation rows,
so neither the 13 examples nor the 7 divide by the global batch of 4: the last batch of the
reference precompute and of evaluation carries accelerate's padding duplicates. Compared, in this
process: the loss and every logged metric of every step (train and eval), the final weights, the
precomputed reference log-probs of every example, KTO's z0, and the data reports. Tolerances are
float32 round-off: the two runs add the same numbers in a different order (padding to different
lengths, gloo all-reduce of the gradients).

Everything launches once per trainer (module-scoped fixtures) and writes JSON; ~1–2 minutes on 2 cores.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "dist_worker.py")
EXAMPLES = os.path.join(ROOT, "examples")
TINY = os.path.join(EXAMPLES, "tiny-model")
TIMEOUT = 600

TRAINERS = [t for t in ("dpo", "kto", "sft") if importlib.util.find_spec(f"mtpo.trainers.{t}") is not None]
REFERENCE_TRAINERS = [t for t in ("dpo", "kto") if t in TRAINERS]  # those with precomputed reference log-probs
GA_TRAINERS = [t for t in ("dpo", "sft") if t in TRAINERS]
# Logged keys that legitimately differ between the runs (timings, FLOP estimates, epoch fraction).
NOT_COMPARED = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "eval_runtime",
                "eval_samples_per_second", "eval_steps_per_second", "total_flos", "epoch", "step"}
RTOL, ATOL = 1e-4, 1e-5  # logged scalars (losses ~0.7, rewards ~0.5)
# Differences of two log-prob sums of ~1e3 nats (KTO's z0, rewards): float32 round-off of the sums
LOGPS_ATOL = 5e-3


# ------------------------------------------------------------------------------------------ data


def _rows(name: str) -> list[dict]:
    with open(os.path.join(EXAMPLES, "data", name), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _too_long(row: dict, key: str) -> dict:
    row = json.loads(json.dumps(row))
    row[key][-1]["content"] += " and so on" * 400  # far over max_length: dropped and counted
    return row


def _datasets(trainer: str) -> tuple[list[dict], list[dict]]:
    """(train rows, eval rows): 13 usable + 1 malformed + 1 too long (+ 1 filtered for SFT); 7 to evaluate."""
    if trainer == "dpo":
        rows = _rows("dpo_research.jsonl")
        good, evals = rows[:13], _rows("eval_dpo.jsonl")[:7]
        bad, long = {"chosen": [{"role": "user", "content": "hi"}], "rejected": "not a list"}, _too_long(rows[13], "chosen")
    elif trainer == "kto":
        rows = _rows("kto.jsonl")
        pos, neg = [r for r in rows if r["label"]], [r for r in rows if not r["label"]]
        good, evals = pos[:7] + neg[:6], pos[10:14] + neg[10:13]
        bad, long = {"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "x"}]}, \
            _too_long(pos[8], "completion")
    else:  # sft with filter_label: a row labelled false is filtered out (and counted as skipped too)
        rows = _rows("sft.jsonl")
        pos, neg = [r for r in rows if r["label"]], [r for r in rows if not r["label"]]
        good, evals = pos[:13], pos[40:47]
        bad, long = {"messages": "not a list", "label": True}, _too_long(pos[13], "messages")
        good = good[:2] + [neg[0]] + good[2:]
    # 13 usable examples: 3 steps × global batch 4 stay inside the first epoch (at an epoch's end
    # accelerate pads the last batch of a multi-process run with repeated examples; one process doesn't)
    train = good[:5] + [bad] + good[5:9] + [long] + good[9:]
    return train, evals


def _write_jsonl(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def _config(trainer: str, data_dir, out_dir, per_device: int, accumulation: int = 1) -> dict:
    config = {
        "model_name_or_path": TINY, "train_data": str(data_dir / f"{trainer}_train.jsonl"),
        "eval_data": str(data_dir / f"{trainer}_eval.jsonl"), "output_dir": str(out_dir),
        "max_length": 512, "invalid_rows": "skip",
        "per_device_train_batch_size": per_device, "per_device_eval_batch_size": per_device,
        "gradient_accumulation_steps": accumulation,
        # Plain SGD: Adam's m/√v turns round-off-sized gradients into ±lr steps, which would
        # compare the sign of float32 noise rather than the training.
        "optim": "sgd", "learning_rate": 0.2, "lr_scheduler_type": "constant", "max_steps": 3, "seed": 7,
        "logging_steps": 1, "eval_strategy": "steps", "eval_steps": 3, "save_strategy": "no",
        "report_to": "none", "use_cpu": True, "disable_tqdm": True, "dataloader_num_workers": 0,
    }
    if trainer in ("dpo", "kto"):
        config["precompute_ref_log_probs"] = True
    if trainer == "sft":
        config["filter_label"] = True
    return config


# ------------------------------------------------------------------------------------------ launching


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([os.path.join(ROOT, "src"), os.environ.get("PYTHONPATH", "")]),
               HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "ACCELERATE_USE_DEEPSPEED",
                "ACCELERATE_USE_FSDP", "ACCELERATE_MIXED_PRECISION", "CUDA_VISIBLE_DEVICES"):
        env.pop(key, None)
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU / gloo even where a GPU exists
    return env


def _launch(tmp, name: str, world_size: int, jobs: list[dict]) -> None:
    spec = tmp / f"{name}.spec.json"
    spec.write_text(json.dumps({"world_size": world_size, "jobs": jobs}))
    if world_size == 1:
        cmd = [sys.executable, WORKER, str(spec)]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
               "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), WORKER, str(spec)]
    proc = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    if proc.returncode != 0:
        pytest.fail(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")


def _job(trainer: str, tmp, run: str, per_device: int, accumulation: int = 1) -> dict:
    return {"name": f"{trainer}-{run}", "trainer": trainer, "result": str(tmp / f"{trainer}-{run}"),
            "config": _config(trainer, tmp, tmp / f"out-{trainer}-{run}", per_device, accumulation)}


def _result(job: dict, rank: int = 0) -> dict:
    with open(f"{job['result']}.rank{rank}.json", encoding="utf-8") as f:
        result = json.load(f)
    if "error" in result:
        pytest.fail(f"{job['name']} failed:\n{result['error']}")
    return result


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("distributed")
    for trainer in TRAINERS:
        train, evals = _datasets(trainer)
        _write_jsonl(tmp / f"{trainer}_train.jsonl", train)
        _write_jsonl(tmp / f"{trainer}_eval.jsonl", evals)
    return tmp


@pytest.fixture(scope="module")
def single(workdir):
    """One process, every trainer, in one launch: {trainer: {"big": result, "accumulate": result}}."""
    jobs = {t: {"big": _job(t, workdir, "1x4", 4)} for t in TRAINERS}
    for t in GA_TRAINERS:
        jobs[t]["accumulate"] = _job(t, workdir, "1x2x2", 2, 2)
    _launch(workdir, "single", 1, [j for runs in jobs.values() for j in runs.values()])
    return {t: {run: _result(job) for run, job in runs.items()} for t, runs in jobs.items()}


_MULTI: dict = {}


@pytest.fixture(scope="module")
def multi(workdir):
    """Two processes, one launch per trainer (lazily): multi(trainer) → [rank 0 result, rank 1 result]."""

    def get(trainer: str) -> list[dict]:
        if trainer not in _MULTI:
            job = _job(trainer, workdir, "2x2", 2)
            _launch(workdir, f"multi-{trainer}", 2, [job])
            _MULTI[trainer] = [_result(job, rank) for rank in (0, 1)]
        return _MULTI[trainer]

    yield get
    _MULTI.clear()


# ------------------------------------------------------------------------------------------ helpers


def _logs(result: dict) -> list[dict]:
    return [{k: v for k, v in entry.items() if k not in NOT_COMPARED} for entry in result["log_history"]]


def _assert_logs_match(ours: list[dict], theirs: list[dict], what: str) -> None:
    assert len(ours) == len(theirs), f"{what}: {len(ours)} log records vs {len(theirs)}"
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys(), f"{what}: logged keys differ: {sorted(a.keys() ^ b.keys())}"
        for key in a:
            atol = LOGPS_ATOL if any(w in key for w in ("kl", "logps", "rewards")) else ATOL
            assert a[key] == pytest.approx(b[key], rel=RTOL, abs=atol), f"{what}: {key} {a[key]} != {b[key]}"


def _weights(result: dict) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(result["summary"]["output_dir"], "model.safetensors"))


def _assert_weights_match(a: dict, b: dict, start: dict) -> None:
    assert a.keys() == b.keys()
    moved = 0.0
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
        moved = max(moved, (a[name] - start[name]).abs().max().item())
    assert moved > 1e-3, "training did not change the weights: the comparison would be vacuous"


@pytest.fixture(scope="module")
def initial_weights():
    from safetensors.torch import load_file

    return load_file(os.path.join(TINY, "model.safetensors"))


# ------------------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("trainer", TRAINERS)
def test_two_processes_see_world_size_two(trainer, multi):
    """The worker checks torch.distributed *and* the Trainer: both must report 2 (not a silent 1)."""
    for rank, result in enumerate(multi(trainer)):
        assert (result["world_size"], result["trainer_world_size"], result["rank"]) == (2, 2, rank)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_loss_and_final_weights_match_one_process(trainer, single, multi, initial_weights):
    one, (rank0, rank1) = single[trainer]["big"], multi(trainer)
    losses = [[h["loss"] for h in r["log_history"] if "loss" in h] for r in (one, rank0)]
    assert len(losses[0]) == 3
    assert losses[1] == pytest.approx(losses[0], rel=RTOL, abs=ATOL)
    _assert_weights_match(_weights(rank0), _weights(one), initial_weights)
    # DDP keeps the replicas identical: rank 1's weights (never saved) have rank 0's checksums
    for name, (s, sq) in rank0["param_checksums"].items():
        assert rank1["param_checksums"][name] == pytest.approx([s, sq], rel=1e-6, abs=1e-6), name


@pytest.mark.parametrize("trainer", TRAINERS)
def test_logged_metrics_are_global(trainer, single, multi):
    """Every train and eval metric of the 2-process run equals the 1-process value over the same global
    batch (rank-0-only metrics would differ), and both processes log the same values. Eval covers 7
    examples with a global batch of 4: accelerate's padding duplicate must not be counted."""
    one, (rank0, rank1) = single[trainer]["big"], multi(trainer)
    _assert_logs_match(_logs(rank0), _logs(one), f"{trainer}: 2 processes vs 1")
    _assert_logs_match(_logs(rank1), _logs(rank0), f"{trainer}: rank 1 vs rank 0")
    evals = [h for h in rank0["log_history"] if "eval_loss" in h]
    assert len(evals) == 1 and len([k for k in evals[0] if k.startswith("eval_")]) > 3


@pytest.mark.parametrize("trainer", GA_TRAINERS)
def test_gradient_accumulation_matches_one_big_batch(trainer, single, initial_weights):
    big, accumulated = single[trainer]["big"], single[trainer]["accumulate"]
    train_logs = [[h for h in _logs(r) if "loss" in h] for r in (accumulated, big)]
    _assert_logs_match(*train_logs, f"{trainer}: 2 × accumulation 2 vs 4")
    _assert_weights_match(_weights(accumulated), _weights(big), initial_weights)


@pytest.mark.parametrize("trainer", TRAINERS)
def test_skipped_rows_are_counted_once(trainer, single, multi):
    """Every process renders the whole dataset (and each takes its shard of the batches afterwards), so
    the skip report is the same on every process and is NOT summed across them: 2 skipped rows, not 4."""
    one, (rank0, rank1) = single[trainer]["big"], multi(trainer)
    report = one["summary"]["data"]["train"]
    assert report["total"] == len(_datasets(trainer)[0]) and report["kept"] == 13
    assert any(r.startswith("invalid") for r in report["reasons"])
    assert any(r.startswith("longer than max_length") for r in report["reasons"])
    assert rank0["summary"]["data"] == rank1["summary"]["data"] == one["summary"]["data"]
    logged = {h["data/rows_skipped"] for r in (rank0, rank1) for h in r["log_history"] if "data/rows_skipped" in h}
    assert logged == {report["skipped"]}


@pytest.mark.parametrize("trainer", REFERENCE_TRAINERS)
def test_precomputed_reference_matches_per_example(trainer, single, multi):
    """Each process computes its shard; gathered by position, every process holds every example's value,
    equal to the 1-process value — including the last, padded batch (13 and 7 examples, global batch 4)."""
    one, (rank0, rank1) = single[trainer]["big"], multi(trainer)
    for split, size in (("train", 13), ("eval", 7)):
        expected = one["ref_logps"][split]
        assert sorted(map(int, expected)) == list(range(size))
        for result in (rank0, rank1):
            got = result["ref_logps"][split]
            assert got.keys() == expected.keys()
            for position, values in expected.items():
                assert got[position] == pytest.approx(values, rel=1e-5, abs=1e-4), (split, position)
        assert rank0["ref_logps"][split] == rank1["ref_logps"][split]  # bit-identical: one gather


@pytest.mark.skipif("kto" not in TRAINERS, reason="KTO trainer not present")
def test_kto_kl_baseline_is_global_and_identical_on_every_process(single, multi):
    """z0 is the mean over the mismatched pairs of the whole global micro-batch: the same number on both
    processes, and equal to the 1-process z0 over the same 4 examples."""
    one, (rank0, rank1) = single["kto"]["big"], multi("kto")
    assert len(one["kl_baselines"]) == 3
    assert rank0["kl_baselines"] == rank1["kl_baselines"]
    assert rank0["kl_baselines"] == pytest.approx(one["kl_baselines"], rel=RTOL, abs=LOGPS_ATOL)
    assert any(z > 0 for z in one["kl_baselines"]), "z0 clamped to 0 at every step: the comparison is vacuous"
