"""Grading: the answer a trajectory states, ground truth, and mathematical equivalence.

    extract_answer(text, fallback=False) -> str | None   last \\boxed{…} / \\fbox{…} / \\boxed 5
    is_equivalent(pred, gold) -> bool                   safe from any thread; never raises
    gold_from_gsm8k(answer_field) -> str                the number after ####, commas removed
    gold_from_math(solution) -> str                     the last \\boxed{} of the solution
    grade(record, gold) -> bool                         False unless finish_reason == "answered"

`is_equivalent` decides as cheaply as it can (details in docs/grading.md):

1. both sides normalized (`latexnorm.normalize`): delimiters, `\\dfrac`, `\\left(`, thousands
   separators, `\\%`, degrees, units in `\\text{}`; equal strings are equivalent;
2. split into structures (`latexnorm.structure`): tuples, points and intervals are ordered and keep
   their brackets; bare lists, sets, `x=1, x=2` and `a \\pm b` are unordered; unions of intervals
   are unordered; items are compared recursively;
3. a leaf that is plain arithmetic on integers/decimals/fractions on both sides is compared exactly
   with `fractions.Fraction` (no sympy, no tolerance; a decimal with ≥ 4 places also matches the
   non-terminating fraction it rounds or truncates: 0.3333 = 1/3);
4. anything else goes to math-verify (pinned 0.9.0) in worker processes (`mathverify_pool`), with a
   timeout that works from any thread; a timeout grades as not equivalent and is counted in
   `grader_stats()`.

Never imports torch.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import threading
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from typing import Iterable

from mtpo.agent.latexnorm import decimal_places, exact_value, normalize, squash, structure
from mtpo.agent.mathverify_pool import MathVerifyPool

log = logging.getLogger(__name__)
DEFAULT_TIMEOUT_S = 5.0
MAX_ANSWER_CHARS = 2000  # a longer "answer" is not one (and would only feed sympy)

# ------------------------------------------------------------------------------------------ extract

_BOX = re.compile(r"\\(?:boxed|fbox)(?![a-zA-Z])")
_FALLBACK = re.compile(
    r"(?:final answer|answer)\s*(?:is|:|=)\s*:?\s*\$*\s*(.+?)\s*\$*\s*(?:\.\s|\.?$|\n)", re.IGNORECASE
)


def _braced(text: str, start: int) -> str | None:
    """Content of the brace group opening at text[start] ('{'), nested braces allowed."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{" and text[i - 1 : i] != "\\":
            depth += 1
        elif text[i] == "}" and text[i - 1 : i] != "\\":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def extract_answer(text: str | None, fallback: bool = False) -> str | None:
    """The last `\\boxed{…}` (or `\\fbox{…}`, or `\\boxed 5`) of `text`, stripped.

    None when there is none, or when the last one is cut off (an unclosed brace: the model did not
    finish stating it, so an earlier box is not its final answer). With `fallback=True` and no box,
    the last "The answer is X" / "Final answer: X" is used."""
    if not text:
        return None
    boxes = list(_BOX.finditer(text))
    if boxes:
        end = boxes[-1].end()
        rest = text[end:].lstrip()
        if rest.startswith("{"):
            inner = _braced(rest, 0)
            return inner.strip() if inner is not None and inner.strip() else None
        m = re.match(r"[^\s$]+", rest)  # `\\boxed 5`, `\\boxed5`: up to the next space or `$`
        return m.group().rstrip(".,") if m else None
    if fallback:
        found = _FALLBACK.findall(text)
        if found and found[-1].strip():
            return found[-1].strip().rstrip(".")
    return None


# ------------------------------------------------------------------------------------------ gold


def gold_from_gsm8k(answer_field: str) -> str:
    """The number after `####` in a GSM8K answer, thousands commas removed."""
    if not isinstance(answer_field, str) or "####" not in answer_field:
        raise ValueError(f"GSM8K answer has no '####' line: {str(answer_field)[-80:]!r}")
    gold = answer_field.rsplit("####", 1)[1].strip().replace(",", "")
    if not gold:
        raise ValueError(f"GSM8K answer has nothing after '####': {answer_field[-80:]!r}")
    return gold


def gold_from_math(solution: str) -> str:
    """The last `\\boxed{}` of a MATH solution."""
    gold = extract_answer(solution)
    if gold is None:
        raise ValueError(f"MATH solution has no complete \\boxed{{}}: {str(solution)[-80:]!r}")
    return gold


# ------------------------------------------------------------------------------------------ compare

