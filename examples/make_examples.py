"""Regenerate mtpo's embedded example assets: sample data, a tiny tokenizer and a tiny model.

    /work/venv/bin/python examples/make_examples.py              # writes into examples/
    /work/venv/bin/python examples/make_examples.py --out DIR    # writes into DIR/ instead

Outputs (all small, committed, so `mtpo dpo|kto|sft|inspect` run offline on a fresh machine):

    data/dpo_research.jsonl  128 pairs  {"chosen": [msgs], "rejected": [msgs]}; tool output = user turn "```output\\n…\\n```"
    data/dpo_tools.jsonl      64 pairs  {"prompt", "chosen", "rejected", "tools"}; OpenAI-style tool_calls + role "tool"
    data/kto.jsonl           128 rows   {"prompt", "completion", "label"}, 64 true / 64 false
    data/sft.jsonl           128 rows   {"messages", "label"} (RAFT style: label = trajectory is correct)
    data/eval_dpo.jsonl       16 pairs  research format, problems disjoint from all training files
    tiny-model/              byte-level BPE tokenizer (vocab 1000, ChatML template with tools) and a
                             randomly initialised 2-layer Llama (~0.1M params, float32 safetensors)

The data are synthetic tool-using math-agent trajectories: arithmetic word problems from templates
with random numbers; the agent reasons, writes a ```python``` block, the tool answers, 1-3 rounds,
final answer in \\boxed{}. Every tool output is produced by actually running the (generator-authored)
code, so outputs always match the code; each problem is checked against an exact answer.
Chosen / label-true = a correct trajectory (one shot, step by step, or error-then-fix); rejected /
label-false = wrong code, a misreported final answer, or an error followed by giving up.

Deterministic: everything derives from --seed (default 0) through private `random.Random`s and
`torch.manual_seed`; re-running gives byte-identical files (tests/test_examples.py checks this).
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import math
import re
import string
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal
from fractions import Fraction
from pathlib import Path
from random import Random
from typing import Callable

HERE = Path(__file__).resolve().parent

# ----------------------------------------------------------------------------- problem templates

Step = tuple[str, str]  # (reasoning text shown before the code, python code)


@dataclass
class Problem:
    question: str
    answer: str                                   # exact answer, as written inside \boxed{}
    one_shot: Step                                # solves everything in one code block
    steps: list[Callable[[list[str]], Step]]      # one tool round each; gets the previous outputs
    wrong: Step                                   # a plausible buggy one-block solution
    conclude: Callable[[str], str]                # final sentence for a given answer
    parallel: tuple[Step, Step, Callable[[list[str]], Step]] | None = None  # 2 independent calls + follow-up


NAMES = ["Maria", "Tom", "Aisha", "Kenji", "Lena", "Omar", "Priya", "Diego", "Sofia", "Noah", "Mei", "Jonas"]


def code(template: str, **values) -> str:
    """Fill `$name` placeholders; string.Template leaves Python's own {braces} alone."""
    return string.Template(template).substitute(**values)


def money(x: Fraction) -> str:
    cents = Decimal(x.numerator) / Decimal(x.denominator)
    return str(cents.quantize(Decimal("0.01"), rounding=ROUND_HALF_EVEN))


def boxed_fraction(x: Fraction) -> str:
    return str(x.numerator) if x.denominator == 1 else f"\\frac{{{x.numerator}}}{{{x.denominator}}}"


