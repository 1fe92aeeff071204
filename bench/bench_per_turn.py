"""Benchmark: per-turn vs single-sequence scoring of the same 4-turn thinking trajectories (M-DPO step).

The same research-format trajectories (a question, then 4 assistant turns, each with Qwen3-style
reasoning, separated by 3 tool outputs) rendered two ways with the tiny example tokenizer:

* ``single``: TRL's ``qwen3_training.jinja`` keeps history, so each trajectory is ONE sequence holding all
  four turns (and their reasoning) — the cheapest possible scoring;
* ``per_turn``: Qwen3's own ``qwen3.jinja`` drops earlier reasoning, so mtpo scores each turn in the
  context it was generated in — FOUR sequences per trajectory (`mtpo.render_turns`).

The trained tokens are the same in both (every turn's reasoning + answer + ``<|im_end|>``); what differs is
how many context tokens are run through the model. One step = policy forward + backward over the batch
(``sequence_logps`` + per-trajectory sums), the sigmoid DPO loss against precomputed reference log-probs,
an AdamW step. Each mode runs in its own subprocess; peak memory = ru_maxrss (CPU) or
max_memory_allocated (CUDA), "step Δ" = peak minus the memory held before the first step.

    nice python bench/bench_per_turn.py --out bench/results/per_turn
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import benchlib as bl

TINY = bl.REPO / "examples" / "tiny-model"


def trajectory(i: int, good: bool, turns: int, words: int) -> list[dict]:
    """A question, then `turns` assistant turns (reasoning + code / answer) with tool outputs between."""
    filler = " ".join(f"step{j} checks value {i + j} carefully" for j in range(words // 5))
    msgs = [{"role": "user", "content": f"Problem {i}: what is {3 + i} * {7 + i}?"}]
    for t in range(turns):
        code = f"```python\nprint({3 + i} * {7 + i} + {t if good else -t})\n```"
        last = t == turns - 1
        body = f"The answer is {(3 + i) * (7 + i)}." if last else code
        msgs.append({"role": "assistant", "content": f"<think>\nTurn {t}: {filler}\n</think>\n\n{body}"})
        if not last:
            msgs.append({"role": "user", "content": f"```output\n{(3 + i) * (7 + i) + t}\n{filler}\n```"})
    return msgs


def worker(args) -> dict:
    import torch
    from transformers import AutoTokenizer

    from mtpo import losses as L
    from mtpo.collate import PairCollator, sum_by_owner
    from mtpo.logprobs import sequence_logps
    from mtpo.prepare import prepare_pairs
    from mtpo.render import ChatRenderer, RenderOptions

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    import trl

    folder = Path(trl.__file__).parent / "chat_templates"
    template = (folder / ("qwen3.jinja" if args.mode == "per_turn" else "qwen3_training.jinja")).read_text()
    tok = AutoTokenizer.from_pretrained(TINY)
    renderer = ChatRenderer(tok, RenderOptions(chat_template=template, render_mode=args.mode))
    rows = [{"chosen": trajectory(i, True, args.turns, args.words), "rejected": trajectory(i, False, args.turns,
                                                                                         args.words)}
            for i in range(args.batch)]
    examples, _ = prepare_pairs(rows, renderer, max_length=None)
    batch = PairCollator(tok.pad_token_id)(examples)
    device = torch.device(args.device)
    batch = {k: v.to(device) for k, v in batch.items()}
    model = bl.tiny_llama(args.vocab, args.hidden, args.layers).to(device)
    if args.device == "cuda":
        model = model.to(torch.bfloat16)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ref = torch.zeros(2 * args.batch, device=device)  # precomputed reference: a constant per trajectory
    probe = bl.MemoryProbe(args.device)
    probe.start()
    times, cpu = [], []
    for _ in range(args.warmup + args.repeats):
        started, cpu_started = time.perf_counter(), time.process_time()
        logps, _ = sequence_logps(model, batch["input_ids"], batch["attention_mask"], batch["trainable"])
        logps = sum_by_owner(logps, batch.get("seq_owner"))
        chosen, rejected = logps[: args.batch], logps[args.batch:]
        losses, _, _ = L.preference_loss("sigmoid", chosen, rejected, ref[: args.batch], ref[args.batch:], beta=0.1)
        losses.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        probe.sync()
        times.append(time.perf_counter() - started)
        cpu.append(time.process_time() - cpu_started)
    peak = probe.peak_mib()
    shape = tuple(batch["input_ids"].shape)
    return {"mode": args.mode, "step_s": statistics.median(times[args.warmup:]), "step_s_all": times,
            "cpu_s": statistics.median(cpu[args.warmup:]),
            "peak_mib": peak, "step_delta_mib": peak - probe.baseline_mib, "sequences": shape[0],
            "padded_width": shape[1], "real_tokens": int(batch["attention_mask"].sum()),
            "trained_tokens": int(batch["trainable"].sum())}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--mode", choices=["single", "per_turn"], default="single")
    p.add_argument("--modes", nargs="+", default=["single", "per_turn"])
    p.add_argument("--turns", type=int, default=4)
    p.add_argument("--words", type=int, default=60, help="words of reasoning per turn (and of each tool output)")
    p.add_argument("--batch", type=int, default=2, help="pairs per step")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", type=Path)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        import json

        print(json.dumps(worker(args)), flush=True)
        return None
    started = time.perf_counter()
    shared = ["--turns", str(args.turns), "--words", str(args.words), "--batch", str(args.batch), "--vocab",
              str(args.vocab), "--hidden", str(args.hidden), "--layers", str(args.layers), "--threads",
              str(args.threads), "--device", args.device, "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    results = []
    for mode in args.modes:
        r = bl.run_worker(Path(__file__), ["--mode", mode, *shared], timeout=args.timeout)
        r.setdefault("mode", mode)
        results.append(r)
        status = r.get("error") or "{:.3f} s/step, step Δ {:.0f} MiB".format(r["step_s"], r["step_delta_mib"])
        print(f"[{mode}] {status}", file=sys.stderr, flush=True)
    base = next((r for r in results if r["mode"] == "single" and "error" not in r), None)
    rows = []
    for r in results:
        if "error" in r:
            rows.append([r["mode"], r["error"]] + [""] * 8)
            continue
        ratio = f"{r['step_s'] / base['step_s']:.2f}×" if base else "—"
        mem = f"{r['step_delta_mib'] / base['step_delta_mib']:.2f}×" if base and base["step_delta_mib"] > 0 else "—"
        cpu = f"{r['cpu_s'] / base['cpu_s']:.2f}×" if base else "—"
        rows.append([r["mode"], r["sequences"], r["padded_width"], r["real_tokens"], r["trained_tokens"],
                     f"{r['step_s']:.3f}", ratio, f"{r['cpu_s']:.3f}", cpu, f"{r['step_delta_mib']:.0f} ({mem})"])
    table = bl.md_table(["mode", "sequences", "padded width", "real tokens", "trained tokens", "s/step",
                         "time vs single", "CPU s/step", "CPU time vs single", "step Δ MiB (vs single)"], rows,
                        "lrrrrrrrrr")
    head = (f"_M-DPO step, {args.batch} pairs of {args.turns}-turn thinking trajectories, tiny Llama (vocab "
            f"{args.vocab}, hidden {args.hidden}, {args.layers} layers), {args.device}, {args.threads} thread(s), "
            f"median of {args.repeats} steps_")
    meta = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "machine": bl.machine_info(args.device),
            "command": bl.command_line(), "loadavg_1min": os.getloadavg()[0],
            "total_s": round(time.perf_counter() - started, 1)}
    bl.write_outputs(args.out, {"meta": meta, "results": results}, "\n\n".join([head, table]))
    return results


if __name__ == "__main__":
    main()