_stats_lock = threading.Lock()
_STATS = {"calls": 0, "exact": 0, "math_verify": 0, "timeouts": 0, "errors": 0}
_cache: dict[tuple[str, str], bool] = {}
_CACHE_MAX = 200_000
_pool: MathVerifyPool | None = None
_pool_lock = threading.Lock()


def _count(key: str) -> None:
    with _stats_lock:
        _STATS[key] += 1


def grader_stats() -> dict:
    """Counters since import (or `reset_grader_stats`): calls, leaves decided exactly, math-verify
    calls, timeouts (graded not equivalent) and errors (graded not equivalent)."""
    with _stats_lock:
        return dict(_STATS)


def reset_grader_stats() -> None:
    with _stats_lock:
        for k in _STATS:
            _STATS[k] = 0


def _get_pool() -> MathVerifyPool:
    global _pool
    with _pool_lock:
        if _pool is None or _pool.pid != os.getpid():  # a forked child must not share pipes
            _pool = MathVerifyPool()
        return _pool


def warm_up() -> None:
    """Start the math-verify workers now instead of at the first symbolic comparison."""
    _get_pool().warm()


@atexit.register
def shutdown_workers() -> None:
    """End the math-verify worker processes (they also end by themselves when this process exits)."""
    global _pool
    with _pool_lock:
        if _pool is not None and _pool.pid == os.getpid():
            _pool.shutdown()
        _pool = None


def _math_verify(pred: str, gold: str, timeout_s: float) -> bool:
    key = (pred, gold)
    if key in _cache:
        return _cache[key]
    _count("math_verify")
    result, error = _get_pool().check(pred, gold, timeout_s)
    if result is None:
        _count("timeouts")
        log.warning("math-verify timed out after %.1fs (graded not equivalent): %r vs %r", timeout_s, pred[:80], gold[:80])
        return False
    if error:
        _count("errors")
        level = logging.WARNING if "worker" in error else logging.DEBUG  # a parse failure is routine
        log.log(level, "math-verify failed on %r vs %r (graded not equivalent): %s", pred[:80], gold[:80], error)
    if len(_cache) >= _CACHE_MAX:
        _cache.clear()
    _cache[key] = result
    return result


def _words(s: str) -> bool:
    """Plain words ("odd", "Evelyn", "June"): compared as text, never as products of symbols."""
    return bool(re.fullmatch(r"[A-Za-z][A-Za-z\s'\-]*", s)) and bool(re.search(r"[A-Za-z]{3,}", s))


_BASE = re.compile(r"(?<![A-Za-z\\])[0-9A-Z]+_\{?\d+\}?")


def _has_variable(s: str) -> bool:
    """A Latin letter outside command names, other than e and i (constants): `2x+1`, not `\\sqrt{2}`."""
    if re.search(r"\\(?:int|oint|sum|prod|lim|operatorname)(?![a-zA-Z])", s):
        return False  # bound variables (`\\int_0^1 x dx`) or named functions can still give a number
    return bool(re.search(r"[a-df-hj-zA-Z]", re.sub(r"\\[a-zA-Z]+", "", s)))


def _exact_equal(p: str, vp: Fraction, g: str, vg: Fraction) -> bool:
    if vp == vg:
        return True
    # a decimal with >= 4 places matches the non-terminating fraction it rounds or truncates
    for s, v, other_s, other in ((p, vp, g, vg), (g, vg, p, vp)):
        k = decimal_places(s)
        den = other.denominator
        while den % 2 == 0:
            den //= 2
        while den % 5 == 0:
            den //= 5
        if k is not None and k >= 4 and decimal_places(other_s) is None and den != 1:
            scaled = other * 10**k
            if v in (Fraction(round(scaled), 10**k), Fraction(int(scaled), 10**k)):
                return True
    return False


def _leaf_equal(p: str, g: str, timeout_s: float) -> bool:
    if squash(p) == squash(g):
        return True
    if _words(p) or _words(g):
        return squash(p).casefold() == squash(g).casefold()
    if _BASE.search(p) or _BASE.search(g):  # 221_3: a numeral in base 3; math-verify drops the base
        return False
    vp, vg = exact_value(p), exact_value(g)
    if vp is not None and vg is not None:
        _count("exact")
        return _exact_equal(p, vp, g, vg)
    if (vp is not None and _has_variable(g)) or (vg is not None and _has_variable(p)):
        _count("exact")  # a number against an expression in variables (`8` vs `6p^4 + 5`)
        return False
    return _math_verify(p, g, timeout_s)


def _unwrap(st):
    while st[0] == "set" and len(st[1]) == 1:
        st = structure(st[1][0])
    return st