def shopping(r: Random) -> Problem:
    name, a, b = r.choice(NAMES), r.randint(2, 9), r.randint(2, 9)
    p, q = Fraction(r.randint(105, 495), 100), Fraction(r.randint(45, 250), 100)
    total = a * p + b * q
    bill = next(x for x in (20, 50, 100, 200) if x > total)
    v = dict(a=a, b=b, p=money(p), q=money(q), bill=bill)
    c, unit = r.choice([("$", "dollars"), ("$", "dollars"), ("€", "euros")])  # some non-ASCII text
    return Problem(
        question=f"{name} buys {a} notebooks at {c}{money(p)} each and {b} pens at {c}{money(q)} each. "
                 f"{name} pays with a {c}{bill} note. How much change does {name} get, in {unit}?",
        answer=money(bill - total),
        one_shot=("The change is the note minus the cost of the notebooks and the pens.",
                  code("notebooks = $a * $p\npens = $b * $q\nchange = $bill - (notebooks + pens)\n"
                       "print(f\"{change:.2f}\")", **v)),
        steps=[lambda o: ("First, the total cost of the notebooks and the pens.",
                          code("total = $a * $p + $b * $q\nprint(f\"{total:.2f}\")", **v)),
               lambda o: (f"The items cost {c}{o[0]} in total. Now subtract that from the {c}{bill} note.",
                          code("change = $bill - $t\nprint(f\"{change:.2f}\")", bill=bill, t=o[0]))],
        wrong=("The change is the note minus the price of what was bought.",
               code("total = $a * $p\nchange = $bill - total\nprint(f\"{change:.2f}\")", **v)),
        conclude=lambda x: f"{name} gets $\\boxed{{{x}}}$ {unit} in change.",
        parallel=(("", code("print(f\"{$a * $p:.2f}\")", **v)),
                  ("", code("print(f\"{$b * $q:.2f}\")", **v)),
                  lambda o: (f"The notebooks cost {c}{o[0]} and the pens {c}{o[1]}. Now the change.",
                             code("change = $bill - ($x + $y)\nprint(f\"{change:.2f}\")", bill=bill, x=o[0], y=o[1]))))


def train_speed(r: Random) -> Problem:
    speed, h, h2 = r.choice([40, 45, 50, 60, 72, 80, 90, 120]), r.randint(2, 6), r.randint(3, 9)
    d = speed * h
    return Problem(
        question=f"A train travels {d} km in {h} hours. At the same speed, how many kilometres "
                 f"does it travel in {h2} hours?",
        answer=str(speed * h2),
        one_shot=("Speed is distance divided by time; then multiply by the new time.",
                  f"speed = {d} / {h}\ndistance = speed * {h2}\nprint(distance)"),
        steps=[lambda o: ("First find the speed in km per hour.", f"speed = {d} / {h}\nprint(speed)"),
               lambda o: (f"The speed is {o[0]} km/h. Multiply by {h2} hours.",
                          f"distance = {o[0]} * {h2}\nprint(distance)")],
        wrong=("The speed is time over distance, then scale to the new time.",
               f"speed = {h} / {d}\ndistance = speed * {h2}\nprint(distance)"),
        conclude=lambda x: f"The train travels $\\boxed{{{x}}}$ km in {h2} hours.")


def discount_tax(r: Random) -> Problem:
    price, disc, tax = 20 * r.randint(2, 15), r.choice([10, 20, 25, 30, 40, 50]), r.choice([5, 8, 10, 15])
    item = r.choice(["jacket", "bicycle", "lamp", "backpack", "printer"])
    after = Fraction(price * (100 - disc), 100)
    return Problem(
        question=f"A {item} costs ${price}. It is discounted by {disc}%, and then a {tax}% sales tax is "
                 f"applied to the discounted price. What is the final price in dollars?",
        answer=money(after * Fraction(100 + tax, 100)),
        one_shot=("Apply the discount first, then add tax on the discounted price.",
                  f"discounted = {price} * (1 - {disc} / 100)\nfinal = discounted * (1 + {tax} / 100)\n"
                  "print(f\"{final:.2f}\")"),
        steps=[lambda o: ("Step 1: the discounted price.",
                          f"discounted = {price} * (1 - {disc} / 100)\nprint(f\"{{discounted:.2f}}\")"),
               lambda o: (f"The discounted price is ${o[0]}. Step 2: the tax on it.",
                          f"tax = {o[0]} * {tax} / 100\nprint(f\"{{tax:.2f}}\")"),
               lambda o: (f"The tax is ${o[1]}. Step 3: add it to the discounted price.",
                          f"final = {o[0]} + {o[1]}\nprint(f\"{{final:.2f}}\")")],
        wrong=("Take the discount off and add the tax.",
               f"final = {price} * (1 - {disc} / 100) + {price} * {tax} / 100\nprint(f\"{{final:.2f}}\")"),
        conclude=lambda x: f"The final price of the {item} is $\\boxed{{{x}}}$ dollars.")


