"""Grader benchmark: MATH self-equivalence, false positives, near misses, wrong rewrites, answers/second.

    python bench/bench_grade.py                      # full run (~5 min on 2 busy cores), writes bench/results/grade.{json,md}
    python bench/bench_grade.py --limit 200 --pairs 300 --out /tmp/grade   # quick look

What it measures (every failure and every positive verdict is written to the JSON for review):

* **self-equivalence**: each MATH gold answer against the same answer written differently
  (whitespace, `\\frac`→`\\dfrac`, `(`→`\\left(` … `\\right)`, all three at once); must all pass;
* **false positives**: `--pairs` seeded pairs of gold answers from different problems whose
  normalized spellings differ; each "equivalent" verdict is listed (a true equality such as `0.5` vs
  `\\frac12` is not a false positive: review the list; aim 0);
* **near misses**: each gold with one digit changed (`1000000`→`1000001`, `2^{98}`→`2^{99}`); the
  grader must say "not equivalent" unless the value really is unchanged (listed for review);
* **wrong rewrites**: each gold negated, its tuple reversed, its bracket flipped, one of its
  solutions dropped; all must grade "not equivalent" (listed for review);
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
from mtpo.agent.latexnorm import exact_value, normalize, squash, strip_var, structure  # noqa: E402

# the team's shared/ folder beside the checkout (MATH and GSM8K test sets), else where it lives here
DATA = next((d for d in (REPO.parent / "shared" / "data", Path("/work/shared/data")) if d.is_dir()),
            REPO.parent / "shared" / "data")


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


def timed(fn, cold: bool = False):
    """Run fn with an empty result cache; `cold`: also with fresh workers (empty parse caches, a parser
    that has not warmed up), all started before the clock."""
    if cold:
        G.shutdown_workers()
    G.warm_up()
    G._cache.clear()
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def perturb(gold: str) -> dict[str, str]:
    """Value-changing rewrites a wrong answer might make: negated, tuple reversed, bracket flipped, one
    solution dropped. Each must grade "not equivalent" (degenerate cases are skipped)."""
    g = strip_var(normalize(gold))
    st = structure(g)
    out = {}
    if st[0] == "leaf" and not re.search(r"=|\\[lg]eq|<|>|^[A-Za-z\s]+$", g) and exact_value(g) != 0 and re.search(r"[1-9a-zA-Z]", re.sub(r"\\(?:begin|end)\{\w+\}|\\[a-zA-Z]+", "", g)):
        out["negated"] = f"-({g})"
    if st[0] == "seq" and len({squash(x) for x in st[3]}) == len(st[3]):
        out["reversed"] = st[1] + ", ".join(reversed(st[3])) + st[2]
        out["bracket"] = {"(": "[", "[": "("}[st[1]] + ", ".join(st[3]) + st[2]
    if st[0] == "set" and len({squash(x) for x in st[1]}) == len(st[1]) > 1:
        out["dropped"] = ", ".join(st[1][:-1])
    return out


def self_equivalence(golds: list[str], rows: list[dict]) -> dict:
    jobs = [(v, g, i, name) for i, g in enumerate(golds) for name, v in variants(g).items()]
    verdicts, secs = timed(lambda: equivalent_many([(v, g) for v, g, _, _ in jobs], desc="self-equivalence"))
    fails = [{"idx": rows[i]["idx"], "variant": name, "gold": g, "pred": v} for (v, g, i, name), ok in zip(jobs, verdicts) if not ok]
    return {"golds": len(golds), "checks": len(jobs), "golds_passing_all": len(golds) - len({f["idx"] for f in fails}),
            "failures": fails, "seconds": round(secs, 2), "answers_per_s": round(len(jobs) / secs, 1)}


def must_differ(pairs: list[tuple[str, str]], desc: str) -> dict:
    """Pairs that are all "not equivalent": count and list every equivalent verdict."""
    verdicts, secs = timed(lambda: equivalent_many(pairs, desc=desc))
    positives = [{"pred": p, "gold": g} for (p, g), ok in zip(pairs, verdicts) if ok]
    return {"pairs": len(pairs), "equivalent_verdicts": len(positives), "positives": positives,
            "seconds": round(secs, 2), "answers_per_s": round(len(pairs) / secs, 1)}


def throughput(golds: list[str], pairs: list[tuple[int, int]], gsm_golds: list[str], rng: random.Random) -> dict:
    """Cold cache, fresh workers. A realistic MATH mix (half correct rewrites, half other golds), the
    same over the pool, a workload math-verify must decide (`gold + 0` against gold, symbolic golds),
    and GSM8K integers (a third off by one)."""
    mix = [(variants(golds[a])["all"], golds[a]) for a, _ in pairs[:1000]] + [(golds[a], golds[b]) for a, b in pairs[1000:2000]]
    symbolic = [g for g in golds if structure(normalize(g))[0] == "leaf" and exact_value(normalize(g)) is None
                and not re.search(r"=|<|>|\\[lg]eq|\\begin|_|^\\text", g)]
    forced = [(f"{g}+0", g) for g in rng.sample(symbolic, min(500, len(symbolic)))]
    gsm = [(str(int(g) + rng.choice([0, 0, 1])), g) for g in gsm_golds if re.fullmatch(r"-?\d+", g)]
    out = {"pool_workers": G._get_pool().max_workers}
    for name, fn, work in [("math_mix_1_thread", lambda w: [is_equivalent(p, g) for p, g in w], mix),
                           ("math_mix_pool", equivalent_many, mix),
                           ("math_verify_decides_pool", equivalent_many, forced),
                           ("gsm8k_1_thread", lambda w: [is_equivalent(p, g) for p, g in w], gsm)]:
        before = grader_stats()["math_verify"]
        verdicts, secs = timed(lambda: fn(work), cold=True)
        out[name] = {"answers": len(work), "per_s": round(len(work) / secs, 1), "math_verify_calls": grader_stats()["math_verify"] - before,
                     "equivalent": sum(verdicts)}
        if name == "math_verify_decides_pool":  # all are equivalent; list the ones math-verify misses
            out[name]["missed"] = [p for (p, _), ok in zip(work, verdicts) if not ok]
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--limit", type=int, default=0, help="only the first N MATH problems (0 = all)")
    ap.add_argument("--pairs", type=int, default=5000, help="false-positive pairs")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "grade"))
    args = ap.parse_args(argv)
    rows = [json.loads(line) for line in open(DATA / "math_test.jsonl")][: args.limit or None]
    golds = [gold_from_math(r["solution"]) for r in rows]
    gsm_golds = [gold_from_gsm8k(json.loads(line)["answer"]) for line in open(DATA / "gsm8k_test.jsonl")]
    rng = random.Random(args.seed)
    res: dict = {"command": " ".join([sys.argv[0]] + (argv or sys.argv[1:])), "machine": machine()}
    res["self_equivalence"] = self_equivalence(golds, rows)
    canon = [squash(strip_var(normalize(g))) for g in golds]  # "different values": different canonical answers
    pairs: list[tuple[int, int]] = []
    while len(pairs) < args.pairs:
        a, b = rng.randrange(len(golds)), rng.randrange(len(golds))
        if a != b and canon[a] != canon[b]:
            pairs.append((a, b))
    res["false_positives"] = must_differ([(golds[a], golds[b]) for a, b in pairs], "false positives")
    res["near_misses"] = must_differ([(m, g) for g in golds if (m := mutate_digit(g, rng)) not in (None, g)], "near misses")
    wrong = [(p, g, name) for g in golds for name, p in perturb(g).items()]
    res["perturbations"] = must_differ([(p, g) for p, g, _ in wrong], "perturbations")
    res["perturbations"]["by_kind"] = {k: sum(1 for *_, n in wrong if n == k) for k in ("negated", "reversed", "bracket", "dropped")}
    res["throughput"] = throughput(golds, pairs, gsm_golds, rng)
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
    pt = res["perturbations"]
    lines = [
        "| measure | value |", "|---|---|",
        f"| MATH golds equivalent to all 4 rewrites | {se['golds_passing_all']} / {se['golds']} ({len(se['failures'])} failed checks of {se['checks']}) |",
        f"| false positives (different golds, seeded pairs) | {fp['equivalent_verdicts']} / {fp['pairs']} equivalent verdicts |",
        f"| near misses (one digit changed) judged equivalent | {nm['equivalent_verdicts']} / {nm['pairs']} |",
        f"| wrong rewrites (negated, reversed, bracket flipped, solution dropped) judged equivalent | {pt['equivalent_verdicts']} / {pt['pairs']} |",
        *[f"| answers/s, {name.replace('_', ' ')} ({v['answers']} answers, {v['math_verify_calls']} math-verify calls) | {v['per_s']} |"
          for name, v in tp.items() if isinstance(v, dict)],
        f"| math-verify timeouts / errors | {res['grader_stats']['timeouts']} / {res['grader_stats']['errors']} |",
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
