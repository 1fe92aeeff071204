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
            margin = a.get(key.replace("accuracies", "margins"))
            if "accuracies" in key and margin is not None and abs(margin) < 1e-3:
                continue  # policy ≈ reference (step 1): chosen > rejected is decided by round-off
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


def test_cpu_launch_without_use_cpu_trains_distributed(workdir, single, initial_weights):
    """`torchrun --nproc_per_node 2` on a machine without GPU and without `use_cpu`: one data-parallel
    run on CPU/gloo, not two independent trainings each writing every metrics.jsonl line."""
    job = _job("dpo", workdir, "2x2-no-use-cpu", 2)
    job["config"]["use_cpu"] = False
    _launch(workdir, "multi-no-use-cpu", 2, [job])
    rank0, rank1 = _result(job, 0), _result(job, 1)
    assert (rank0["trainer_world_size"], rank1["trainer_world_size"]) == (2, 2)
    one = single["dpo"]["big"]
    _assert_logs_match(_logs(rank0), _logs(one), "2 processes without use_cpu vs 1 process")
    _assert_weights_match(_weights(rank0), _weights(one), initial_weights)
    with open(os.path.join(job["config"]["output_dir"], "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3]  # each step once
    assert [r["step"] for r in records if "eval_loss" in r] == [3]


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


@pytest.fixture(scope="module")
def per_turn(workdir):
    """DPO with Qwen3's own template (drops earlier reasoning): rows are scored per turn (several sequences
    per trajectory, `seq_owner` in every batch). One process × 4 vs two × 2, like the runs above."""
    from conftest import read_template

    template = workdir / "qwen3.jinja"
    template.write_text(read_template("qwen3"), encoding="utf-8")
    rows = []
    for name in ("dpo_train.jsonl", "dpo_eval.jsonl"):
        rows = [json.loads(x) for x in (workdir / name).read_text(encoding="utf-8").splitlines()]
        for row in rows:  # give every assistant turn Qwen3-style reasoning, kept as generated
            for side in ("chosen", "rejected"):
                if isinstance(row.get(side), list):
                    for m in row[side]:
                        if m.get("role") == "assistant":
                            m["content"] = f"<think>\nLet me think about {side}.\n</think>\n\n" + m["content"]
        _write_jsonl(workdir / f"per_turn_{name}", rows)
    jobs = {}
    for run, world, per_device in (("1x4", 1, 4), ("2x2", 2, 2)):
        job = _job("dpo", workdir, f"per-turn-{run}", per_device)
        job["config"].update(chat_template=str(template), train_data=str(workdir / "per_turn_dpo_train.jsonl"),
                             eval_data=str(workdir / "per_turn_dpo_eval.jsonl"))
        _launch(workdir, f"per-turn-{run}", world, [job])
        jobs[run] = [_result(job, rank) for rank in range(world)]
    return jobs


@pytest.mark.skipif("dpo" not in TRAINERS, reason="DPO trainer not present")
def test_per_turn_rows_train_identically_on_two_processes(per_turn, initial_weights, workdir):
    from transformers import AutoTokenizer

    from mtpo.data import parse_pair
    from mtpo.render import ChatRenderer, RenderOptions
    from mtpo.render_turns import TurnSequences

    renderer = ChatRenderer(AutoTokenizer.from_pretrained(TINY),
                            RenderOptions(chat_template=(workdir / "qwen3.jinja").read_text(encoding="utf-8")))
    rows = [json.loads(x) for x in (workdir / "per_turn_dpo_train.jsonl").read_text(encoding="utf-8").splitlines()]
    multi_turn = [r for r in rows if isinstance(r.get("chosen"), list) and len(r["chosen"]) > 2][:3]
    assert multi_turn and all(isinstance(renderer.render_pair(parse_pair(r, 0))[0], TurnSequences) for r in multi_turn)
    (one,), (rank0, rank1) = per_turn["1x4"], per_turn["2x2"]
    _assert_logs_match(_logs(rank0), _logs(one), "per-turn DPO, 2 processes vs 1")
    _assert_weights_match(_weights(rank0), _weights(one), initial_weights)
    for split in ("train", "eval"):
        for position, values in one["ref_logps"][split].items():
            assert rank0["ref_logps"][split][position] == pytest.approx(values, rel=1e-5, abs=1e-4), (split, position)


# ------------------------------------------------------------------------------------------ launchers


def _probe(tmp, launcher: list[str], name: str) -> subprocess.CompletedProcess:
    """Start `launcher + [worker, spec]` with a job that only reports the world size each process sees."""
    job = {"name": name, "trainer": "probe", "result": str(tmp / name),
           "config": {"output_dir": str(tmp / f"out-{name}"), "use_cpu": True, "report_to": "none"}}
    spec = tmp / f"{name}.spec.json"
    spec.write_text(json.dumps({"world_size": 2, "jobs": [job]}))
    return subprocess.run(launcher + [WORKER, str(spec)], env=_env(), cwd=ROOT, capture_output=True, text=True,
                          timeout=TIMEOUT)


def test_shipped_ddp_config_launches_two_processes(tmp_path):
    """`accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes 2` (use_cpu in the mtpo
    config selects gloo) really starts two processes that see each other."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                os.path.join(ROOT, "configs", "accelerate", "ddp.yaml"), "--num_processes", "2",
                "--mixed_precision", "no", "--main_process_port", str(_free_port())]
    proc = _probe(tmp_path, launcher, "ddp-probe")
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"ddp-probe.rank{rank}.json").read_text())
        assert (result["world_size"], result["trainer_world_size"], result["rank"]) == (2, 2, rank)


def test_accelerate_cpu_flag_never_passes_silently_with_one_process(tmp_path):
    """`accelerate launch --cpu --num_processes 2` starts ONE process (accelerate's simple launcher);
    the worker's world-size check turns that into a failure instead of a 1-process 'pass'."""
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
                "--main_process_port", str(_free_port())]
    proc = _probe(tmp_path, launcher, "cpu-probe")
    if proc.returncode == 0:  # a future accelerate that does start two processes is fine too
        for rank in (0, 1):
            assert json.loads((tmp_path / f"cpu-probe.rank{rank}.json").read_text())["world_size"] == 2
    else:
        assert "world size 1, expected 2" in proc.stderr + proc.stdout


# ------------------------------------------------------------------------------------------ FSDP2


def _launch_env(config_name: str) -> dict[str, str]:
    """The environment `accelerate launch --config_file configs/accelerate/<name>.yaml` gives its processes."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    path = os.path.join(ROOT, "configs", "accelerate", f"{config_name}.yaml")
    args = launch_command_parser().parse_args(["--config_file", path, "--main_process_port", "0", "train.py"])
    args, defaults, mixed_precision_from_config = _validate_launch_command(args)
    if args.use_deepspeed:  # what launch_command adds before calling the DeepSpeed launcher
        fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mixed_precision_from_config else [])
        args.deepspeed_fields_from_accelerate_config = ",".join(fields)
        return prepare_deepspeed_cmd_env(args)[1]
    if args.use_fsdp or args.multi_gpu:
        return prepare_multi_gpu_env(args)
    return prepare_simple_launcher_cmd_env(args)[1]


def test_fsdp2_log_probs_and_gradients_are_exact(tmp_path):
    """Under FSDP2 as accelerate shards a model (configs/accelerate/fsdp2.yaml → fsdp2_prepare_model),
    calling the LM head outside the root forward gives the unsharded model's log-probs and gradients;
    the FSDP2 reference (RAM-efficient loading) matches too; a head left in a root unit that reshards
    after forward raises mtpo's clear error."""
    env = _env()
    env.update({k: v for k, v in _launch_env("fsdp2").items() if k.startswith("FSDP_") or k == "ACCELERATE_USE_FSDP"})
    env.pop("ACCELERATE_USE_FSDP", None)  # FSDP is driven by the worker itself (accelerate enables it on GPUs only)
    out = tmp_path / "fsdp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(_free_port()), os.path.join(HERE, "fsdp_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT)
    assert proc.returncode == 0, proc.stderr[-6000:]
    for rank in (0, 1):
        result = json.loads((tmp_path / f"fsdp.rank{rank}.json").read_text())
        assert result["policy_logps_err"] < 1e-4  # log-prob sums ~ -100
        assert result["policy_grad_err"] < 1e-5
        assert result["reference_err"] < 1e-4
        assert result["root_only_error"] and "not an FSDP unit of its own" in result["root_only_error"]


# ------------------------------------------------------------------------------------------ shipped configs

CONFIG_NAMES = ("single", "ddp", "zero2", "zero3", "fsdp2")


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_accelerate_config_names_only_known_options(name):
    """Parses as YAML, loads as accelerate's ClusterConfig (which rejects unknown top-level keys), and
    every nested deepspeed_config / fsdp_config key is an option `accelerate launch` knows (unknown
    nested keys would be silently ignored by the launcher)."""
    import yaml
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file
    from accelerate.commands.launch import launch_command_parser

    path = os.path.join(ROOT, "configs", "accelerate", f"{name}.yaml")
    with open(path, encoding="utf-8") as f:
        raw = yaml.safe_load(f)
    assert isinstance(load_config_from_file(path), ClusterConfig)
    options = {action.dest for action in launch_command_parser()._actions}
    for key in raw.get("deepspeed_config", {}):
        assert key in options, f"{name}: deepspeed_config.{key} is not an accelerate launch option"
    for key in raw.get("fsdp_config", {}):
        assert (key if key.startswith("fsdp_") else f"fsdp_{key}") in options, f"{name}: fsdp_config.{key} unknown"
    ds_file = raw.get("deepspeed_config", {}).get("deepspeed_config_file")
    if ds_file:
        assert os.path.isfile(os.path.join(ROOT, ds_file)), ds_file


@pytest.mark.parametrize("name", CONFIG_NAMES)
def test_accelerate_config_builds_the_intended_plugin(name, monkeypatch):
    """The launcher's environment for each file builds accelerate's plugin with the settings we rely on
    (no DeepSpeed install needed for this): ZeRO-3 partitions at load and saves gathered 16-bit weights,
    FSDP2 saves a full state dict."""
    from accelerate.utils import DeepSpeedPlugin, FullyShardedDataParallelPlugin

    env = _launch_env(name)
    for key in [k for k in os.environ if k.startswith(("ACCELERATE_", "FSDP_"))]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        if key.startswith(("ACCELERATE_", "FSDP_")):
            monkeypatch.setenv(key, value)
    if name in ("single", "ddp"):
        assert "ACCELERATE_USE_DEEPSPEED" not in env and "ACCELERATE_USE_FSDP" not in env
        assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"
    elif name.startswith("zero"):
        plugin = DeepSpeedPlugin()
        stage = int(name[-1])
        assert plugin.zero_stage == stage and plugin.deepspeed_config["zero_optimization"]["stage"] == stage
        assert plugin.zero3_init_flag == (stage == 3)
        if stage == 3:
            assert plugin.deepspeed_config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    else:
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2
        assert "FULL_STATE_DICT" in str(plugin.state_dict_type)
        assert plugin.reshard_after_forward is True and plugin.cpu_ram_efficient_loading is True


# DeepSpeed config keys, from DeepSpeed's own sources (found with the code search; DeepSpeed need not be
# installed): deepspeed/runtime/constants.py and docs/_pages/config-json.md (top level),
# deepspeed/runtime/zero/config.py (DeepSpeedZeroConfig fields and their aliases),
# deepspeed/runtime/zero/offload_config.py (offload_param / offload_optimizer).
DS_TOP_LEVEL = {
    "train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer", "scheduler",
    "steps_per_print", "wall_clock_breakdown", "memory_breakdown", "gradient_clipping", "bf16", "bfloat16", "fp16",
    "amp", "zero_optimization", "zero_allow_untested_optimizer", "zero_force_ds_cpu_optimizer", "sparse_gradients",
    "prescale_gradients", "gradient_predivide_factor", "communication_data_type", "fp32_allreduce", "dump_state",
    "checkpoint", "data_types", "dataloader_drop_last", "activation_checkpointing", "flops_profiler", "tensorboard",
    "wandb", "csv_monitor", "comms_logger", "graph_harvesting", "disable_allgather", "vocabulary_size",
}
DS_ZERO = {
    "stage", "contiguous_gradients", "reduce_scatter", "reduce_bucket_size", "use_multi_rank_bucket_allreduce",
    "allgather_partitions", "allgather_bucket_size", "overlap_comm", "load_from_fp32_weights", "elastic_checkpoint",
    "offload_param", "offload_optimizer", "sub_group_size", "stage3_prefetch_bucket_size",
    "stage3_param_persistence_threshold", "stage3_model_persistence_threshold", "stage3_max_live_parameters",
    "stage3_max_reuse_distance", "stage3_gather_16bit_weights_on_model_save", "stage3_module_granularity_threshold",
    "stage3_use_all_reduce_for_fetch_params", "ignore_unused_parameters", "round_robin_gradients",
    "zero_hpz_partition_size", "zero_quantized_weights", "zero_quantized_nontrainable_weights",
    "zero_quantized_gradients", "mics_shard_size", "mics_hierarchical_params_gather", "memory_efficient_linear",
    "override_module_apply", "log_trace_cache_warnings",
}
DS_OFFLOAD = {"device", "nvme_path", "buffer_count", "buffer_size", "max_in_cpu", "pin_memory", "pipeline_read",
              "pipeline_write", "fast_init", "ratio"}
DS_PRECISION = {"enabled", "auto_cast", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
                "consecutive_hysteresis", "min_loss_scale", "fused_mode", "immediate_grad_update"}
# The "auto" values transformers fills from TrainingArguments (transformers/integrations/deepspeed.py:
# trainer_config_process / trainer_config_finalize); "auto" anywhere else would reach DeepSpeed as is.
DS_AUTO_FILLED = {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                  "gradient_clipping", "bf16.enabled", "fp16.enabled", "zero_optimization.reduce_bucket_size",
                  "zero_optimization.stage3_prefetch_bucket_size",
                  "zero_optimization.stage3_param_persistence_threshold"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


@pytest.mark.parametrize("name", ("zero2", "zero3"))
def test_deepspeed_json_names_only_documented_keys(name):
    with open(os.path.join(ROOT, "configs", "deepspeed", f"{name}.json"), encoding="utf-8") as f:
        config = json.load(f)
    assert set(config) <= DS_TOP_LEVEL, set(config) - DS_TOP_LEVEL
    zero = config["zero_optimization"]
    assert set(zero) <= DS_ZERO, set(zero) - DS_ZERO
    for key in ("offload_param", "offload_optimizer"):
        assert set(zero.get(key, {})) <= DS_OFFLOAD
    for key in ("bf16", "fp16"):
        assert set(config.get(key, {})) <= DS_PRECISION
    assert zero["stage"] == int(name[-1])
    assert "optimizer" not in config and "scheduler" not in config  # Trainer's AdamW + schedule, as configured
    autos = {k for k, v in _flatten(config).items() if v == "auto"}
    assert autos <= DS_AUTO_FILLED, autos - DS_AUTO_FILLED
    if name == "zero3":
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True


# ------------------------------------------------------------------------------------------ units


def test_deepspeed_reference_gets_an_inference_engine(monkeypatch):
    """The frozen reference is `deepspeed.initialize`d without optimizer/scheduler: ZeRO-3 stays ZeRO-3 with
    the bucket sizes transformers would fill (nothing "auto" left); ZeRO-1/2 become a stage-0 replica."""
    import types as pytypes

    from mtpo.trainers.parallel import prepare_reference

    seen = []

    class Engine:
        def eval(self):
            seen.append("eval")

    def initialize(model=None, config=None):
        seen.append(config)
        return Engine(), None, None, None

    monkeypatch.setitem(sys.modules, "deepspeed", pytypes.SimpleNamespace(initialize=initialize))
    model = torch.nn.Linear(4, 4)
    model.config = pytypes.SimpleNamespace(hidden_size=64)
    for stage in (2, 3):
        with open(os.path.join(ROOT, "configs", "deepspeed", f"zero{stage}.json"), encoding="utf-8") as f:
            config = json.load(f)
        config.update(optimizer={"type": "AdamW"}, scheduler={"type": "WarmupLR"}, train_batch_size=8,
                      train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=1)
        config["zero_optimization"]["offload_optimizer"] = {"device": "cpu"}
        state = pytypes.SimpleNamespace(deepspeed_plugin=pytypes.SimpleNamespace(deepspeed_config=config))
        seen.clear()
        prepare_reference(model, pytypes.SimpleNamespace(state=state), "cpu")
        built, _ = seen
        assert "optimizer" not in built and "scheduler" not in built
        assert "offload_optimizer" not in built["zero_optimization"]
        assert '"auto"' not in json.dumps(built)
        assert config["optimizer"] == {"type": "AdamW"}  # the training config is untouched
        if stage == 3:
            zero = built["zero_optimization"]
            assert zero["stage"] == 3 and zero["reduce_bucket_size"] == 64 * 64
            assert zero["stage3_param_persistence_threshold"] == 640
        else:
            assert built["zero_optimization"]["stage"] == 0
    assert not any(p.requires_grad for p in model.parameters())


def test_fsdp1_is_refused_with_a_clear_error():
    import types as pytypes

    from mtpo.trainers.parallel import check_supported

    state = pytypes.SimpleNamespace(fsdp_plugin=pytypes.SimpleNamespace(fsdp_version=1))
    with pytest.raises(ValueError, match="FSDP2 only"):
        check_supported(pytypes.SimpleNamespace(state=state))


@pytest.mark.parametrize("size", [1, 5, 7, 9, 13, 16])
def test_real_rows_drops_exactly_accelerates_padding(size):
    """With 4 processes × batch 2, accelerate's BatchSamplerShard fills the last round with repeats;
    `real_rows` (the gather_for_metrics rule) must keep each remaining example exactly once."""
    import types as pytypes

    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    from mtpo.trainers.parallel import real_rows

    world, per_device = 4, 2
    shards = [list(BatchSamplerShard(BatchSampler(SequentialSampler(range(size)), per_device, False), world, rank,
                                     even_batches=True)) for rank in range(world)]
    rounds = len(shards[0])
    assert all(len(s) == rounds for s in shards)
    kept = []
    for step in range(rounds):
        last = step == rounds - 1
        for rank in range(world):
            batch = shards[rank][step]
            state = pytypes.SimpleNamespace(end_of_dataloader=last, remainder=size % (world * per_device))
            accelerator = pytypes.SimpleNamespace(gradient_state=state, num_processes=world, process_index=rank)
            kept += batch[:real_rows(accelerator, len(batch))]
    assert sorted(kept) == list(range(size))


def test_first_examples_keeps_stacked_blocks_aligned():
    from mtpo.trainers.parallel import first_examples

    ids = torch.arange(8)[:, None].repeat(1, 3)  # (2B, T) rows [c0 c1 c2 c3 ; r0 r1 r2 r3]
    out = first_examples({"input_ids": ids, "idx": torch.tensor([10, 11, 12, 13]), "note": "x"}, 4, 3)
    assert out["input_ids"][:, 0].tolist() == [0, 1, 2, 4, 5, 6]
    assert out["idx"].tolist() == [10, 11, 12] and out["note"] == "x"


def test_mixed_precision_head_outside_autocast():
    """accelerate's mixed precision returns the forward's outputs upcast to float32; a bf16 LM head called
    after it must still work (and give the bf16 model's own log-probs)."""
    from accelerate.utils.operations import convert_outputs_to_fp32
    from transformers import AutoModelForCausalLM

    from mtpo.logprobs import sequence_logps

    model = AutoModelForCausalLM.from_pretrained(TINY, dtype=torch.bfloat16)
    ids = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 12, dtype=torch.bool)
    expected, _ = sequence_logps(model, ids, mask, mask)
    model.forward = convert_outputs_to_fp32(model.forward)  # what Accelerator.prepare does under bf16
    got, _ = sequence_logps(model, ids, mask, mask)
    torch.testing.assert_close(got, expected)
