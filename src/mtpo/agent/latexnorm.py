"""Answer strings → canonical strings, structures and exact numbers (pure Python, no sympy).

The grader (`mtpo.agent.grade`) compares answers in three steps, cheapest first:

1. `normalize` rewrites what never changes the value: math delimiters, `\\left`/`\\right`,
   `\\dfrac`/`\\tfrac`, spacing commands, thousands separators (`1{,}000`, `10,\\!000`, `15,600`),
   `\\%`, degrees (`^\\circ`), dollar signs and units in `\\text{}` after a number.
2. `structure` splits a normalized answer into a leaf, an ordered sequence (a tuple, a point, an
   interval: brackets kept), an unordered collection (a bare list "1, 2", a set `\\{1,2\\}`, solutions
   "x=1, x=2", `a \\pm b`) or a union of intervals (`\\cup`).
3. `exact_value` evaluates plain arithmetic on integers, decimals and fractions (`+ - * / ^`,
   `\\cdot`, `\\times`, `\\div`, `\\frac`, parentheses and braces) to a `fractions.Fraction`, so
   integers and rationals are compared exactly and without sympy: `2\\cdot3` is 6, `1000001` is not
   `1000000`, `\\frac{1}{2^{98}}` is not `\\frac{1}{2^{99}}`. Anything else returns None and goes to
   math-verify.
"""

from __future__ import annotations

import re
from fractions import Fraction

# ------------------------------------------------------------------------------------------ normalize

_TEXT_CMDS = r"\\(?:text|textbf|textit|textrm|textnormal|mbox|mathrm|mathbf|mathit|operatorname)"
_TEXT_GROUP = re.compile(_TEXT_CMDS + r"\s*\{([^{}]*)\}")
_UNIT_GROUP = re.compile(r"(?<=[\w})])\s*" + _TEXT_CMDS + r"\s*\{\s*([A-Za-z][A-Za-z.\s]*)\}(?:\s*\^\s*\{?\d\}?)?")
_TRAILING_WORDS = re.compile(r"^(.*[\d}])\s+[A-Za-z]{2,}[A-Za-z.\s]*(?:\^\{?[23]\}?)?$")
_THOUSANDS = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?")
_SIMPLE_SUBS = [
    (re.compile(r"\\(?:displaystyle|textstyle|scriptstyle)"), ""),
    (re.compile(r"\\[dt]frac(?![a-zA-Z])"), r"\\frac"),
    # unbraced arguments (`\\frac\\pi4`, `\\sqrt2`) braced: math-verify turns `\\frac\\pi4` into `\\frac{\\}{p}i4`
    (re.compile(r"\\(frac|sqrt)\s*(\\[a-zA-Z]+|[A-Za-z0-9])"), r"\\\1{\2}"),
    (re.compile(r"\\frac\{((?:[^{}]|\{[^{}]*\})*)\}\s*(\\[a-zA-Z]+|[A-Za-z0-9])"), r"\\frac{\1}{\2}"),
    (re.compile(r"\\(?:left|right)\s*\.|\\big[lr]?|\\Big[lr]?"), ""),
    (re.compile(r"\\(?:left|right)(?![a-zA-Z])"), ""),
    (re.compile(r"\\lbrace"), r"\\{"),
    (re.compile(r"\\rbrace"), r"\\}"),
    # thousands separators that cannot be list commas: 10,\!000 and 1{,}000
    (re.compile(r"(\d)\s*(?:,\s*\\!|\{,\})\s*(?=\d{3})"), r"\1"),
    (re.compile(r"(?<!\\)\\!"), ""),
    (re.compile(r"(?<!\\)\\[,;:> ]|\\q?quad(?![a-zA-Z])|~"), " "),
    (re.compile(r"\^\s*\{?\s*\\circ\s*\}?|°|\\degree(?![a-zA-Z])"), ""),  # not f \circ g
    (re.compile(r"\\?%"), ""),
    (re.compile(r"\\?\$"), ""),
    (re.compile(r"∞|\\infinity|\\inf(?![a-zA-Z])"), r"\\infty"),
    (re.compile(r"\+\s*\\infty"), r"\\infty"),
    (re.compile(r"\\le(?![a-zA-Z])"), r"\\leq"),
    (re.compile(r"\\ge(?![a-zA-Z])"), r"\\geq"),
]


