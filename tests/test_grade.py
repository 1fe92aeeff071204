"""Grader tests: a hand-written verdict table, extraction, gold answers, trajectories, threads and
timeouts, and checks against the real MATH/GSM8K test sets (a fixed sample; the full sets run in
bench/bench_grade.py).

Independent checks: the exact path (fractions) is cross-checked against math-verify itself, and
against brute-force cross-multiplication; the MATH golds are checked against rewrites of themselves
and against each other (false positives)."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import threading
import time
from fractions import Fraction
from pathlib import Path

import pytest

from mtpo.agent import grade as G
from mtpo.agent import mathverify_pool
from mtpo.agent.grade import (
    extract_answer,
    equivalent_many,
    gold_from_gsm8k,
    gold_from_math,
    grade,
    grader_stats,
    is_equivalent,
)
from mtpo.agent.latexnorm import exact_value, normalize, squash, strip_var

REPO = Path(__file__).resolve().parent.parent
# the team's shared/ folder beside the checkout (CI lays a copy there), else where it lives here
DATA = next((d for d in (REPO.parent / "shared" / "data", Path("/work/shared/data")) if d.is_dir()),
            REPO.parent / "shared" / "data")
MATH = DATA / "math_test.jsonl"
GSM8K = DATA / "gsm8k_test.jsonl"
needs_data = pytest.mark.skipif(not MATH.exists() or not GSM8K.exists(), reason="shared MATH/GSM8K test sets absent")

# (prediction, gold, verdict, why). "BUG" marks a regression case for a bug of the original grader.
TABLE = [
    # --- bugs of the original research grader ---------------------------------------------------
    ("100", "1", False, "BUG: a x100 'percent' rule made 100 equal 1"),
    ("1", "100", False, "BUG: the x100 rule, other direction"),
    ("50", "0.5", False, "BUG: the x100 rule on decimals"),
    ("10\\%", "0.1", False, "no x100 rule: 10% is graded as the number 10, and 10 != 0.1"),
    ("2\\cdot3", "23", False, "BUG: deleting \\cdot made 2\\cdot3 read as 23"),
    ("2\\cdot3", "6", True, "\\cdot is multiplication"),
    ("2 \\times 3", "6", True, "\\times is multiplication"),
    ("\\pi", "3", False, "BUG: \\pi read as a plain symbol; it is pi, not 3"),
    ("2\\pi", "\\pi\\cdot 2", True, "\\pi is one constant: 2pi = pi*2"),
    ("\\frac{\\pi}{2}", "\\frac12\\pi", True, "pi/2 = (1/2) pi"),
    ("\\pi", "p i", False, "\\pi is not the product of symbols p and i"),
    ("3.14", "\\pi", False, "a 3-digit approximation of pi is not pi"),
    ("1000001", "1000000", False, "BUG: relative tolerance on integers; integers compare exactly"),
    ("999999", "1000000", False, "integers compare exactly, below too"),
    ("1000000.5", "1000000", False, "exact: a half is not nothing"),
    ("\\frac{1}{2^{98}}", "\\frac{1}{2^{99}}", False, "tiny numbers must not collapse (math-verify alone says equal)"),
    ("2^{-98}", "\\frac{1}{2^{99}}", False, "tiny numbers written differently, still different"),
    ("2^{-98}", "\\frac{1}{2^{98}}", True, "same tiny number, two spellings"),
    ("0.000000001", "0.000000002", False, "tiny decimals compare exactly"),
    ("10^{100}", "10^{100}+1", False, "huge integers compare exactly"),
    ("2^{10}", "1024", True, "powers are evaluated exactly"),
    # --- rules math-verify misses or that need care ------------------------------------------------
    ("x=3", "3", True, "a single-variable assignment states the value"),
    ("3", "x=3", True, "the same, gold side"),
    ("a=5", "5", True, "any single-letter variable"),
    ("f(x)=2x", "2x", True, "function definition states the expression"),
    ("y=2x+3", "2x+3", True, "line written as y = ..."),
    ("4x-5y=-50", "-4x+5y=50", True, "an equation is kept whole; equivalent equations match"),
    ("4x-5y=-50", "4x-5y=50", False, "an equation with another constant is another line"),
    ("x=4", "x=5", False, "assignments with different values"),
    ("10\\%", "10", True, "percent sign dropped (the question asks for a percentage)"),
    ("10", "10\\%", True, "percent sign dropped, gold side"),
    ("33\\%", "33", True, "percent sign dropped"),
    ("12.5%", "12.5", True, "plain % too"),
    ("1{,}000", "1000", True, "{,} thousands separator"),
    ("10,\\!000", "10000", True, "MATH's ,\\! thousands separator"),
    ("15,600", "15600", True, "plain thousands commas in a whole number"),
    ("1,000,000", "1000000", True, "several thousands groups"),
    ("\\$32,\\!348", "32348", True, "dollar sign and separator"),
    ("\\frac{12}{5,\\!525}", "\\frac{12}{5525}", True, "separator inside a fraction"),
    ("27,93", "93, 27", True, "27,93 is not a thousands group: a list, unordered"),
    ("5\\text{ cm}", "5", True, "units in \\text{} after a value"),
    ("440\\text{ cm}^2", "440", True, "squared units"),
    ("90\\text{ square\nunits}", "90", True, "units across a line break"),
    ("9\\text{ a.m.}", "9", True, "units with periods"),
    ("\\frac{68}{3}\\text{ pounds}", "\\frac{68}{3}", True, "units after a fraction"),
    ("5 inches", "5", True, "bare unit words after a number"),
    ("6\\text{ cm}", "5", False, "units do not make a wrong number right"),
    ("x = 5 inches", "5", True, "assignment with a bare unit"),
    ("30^\\circ", "30", True, "degrees: ^\\circ"),
    ("30^{\\circ}", "30", True, "degrees: ^{\\circ}"),
    ("\\theta = 30^\\circ", "30", True, "assignment and degrees"),
    ("30", "\\frac{\\pi}{6}", False, "degrees are not radians"),
    ("\\dfrac{3}{4}", "\\frac{3}{4}", True, "\\dfrac is \\frac"),
    ("\\tfrac34", "0.75", True, "\\tfrac shorthand and a decimal"),
    ("\\frac34", "\\frac{3}{4}", True, "\\frac shorthand"),
    ("\\frac\\pi4 + 2", "2+\\frac{\\pi}{4}", True, "unbraced command argument (math-verify alone mangles \\frac\\pi4)"),
    ("\\sqrt23", "3\\sqrt{2}", True, "\\sqrt23 is sqrt(2) times 3, as LaTeX typesets it"),
    ("\\frac{\\sqrt{3}}{2}", "\\frac{\\sqrt3}2", True, "braces around single tokens"),
    ("\\left( 1, 2 \\right)", "(1,2)", True, "\\left( \\right) are plain parentheses"),
    ("\\displaystyle \\frac12", "0.5", True, "\\displaystyle is layout"),
    ("$\\frac{1}{2}$", "\\frac12", True, "math delimiters"),
    ("\\$1.50", "1.5", True, "currency"),
    # --- exact integers, rationals, decimals --------------------------------------------------------
    ("0.5", "\\frac{1}{2}", True, "terminating decimal = fraction, exactly"),
    ("0.50", "\\frac12", True, "trailing zeros"),
    (".5", "0.5", True, "no leading zero"),
    ("1000.0", "1000", True, "integer written as a decimal"),
    ("-0", "0", True, "negative zero is zero"),
    ("\\frac{10}{4}", "2.5", True, "unreduced fraction"),
    ("6/8", "\\frac34", True, "slash fraction"),
    ("-\\frac34", "\\frac{-3}{4}", True, "sign inside or outside"),
    ("\\frac{-3}{4}", "-0.75", True, "negative fraction and decimal"),
    ("\\frac{3}{4}", "\\frac{4}{3}", False, "reciprocal"),
    ("-3", "3", False, "sign matters"),
    ("0.3333", "\\frac13", True, "a decimal with >= 4 places rounding 1/3"),
    ("0.6667", "\\frac23", True, "rounded, not truncated"),
    ("0.33", "\\frac13", False, "two places are not enough to stand for 1/3"),
    ("0.3334", "\\frac13", False, "neither the rounding nor the truncation of 1/3"),
    ("0.35", "0.3500", True, "equal terminating decimals"),
    ("0.35", "0.36", False, "different decimals"),
    ("\\frac{5}{2}", "2\\frac{1}{2}", True, "mixed number 2 1/2"),
    ("2^{10}-1", "1023", True, "arithmetic evaluated exactly"),
    ("\\frac{1}{3}+\\frac{1}{6}", "\\frac12", True, "sum of fractions"),
    # --- symbolic (math-verify) --------------------------------------------------------------------
    ("3\\sqrt2", "\\sqrt{18}", True, "surds simplify"),
    ("12\\sqrt{2}", "\\sqrt{288}", True, "surds simplify"),
    ("\\sqrt{4}", "2", True, "a root that is an integer"),
    ("\\frac{1}{\\sqrt2}", "\\frac{\\sqrt2}{2}", True, "rationalised denominator"),
    ("\\sqrt{2}/2", "\\frac{\\sqrt2}{2}", True, "slash and \\frac"),
    ("\\sqrt{3}", "\\sqrt{2}", False, "different surds"),
    ("x^2+1", "1+x^2", True, "commuted polynomial"),
    ("(x+5)^2", "x^2 + 10x + 25", True, "expanded polynomial"),
    ("x^2+10x+24", "x^2 + 10x + 25", False, "different polynomial"),
    ("3+4i", "4i+3", True, "complex number"),
    ("3-4i", "3+4i", False, "conjugate"),
    ("\\log_2 8", "3", True, "logarithm evaluated"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", True, "matrix, spacing"),
    ("\\begin{pmatrix} 2 \\\\ 1 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}", False, "vector entries are ordered"),
    ("\\pi r^2", "r^2\\pi", True, "product commutes"),
    ("3.14159265358979", "\\pi", True, "pi to 15 digits (math-verify's 6-place float rule)"),
    ("4s", "4t", False, "math-verify's default unit stripping reads both as 4"),
    ("\\frac{7}{5}+\\frac{1}{5}x. +1", "\\frac15", False, "a stray period must not cut the parse short (math-verify keeps 1/5)"),
    ("3m+1", "3n+1", False, "a single letter after a number is a variable, not a unit"),
    # --- structures: ordered tuples, unordered solution sets, intervals ---------------------------
    ("(1,2)", "(2,1)", False, "an ordered pair is ordered"),
    ("(3, 4)", "(3,4)", True, "spacing in a tuple"),
    ("(1,2)", "1,2", True, "parentheses dropped from the pair, same order"),
    ("1,2", "(1,2)", True, "the same, gold side"),
    ("(2,1)", "1,2", False, "a tuple against a list: order is kept"),
    ("(60,-88,25,4)", "(60,-88,25,5)", False, "one coordinate off"),
    ("\\left(\\frac43,-\\frac13\\right)", "\\left( \\frac{4}{3}, -\\frac{1}{3} \\right)", True, "point with fractions"),
    ("((1,2),(3,4))", "((3,4),(1,2))", False, "a tuple of points is ordered"),
    ("(1,2),(3,4)", "(3,4),(1,2)", True, "a bare list of points is unordered"),
    ("x=1, x=2", "2, 1", True, "solutions of an equation are a set"),
    ("1, 2, 3", "3,2,1", True, "bare list: unordered"),
    ("1,2,3", "1,2", False, "a missing solution"),
    ("1,2", "1,2,3", False, "an extra solution"),
    ("1,1,2", "1,2,2", False, "multiplicities differ"),
    ("\\{1,2\\}", "\\{2,1\\}", True, "sets are unordered"),
    ("\\{1,2\\}", "1,2", True, "a set and a bare list of the same elements"),
    ("\\{3\\}", "3", True, "a one-element set is its element"),
    ("x=1 \\text{ or } x=2", "1, 2", True, "'or' separates solutions"),
    ("19 \\text{ and }43", "43, 19", True, "'and' separates solutions"),
    ("x=2 or x=-3", "-3, 2", True, "a bare 'or' separates solutions too"),
    ("1\\pm \\sqrt{3}", "1+\\sqrt3,1-\\sqrt3", True, "\\pm is two solutions"),
    ("1-\\sqrt3,1+\\sqrt3", "1\\pm\\sqrt3", True, "\\pm, gold side, any order"),
    ("1+\\sqrt3", "1\\pm\\sqrt3", False, "one of the two solutions only"),
    ("[1,2)", "[1,2)", True, "half-open interval"),
    ("[1,2)", "(1,2]", False, "interval ends differ"),
    ("[1,2]", "[1,2)", False, "closed vs half-open"),
    ("(-\\infty,3]", "(-\\infty, 3]", True, "unbounded interval"),
    ("x \\in [2,5]", "[2,5]", True, "x \\in stripped"),
    ("(-\\infty, 1) \\cup (2, \\infty)", "(2,\\infty)\\cup(-\\infty,1)", True, "a union is unordered"),
    ("(-\\infty, 1] \\cup (2, \\infty)", "(-\\infty,1)\\cup(2,\\infty)", False, "a union with another end"),
    ("x\\le 5", "(-\\infty,5]", True, "an inequality against its interval (math-verify)"),
    ("x>2", "(2,\\infty)", True, "strict inequality against an open interval"),
    ("-\\infty", "\\infty", False, "signs of infinity"),
    ("8", "(1,4-\\sqrt{3})\\cup(4+\\sqrt{3},7)", False, "a number is not a union of intervals (decided without math-verify)"),
    ("2", "x^2-2x+2", False, "a number is not an expression in x (decided without math-verify)"),
    ("-1", "i^2", True, "i is the imaginary unit, not a variable"),
    ("e^{0}", "1", True, "e is Euler's number"),
    ("\\int_0^1 2x\\,dx", "1", True, "a bound variable does not make an integral non-numeric"),
    # --- text answers -------------------------------------------------------------------------------
    ("\\text{Evelyn}", "evelyn", True, "names compare as text, case-insensitive"),
    ("\\text{odd}", "odd", True, "text unwrapped"),
    ("\\text{odd}", "even", False, "different words (never products of symbols)"),
    ("\\text{(C)}", "C", True, "multiple choice letter with parentheses"),
    ("(\\text{E})", "E", True, "a letter in \\text inside parentheses is the answer, not a unit"),
    ("B", "C", False, "different choice"),
    ("\\text{June 20}", "June 20", True, "text with a number"),
    ("yes", "sey", False, "letters are not commuting symbols in a word"),
    ("-221_6", "-221_3", False, "numerals in different bases (math-verify alone drops the base)"),
    ("141_{13}", "141_{13}", True, "the same numeral in the same base"),
    ("\\log_2 8", "\\log_{2} 8", True, "a subscript that is not a base"),
]


def test_table_is_large_and_justified():
    assert len(TABLE) >= 100
    assert all(isinstance(why, str) and why for _, _, _, why in TABLE)
    assert len({(p, g) for p, g, _, _ in TABLE}) == len(TABLE), "duplicate cases"


@pytest.mark.parametrize("pred,gold,verdict,why", TABLE, ids=[f"{i}" for i in range(len(TABLE))])
def test_table(pred, gold, verdict, why):
    assert is_equivalent(pred, gold) is verdict, why


# ------------------------------------------------------------------------------------------ exact path


def test_exact_path_brute_force():
    """Random fractions in several spellings against cross-multiplication (a second method)."""
    rng = random.Random(0)
    for _ in range(400):
        a, b, c, d = (rng.randint(-30, 30) for _ in range(4))
        b, d = b or 1, d or 1
        spell = lambda n, m: rng.choice([f"\\frac{{{n}}}{{{m}}}", f"{n}/{m}", f"\\dfrac{{{n}}}{{{m}}}"])  # noqa: E731
        assert is_equivalent(spell(a, b), spell(c, d)) == (a * d == b * c), (a, b, c, d)


def test_exact_path_agrees_with_math_verify():
    """Where both apply, the fraction path and math-verify (with the numeric veto) agree."""
    pairs = [("6", "6.0"), ("\\frac{1}{2^{98}}", "\\frac{1}{2^{99}}"), ("1000001", "1000000"), ("2\\cdot3", "6"),
             ("\\frac{10}{4}", "2.5"), ("0.35", "0.36"), ("-\\frac34", "-0.75"), ("2^{10}", "1024"), ("7", "-7"),
             ("0.000000001", "0.000000002"), ("\\frac{1}{3}+\\frac{1}{6}", "\\frac12")]
    pool = mathverify_pool.MathVerifyPool(max_workers=1)
    try:
        for p, g in pairs:
            fast = is_equivalent(p, g)
            assert exact_value(normalize(p)) is not None and exact_value(normalize(g)) is not None
            assert pool.check(normalize(p), normalize(g), 10.0) == (fast, None), (p, g)
    finally:
        pool.shutdown()


def test_exact_value_refuses_what_it_cannot_do_safely():
    assert exact_value("2^{2^{2^{2^{2^{2}}}}}") is None  # would be astronomically large: math-verify decides
    assert exact_value("2(3)") is None  # implicit multiplication is not plain arithmetic
    assert exact_value("\\frac{1}{0}") is None
    assert exact_value("\\sqrt{4}") is None
    assert exact_value("\\frac{1}{2^{98}}") == Fraction(1, 2**98)


# ------------------------------------------------------------------------------------------ extract

@pytest.mark.parametrize(
    "text,fallback,expected",
    [
        ("so \\boxed{\\frac{1}{2}}.", False, "\\frac{1}{2}"),
        ("\\boxed{1} then \\boxed{\\{1, \\{2\\}\\}}", False, "\\{1, \\{2\\}\\}"),  # last; nested and escaped braces
        ("nested \\boxed{\\frac{a}{\\sqrt{b}}} end", False, "\\frac{a}{\\sqrt{b}}"),
        ("answer $\\boxed 5$.", False, "5"),
        ("answer \\boxed 5.", False, "5"),
        ("answer $\\boxed42$", False, "42"),
        ("ends with \\boxed", False, None),
        ("\\fbox{42}", False, "42"),
        ("\\boxed { 7 }", False, "7"),
        ("\\boxed{3} and later \\boxed{4", False, None),  # the last box is cut off: no final answer
        ("\\boxed{}", False, None),
        ("no box here. The answer is 42.", False, None),  # fallback only when asked
        ("no box here. The answer is 42.", True, "42"),
        ("Final answer: $\\frac{3}{4}$", True, "\\frac{3}{4}"),
        ("The answer is 7. \\boxed{8}", True, "8"),  # a box wins over the fallback
        ("", False, None),
        (None, False, None),
    ],
)
def test_extract_answer(text, fallback, expected):
    assert extract_answer(text, fallback=fallback) == expected


# ------------------------------------------------------------------------------------------ gold


def test_gold_from_gsm8k():
    assert gold_from_gsm8k("She pays 2 * 3 = <<2*3=6>>6.\n#### 1,234") == "1234"
    assert gold_from_gsm8k("#### -5") == "-5"
    with pytest.raises(ValueError, match="####"):
        gold_from_gsm8k("no marker 5")
    with pytest.raises(ValueError, match="nothing after"):
        gold_from_gsm8k("#### ")


def test_gold_from_math():
    sol = "So $x=\\boxed{3}$, and the area is $\\boxed{\\frac{\\sqrt{3}}{2}}$."
    assert gold_from_math(sol) == "\\frac{\\sqrt{3}}{2}"
    with pytest.raises(ValueError, match="boxed"):
        gold_from_math("no box")


@needs_data
def test_gold_from_gsm8k_whole_test_set():
    golds = [gold_from_gsm8k(json.loads(line)["answer"]) for line in GSM8K.open()]
    assert len(golds) == 1319
    assert all(exact_value(g) is not None for g in golds), [g for g in golds if exact_value(g) is None][:5]


# ------------------------------------------------------------------------------------------ grade

def _record(final: str, finish_reason: str = "answered", earlier: str = "Let me compute.\n```python\nprint(6*7)\n```"):
    return {
        "prompt_id": "t/0",
        "messages": [
            {"role": "user", "content": "Q"},
            {"role": "assistant", "content": earlier},
            {"role": "user", "content": "```output\n42\n```"},
            {"role": "assistant", "content": final},
        ],
        "finish_reason": finish_reason,
    }


def test_grade_trajectories():
    assert grade(_record("The answer is \\boxed{42}."), "42")
    assert not grade(_record("The answer is \\boxed{41}."), "42")
    for reason in ("max_calls", "max_tokens", "length", "no_code", "tool_error"):  # never finished
        assert not grade(_record("\\boxed{42}", finish_reason=reason), "42"), reason
    assert not grade({k: v for k, v in _record("\\boxed{42}").items() if k != "finish_reason"}, "42")
    assert not grade(_record("I think it's 42."), "42")  # answered but no box
    assert grade(_record("I think the answer is 42."), "42") is False
    assert G.grade(_record("The answer is 42."), "42", fallback=True)
    # only the final assistant turn counts
    assert not grade(_record("\\boxed{41}", earlier="maybe \\boxed{42}"), "42")
    assert grade(_record("\\boxed{42}", earlier="maybe \\boxed{41}"), "42")
    parts = _record("")
    parts["messages"][-1]["content"] = [{"type": "text", "text": "so "}, {"type": "text", "text": "\\boxed{42}"}]
    assert grade(parts, "42")
    assert not grade({"finish_reason": "answered", "messages": []}, "42")


def test_never_raises():
    for pred, gold in [(None, "1"), ("1", None), (3, "3"), ("\\frac{", "1"), ("}}}{{{", "\\sqrt{"), ("", "1"), ("1", ""), ("(", ")"), ("\\{\\}", "1"), ("()", "1"), ("x" * 5000, "x" * 5000)]:
        assert is_equivalent(pred, gold) is False
    assert is_equivalent("()", "()") is True  # degenerate but identical


# ------------------------------------------------------------------------------------------ threads, timeouts

SYMBOLIC = [("3\\sqrt2", "\\sqrt{18}", True), ("(x+5)^2", "x^2+10x+25", True), ("\\sqrt{3}", "\\sqrt{2}", False),
            ("\\frac{1}{\\sqrt2}", "\\frac{\\sqrt2}{2}", True), ("x^2+10x+24", "x^2+10x+25", False), ("3+4i", "4i+3", True)]


def test_safe_from_threads():
    """math-verify alone raises in a non-main thread (SIGALRM); ours runs it in worker processes."""
    G._cache.clear()
    results, errors = {}, []

    def work(k):
        try:
            results[k] = [is_equivalent(p, g) for p, g, _ in SYMBOLIC]
        except BaseException as e:  # noqa: BLE001 - any escape is the failure this test looks for
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert all(r == [v for _, _, v in SYMBOLIC] for r in results.values()) and len(results) == 6
    assert equivalent_many([(p, g) for p, g, _ in SYMBOLIC] * 2) == [v for _, _, v in SYMBOLIC] * 2


def test_timeout_is_not_equivalent_and_counted():
    before = grader_stats()["timeouts"]
    t = time.perf_counter()
    # a pair no other test grades (verdicts are cached, and a cached pair would not time out); math-verify
    # needs >= 0.27 s for it even with a warm parser, so a 0.05 s budget always runs out
    assert is_equivalent("z^{z^{z^{z^{z}}}}", "z^{z^{z^{z^{2z}}}}", timeout_s=0.05) is False
    assert time.perf_counter() - t < 5
    assert grader_stats()["timeouts"] == before + 1
    assert is_equivalent("3\\sqrt2", "\\sqrt{18}")  # the worker still serves


def test_stuck_worker_is_killed_and_replaced(monkeypatch):
    """A worker that does not answer in time (e.g. stuck in C where no signal lands) is killed."""
    pool = mathverify_pool.MathVerifyPool(max_workers=1)
    try:
        assert pool.check("3\\sqrt2", "\\sqrt{18}", 10.0) == (True, None)  # warm: no start-up allowance left
        monkeypatch.setattr(mathverify_pool, "KILL_GRACE_S", -0.8)  # parent gives up 0.8 s before the worker's alarm
        (worker,) = pool._all
        assert pool.check("x^{x^{x^{x^{x}}}}", "x^{x^{x^{x^{2x}}}}", 1.0) == (None, None)
        assert worker.proc.poll() is not None and not pool._all  # killed and forgotten
        monkeypatch.setattr(mathverify_pool, "KILL_GRACE_S", 3.0)
        assert pool.check("3\\sqrt2", "\\sqrt{18}", 10.0) == (True, None)  # a fresh worker
    finally:
        pool.shutdown()


def test_warm_starts_every_worker():
    pool = mathverify_pool.MathVerifyPool(max_workers=2)
    try:
        pool.warm()
        assert len(pool._all) == 2 and all(w.alive() for w in pool._all) and pool._idle.qsize() == 2
        assert pool.check("\\sqrt{4}", "2", 10.0) == (True, None) and len(pool._all) == 2  # reused
    finally:
        pool.shutdown()


def test_ctrl_c_reaches_the_parent_only():
    """QA: a terminal's Ctrl-C signals the whole foreground process group; workers in it each printed a
    KeyboardInterrupt traceback under `mtpo generate`'s one-line message. A parent in its own group
    warms a pool, then interrupts its group as a terminal would."""
    import subprocess
    import sys

    code = ("import os, signal, time\n"
            "from mtpo.agent import mathverify_pool\n"
            "pool = mathverify_pool.MathVerifyPool(max_workers=2)\n"
            "pool.warm()\n"
            "try:\n"
            "    os.killpg(0, signal.SIGINT); time.sleep(5)\n"
            "except KeyboardInterrupt:\n"
            "    print('interrupted', sum(w.alive() for w in pool._all))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          start_new_session=True)
    assert done.stdout.strip() == "interrupted 2" and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_warm_racing_shutdown_is_quiet(monkeypatch):
    """QA: `mtpo generate` warms the pool in a background thread; Ctrl-C during the model load runs the
    at-exit `shutdown` while `warm` still waits, which raised `list.remove(x): x not in list` there."""
    killed = threading.Event()

    class Starting:  # a worker still importing sympy when shutdown kills it
        def ask(self, *args):
            killed.wait(10)
            return {"r": None, "killed": True}

        def kill(self):
            killed.set()

    monkeypatch.setattr(mathverify_pool, "_Worker", Starting)
    pool = mathverify_pool.MathVerifyPool(max_workers=1)
    errors = []

    def warm_up():
        try:
            pool.warm()
            errors.append(None)
        except Exception as e:  # noqa: BLE001 - the regression: ValueError from list.remove
            errors.append(e)

    warm = threading.Thread(target=warm_up)
    warm.start()
    while not pool._all:
        time.sleep(0.01)
    pool.shutdown()
    warm.join(10)
    assert errors == [None] and pool._all == []  # warm returned (None), no ValueError


def test_dead_worker_is_an_error_not_a_timeout(monkeypatch):
    """A worker that cannot start (say math-verify is missing) is reported as an error."""
    monkeypatch.setattr(mathverify_pool, "_WORKER_CMD", "import sys; sys.exit(3)")
    pool = mathverify_pool.MathVerifyPool(max_workers=1)
    try:
        result, error = pool.check("\\sqrt{2}", "1", 5.0)
        assert result is False and "exited with code 3" in error
    finally:
        pool.shutdown()


def test_no_torch():
    import subprocess
    import sys

    code = "import sys, mtpo.agent.grade as g; g.is_equivalent('\\\\sqrt{4}', '2'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(REPO / "src")})
    assert out.stdout.strip() == "False", out.stderr


# ------------------------------------------------------------------------------------------ real data


def _bench():
    spec = importlib.util.spec_from_file_location("bench_grade", REPO / "bench" / "bench_grade.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def math_golds():
    if not MATH.exists():
        pytest.skip("shared MATH test set absent")
    golds = [gold_from_math(json.loads(line)["solution"]) for line in MATH.open()]
    assert len(golds) == 5000
    return golds


def test_math_golds_equal_their_rewrites(math_golds):
    """A fixed sample of 200 (the full 5,000 run in bench/bench_grade.py)."""
    sample = random.Random(0).sample(math_golds, 200)
    jobs = [(v, g, name) for g in sample for name, v in _bench().variants(g).items()]
    verdicts = equivalent_many([(v, g) for v, g, _ in jobs])
    assert [j for j, ok in zip(jobs, verdicts) if not ok] == []


def test_math_golds_no_false_positives(math_golds):
    """Seeded pairs of different golds (different normalized spellings) and one-digit mutations."""
    rng = random.Random(1)
    canon = [squash(strip_var(normalize(g))) for g in math_golds]
    pairs = []
    while len(pairs) < 200:
        a, b = rng.randrange(5000), rng.randrange(5000)
        if canon[a] != canon[b]:
            pairs.append((math_golds[a], math_golds[b]))
    bench = _bench()
    pairs += [(m, g) for g in rng.sample(math_golds, 100) if (m := bench.mutate_digit(g, rng)) not in (None, g)]
    verdicts = equivalent_many(pairs)
    assert [pg for pg, ok in zip(pairs, verdicts) if ok] == []