def multiples(r: Random) -> Problem:
    k, m = r.sample([3, 4, 5, 6, 7, 9, 11], 2)
    n = r.randint(40, 300)
    lcm = k * m // math.gcd(k, m)
    total = sum(x for x in range(1, n + 1) if x % k == 0 or x % m == 0)
    return Problem(
        question=f"What is the sum of all integers from 1 to {n} (inclusive) that are multiples of {k} or of {m}?",
        answer=str(total),
        one_shot=("Loop over the range and keep the numbers divisible by either.",
                  f"print(sum(x for x in range(1, {n} + 1) if x % {k} == 0 or x % {m} == 0))"),
        steps=[lambda o: (f"Use inclusion-exclusion. First the multiples of {k}.", f"print(sum(range({k}, {n} + 1, {k})))"),
               lambda o: (f"That sum is {o[0]}. Next the multiples of {m}.", f"print(sum(range({m}, {n} + 1, {m})))"),
               lambda o: (f"Numbers divisible by both are multiples of {lcm} and were counted twice.",
                          f"print({o[0]} + {o[1]} - sum(range({lcm}, {n} + 1, {lcm})))")],
        wrong=("Add the multiples of each number.",
               f"print(sum(range(0, {n}, {k})) + sum(range(0, {n}, {m})))"),
        conclude=lambda x: f"The sum is $\\boxed{{{x}}}$.",
        parallel=(("", f"print(sum(range({k}, {n} + 1, {k})))"), ("", f"print(sum(range({m}, {n} + 1, {m})))"),
                  lambda o: (f"Now remove the multiples of {lcm}, which were counted twice.",
                             f"print({o[0]} + {o[1]} - sum(range({lcm}, {n} + 1, {lcm})))")))


def fence(r: Random) -> Problem:
    length, width, gate, cost = r.randint(8, 40), r.randint(5, 30), r.randint(1, 3), r.randint(6, 25)
    fenced = 2 * (length + width) - gate
    return Problem(
        question=f"A rectangular garden is {length} m long and {width} m wide. It is fenced all around except "
                 f"for a {gate} m wide gate. Fencing costs ${cost} per metre. How much does the fencing cost?",
        answer=str(fenced * cost),
        one_shot=("The fence covers the perimeter minus the gate.",
                  f"perimeter = 2 * ({length} + {width})\nfence = perimeter - {gate}\nprint(fence * {cost})"),
        steps=[lambda o: ("First the perimeter.", f"print(2 * ({length} + {width}))"),
               lambda o: (f"The perimeter is {o[0]} m; remove the gate and multiply by the price.",
                          f"print(({o[0]} - {gate}) * {cost})")],
        wrong=("Multiply the size of the garden by the price.",
               f"area = {length} * {width}\nprint(area * {cost})"),
        conclude=lambda x: f"The fencing costs $\\boxed{{{x}}}$ dollars.")


def savings(r: Random) -> Problem:
    name, has, per = r.choice(NAMES), r.randint(10, 90), r.randint(7, 30)
    price = has + per * r.randint(3, 20) + r.randint(1, per - 1)  # never a whole number of weeks
    return Problem(
        question=f"{name} has ${has} and saves ${per} every week. A bike costs ${price}. "
                 f"After how many weeks can {name} first afford the bike?",
        answer=str(math.ceil((price - has) / per)),
        one_shot=("The remaining amount divided by the weekly savings, rounded up.",
                  f"import math\nweeks = math.ceil(({price} - {has}) / {per})\nprint(weeks)"),
        steps=[lambda o: ("How much is still missing?", f"print({price} - {has})"),
               lambda o: (f"{o[0]} dollars are missing. Divide by {per} and round up to whole weeks.",
                          f"import math\nprint(math.ceil({o[0]} / {per}))")],
        wrong=("Divide what is missing by the weekly savings.", f"weeks = ({price} - {has}) // {per}\nprint(weeks)"),
        conclude=lambda x: f"{name} can afford the bike after $\\boxed{{{x}}}$ weeks.")