def _strip_delimiters(s: str) -> str:
    s = s.strip()
    for left, right in (("\\[", "\\]"), ("\\(", "\\)")):
        if s.startswith(left) and s.endswith(right):
            s = s[len(left) : -len(right)].strip()
    return s


def normalize(s: str) -> str:
    """A canonical spelling of one answer (same value, fewer spellings). Pure string rewriting."""
    s = _strip_delimiters(s.replace("\n", " "))
    for pattern, repl in _SIMPLE_SUBS:
        s = pattern.sub(repl, s)
    s = re.sub(_TEXT_CMDS + r"\s*\{\s*(?:or|and)\s*\}", ",", s)  # "1 \text{ or } 2" is a list
    s = re.sub(r"(?<=[\d}])\s+(?:or|and)\s+(?=[-\w\\(])", ", ", s)  # and so is "x=1 or x=2"
    # units after a value (`5\text{ cm}^2`, `9\text{ a.m.}`) go; other text is unwrapped
    s = _UNIT_GROUP.sub("", s)
    while True:
        unwrapped = _TEXT_GROUP.sub(r"\1", s)
        if unwrapped == s:
            break
        s = unwrapped
    # a period that is no decimal point (`\\frac15 x.`) makes latex2sympy keep only part of the answer
    s = re.sub(r"(?<!\d)\.(?!\d)", " ", s)
    s = " ".join(s.split()).strip()
    m = _TRAILING_WORDS.match(s)
    if m and not re.search(r"[A-Za-z]", strip_var(m.group(1)).replace("\\frac", "")):
        s = m.group(1)  # "5 cm", "90 square units" -> the number
    s = s.rstrip(".").strip()
    if _THOUSANDS.fullmatch(s):
        s = s.replace(",", "")
    return s


def squash(s: str) -> str:
    """For string equality: no whitespace, no braces around a single character (`x^{2}` = `x^2`)."""
    s = "".join(s.split())
    return re.sub(r"\{(\\?[A-Za-z0-9])\}", r"\1", s)


# ------------------------------------------------------------------------------------------ structure

_OPEN, _CLOSE = "([{", ")]}"
_VAR_PREFIX = re.compile(r"^\s*(?:[A-Za-z]|\\[a-zA-Z]+)(?:_\{?\w+\}?)?(?:\([a-z]\))?\s*(?:=|\\in(?![a-zA-Z]))\s*(?=\S)")


def split_top(s: str, sep: str = ",") -> list[str]:
    """Split at `sep` where no bracket of any kind is open. Brackets count by kind-agnostic depth so
    that the mixed interval `[1,2)` is one item."""
    out, depth, start, i = [], 0, 0, 0
    while i < len(s):
        c = s[i]
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
        elif depth == 0 and s.startswith(sep, i) and not (sep[-1].isalpha() and s[i + len(sep) : i + len(sep) + 1].isalpha()):
            out.append(s[start:i].strip())
            start = i + len(sep)
            i = start
            continue
        i += 1
    out.append(s[start:].strip())
    return out


def _outer_closer(s: str) -> int:
    """Index of the bracket closing s[0] (any kind; -1 if none)."""
    depth = 0
    for i, c in enumerate(s):
        if c in _OPEN:
            depth += 1
        elif c in _CLOSE:
            depth -= 1
            if depth == 0:
                return i
    return -1


def strip_var(s: str) -> str:
    """`x = 3` -> `3`, `x \\in [1, 2]` -> `[1, 2]`, `f(x) = 2x` -> `2x`; an equation such as
    `x + y = 3` keeps its left side (only a single variable name is an assignment)."""
    m = _VAR_PREFIX.match(s)
    if m and not re.match(r"\\(?:frac|sqrt)", s.lstrip()) and "=" not in s[m.end() :]:
        return s[m.end() :].strip()
    return s


def _expand_pm(items: list[str]) -> list[str]:
    out = []
    for it in items:
        if it.count("\\pm") == 1 or it.count("\\mp") == 1:
            out += [re.sub(r"\\[pm]{2}", "+", it), re.sub(r"\\[pm]{2}", "-", it)]
        else:
            out.append(it)
    return out