def _same_multiset(ps: list[str], gs: list[str], timeout_s: float) -> bool:
    if len(ps) != len(gs):
        return False
    unused = list(ps)
    for g in gs:
        hit = next((i for i, p in enumerate(unused) if _equal(p, g, timeout_s)), None)
        if hit is None:
            return False
        unused.pop(hit)
    return True


def _equal(p: str, g: str, timeout_s: float) -> bool:
    if squash(p) == squash(g):
        return True
    sp, sg = _unwrap(structure(p)), _unwrap(structure(g))
    kp, kg = sp[0], sg[0]
    if kp == "leaf" and kg == "leaf":
        return _leaf_equal(sp[1], sg[1], timeout_s)
    if kp == "leaf" or kg == "leaf":  # a value against a collection: `x > 2` vs `(2, \infty)`
        leaf = sp[1] if kp == "leaf" else sg[1]
        if exact_value(leaf) is not None:  # a plain number is never a tuple, set or interval
            return False
        return _math_verify(p, g, timeout_s)
    if kp == "seq" and kg == "seq":  # tuple, point or interval: brackets and order matter
        return sp[1:3] == sg[1:3] and len(sp[3]) == len(sg[3]) and all(
            _equal(a, b, timeout_s) for a, b in zip(sp[3], sg[3])
        )
    if {kp, kg} == {"seq", "set"}:  # `1, 2` for the pair `(1, 2)`: only in order
        seq, other = (sp, sg) if kp == "seq" else (sg, sp)
        if seq[1:3] != ("(", ")") or len(seq[3]) != len(other[1]):
            return False
        return all(_equal(a, b, timeout_s) for a, b in zip(sp[-1], sg[-1]))
    if kp == kg:  # unordered: solutions, sets, unions of intervals
        return _same_multiset(sp[1], sg[1], timeout_s)
    return False


def is_equivalent(pred: str | None, gold: str | None, timeout_s: float = DEFAULT_TIMEOUT_S) -> bool:
    """Whether answer `pred` states the same mathematical object as `gold`.

    Safe from any thread; never raises (a malformed answer, a math-verify error or a timeout is
    "not equivalent"; timeouts and errors are counted in `grader_stats()`)."""
    _count("calls")
    try:
        if not isinstance(pred, str) or not isinstance(gold, str):
            return False
        p, g = normalize(pred), normalize(gold)
        if not p or not g or len(p) > MAX_ANSWER_CHARS:
            return False
        return _equal(p, g, timeout_s)
    except Exception:  # noqa: BLE001 - the contract: grading never raises
        _count("errors")
        log.exception("grading failed on %r vs %r (graded not equivalent)", pred, gold)
        return False


def equivalent_many(
    pairs: Iterable[tuple[str, str]], timeout_s: float = DEFAULT_TIMEOUT_S, workers: int | None = None, desc: str | None = None
) -> list[bool]:
    """`is_equivalent` over many (pred, gold) pairs, math-verify calls spread over the worker pool
    (`workers` threads, default one per worker process); a progress bar when `desc` is given."""
    from tqdm.auto import tqdm

    pairs = list(pairs)
    workers = workers or _get_pool().max_workers
    bar = tqdm(total=len(pairs), desc=desc, disable=desc is None)

    def one(pg: tuple[str, str]) -> bool:
        ok = is_equivalent(pg[0], pg[1], timeout_s)
        bar.update()
        return ok

    try:
        if workers <= 1 or len(pairs) < 2:
            return [one(pg) for pg in pairs]
        with ThreadPoolExecutor(workers) as ex:
            return list(ex.map(one, pairs))
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------ grade


def _text(content) -> str:
    if isinstance(content, list):  # content parts: [{"type": "text", "text": ...}, ...]
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return content if isinstance(content, str) else ""


def final_answer(record: dict, fallback: bool = False) -> str | None:
    """The answer stated in the final assistant turn of a trajectory record (None if none)."""
    for msg in reversed(record.get("messages") or []):
        if msg.get("role") == "assistant":
            return extract_answer(_text(msg.get("content")), fallback=fallback)
    return None


def grade(record: dict, gold: str, fallback: bool = False) -> bool:
    """True only for a finished trajectory (finish_reason "answered") whose final assistant turn
    states an answer equivalent to `gold`. Hitting max calls/tokens, or no answer, is False."""
    if record.get("finish_reason") != "answered":
        return False
    answer = final_answer(record, fallback=fallback)
    return answer is not None and is_equivalent(answer, gold)