def pipes(r: Random) -> Problem:
    a, b = r.sample(range(2, 13), 2)
    t = 1 / (Fraction(1, a) + Fraction(1, b))
    return Problem(
        question=f"Pipe A fills a tank in {a} hours and pipe B fills it in {b} hours. "
                 f"How many hours do they take to fill the tank together? Give an exact fraction.",
        answer=boxed_fraction(t),
        one_shot=("Rates add: 1/a + 1/b tanks per hour. The time is the reciprocal.",
                  f"from fractions import Fraction\nrate = Fraction(1, {a}) + Fraction(1, {b})\nprint(1 / rate)"),
        steps=[lambda o: ("First the combined rate in tanks per hour.",
                          f"from fractions import Fraction\nprint(Fraction(1, {a}) + Fraction(1, {b}))"),
               lambda o: (f"Together they fill {o[0]} of the tank per hour; the time is the reciprocal.",
                          f"from fractions import Fraction\nprint(1 / Fraction('{o[0]}'))")],
        wrong=("Take the average of the two times.",
               f"from fractions import Fraction\nprint(Fraction({a} + {b}, 2))"),
        conclude=lambda x: f"Together the pipes fill the tank in $\\boxed{{{x}}}$ hours.")


def ages(r: Random) -> Problem:
    bob, k, n = r.randint(3, 20), r.randint(2, 5), r.randint(2, 12)
    s = k * bob + bob + 2 * n
    return Problem(
        question=f"Alice is {k} times as old as Bob. In {n} years, the sum of their ages will be {s}. "
                 f"How old is Bob now?",
        answer=str(bob),
        one_shot=("Search over Bob's possible ages.",
                  f"for bob in range(1, 100):\n    if {k} * bob + bob + 2 * {n} == {s}:\n        print(bob)"),
        steps=[lambda o: (f"In {n} years both are {n} years older, so today their ages sum to:", f"print({s} - 2 * {n})"),
               lambda o: (f"Today Alice + Bob = {o[0]} and Alice = {k} * Bob, so Bob = {o[0]} / {k + 1}.",
                          f"print({o[0]} // {k + 1})")],
        wrong=(f"Subtract the {n} years and split the sum.", f"print(({s} - {n}) / {k + 1})"),
        conclude=lambda x: f"Bob is $\\boxed{{{x}}}$ years old.")


def interest(r: Random) -> Problem:
    principal, rate, years = 100 * r.randint(5, 60), r.choice([2, 3, 4, 5, 6, 8]), r.randint(2, 6)
    amount = principal * Fraction(100 + rate, 100) ** years
    return Problem(
        question=f"${principal} is invested at {rate}% interest compounded annually. "
                 f"How much is in the account after {years} years, to the nearest cent?",
        answer=money(amount),
        one_shot=("Compound growth: P * (1 + r)^n.",
                  f"amount = {principal} * (1 + {rate} / 100) ** {years}\nprint(f\"{{amount:.2f}}\")"),
        steps=[lambda o: ("First the growth factor over all the years.", f"print((1 + {rate} / 100) ** {years})"),
               lambda o: ("Multiply the principal by that factor.", f"print(f\"{{{principal} * {o[0]}:.2f}}\")")],
        wrong=("The interest is rate times years.",
               f"amount = {principal} * (1 + {rate} / 100 * {years})\nprint(f\"{{amount:.2f}}\")"),
        conclude=lambda x: f"After {years} years the account holds $\\boxed{{{x}}}$ dollars.")


