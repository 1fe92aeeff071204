"""Benchmark: one optimizer step of mtpo vs TRL (DPO and KTO) — wall time and peak memory.

Both libraries are driven through their own ``Trainer`` subclasses (``trainer.train()`` with a small
``max_steps``); a ``TrainerCallback`` times each step from ``on_step_begin`` to ``on_step_end``
(forward + backward of policy, reference forward, optimizer step, zero_grad; batch collation and
logging fall outside the window). The reported time is the median of ``--repeats`` steps after
``--warmup`` steps. Every (library, algorithm, vocab, seq) runs in its own subprocess; peak memory is
``ru_maxrss`` on CPU and ``torch.cuda.max_memory_allocated`` on CUDA, and "step Δ" is that peak minus
the memory held when training starts (models, data, imported libraries).

Same work on both sides (see docs/benchmarks.md for the full list of settings):
  * the same tiny Llama (random init from a config, untied LM head) as policy AND as a separate frozen
    reference model on both sides (no precomputed reference log-probs on either side);
  * the same single-turn token-id data: prompt = seq/4 tokens, completions = 3·seq/4 tokens, no
    padding; the completion is the loss mask on both sides (TRL ``completion_mask`` = mtpo ``trainable``);
  * the same batch (``--batch`` pairs for DPO, ``--kto-batch`` trajectories for KTO), β, optimizer
    (AdamW, constant lr), no gradient checkpointing, no padding-free, no Liger, fp32 on CPU / bf16 on CUDA.
TRL's tokenization is bypassed (a one-method subclass returns the pre-tokenized dataset as-is, with
KTO's KL completions built exactly as TRL builds them); its training step is untouched.

``--multiturn`` (default on) adds mtpo rows on multi-turn data of the same length (``--multiturn-seq``,
default the largest ``--seq``): after the prompt, rounds of 192 policy tokens + 64 tool-output tokens
(``--round``); only the policy tokens are trained. TRL cannot express that mask (it would train on the
tool outputs too), so those rows have no TRL column. ``--libs trl-compact`` runs TRL forced to score
only labelled positions, as it does with Triton on GPU (on CPU it scores every position).

    python bench/bench_train_step.py --out bench/results/train_step            # CPU grid (19 min, 2 cores)
    python bench/bench_train_step.py --device cuda --out bench/results/train_step_gpu   # bf16, hidden 1024
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import benchlib as bl

SCRIPT = Path(__file__).resolve()
ROUND = 256  # multi-turn layout: per round of 256 tokens, 192 policy tokens then 64 tool-output tokens
PRESETS = {  # --device → defaults (any flag overrides)
    "cpu": dict(hidden=64, layers=2, batch=1, kto_batch=2, warmup=1, repeats=2, dtype="float32"),
    "cuda": dict(hidden=1024, layers=4, batch=2, kto_batch=4, warmup=2, repeats=5, dtype="bfloat16"),
}


# ------------------------------------------------------------------------------------------ data


def make_rows(args, rng) -> list[dict]:
    """Token-id rows. DPO: prompt/chosen/rejected ids; KTO: prompt/completion ids + label."""
    import numpy as np

    prompt_len = args.seq // 4
    completion_len = args.seq - prompt_len
    n = args.batch if args.algo == "dpo" else args.kto_batch

    def ids(k):
        return rng.integers(3, args.vocab, size=k, dtype=np.int64).tolist()

    if args.algo == "dpo":
        return [{"prompt_ids": ids(prompt_len), "chosen_ids": ids(completion_len),
                 "rejected_ids": ids(completion_len)} for _ in range(n)]
    return [{"prompt_ids": ids(prompt_len), "completion_ids": ids(completion_len), "label": i % 2 == 0}
            for i in range(n)]


def trainable_mask(prompt_len: int, total: int, multiturn: bool, round_len: int = ROUND):
    """mtpo's loss mask for a row: the completion (single-turn) or its policy rounds (multi-turn:
    the first 3/4 of every `round_len` tokens trained, the last 1/4 a tool output)."""
    import numpy as np

    mask = np.zeros(total, dtype=bool)
    mask[prompt_len:] = True
    if multiturn:
        offset = np.arange(total - prompt_len)
        mask[prompt_len:] = offset % round_len < 3 * round_len // 4
    return mask


# ------------------------------------------------------------------------------------------ trainers


def common_args(args, out_dir: str) -> dict:
    """TrainingArguments shared verbatim by both libraries."""
    cuda = args.device == "cuda"
    return dict(
        output_dir=out_dir, max_steps=args.warmup + args.repeats, per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1, learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch", seed=args.seed, data_seed=args.seed,
        logging_steps=1, save_strategy="no", eval_strategy="no", report_to="none", disable_tqdm=True,
        gradient_checkpointing=False, bf16=cuda, fp16=False, use_cpu=not cuda,
        dataloader_num_workers=0, dataloader_pin_memory=False,
    )


def mtpo_rendered(ids, prompt_len: int, multiturn: bool, index: int, round_len: int = ROUND):
    import numpy as np

    from mtpo.render import Rendered

    ids = np.asarray(ids, dtype=np.int64)
    mask = trainable_mask(prompt_len, len(ids), multiturn, round_len)
    return Rendered(ids, mask, "", np.zeros((len(ids), 2), dtype=np.int64), [], index, prompt_len)


def build_mtpo(args, policy, ref, rows, out_dir):
    from mtpo.collate import ListDataset, PairCollator

    common = common_args(args, out_dir)
    extra = dict(max_length=None, logprob_chunk_size=args.chunk_size) if args.chunk_size else dict(max_length=None)
    if args.algo == "dpo":
        from mtpo.prepare import PairExample
        from mtpo.trainers.dpo import DPOConfig, DPOTrainer

        examples = []
        for i, r in enumerate(rows):
            p = len(r["prompt_ids"])
            chosen = mtpo_rendered(r["prompt_ids"] + r["chosen_ids"], p, args.multiturn, i, args.round)
            rejected = mtpo_rendered(r["prompt_ids"] + r["rejected_ids"], p, args.multiturn, i, args.round)
            examples.append(PairExample(chosen, rejected, i, position=i))
        config = DPOConfig(**common, **extra, beta=args.beta, loss_type="sigmoid", precompute_ref_log_probs=False,
                           nll_coef=0.0, length_penalty=0.0, disable_dropout=True)
        return DPOTrainer(model=policy, args=config, train_dataset=ListDataset(examples), ref_model=ref,
                          data_collator=PairCollator(pad_token_id=0))
    return build_mtpo_kto(args, policy, ref, rows, common, extra)


def build_mtpo_kto(args, policy, ref, rows, common, extra):
    """mtpo's KTOTrainer on the same rows. Each example's KL pair (prompt i + another completion) is the
    one TRL builds (completions rotated by +1 within each batch), so z0 is computed from the same data."""
    from mtpo.collate import LabeledCollator, ListDataset
    from mtpo.prepare import LabeledExample
    from mtpo.trainers.kto import KTOConfig, KTOTrainer

    b = args.kto_batch
    examples = []
    for i, r in enumerate(rows):
        p = len(r["prompt_ids"])
        partner = rows[(i // b) * b + (i - 1) % b] if b > 1 else r
        example = LabeledExample(mtpo_rendered(r["prompt_ids"] + r["completion_ids"], p, args.multiturn, i, args.round),
                                 bool(r["label"]), i, None, position=i)
        example.kl = mtpo_rendered(r["prompt_ids"] + partner["completion_ids"], p, args.multiturn, i, args.round)
        examples.append(example)
    common = {**common, "per_device_train_batch_size": b}
    config = KTOConfig(**common, **extra, beta=args.beta, desirable_weight=1.0, undesirable_weight=1.0,
                       precompute_ref_log_probs=False, disable_dropout=True)
    return KTOTrainer(model=policy, args=config, train_dataset=ListDataset(examples), ref_model=ref,
                      data_collator=LabeledCollator(pad_token_id=0))


def build_trl(args, policy, ref, rows, out_dir):
    import datasets
    from transformers import PreTrainedTokenizerFast

    # TRL needs a tokenizer object for its pad token only: the data are token ids already.
    tokenizer = PreTrainedTokenizerFast(tokenizer_file=str(bl.REPO / "examples/tiny-model/tokenizer.json"))
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(0)
    common = common_args(args, out_dir)
    no_extras = dict(max_length=None, pad_to_multiple_of=None, precompute_ref_log_probs=False,
                     use_liger_kernel=False, activation_offloading=False, sync_ref_model=False,
                     disable_dropout=True, dataset_num_proc=None, beta=args.beta)
    if args.algo == "dpo":
        from trl import DPOConfig, DPOTrainer

        class PreTokenizedDPOTrainer(DPOTrainer):
            def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
                return dataset  # already {prompt_ids, chosen_ids, rejected_ids}: what TRL's map would produce

        config = DPOConfig(**common, **no_extras, padding_free=False, loss_type=["sigmoid"], use_weighting=False,
                           ld_alpha=None, f_divergence_type="reverse_kl", label_smoothing=0.0)
        return PreTokenizedDPOTrainer(model=policy, ref_model=ref, args=config, processing_class=tokenizer,
                                      train_dataset=datasets.Dataset.from_list(rows))
    from trl import KTOConfig, KTOTrainer

    b = args.kto_batch
    for start in range(0, len(rows), b):  # TRL's add_kl_completion_ids: rotate completions by +1 per batch
        block = rows[start:start + b]
        kl = [block[-1]["completion_ids"]] + [r["completion_ids"] for r in block[:-1]]
        for r, c in zip(block, kl):
            r["KL_completion_ids"] = c

    class PreTokenizedKTOTrainer(KTOTrainer):
        def _prepare_dataset(self, dataset, processing_class, args, dataset_name):
            return dataset  # already {prompt_ids, completion_ids, KL_completion_ids, label}

    common = {**common, "per_device_train_batch_size": b}
    config = KTOConfig(**common, **no_extras, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0,
                       train_sampling_strategy="sequential")
    return PreTokenizedKTOTrainer(model=policy, ref_model=ref, args=config, processing_class=tokenizer,
                                  train_dataset=datasets.Dataset.from_list(rows))


# ------------------------------------------------------------------------------------------ worker


def worker(args) -> dict:
    import numpy as np
    import torch
    from transformers import TrainerCallback

    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(args.seed)
    policy = bl.tiny_llama(args.vocab, args.hidden, args.layers, seed=args.seed).to(device, dtype)
    ref = bl.tiny_llama(args.vocab, args.hidden, args.layers, seed=args.seed).to(device, dtype)  # same weights
    rows = make_rows(args, np.random.default_rng(args.seed))
    probe = bl.MemoryProbe(device)
    times: list[float] = []
    cpu_times: list[float] = []  # process CPU seconds (all threads): less sensitive to a busy machine

    class StepTimer(TrainerCallback):
        def on_train_begin(self, *a, **k):
            probe.start()

        def on_step_begin(self, *a, **k):
            probe.sync()
            self.t0, self.c0 = time.perf_counter(), time.process_time()

        def on_step_end(self, *a, **k):
            probe.sync()
            times.append(time.perf_counter() - self.t0)
            cpu_times.append(time.process_time() - self.c0)

    if args.lib == "trl-compact":
        # TRL scores only the positions with a label (`compact`) when Triton is available (CUDA/XPU); on
        # CPU it scores every position. Force the GPU behaviour so the CPU numbers can be compared with
        # it; the LM-head kernel itself keeps TRL's torch fallback.
        import trl.trainer.utils

        trl.trainer.utils._use_triton = lambda device: True
    with tempfile.TemporaryDirectory() as out_dir:
        build = build_mtpo if args.lib == "mtpo" else build_trl
        trainer = build(args, policy, ref, rows, out_dir)
        trainer.add_callback(StepTimer())
        trainer.train()
    peak = probe.peak_mib()
    first = next((h for h in trainer.state.log_history if "loss" in h), {})
    timed = times[args.warmup:]
    return {
        "lib": args.lib, "algo": args.algo, "data": "multi-turn" if args.multiturn else "single-turn",
        "vocab": args.vocab, "seq": args.seq, "device": str(device), "dtype": args.dtype,
        "step_s": statistics.median(timed), "step_s_all": [round(t, 4) for t in times],
        "step_cpu_s": statistics.median(cpu_times[args.warmup:]), "loadavg_1min": os.getloadavg()[0],
        "peak_mib": round(peak, 1), "baseline_mib": round(probe.baseline_mib, 1),
        "step_delta_mib": round(peak - probe.baseline_mib, 1),
        # Step-1 values (policy == reference): equal on both sides when both do the same computation.
        "first_loss": first.get("loss"),
        "first_logps_chosen": first.get("logps/chosen", first.get("logps/desirable")),
    }


# ------------------------------------------------------------------------------------------ driver

WORKER_KEYS = ("lib", "algo", "vocab", "seq", "batch", "kto_batch", "hidden", "layers", "warmup", "repeats",
               "device", "dtype", "beta", "seed", "chunk_size", "round")


def worker_argv(args, multiturn: bool, **overrides) -> list[str]:
    values = {k: getattr(args, k) for k in WORKER_KEYS} | overrides
    argv = []
    for key, value in values.items():
        if value is not None:
            argv += [f"--{key.replace('_', '-')}", str(value)]
    return argv + ["--multiturn" if multiturn else "--no-multiturn"]


def run_grid(args) -> list[dict]:
    results = []
    jobs = [(algo, vocab, seq, lib, False) for algo in args.algos for vocab in args.vocab for seq in args.seq
            for lib in args.libs]
    if args.multiturn:
        multi_seq = args.multiturn_seq or [max(args.seq)]
        jobs += [(algo, vocab, seq, "mtpo", True) for algo in args.algos for vocab in args.vocab for seq in multi_seq]
    for algo, vocab, seq, lib, multi in jobs:
        argv = worker_argv(args, multi, lib=lib, algo=algo, vocab=vocab, seq=seq)
        r = bl.run_worker(SCRIPT, argv, timeout=args.timeout)
        r.update(lib=lib, algo=algo, vocab=vocab, seq=seq, data="multi-turn" if multi else "single-turn")
        results.append(r)
        status = r.get("error") or (f"{r['step_s']:.3f} s/step, peak {r['peak_mib']:.0f} MiB "
                                    f"(Δ {r['step_delta_mib']:.0f})")
        print(f"[{lib:4} {algo} {r['data']:11} V={vocab:>6} T={seq:>5}] {status}  ({r['wall_s']}s)",
              file=sys.stderr, flush=True)
    return results


def ratio(a, b):
    return None if a is None or b is None or not b else a / b


def _rel_diff(a, b):
    return None if a is None or b is None or not b else abs(a - b) / abs(b)


def markdown(results: list[dict], meta: dict) -> str:
    by = {(r["lib"], r["algo"], r["data"], r["vocab"], r["seq"]): r for r in results}
    parts = []
    header = ["algo", "vocab", "seq", "mtpo s/step", "TRL s/step", "time ×", "CPU-time ×", "mtpo peak MiB",
              "TRL peak MiB", "peak ×", "mtpo step Δ MiB", "TRL step Δ MiB", "step Δ ×", "logps₁ rel. diff"]
    rows = []
    for m in results:
        if m["lib"] != "mtpo" or m["data"] != "single-turn":
            continue
        t = by.get(("trl", m["algo"], "single-turn", m["vocab"], m["seq"]), {})
        rows.append([
            m["algo"].upper(), m["vocab"], m["seq"],
            m.get("error") or bl.fmt(m.get("step_s"), ".2f"), t.get("error") or bl.fmt(t.get("step_s"), ".2f"),
            bl.fmt(ratio(m.get("step_s"), t.get("step_s")), ".2f"),
            bl.fmt(ratio(m.get("step_cpu_s"), t.get("step_cpu_s")), ".2f"),
            bl.fmt(m.get("peak_mib"), ".0f"), bl.fmt(t.get("peak_mib"), ".0f"),
            bl.fmt(ratio(m.get("peak_mib"), t.get("peak_mib")), ".2f"),
            bl.fmt(m.get("step_delta_mib"), ".0f"), bl.fmt(t.get("step_delta_mib"), ".0f"),
            bl.fmt(ratio(m.get("step_delta_mib"), t.get("step_delta_mib")), ".2f"),
            bl.fmt(_rel_diff(m.get("first_logps_chosen"), t.get("first_logps_chosen")), ".0e"),
        ])
    if rows:
        parts.append("### Single-turn: mtpo vs TRL (× = mtpo / TRL)\n\n" + bl.md_table(header, rows, "lrr" + "r" * 11))
    compact = [r for r in results if r["lib"] == "trl-compact"]
    if compact:
        rows = []
        for c in compact:
            m = by.get(("mtpo", c["algo"], "single-turn", c["vocab"], c["seq"]), {})
            t = by.get(("trl", c["algo"], "single-turn", c["vocab"], c["seq"]), {})
            rows.append([c["algo"].upper(), c["vocab"], c["seq"], bl.fmt(m.get("step_s"), ".2f"),
                         c.get("error") or bl.fmt(c.get("step_s"), ".2f"), bl.fmt(t.get("step_s"), ".2f"),
                         bl.fmt(ratio(m.get("step_s"), c.get("step_s")), ".2f"),
                         bl.fmt(ratio(m.get("step_cpu_s"), c.get("step_cpu_s")), ".2f"),
                         bl.fmt(c.get("step_delta_mib"), ".0f"),
                         bl.fmt(ratio(m.get("step_delta_mib"), c.get("step_delta_mib")), ".2f")])
        parts.append("### TRL with GPU-style compaction (only labelled positions scored)\n\n" + bl.md_table(
            ["algo", "vocab", "seq", "mtpo s/step", "TRL-compact s/step", "TRL s/step", "time ×", "CPU-time ×",
             "TRL-compact step Δ MiB", "step Δ ×"], rows, "lrrrrrrrrr"))
    multi = [r for r in results if r["data"] == "multi-turn"]
    if multi:
        rows = []
        for r in multi:
            single = by.get(("mtpo", r["algo"], "single-turn", r["vocab"], r["seq"]), {})
            rows.append([r["algo"].upper(), r["vocab"], r["seq"], r.get("error") or bl.fmt(r.get("step_s"), ".2f"),
                         bl.fmt(r.get("peak_mib"), ".0f"), bl.fmt(r.get("step_delta_mib"), ".0f"),
                         bl.fmt(single.get("step_s"), ".2f")])
        parts.append("### Multi-turn (mtpo only; TRL cannot mask tool outputs)\n\n" + bl.md_table(
            ["algo", "vocab", "seq", "mtpo s/step", "peak MiB", "step Δ MiB", "single-turn s/step (same length)"],
            rows, "lrrrrrr"))
    settings = (f"device {meta['device']} ({meta['dtype']}), hidden {meta['hidden']}, {meta['layers']} layers, "
                f"DPO batch {meta['batch']} pair(s), KTO batch {meta['kto_batch']} trajectories, β {meta['beta']}, "
                f"median of {meta['repeats']} steps after {meta['warmup']} warm-up, "
                f"mtpo logprob_chunk_size {meta['chunk_size'] or 'default (by device and vocabulary)'}")
    return "\n\n".join([f"_{settings}_"] + parts)


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--algos", nargs="+", default=["dpo", "kto"], choices=["dpo", "kto"])
    p.add_argument("--libs", nargs="+", default=["mtpo", "trl"], choices=["mtpo", "trl", "trl-compact"],
                   help="trl-compact: TRL forced to score only labelled positions, as it does with Triton on GPU")
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 256000])
    p.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048])
    p.add_argument("--multiturn", action=argparse.BooleanOptionalAction, default=True,
                   help="also run mtpo on multi-turn data (default: on)")
    p.add_argument("--multiturn-seq", dest="multiturn_seq", type=int, nargs="+",
                   help="sequence lengths of the multi-turn rows (default: the largest --seq)")
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--batch", type=int, help="DPO pairs per step")
    p.add_argument("--kto-batch", dest="kto_batch", type=int, help="KTO trajectories per step (TRL needs ≥ 2)")
    p.add_argument("--warmup", type=int)
    p.add_argument("--repeats", type=int)
    p.add_argument("--dtype", choices=["float32", "bfloat16"])
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chunk-size", dest="chunk_size", type=int, help="mtpo logprob_chunk_size (default: mtpo's)")
    p.add_argument("--timeout", type=float, default=600, help="seconds per run before it is recorded as timed out")
    p.add_argument("--out", type=Path, help="write OUT.json and OUT.md")
    p.add_argument("--round", type=int, default=ROUND, help="multi-turn round length (3/4 policy, 1/4 tool output)")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--lib", choices=["mtpo", "trl", "trl-compact"], help=argparse.SUPPRESS)
    p.add_argument("--algo", choices=["dpo", "kto"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    for key, value in PRESETS[args.device].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def worker_from_argv(argv: list[str]) -> dict:
    """Run one configuration in this process (what a ``--worker`` subprocess does)."""
    args = parse(argv)
    args.vocab, args.seq = args.vocab[0], args.seq[0]
    return worker(args)


def main(argv=None):
    args = parse(argv)
    if args.worker:
        print(json.dumps(worker_from_argv(argv if argv is not None else sys.argv[1:])), flush=True)
        return
    started, load_start = time.perf_counter(), os.getloadavg()[0]
    results = run_grid(args)
    meta = {k: getattr(args, k) for k in ("device", "dtype", "hidden", "layers", "batch", "kto_batch", "beta",
                                          "warmup", "repeats", "seed", "chunk_size")}
    meta.update(machine=bl.machine_info(args.device), command=bl.command_line(),
                total_s=round(time.perf_counter() - started, 1),
                loadavg_1min_start_end=[load_start, os.getloadavg()[0]])
    bl.write_outputs(args.out, {"meta": meta, "results": results}, markdown(results, meta))


if __name__ == "__main__":
    main()
