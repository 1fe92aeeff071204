"""The demo's synthetic tool-integrated task: arithmetic whose exact answer needs the Python tool.

Six kinds of problem, generated from a seed (`make_problems`): large products, modular remainders,
a multi-step expression, a warehouse word problem, modular powers, and a two-step shopping problem
with four quantities (two tool calls). Each problem has its gold answer and two *plans*: the correct
one and a plausible misconception (adding instead of multiplying, the quotient instead of the
remainder, dropped parentheses, ...). A plan is a list of tool steps, each a reasoning sentence
plus one line of Python, followed by a final sentence with `\\boxed{answer}`.

Split: a problem is held out iff a hash of its question text says so (`split_of`, ~1 in 8), so
held-out questions can never occur in any training set (SFT data, rollout prompts) whatever the
seeds.

SFT trajectories (`sft_trajectory`) follow the misconception with a per-kind rate
(`MISCONCEPTION_RATE`) and contain two random slips at a small rate each (an operand miscopied into
the code, the final answer miscopied from the tool output). The rates above 1/2 make the greedy SFT
model wrong on those kinds while sampling still finds the correct plan often: exactly the situation
preference learning from the model's own samples can fix. Tool outputs in these trajectories are
computed by `evaluate` (a small AST evaluator of the generator's own arithmetic, never model text).
"""

from __future__ import annotations

import ast
import hashlib
import operator
from dataclasses import dataclass, field
from random import Random
from typing import Callable

NAMES = ["Maria", "Tom", "Aisha", "Kenji", "Lena", "Omar", "Priya", "Diego", "Sofia", "Noah", "Mei", "Jonas"]
HELDOUT_PER_256 = 32  # share of the question-hash space that is held out (1/8)

Step = Callable[[list[str]], tuple[str, str]]  # previous tool outputs -> (reasoning, python code)


@dataclass
class Plan:
    steps: list[Step]
    conclude: Callable[[str], str]  # the final answer (as text) -> final sentence with \boxed{}


@dataclass
class Problem:
    kind: str
    question: str
    answer: str
    correct: Plan
    wrong: Plan  # the kind's misconception
    meta: dict = field(default_factory=dict)


# --------------------------------------------------------------------------------------- evaluation

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}


def evaluate(code: str) -> str:
    """What `print(<integer arithmetic>)` prints, for the generator's own code only (+ - * // % pow)."""
    tree = ast.parse(code.strip(), mode="eval").body
    if not (isinstance(tree, ast.Call) and getattr(tree.func, "id", None) == "print" and len(tree.args) == 1):
        raise ValueError(f"expected print(<expression>), got {code!r}")
    return str(_eval(tree.args[0]))


def _eval(node) -> int:
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return node.value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        return _BINOPS[type(node.op)](_eval(node.left), _eval(node.right))
    if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "pow" and len(node.args) == 3:
        return pow(*(_eval(a) for a in node.args))
    raise ValueError(f"unsupported expression {ast.dump(node)}")


# --------------------------------------------------------------------------------------- the kinds


def _one(reason: str, code: str) -> list[Step]:
    return [lambda outs: (reason, code)]


def _boxed(template: str) -> Callable[[str], str]:
    return lambda x: template.replace("ANSWER", f"\\boxed{{{x}}}")


def product(r: Random) -> Problem:
    a, b = r.randint(100, 9999), r.randint(100, 9999)
    q = r.choice([f"What is {a} times {b}?", f"Compute the product of {a} and {b}.", f"Multiply {a} by {b}."])
    done = _boxed("The product is ANSWER.")
    return Problem("product", q, str(a * b),
                   Plan(_one("I will multiply the two numbers with Python.", f"print({a} * {b})"), done),
                   Plan(_one("I will combine the two numbers with Python.", f"print({a} + {b})"), done))