def removed_mean(r: Random) -> Problem:
    n, m = r.randint(5, 12), r.randint(20, 80)
    m2 = r.randint(m - 6, m + 6)
    return Problem(
        question=f"The average of {n} numbers is {m}. After one number is removed, the average of the "
                 f"remaining numbers is {m2}. What number was removed?",
        answer=str(n * m - (n - 1) * m2),
        one_shot=("The removed number is the old total minus the new total.",
                  f"before = {n} * {m}\nafter = ({n} - 1) * {m2}\nprint(before - after)"),
        steps=[lambda o: ("The total before removal:", f"print({n} * {m})"),
               lambda o: ("The total after removal:", f"print({n - 1} * {m2})"),
               lambda o: ("The removed number is the difference.", f"print({o[0]} - {o[1]})")],
        wrong=("The removed number changes the average by the difference.", f"print({n} * ({m} - {m2}))"),
        conclude=lambda x: f"The removed number is $\\boxed{{{x}}}$.",
        parallel=(("", f"print({n} * {m})"), ("", f"print({n - 1} * {m2})"),
                  lambda o: (f"The totals are {o[0]} and {o[1]}; their difference is the removed number.",
                             f"print({o[0]} - {o[1]})")))


TEMPLATES = [shopping, train_speed, discount_tax, multiples, fence, savings, pipes, ages, interest, removed_mean]

# ----------------------------------------------------------------------------- running the tool


def run_python(source: str) -> str:
    """What the agent's tool returns: stdout, or the last traceback line (as ToRA-style executors do).
    Only generator-authored code reaches this function."""
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(source, {"__name__": "__main__"})
    except Exception as e:  # noqa: BLE001 - the error text *is* the tool output
        return f"{type(e).__name__}: {e}"
    return out.getvalue().strip()


def to_answer(output: str) -> str:
    """How the agent writes a printed value inside \\boxed{}: 150.0 -> 150, 12/7 -> \\frac{12}{7}."""
    if re.fullmatch(r"-?\d+/\d+", output):
        num, den = output.split("/")
        return f"\\frac{{{num}}}{{{den}}}"
    return output[:-2] if re.fullmatch(r"-?\d+\.0", output) else output


def verify(p: Problem) -> bool:
    """Every correct path must reach the exact answer and the buggy code must not (else resample)."""
    outs = []
    for step in p.steps:
        outs.append(run_python(step(outs)[1]))
    paths = [run_python(p.one_shot[1]), outs[-1]]
    if p.parallel:
        a, b, follow = p.parallel
        paths.append(run_python(follow([run_python(a[1]), run_python(b[1])])[1]))
    return all(to_answer(o) == p.answer for o in paths) and to_answer(run_python(p.wrong[1])) != p.answer


def make_problem(r: Random) -> Problem:
    template = r.choice(TEMPLATES)
    while not verify(p := template(r)):  # float rounding at a half cent, or a bug that happens to be right
        pass
    return p


# ----------------------------------------------------------------------------- trajectories
# A trajectory is a list of rounds plus a final text. A round is (text, [(code, output), ...]);
# two calls in one round are parallel tool calls (tools format only).

Round = tuple[str, list[tuple[str, str]]]


def perturb(answer: str, r: Random) -> str:
    """A near-miss answer, as a careless model would misreport it."""
    if answer.startswith("\\frac"):
        num, den = re.findall(r"\d+", answer)
        return f"\\frac{{{den}}}{{{num}}}"
    if "." in answer:
        return money(Fraction(answer) + r.choice([Fraction(1, 10), Fraction(1), Fraction(5)]))
    return str(int(answer) + r.choice([-1, 1]) * r.choice([1, 2, 10]))


def call(c: str) -> tuple[str, str]:
    return c, run_python(c)


def solve_by_steps(p: Problem) -> list[Round]:
    rounds, outs = [], []
    for step in p.steps:
        text, c = step(outs)
        rounds.append((text, [call(c)]))
        outs.append(rounds[-1][1][0][1])
    return rounds


