"""Benchmark: chunked ``sequence_logps`` vs. full-logits log-prob paths (memory and time).

Each (variant, vocab) runs in its own subprocess so peak memory is not polluted by other runs:
peak RSS via ``resource.getrusage`` on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. Time is the
median forward+backward of ``--repeats`` steps after ``--warmup`` steps. The model is a tiny Llama
(``--hidden``, ``--layers``) so that the LM head — the part that scales with the vocabulary —
dominates, as it does for the log-prob computation of real models.

Variants:
  chunked  mtpo.logprobs.sequence_logps (no B×T×V tensor; checkpointed LM-head chunks)
  naive    model(...).logits → float32 log_softmax → gather → masked sum (original research code)
  trl      model(...).logits → trl's selective_log_softmax (row-wise logsumexp) → masked sum

    python bench/bench_logprobs.py --vocab 32000 128256 256000 --seq 1024 --batch 2 --out bench.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def build(args, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).to(device=device, dtype=dtype)
    input_ids = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
    # Multi-turn shape: a 128-token prompt, then alternating 192 generated / 64 external tokens.
    position = torch.arange(args.seq, device=device)
    trainable = (position >= 128) & ((position - 128) % 256 < 192)
    return model, input_ids, attention_mask, trainable.expand(args.batch, -1).clone()


def naive_logps(model, input_ids, attention_mask, trainable, use_trl: bool):
    logits = model(input_ids=input_ids, attention_mask=attention_mask.long(), use_cache=False).logits
    labels = input_ids[:, 1:]
    if use_trl:
        from trl.trainer.utils import selective_log_softmax

        token_logps = selective_log_softmax(logits[:, :-1].float(), labels)  # (B, T-1)
    else:
        logp = logits[:, :-1].float().log_softmax(-1)  # (B, T-1, V) float32
        token_logps = logp.gather(-1, labels[..., None]).squeeze(-1)
    return (token_logps * trainable[:, 1:]).sum(-1)


def step(variant, model, batch, chunk_size):
    from mtpo.logprobs import sequence_logps

    model.zero_grad(set_to_none=True)
    if variant == "chunked":
        logps, _ = sequence_logps(model, *batch, chunk_size=chunk_size)
    else:
        logps = naive_logps(model, *batch, use_trl=variant == "trl")
    logps.sum().backward()
    return logps.detach()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def worker(args) -> dict:
    device = args.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    model, *batch = build(args, device, dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = current_rss_mib()
    times = []
    for i in range(args.warmup + args.repeats):
        sync()
        start = time.perf_counter()
        logps = step(args.worker, model, batch, args.chunk_size)
        sync()
        if i >= args.warmup:
            times.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    return {
        "variant": args.worker, "vocab": args.vocab, "device": str(device), "dtype": str(dtype),
        "median_s": statistics.median(times), "peak_mib": peak, "baseline_mib": base,
        "step_peak_mib": peak - base, "logps": logps.float().cpu().tolist(),
    }


def run_one(args, variant: str, vocab: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", variant, "--vocab", str(vocab)]
    for key in ("seq", "batch", "hidden", "layers", "repeats", "warmup", "chunk_size", "device", "dtype"):
        value = getattr(args, key)
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"variant": variant, "vocab": vocab, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def table(results: list[dict]) -> str:
    lines = [
        "| vocab | variant | time fwd+bwd (s) | peak (MiB) | step peak over baseline (MiB) | max abs Δ logps vs naive |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    naive = {r["vocab"]: r for r in results if r["variant"] == "naive" and "error" not in r}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['vocab']} | {r['variant']} | error: {r['error']} | | | |")
            continue
        ref = naive.get(r["vocab"])
        diff = max(abs(a - b) for a, b in zip(r["logps"], ref["logps"])) if ref else float("nan")
        lines.append(
            f"| {r['vocab']} | {r['variant']} | {r['median_s']:.3f} | {r['peak_mib']:.0f} "
            f"| {r['step_peak_mib']:.0f} | {diff:.2e} |"
        )
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 256000])
    p.add_argument("--variants", nargs="+", default=["chunked", "naive"], choices=["chunked", "naive", "trl"])
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--chunk-size", dest="chunk_size", type=int, help="default: mtpo's (sized by device and vocabulary)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default=None, help="float32 | bfloat16 (default: float32 on CPU, bfloat16 on CUDA)")
    p.add_argument("--out", type=Path, default=None, help="write results as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        args.vocab = args.vocab[0]
        print(json.dumps(worker(args)))
        return
    results = [run_one(args, variant, vocab) for vocab in args.vocab for variant in args.variants]
    meta = {
        "machine": f"{cpu_name()} ({os.cpu_count()} CPUs), {torch.get_num_threads()} torch threads, "
        f"torch {torch.__version__}" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "seq": args.seq, "batch": args.batch, "hidden": args.hidden, "layers": args.layers,
        "chunk_size": args.chunk_size, "loadavg_1min_at_end": os.getloadavg()[0],
    }
    print(table(results))
    print(f"\n{meta['machine']}; seq {args.seq}, batch {args.batch}, hidden {args.hidden}, layers {args.layers}, "
          f"chunk {args.chunk_size or 'default'}; 1-min load average at end {meta['loadavg_1min_at_end']:.1f}")
    if args.out:
        args.out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