def remainder(r: Random) -> Problem:
    a, m = r.randint(1000, 99999), r.randint(7, 97)
    q = r.choice([f"What is the remainder when {a} is divided by {m}?", f"Find {a} modulo {m}.",
                  f"What is left over when {a} is divided by {m}?"])
    done = _boxed("The remainder is ANSWER.")
    return Problem("remainder", q, str(a % m),
                   Plan(_one("The remainder is what is left after taking out multiples of the divisor.",
                             f"print({a} % {m})"), done),
                   Plan(_one("I will divide the number by the divisor.", f"print({a} // {m})"), done))


def expression(r: Random) -> Problem:
    a, b, c = r.randint(100, 9999), r.randint(100, 9999), r.randint(12, 999)
    q = r.choice([f"Evaluate ({a} + {b}) * {c}.", f"What is the sum of {a} and {b}, multiplied by {c}?"])
    done = _boxed("The value is ANSWER.")
    return Problem("expression", q, str((a + b) * c),
                   Plan(_one("The sum comes first, then the product.", f"print(({a} + {b}) * {c})"), done),
                   Plan(_one("I will write the expression in Python.", f"print({a} + {b} * {c})"), done))


def warehouse(r: Random) -> Problem:
    a, b, c = r.randint(2000, 9999), r.randint(100, 1999), r.randint(100, 9999)
    q = r.choice([f"A warehouse holds {a} boxes. {b} boxes are shipped out and {c} new boxes arrive. "
                  "How many boxes are in the warehouse now?",
                  f"A library has {a} books. It gives away {b} books and buys {c} more. "
                  "How many books does it have now?"])
    done = _boxed("The total now is ANSWER.")
    return Problem("warehouse", q, str(a - b + c),
                   Plan(_one("Subtract what left and add what arrived.", f"print({a} - {b} + {c})"), done),
                   Plan(_one("Subtract both changes from the start.", f"print({a} - {b} - {c})"), done))


def power_mod(r: Random) -> Problem:
    a, k, m = r.randint(12, 999), r.randint(5, 99), r.randint(100, 9999)
    q = r.choice([f"What is {a} to the power {k}, modulo {m}?", f"Compute {a}^{k} mod {m}."])
    done = _boxed("The result is ANSWER.")
    return Problem("power_mod", q, str(pow(a, k, m)),
                   Plan(_one("Python's pow takes a modulus.", f"print(pow({a}, {k}, {m}))"), done),
                   Plan(_one("I will multiply and reduce.", f"print({a} * {k} % {m})"), done))


def shopping(r: Random) -> Problem:
    name = r.choice(NAMES)
    x, y, z, w = r.randint(12, 99), r.randint(12, 999), r.randint(12, 99), r.randint(12, 999)
    q = (f"{name} buys {x} packs of {y} pens and {z} packs of {w} pencils. "
         f"How many items does {name} buy in total?")
    first: Step = lambda outs: ("First the pens.", f"print({x} * {y})")  # noqa: E731
    done = _boxed(f"{name} buys ANSWER items.")
    return Problem("shopping", q, str(x * y + z * w),
                   Plan([first, lambda outs: ("Now add the pencils.", f"print({outs[0]} + {z} * {w})")], done),
                   Plan([first, lambda outs: ("Now add the pencils.", f"print({outs[0]} + {z} + {w})")], done))


KINDS: dict[str, Callable[[Random], Problem]] = {
    "product": product, "remainder": remainder, "expression": expression,
    "warehouse": warehouse, "power_mod": power_mod, "shopping": shopping,
}
# How often the SFT data follows the misconception. Above 1/2 the greedy SFT model is wrong on that
# kind; a few preference updates that move the odds past 1/2 make it right.
MISCONCEPTION_RATE = {"product": 0.25, "remainder": 0.6, "expression": 0.6,
                      "warehouse": 0.3, "power_mod": 0.6, "shopping": 0.6}
SLIP_RATE = 0.06  # each of: operand miscopied into code, final answer miscopied from the output