def error_variant(c: str) -> str:
    """The same code with a realistic bug that raises: a forgotten import or a misspelt variable."""
    if "import math\n" in c:
        return c.replace("import math\n", "")
    names = re.findall(r"^(\w+) = ", c, flags=re.M)
    if names:
        *body, last = c.split("\n")
        return "\n".join(body + [re.sub(rf"\b{names[-1]}\b", names[-1] + "s", last)])
    return c.replace("print(", "prnt(", 1)


def read_output(rounds: list[Round], r: Random) -> str:
    last = rounds[-1][1][-1][1]
    return r.choice([f"The output is {last}.", f"The code prints {last}.", f"We get {last}."])


def correct_trajectory(p: Problem, r: Random, parallel: bool = False) -> tuple[list[Round], str]:
    if parallel and p.parallel:
        a, b, follow = p.parallel
        first = ("The two parts are independent, so I compute them at the same time.", [call(a[1]), call(b[1])])
        text, c = follow([first[1][0][1], first[1][1][1]])
        rounds = [first, (text, [call(c)])]
    else:
        kind = r.choice(["one_shot", "steps", "steps", "fix_error"])
        if kind == "steps":
            rounds = solve_by_steps(p)
        elif kind == "fix_error":
            bad = error_variant(p.one_shot[1])
            rounds = [(p.one_shot[0], [call(bad)]), ("The code raised an error; let me fix it.", [call(p.one_shot[1])])]
        else:
            rounds = [(p.one_shot[0], [call(p.one_shot[1])])]
    final = f"{read_output(rounds, r)} {p.conclude(p.answer)}"
    return rounds, final


def wrong_trajectory(p: Problem, r: Random) -> tuple[list[Round], str]:
    kind = r.choice(["wrong_code", "wrong_final", "give_up"])
    if kind == "wrong_code":
        rounds = [(p.wrong[0], [call(p.wrong[1])])]
        return rounds, f"{read_output(rounds, r)} {p.conclude(to_answer(rounds[0][1][0][1]))}"
    if kind == "wrong_final":
        rounds = r.choice([[(p.one_shot[0], [call(p.one_shot[1])])], solve_by_steps(p)])
        return rounds, f"{read_output(rounds, r)} {p.conclude(perturb(p.answer, r))}"  # misread
    bad = error_variant(p.one_shot[1])
    rounds = [(p.one_shot[0], [call(bad)])]
    if r.random() < 0.5:
        rounds.append(("Let me try again.", [call(bad)]))
    if r.random() < 0.5:
        return rounds, ("The code keeps failing" if len(rounds) > 1 else "The code failed") + ", so I cannot compute the answer."
    return rounds, f"The code failed, so I will estimate instead. {p.conclude(perturb(p.answer, r))}"


# ----------------------------------------------------------------------------- record formats

SYSTEM = ("You are a helpful math assistant. Reason step by step and run Python code when it helps. "
          "Put the final answer in \\boxed{}.")
SUFFIX = "\nPlease integrate natural language reasoning with programs, and put your final answer within \\boxed{}."
PYTHON_TOOL = {"type": "function", "function": {
    "name": "python",
    "description": "Run Python code and return what it prints (or the error message).",
    "parameters": {"type": "object", "properties": {
        "code": {"type": "string", "description": "Python source code; print() the results you need."}},
        "required": ["code"]}}}


def prompt_messages(p: Problem, r: Random, tools: bool = False) -> list[dict]:
    msgs = [{"role": "system", "content": SYSTEM}] if r.random() < 0.35 else []
    return msgs + [{"role": "user", "content": p.question + ("" if tools else SUFFIX)}]


def research_messages(traj: tuple[list[Round], str]) -> list[dict]:
    """Tool outputs become user turns with a ```output fence, as in the original research data."""
    rounds, final = traj
    msgs = []
    for text, calls in rounds:
        for c, out in calls:  # research format has no parallel calls; rounds here hold one call
            msgs.append({"role": "assistant", "content": f"{text}\n```python\n{c}\n```"})
            msgs.append({"role": "user", "content": f"```output\n{out}\n```"})
    return msgs + [{"role": "assistant", "content": final}]


