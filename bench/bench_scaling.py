"""Scaling note: peak memory of an mtpo M-DPO step vs sequence length, with the fitted slope.

mtpo never builds the (B, T, V) float32 logits: only the rows whose next token is trained go through
the LM head, ``logprob_chunk_size`` rows at a time (see ``mtpo.logprobs``). So the step's memory
should grow linearly in T with a small constant (hidden states, attention, masks), plus a fixed LM-head
chunk buffer — not by 2·T·V·4 bytes per pair, which is what full float32 logits would cost.

Each length runs in its own subprocess (the worker of ``bench_train_step.py``: the same trainer,
model and data). The slope is a least-squares fit of "step Δ" (peak minus memory held when training
starts) against T over the lengths where the LM-head chunk is already full (trained rows ≥ chunk).

    python bench/bench_scaling.py --out bench/results/scaling
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import benchlib as bl

STEP_SCRIPT = Path(__file__).resolve().parent / "bench_train_step.py"


def fit_line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least-squares y = a + b·x; returns (a, b)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx if sxx else 0.0
    return my - b * mx, b


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=128256)
    p.add_argument("--seq", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192])
    p.add_argument("--libs", nargs="+", default=["mtpo"], choices=["mtpo", "trl"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--hidden", type=int)
    p.add_argument("--layers", type=int)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--chunk-size", dest="chunk_size", type=int)
    p.add_argument("--timeout", type=float, default=600)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)

    started = time.perf_counter()
    results = []
    for lib in args.libs:
        for seq in args.seq:
            argv_ = ["--lib", lib, "--algo", "dpo", "--vocab", str(args.vocab), "--seq", str(seq), "--no-multiturn",
                     "--device", args.device, "--batch", str(args.batch), "--warmup", str(args.warmup),
                     "--repeats", str(args.repeats)]
            for key in ("hidden", "layers", "chunk_size"):
                if getattr(args, key) is not None:
                    argv_ += [f"--{key.replace('_', '-')}", str(getattr(args, key))]
            r = bl.run_worker(STEP_SCRIPT, argv_, timeout=args.timeout)
            r.update(lib=lib, seq=seq, vocab=args.vocab)
            results.append(r)
            status = r.get("error") or f"step Δ {r['step_delta_mib']:.0f} MiB, {r['step_s']:.2f} s/step"
            print(f"[{lib} T={seq}] {status}", file=sys.stderr, flush=True)

    from mtpo.logprobs import chunk_rows

    chunk = chunk_rows(args.chunk_size, args.vocab, args.device)
    lines, fits = [], {}
    for lib in args.libs:
        ok = [r for r in results if r["lib"] == lib and "error" not in r]
        # Only lengths where the LM-head chunk is full: trained rows per step = 2·batch·(3T/4 − 1).
        full = [r for r in ok if 2 * args.batch * (3 * r["seq"] // 4) >= chunk] or ok
        if len(full) >= 2:
            a, b = fit_line([r["seq"] for r in full], [r["step_delta_mib"] for r in full])
            fits[lib] = {"intercept_mib": a, "mib_per_1k_tokens": 1000 * b, "points": [r["seq"] for r in full]}
    rows = []
    for r in results:
        logits = 2 * args.batch * r["seq"] * args.vocab * 4 / 2**20  # (2B, T, V) float32
        rows.append([r["lib"], r["seq"], r.get("error") or bl.fmt(r.get("step_delta_mib"), ".0f"),
                     bl.fmt(r.get("peak_mib"), ".0f"), f"{logits:.0f}", bl.fmt(r.get("step_s"), ".2f")])
    table = bl.md_table(["lib", "seq", "step Δ MiB", "peak MiB", "one (2B,T,V) fp32 logits MiB", "s/step"], rows,
                        "lrrrrr")
    for lib, f in fits.items():
        lines.append(f"- **{lib}**: step Δ ≈ {f['intercept_mib']:.0f} MiB + {f['mib_per_1k_tokens']:.1f} MiB per 1k "
                     f"tokens of sequence length (fit over T = {', '.join(map(str, f['points']))}); full float32 "
                     f"logits would add {2 * args.batch * 1000 * args.vocab * 4 / 2**20:.0f} MiB per 1k tokens")
    head = (f"_mtpo M-DPO step, vocab {args.vocab}, batch {args.batch} pair(s) (2 sequences each), device "
            f"{args.device}, logprob_chunk_size {args.chunk_size or 'default'}_")
    meta = {"vocab": args.vocab, "batch": args.batch, "device": args.device, "chunk_size": args.chunk_size,
            "fits": fits, "machine": bl.machine_info(args.device), "command": bl.command_line(),
            "loadavg_1min": os.getloadavg()[0], "total_s": round(time.perf_counter() - started, 1)}
    bl.write_outputs(args.out, {"meta": meta, "results": results}, "\n\n".join([head, table, "\n".join(lines)]))


if __name__ == "__main__":
    main()