# --------------------------------------------------------------------------------------- problems


def split_of(question: str) -> str:
    """"heldout" or "train", from the question text alone (the same question always lands the same)."""
    return "heldout" if hashlib.sha256(question.encode()).digest()[0] < HELDOUT_PER_256 else "train"


def make_problems(seed: int, n: int, split: str = "train", kinds: list[str] | None = None) -> list[Problem]:
    """`n` distinct problems of `split`, kinds in turn (so every kind gets n/len(kinds)), from `seed`."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be train or heldout, got {split!r}")
    names = list(kinds or KINDS)
    unknown = [k for k in names if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown problem kinds {unknown}; known: {list(KINDS)}")
    r = Random(f"mtpo-demo/{split}/{seed}")
    seen, out = set(), []
    while len(out) < n:
        p = KINDS[names[len(out) % len(names)]](r)
        if p.question not in seen and split_of(p.question) == split:
            seen.add(p.question)
            out.append(p)
    return out


def prompt_row(p: Problem, index: int, split: str) -> dict:
    """A rollout prompt row: question, gold answer, the kind as `type` (`mtpo eval` reports accuracy per type)."""
    return {"prompt_id": f"{split}/{index}", "question": p.question, "answer": p.answer, "type": p.kind}


# --------------------------------------------------------------------------------------- trajectories


def run_plan(plan: Plan, final: Callable[[str], str] | None = None,
             tweak_code: Callable[[str], str] | None = None) -> tuple[list[dict], str]:
    """The plan's messages after the question (tool outputs computed) and the final answer given.
    `tweak_code` may alter one step's code (slip injection); `final` may alter the reported answer."""
    messages, outs = [], []
    for i, step in enumerate(plan.steps):
        reason, code = step(outs)
        if tweak_code is not None and i == len(plan.steps) - 1:
            code = tweak_code(code)
        outs.append(evaluate(code))
        messages.append({"role": "assistant", "content": f"{reason}\n```python\n{code}\n```"})
        messages.append({"role": "user", "content": f"```output\n{outs[-1]}\n```"})
    answer = final(outs[-1]) if final else outs[-1]
    messages.append({"role": "assistant", "content": plan.conclude(answer)})
    return messages, answer


def _change_a_digit(r: Random, number: str) -> str:
    """`number` with one digit changed (the first digit never becomes 0)."""
    digits = [i for i, ch in enumerate(number) if ch.isdigit()]
    i = r.choice(digits)
    choices = [d for d in "0123456789" if d != number[i] and not (i == digits[0] and d == "0" and len(digits) > 1)]
    return number[:i] + r.choice(choices) + number[i + 1:]


def _miscopy_operand(r: Random) -> Callable[[str], str]:
    def tweak(code: str) -> str:
        tokens = [t for t in _numbers(code) if len(t) >= 3]
        if not tokens:
            return code
        t = r.choice(tokens)
        return code.replace(t, _change_a_digit(r, t), 1)
    return tweak


def _numbers(code: str) -> list[str]:
    out, cur = [], ""
    for ch in code + " ":
        if ch.isdigit():
            cur += ch
        elif cur:
            out.append(cur)
            cur = ""
    return out


def sft_trajectory(p: Problem, r: Random, misconception_rate: float | None = None,
                   slip_rate: float = SLIP_RATE) -> tuple[list[dict], bool]:
    """One SFT conversation for `p` with the kind's error profile; returns (messages, correct)."""
    rate = MISCONCEPTION_RATE[p.kind] if misconception_rate is None else misconception_rate
    plan = p.wrong if r.random() < rate else p.correct
    tweak = _miscopy_operand(r) if r.random() < slip_rate else None
    final = (lambda out: _change_a_digit(r, out)) if r.random() < slip_rate else None
    steps, answer = run_plan(plan, final, tweak)
    return [{"role": "user", "content": p.question}] + steps, answer == p.answer