def tool_messages(traj: tuple[list[Round], str], r: Random) -> list[dict]:
    rounds, final = traj
    msgs = []
    for text, calls in rounds:
        msgs.append({"role": "assistant", "content": "" if r.random() < 0.05 else text, "tool_calls": [
            {"type": "function", "function": {"name": "python", "arguments": {"code": c}}} for c, _ in calls]})
        msgs += [{"role": "tool", "name": "python", "content": out} for _, out in calls]
    return msgs + [{"role": "assistant", "content": final}]


def build_datasets(seed: int) -> dict[str, list[dict]]:
    r = Random(seed)
    seen: set[str] = set()

    def fresh() -> Problem:  # problems are never repeated, within or across files (eval is held out)
        while (p := make_problem(r)).question in seen:
            pass
        seen.add(p.question)
        return p

    files: dict[str, list[dict]] = {name: [] for name in
                                    ["dpo_research", "dpo_tools", "kto", "sft", "eval_dpo"]}
    for name, n in [("dpo_research", 128), ("eval_dpo", 16)]:
        for _ in range(n):
            p = fresh()
            prompt = prompt_messages(p, r)
            files[name].append({"chosen": prompt + research_messages(correct_trajectory(p, r)),
                                "rejected": prompt + research_messages(wrong_trajectory(p, r))})
    for i in range(64):
        p = fresh()
        parallel = p.parallel is not None and i % 3 == 0
        files["dpo_tools"].append({"prompt": prompt_messages(p, r, tools=True),
                                   "chosen": tool_messages(correct_trajectory(p, r, parallel), r),
                                   "rejected": tool_messages(wrong_trajectory(p, r), r),
                                   "tools": [PYTHON_TOOL]})
    labels = [True, False] * 64
    r.shuffle(labels)
    for label in labels:
        p = fresh()
        traj = correct_trajectory(p, r) if label else wrong_trajectory(p, r)
        files["kto"].append({"prompt": prompt_messages(p, r), "completion": research_messages(traj), "label": label})
    for i in range(128):
        p, label = fresh(), i % 4 != 3  # 96 correct, 32 incorrect: RAFT keeps label-true rows
        traj = correct_trajectory(p, r) if label else wrong_trajectory(p, r)
        files["sft"].append({"messages": prompt_messages(p, r) + research_messages(traj), "label": label})
    return files


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------- tokenizer

# ChatML, simplified from Qwen2.5's template. Choices that matter for mtpo:
#  * no default system prompt and no BOS: the text starts with the first message;
#  * every assistant turn is `<|im_start|>assistant\n` + content [+ tool calls] + `<|im_end|>` + `\n`,
#    so the generation prompt `<|im_start|>assistant\n` is a prefix of every assistant turn;
#  * `{% generation %}` wraps exactly what the policy emits (content, tool calls, `<|im_end|>`) so
#    `return_assistant_tokens_mask=True` gives an independent check of mtpo's own mask;
#  * consecutive `tool` messages are grouped into one user turn of <tool_response> blocks (parallel calls).
CHAT_TEMPLATE = r"""{%- if messages and messages[0].role == 'system' -%}
    {%- set system_message = messages[0].content -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set system_message = '' -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- if tools -%}
    {{- '<|im_start|>system\n' -}}
    {%- if system_message -%}{{- system_message + '\n\n' -}}{%- endif -%}
    {{- '# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>' -}}
    {%- for tool in tools -%}
        {{- '\n' + (tool | tojson) -}}
    {%- endfor -%}
    {{- '\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif system_message -%}
    {{- '<|im_start|>system\n' + system_message + '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if message.role == 'assistant' -%}
        {{- '<|im_start|>assistant\n' -}}
        {%- generation -%}
        {{- message.content or '' -}}
        {%- for tool_call in message.tool_calls or [] -%}
            {%- set call = tool_call.function if tool_call.function is defined else tool_call -%}
            {%- if message.content or not loop.first -%}{{- '\n' -}}{%- endif -%}
            {{- '<tool_call>\n{"name": "' + call.name + '", "arguments": ' -}}
            {{- call.arguments if call.arguments is string else call.arguments | tojson -}}
            {{- '}\n</tool_call>' -}}
        {%- endfor -%}
        {{- '<|im_end|>' -}}
        {%- endgeneration -%}
        {{- '\n' -}}
    {%- elif message.role == 'tool' -%}
        {%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
        {{- '\n<tool_response>\n' + message.content + '\n</tool_response>' -}}
        {%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
    {%- else -%}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>\n' -}}
    {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{- '<|im_start|>assistant\n' -}}
{%- endif -%}
"""

