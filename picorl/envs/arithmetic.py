"""Arithmetic: integer addition, then multiplication, with more digits at each tier.

    record = {"difficulty": 1, "a": 47, "op": "+", "b": 85, "answer": 132}
    prompt:  What is 47 + 85?  (answer as a bare integer in <answer></answer>)

The `cot` demonstration works the way it is taught on paper, digit by digit from the right
with the carry written out, so each step needs two digits and a carry, all close by:

    <think>
    7+5=12, write 2 carry 1
    4+8+1=13, write 13
    47+85=132
    </think>
    <answer>132</answer>

Multiplication multiplies the top number by each digit of the bottom one the same way
(`347*5: 7*5=35, write 5 carry 3 ...`), shifts each partial product by its digit's place and
adds them up with the addition steps. `direct` is the answer tag alone.
"""
from __future__ import annotations

from picorl.envs.base import Environment, answer_body

# difficulty -> (op, digits of a, digits of b). Every tier has thousands of distinct
# problems, so the held-out set (1,024 items) leaves most of a tier to train on.
TIERS = {
    1: ("+", 2, 2),
    2: ("+", 3, 3),
    3: ("+", 4, 4),
    4: ("*", 3, 1),
    5: ("*", 3, 2),
    6: ("*", 4, 3),
}
SYSTEM_PROMPT = ("You are a careful assistant that does arithmetic. Work digit by digit, then give the "
                 "final answer wrapped in <answer></answer> tags.")
_MAX_DIGITS = 40  # longer answers cannot be right for any tier; never convert megabytes of digits


def _operands(digits: int) -> range:
    # one-digit multipliers skip 0 and 1, which would teach nothing about carries
    return range(2, 10) if digits == 1 else range(10 ** (digits - 1), 10 ** digits)


def _add_steps(x: int, y: int) -> list[str]:
    """Column addition of x and y, one line per column from the right, then the sum."""
    xs, ys = str(x)[::-1], str(y)[::-1]
    lines, carry = [], 0
    width = max(len(xs), len(ys))
    for i in range(width):
        dx, dy = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        s = dx + dy + carry
        head = f"{dx}+{dy}" + ("+1" if carry else "") + f"={s}"
        if i == width - 1:
            lines.append(f"{head}, write {s}")
        else:
            lines.append(f"{head}, write {s % 10}" + (" carry 1" if s >= 10 else ""))
            carry = s // 10
    return lines + [f"{x}+{y}={x + y}"]


def _mul_digit_steps(x: int, d: int) -> list[str]:
    """x times the single digit d, one line per digit of x from the right, then the product."""
    lines, carry = [], 0
    xs = str(x)[::-1]
    for i, ch in enumerate(xs):
        p = int(ch) * d + carry
        head = f"{ch}*{d}" + (f"+{carry}" if carry else "") + f"={p}"
        if i == len(xs) - 1:
            lines.append(f"{head}, write {p}")
        else:
            lines.append(f"{head}, write {p % 10}" + (f" carry {p // 10}" if p >= 10 else ""))
            carry = p // 10
    return lines + [f"{x}*{d}={x * d}"]


def cot_lines(a: int, op: str, b: int) -> list[str]:
    if op == "+":
        return _add_steps(a, b)
    lines, total = [], None
    for place, ch in enumerate(str(b)[::-1]):
        d = int(ch)
        lines.append(f"{a}*{d}:")
        lines += _mul_digit_steps(a, d)
        partial = a * d * 10 ** place
        if place:
            lines.append(f"shifted {place}: {partial}")
        if not total:  # nothing to add to yet (the first partial product, or only zeros so far)
            total = partial
        else:
            lines += _add_steps(total, partial)
            total += partial
    return lines + ([f"{a}*{b}={a * b}"] if b >= 10 else [])


class Arithmetic(Environment):
    """What is a + b, or a * b? Six tiers, two-digit sums up to four- by three-digit products."""

    name = "arithmetic"
    tiers = {d: (f"{da}-digit + {db}-digit" if op == "+" else f"{da}-digit * {db}-digit")
             for d, (op, da, db) in TIERS.items()}
    demo_styles = ("cot", "direct")

    def make_record(self, rng, difficulty, split):
        op, da, db = TIERS[self.check_difficulty(difficulty)]
        a, b = rng.choice(_operands(da)), rng.choice(_operands(db))
        return {"difficulty": difficulty, "a": a, "op": op, "b": b, "answer": a + b if op == "+" else a * b}

    def messages(self, record):
        return [{"role": "system", "content": SYSTEM_PROMPT},
                {"role": "user", "content": f"What is {record['a']} {record['op']} {record['b']}?\n"
                                            "Give the result as a bare integer, for example <answer>42</answer>."}]

    def parse(self, completion, record):
        body = answer_body(completion)
        if body is None:
            return None
        body = body.strip()
        if not body or not (body.isascii() and body.isdigit()):
            return None
        return int(body) if len(body.lstrip("0")) <= _MAX_DIGITS else -1  # -1: formatted, never right

    def fraction_right(self, prediction, record):
        """The share of the answer's digits in place (aligned from the right, over the longer of
        the two): 132 against 132 is 1, 122 is 2/3, 1320 is 0."""
        want, got = str(record["answer"]), str(prediction)
        if got == want:
            return 1.0
        if prediction < 0:
            return 0.0
        width = max(len(want), len(got))
        return sum(w == g for w, g in zip(want[::-1], got[::-1])) / width

    def demonstration(self, record, style, tokenizer=None):
        if style not in self.demo_styles:
            raise ValueError(f"sft.style must be one of {', '.join(self.demo_styles)} for arithmetic, got {style!r}")
        answer = f"<answer>{record['answer']}</answer>"
        if style == "direct":
            return answer
        return "<think>\n" + "\n".join(cot_lines(record["a"], record["op"], record["b"])) + "\n</think>\n" + answer

    def key(self, record):
        return f"{record['a']}{record['op']}{record['b']}"

    def capacity(self, difficulty, split):
        _, da, db = TIERS[self.check_difficulty(difficulty)]
        return len(_operands(da)) * len(_operands(db))

    def check_task(self, task, where):
        if not isinstance(task, dict):
            raise ValueError(f"{where}: expected {{'a': int, 'op': '+' or '*', 'b': int}}, got {str(task)[:120]!r}")
        for k in ("a", "b"):
            if type(task.get(k)) is not int or task[k] < 0:
                raise ValueError(f"{where}: '{k}' must be a whole number >= 0, got {task.get(k)!r}")
        if task.get("op") not in ("+", "*"):
            raise ValueError(f"{where}: 'op' must be '+' or '*', got {task.get('op')!r}")
        return task

    def check_record(self, record, where):
        super().check_record(record, where)
        a, op, b = record["a"], record["op"], record["b"]
        if record.get("answer") != (a + b if op == "+" else a * b):
            raise ValueError(f"{where}: 'answer' must be {a} {op} {b}, got {record.get('answer')!r}")
        return record