def structure(s: str):
    """("leaf", s) | ("seq", open, close, items) | ("set", items) | ("union", pieces).

    A tuple or point is ordered and keeps its brackets, so intervals compare with their ends; a bare
    list, a set and the solutions of an equation are unordered."""
    s = s.strip()
    pieces = split_top(s, "\\cup")
    if len(pieces) > 1:
        return ("union", pieces)
    items = split_top(s)
    if len(items) == 1:
        stripped = strip_var(s)
        if stripped != s:
            return structure(stripped)
        if s.startswith("\\{") and s.endswith("\\}") and _outer_closer(s[1:]) == len(s) - 2:
            return ("set", _expand_pm([strip_var(x) for x in split_top(s[2:-2]) if x]))
        if s[:1] and s[0] in "([" and _outer_closer(s) == len(s) - 1:
            inner = split_top(s[1:-1])
            if len(inner) > 1:
                return ("seq", s[0], s[-1], inner)
            if s[0] == "(":
                return structure(s[1:-1])
        pm = _expand_pm([s])
        return ("leaf", s) if len(pm) == 1 else ("set", pm)
    return ("set", _expand_pm([strip_var(x) for x in items]))


# ------------------------------------------------------------------------------------------ exact

_MAX_BITS = 1 << 16  # refuse to build numbers larger than this many bits (2^{10^{10}} must not hang)


class _NotExact(Exception):
    pass


class _Parser:
    """Recursive descent over plain arithmetic; raises _NotExact on anything else."""

    def __init__(self, s: str):
        self.s, self.i = s.replace(" ", ""), 0

    def peek(self, tok: str) -> bool:
        return self.s.startswith(tok, self.i)

    def take(self, tok: str) -> bool:
        if self.peek(tok) and not (tok[-1].isalpha() and self.s[self.i + len(tok) : self.i + len(tok) + 1].isalpha()):
            self.i += len(tok)
            return True
        return False

    def parse(self) -> Fraction:
        v = self.expr()
        if self.i != len(self.s):
            raise _NotExact
        return v

    def expr(self) -> Fraction:
        v = self.term()
        while True:
            if self.take("+"):
                v += self.term()
            elif self.take("-"):
                v -= self.term()
            else:
                return v

    def term(self) -> Fraction:
        v = self.unary()
        while True:
            if self.take("*") or self.take("\\cdot") or self.take("\\times"):
                v *= self.unary()
            elif self.take("/") or self.take("\\div"):
                d = self.unary()
                if d == 0:
                    raise _NotExact
                v /= d
            else:
                return v

    def unary(self) -> Fraction:
        if self.take("-"):
            return -self.unary()
        if self.take("+"):
            return self.unary()
        base = self.atom()
        if self.take("^"):
            exp = self.unary() if not self.peek("{") else self.atom()
            return _power(base, exp)
        return base

    def atom(self) -> Fraction:
        for left, right in (("{", "}"), ("(", ")")):
            if self.take(left):
                v = self.expr()
                if not self.take(right):
                    raise _NotExact
                return v
        if self.take("\\frac"):
            num = self.frac_arg()
            den = self.frac_arg()
            if den == 0:
                raise _NotExact
            return num / den
        m = re.compile(r"\d+(?:\.\d*)?|\.\d+").match(self.s, self.i)
        if not m:
            raise _NotExact
        self.i = m.end()
        return Fraction(m.group().rstrip(".") or "0")

    def frac_arg(self) -> Fraction:
        if self.peek("{"):
            return self.atom()
        if self.i < len(self.s) and self.s[self.i].isdigit():  # \frac12: one digit per argument
            self.i += 1
            return Fraction(int(self.s[self.i - 1]))
        raise _NotExact


def _power(base: Fraction, exp: Fraction) -> Fraction:
    if exp.denominator != 1 or (base == 0 and exp < 0):
        raise _NotExact
    bits = max(base.numerator.bit_length(), base.denominator.bit_length(), 1)
    if bits * abs(exp.numerator) > _MAX_BITS:
        raise _NotExact
    return base ** exp.numerator


def exact_value(s: str) -> Fraction | None:
    """The exact rational value of plain arithmetic, or None when `s` is anything else."""
    if not s or len(s) > 200 or not re.fullmatch(r"[\d\s.+\-*/^{}()]*(?:\\(?:frac|cdot|times|div)[\d\s.+\-*/^{}()]*)*", s):
        return None
    try:
        return _Parser(s).parse()
    except (_NotExact, ValueError, ZeroDivisionError, OverflowError):
        return None


def decimal_places(s: str) -> int | None:
    """Places after the point when `s` is one decimal literal ("0.3333" -> 4), else None."""
    m = re.fullmatch(r"[+-]?\d*\.(\d+)", s.replace(" ", ""))
    return len(m.group(1)) if m else None