# ids 0..2 in this order. eos is `<|im_end|>` because that is where a chat model must stop
# (like Qwen2.5-Instruct); pad is `<|endoftext|>`, a different id, so pad != eos (mtpo never infers
# masks from token values anyway).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Normal added tokens (not special: they stay in decode(skip_special_tokens=True)), matched
# atomically so tool markup never merges with neighbouring text.
TOOL_TOKENS = ["<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
VOCAB_SIZE = 1000


def conversations(files: dict[str, list[dict]]) -> list[tuple[list[dict], list[dict] | None]]:
    """Every full conversation in the data, as (messages, tools)."""
    convs = []
    for rows in files.values():
        for row in rows:
            prompt = row.get("prompt", [])
            for key in ("chosen", "rejected", "completion", "messages"):
                if key in row:
                    convs.append((prompt + row[key], row.get("tools")))
    return convs


def build_tokenizer(files: dict[str, list[dict]]):
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    def wrap(tok: Tokenizer) -> PreTrainedTokenizerFast:
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
            extra_special_tokens=["<|im_start|>"],  # so all_special_ids holds all three (as in Qwen)
            chat_template=CHAT_TEMPLATE, clean_up_tokenization_spaces=False,  # keeps decode(encode(t)) == t
            model_max_length=2048)

    tok = Tokenizer(models.BPE())  # no unk token: byte-level covers every input
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)  # offsets cover whitespace exactly
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in TOOL_TOKENS])

    # Train on exactly the text the model will see: rendering needs no vocabulary, so an untrained
    # wrapper renders the corpus first.
    untrained = wrap(tok)
    corpus = [untrained.apply_chat_template(m, tools=t, tokenize=False) for m, t in conversations(files)]
    # Listing all 7 markers as trainer special tokens pins them to ids 0..6 (the trainer reserves
    # them before the byte alphabet); it also marks them special, so un-mark the tool markup after.
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=SPECIAL_TOKENS + TOOL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer)
    state = json.loads(tok.to_str())
    for added in state["added_tokens"]:
        added["special"] = added["content"] in SPECIAL_TOKENS
    return wrap(Tokenizer.from_str(json.dumps(state)))


# ----------------------------------------------------------------------------- model


def build_model(tokenizer, seed: int):
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=2048,
        tie_word_embeddings=True, bos_token_id=None,  # the tokenizer has no BOS
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, dtype="float32")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return model


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=HERE, help="output directory (default: examples/)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    files = build_datasets(args.seed)
    for name, rows in files.items():
        write_jsonl(args.out / "data" / f"{name}.jsonl", rows)
    tokenizer = build_tokenizer(files)
    tokenizer.save_pretrained(args.out / "tiny-model")
    build_model(tokenizer, args.seed).save_pretrained(args.out / "tiny-model")
    print(f"wrote {args.out / 'data'} ({', '.join(f'{k}: {len(v)}' for k, v in files.items())}) "
          f"and {args.out / 'tiny-model'} (vocab {len(tokenizer)})")


if __name__ == "__main__":
    main()
