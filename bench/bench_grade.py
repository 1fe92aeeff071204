"""Grader benchmark: MATH self-equivalence, false positives, near misses and answers/second.

    python bench/bench_grade.py                      # full run (~N min on 2 cores), writes bench/results/grade.{json,md}
    python bench/bench_grade.py --limit 200 --pairs 300 --out /tmp/grade   # quick look

What it measures (every failure and every positive verdict is written to the JSON for review):

* **self-equivalence**: each MATH gold answer against the same answer written differently
  (whitespace, `\\frac`→`\\dfrac`, `(`→`\\left(` … `\\right)`, all three at once); must all pass;
* **false positives**: `--pairs` seeded pairs of gold answers from different problems whose
  normalized spellings differ; each "equivalent" verdict is listed (a true equality such as `0.5` vs
  `\\frac12` is not a false positive: review the list; aim 0);
* **near misses**: each gold with one digit changed (`1000000`→`1000001`, `2^{98}`→`2^{99}`); the
  grader must say "not equivalent" unless the value really is unchanged (listed for review);
* **throughput**: graded answers per second, cold cache, one thread and `equivalent_many` over the
  worker pool, for MATH answers and for GSM8K answers.
Never imports torch.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))

from mtpo.agent import grade as G  # noqa: E402
from mtpo.agent.grade import equivalent_many, gold_from_gsm8k, gold_from_math, grader_stats, is_equivalent  # noqa: E402
from mtpo.agent.latexnorm import exact_value, normalize, squash, strip_var  # noqa: E402

DATA = Path("/work/shared/data")


def variants(gold: str) -> dict[str, str]:
    """The same answer written differently (value-preserving rewrites)."""
    ws = re.sub(r"(?<!\\)\s*((?<![\d\\]),|(?<!\\),(?!\d{3})|[=+<>])\s*", r" \1 ", gold)  # not inside 115,000
    ws = re.sub(r"\s*(\\frac|\\sqrt)", r" \1", ws).strip()
    dfrac = re.sub(r"\\frac(?![a-zA-Z])", r"\\dfrac", gold)
    left = re.sub(r"(?<!\\)([(\[])", r"\\left\1", gold)
    left = re.sub(r"(?<!\\)([)\]])", r"\\right\1", left)
    both = re.sub(r"(?<!\\)([(\[])", r"\\left\1 ", re.sub(r"\\frac(?![a-zA-Z])", r"\\dfrac", ws))
    both = re.sub(r"(?<!\\)([)\]])", r" \\right\1", both)
    return {"whitespace": ws, "dfrac": dfrac, "left_right": left, "all": both}


def mutate_digit(gold: str, rng: random.Random) -> str | None:
    """`gold` with one digit replaced by another (None if it has no digit)."""
    units = [m.span() for m in re.finditer(r"\\text\{[^}]*\}(?:\^\{?\d\}?)?", gold)]  # not a value's digit
    spots = [m.start() for m in re.finditer(r"\d", gold) if not any(a <= m.start() < b for a, b in units)]
    if not spots:
        return None
    i = rng.choice(spots)
    d = rng.choice([c for c in "0123456789" if c != gold[i]])
    return gold[:i] + d + gold[i + 1 :]


def timed(fn):
    G._cache.clear()
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=0, help="only the first N MATH problems (0 = all)")
    ap.add_argument("--pairs", type=int, default=5000, help="false-positive pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "grade"))
    args = ap.parse_args(argv)
    math_rows = [json.loads(line) for line in open(DATA / "math_test.jsonl")]
    gsm_rows = [json.loads(line) for line in open(DATA / "gsm8k_test.jsonl")]
    if args.limit:
        math_rows = math_rows[: args.limit]
    golds = [gold_from_math(r["solution"]) for r in math_rows]
    rng = random.Random(args.seed)
    res: dict = {"command": " ".join([sys.argv[0]] + (argv or sys.argv[1:])), "machine": machine()}

    # self-equivalence (also the timed "correct answers" workload)
    jobs = [(v, g, i, name) for i, g in enumerate(golds) for name, v in variants(g).items()]
    verdicts, secs = timed(lambda: equivalent_many([(v, g) for v, g, _, _ in jobs], desc="self-equivalence"))
    fails = [{"idx": math_rows[i]["idx"], "variant": name, "gold": g, "pred": v} for (v, g, i, name), ok in zip(jobs, verdicts) if not ok]
    failed_golds = {f["idx"] for f in fails}
    res["self_equivalence"] = {"golds": len(golds), "checks": len(jobs), "golds_passing_all": len(golds) - len(failed_golds),
                               "failures": fails, "seconds": round(secs, 2), "answers_per_s": round(len(jobs) / secs, 1)}

    # false positives: different problems, different normalized answers
    canon = [squash(strip_var(normalize(g))) for g in golds]
    pairs = []
    while len(pairs) < args.pairs:
        a, b = rng.randrange(len(golds)), rng.randrange(len(golds))
        if a != b and canon[a] != canon[b]:
            pairs.append((a, b))
    verdicts, secs = timed(lambda: equivalent_many([(golds[a], golds[b]) for a, b in pairs], desc="false positives"))
    positives = [{"pred": golds[a], "gold": golds[b]} for (a, b), ok in zip(pairs, verdicts) if ok]
    res["false_positives"] = {"pairs": len(pairs), "equivalent_verdicts": len(positives), "positives": positives,
                              "seconds": round(secs, 2), "answers_per_s": round(len(pairs) / secs, 1)}

    # near misses: one digit changed
    near = [(m, g) for g in golds if (m := mutate_digit(g, rng)) is not None and m != g]
    verdicts, secs = timed(lambda: equivalent_many(near, desc="near misses"))
    res["near_misses"] = {"pairs": len(near), "equivalent_verdicts": sum(verdicts),
                          "positives": [{"pred": m, "gold": g} for (m, g), ok in zip(near, verdicts) if ok]}

    # throughput, single thread, on a realistic mix: half correct (rewritten), half wrong (other golds)
    mix = [(variants(golds[a])["all"], golds[a]) for a, _ in pairs[:1000]] + [(golds[a], golds[b]) for a, b in pairs[1000:2000]]
    _, secs1 = timed(lambda: [is_equivalent(p, g) for p, g in mix])
    _, secs2 = timed(lambda: equivalent_many(mix))
    gsm = [(str(int(gold_from_gsm8k(r["answer"])) + rng.choice([0, 0, 1])), gold_from_gsm8k(r["answer"])) for r in gsm_rows
           if re.fullmatch(r"-?\d+", gold_from_gsm8k(r["answer"]))]
    hard = [(p, g) for p, g in mix if exact_value(normalize(g)) is None]
    _, secs4 = timed(lambda: equivalent_many(hard))
    _, secs3 = timed(lambda: [is_equivalent(p, g) for p, g in gsm])
    res["throughput"] = {"math_mix_answers": len(mix), "math_mix_per_s_1_thread": round(len(mix) / secs1, 1),
                         "math_mix_per_s_pool": round(len(mix) / secs2, 1), "pool_workers": G._get_pool().max_workers,
                         "math_non_arithmetic_answers": len(hard), "math_non_arithmetic_per_s_pool": round(len(hard) / secs4, 1),
                         "gsm8k_answers": len(gsm), "gsm8k_per_s_1_thread": round(len(gsm) / secs3, 1)}
    res["grader_stats"] = grader_stats()
    write(res, Path(args.out))
    return 0


def machine() -> dict:
    import math_verify
    import sympy

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_cores": os.cpu_count(),
            "load_avg_1m": round(os.getloadavg()[0], 2), "math_verify": getattr(math_verify, "__version__", "0.9.0"),
            "sympy": sympy.__version__}


def write(res: dict, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, ensure_ascii=False) + "\n")
    se, fp, nm, tp = res["self_equivalence"], res["false_positives"], res["near_misses"], res["throughput"]
    lines = [
        "| measure | value |", "|---|---|",
        f"| MATH golds equivalent to all 4 rewrites | {se['golds_passing_all']} / {se['golds']} ({len(se['failures'])} failed checks of {se['checks']}) |",
        f"| false positives (different golds, seeded pairs) | {fp['equivalent_verdicts']} / {fp['pairs']} equivalent verdicts |",
        f"| near misses (one digit changed) judged equivalent | {nm['equivalent_verdicts']} / {nm['pairs']} |",
        f"| answers/s, MATH mix, 1 thread | {tp['math_mix_per_s_1_thread']} |",
        f"| answers/s, MATH mix, pool of {tp['pool_workers']} | {tp['math_mix_per_s_pool']} |",
        f"| answers/s, MATH golds that are not plain arithmetic ({tp['math_non_arithmetic_answers']}), pool | {tp['math_non_arithmetic_per_s_pool']} |",
        f"| answers/s, GSM8K integers, 1 thread | {tp['gsm8k_per_s_1_thread']} |",
        f"| math-verify timeouts / errors | {res['grader_stats']['timeouts']} / {res['grader_stats']['errors']} |",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
