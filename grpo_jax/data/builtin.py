"""Built-in procedural tasks: `arithmetic` and `countdown`.

Each row is generated on demand from (seed, split, index), so a dataset of any
size costs nothing to create and gives the same rows on every machine.

Train and held-out splits are disjoint by construction: a problem's key (its
operands) is hashed together with the seed into one of 10 buckets; the `train`
split only keeps problems from buckets 1..9 and every other split (`test`,
`validation`, ...) only from bucket 0, drawing again until the bucket matches.
"""

from __future__ import annotations

import ast
import re
import zlib
from fractions import Fraction
from typing import Any, Callable, Optional, Sequence

import numpy as np

from grpo_jax.data.dataset import DataError, Dataset

HOLDOUT_BUCKETS = 10  # 1 in 10 problems is reserved for the held-out splits


def _split_code(split: str) -> int:
    return zlib.crc32(split.encode())


def _bucket(key: tuple, seed: int) -> int:
    return zlib.crc32(repr((seed,) + tuple(key)).encode()) % HOLDOUT_BUCKETS


class ProceduralDataset(Dataset):
    """`size` rows of a task generator `make(rng, **options) -> (key, row)`.

    Row `i` of split `s` is drawn from `np.random.default_rng([seed, crc32(s), i, attempt])`,
    taking the first attempt whose key falls on this split's side of the
    train / held-out partition.
    """

    def __init__(self, name: str, make: Callable[..., tuple[tuple, dict]], split: str, seed: int, size: int,
                 options: Optional[dict] = None):
        if size <= 0:
            raise DataError(f"{name}: the {split} split would have {size} rows; the size must be positive")
        self.name, self._make, self.split, self.seed, self.size = name, make, split, int(seed), int(size)
        self._options = dict(options or {})
        self._heldout = split != "train"

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> dict:
        index = self._check_index(index)
        for attempt in range(10_000):
            rng = np.random.default_rng([self.seed, _split_code(self.split), index, attempt])
            key, row = self._make(rng, **self._options)
            if (_bucket(key, self.seed) == 0) == self._heldout:
                row.setdefault("task", self.name)
                return row
        raise DataError(f"{self.name}: could not draw a {self.split} problem for row {index}")  # pragma: no cover


# ------------------------------------------------------------------ arithmetic

_OPS = {"sum": "+", "difference": "-", "product": "*"}


ARITHMETIC_PROMPT = "What is the {name} of {a} {op} {b}?"


def make_arithmetic(rng: np.random.Generator, min_operand: int | Sequence[int] = 0,
                    max_operand: int | Sequence[int] = 99,
                    ops: Sequence[str] = ("sum", "difference", "product"), prompt: str = ARITHMETIC_PROMPT,
                    teacher_skips_carry: float = 0.0) -> tuple[tuple, dict]:
    """"What is the sum of 8 + 5?" -> "13"; also difference (-) and product (*).

    min_operand, max_operand: one bound for both operands, or [first, second].
    prompt: the question's format string ({a}, {b}, {op}, {name}), e.g. "{a}{op}{b}=".
    teacher_skips_carry: adds a `teacher` column, the answer of a sloppy teacher who,
    with this probability per row, adds (or subtracts) digit by digit without carrying
    (borrowing): 47 + 38 -> 75. Supervised data from it imitates a systematic mistake
    that a reward can then correct (the demo's starting policy).
    """
    for op in ops:
        if op not in _OPS:
            raise DataError(f"arithmetic: unknown op {op!r}; choose from {', '.join(_OPS)}")
    name = ops[int(rng.integers(len(ops)))]
    lo, hi = _pair(min_operand, "min_operand"), _pair(max_operand, "max_operand")
    if lo[0] > hi[0] or lo[1] > hi[1]:
        raise DataError(f"arithmetic: min_operand {min_operand} is above max_operand {max_operand}")
    a, b = (int(rng.integers(lo[i], hi[i] + 1)) for i in (0, 1))
    sym = _OPS[name]
    value = a + b if sym == "+" else a - b if sym == "-" else a * b
    try:
        text = prompt.format(name=name, a=a, b=b, op=sym)
    except (KeyError, IndexError, ValueError) as e:
        raise DataError(f"arithmetic: prompt {prompt!r} is not a valid format string ({e}); it may use "
                        "{a}, {b}, {op} and {name}") from None
    row = {"prompt": text, "answer": str(value), "a": a, "b": b, "op": sym}
    if teacher_skips_carry:
        sloppy = rng.random() < teacher_skips_carry and sym != "*"
        row["teacher"] = str(_without_carry(a, b, sym) if sloppy else value)
    return (a, sym, b), row


def _pair(value, name: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise DataError(f"arithmetic: {name} must be an integer or a pair [first, second] of integers, got {value!r}")


def _without_carry(a: int, b: int, sym: str) -> int:
    """Digit-wise sum (or absolute difference) of a and b, no carry or borrow: 47 + 38 -> 75, 52 - 38 -> 26."""
    digits, place = 0, 1
    sign = 1 if sym == "+" or a >= b else -1
    a, b = (a, b) if sign == 1 else (b, a)
    while a or b:
        x, y = a % 10, b % 10
        digits += ((x + y) % 10 if sym == "+" else abs(x - y)) * place
        a, b, place = a // 10, b // 10, place * 10
    return sign * digits


# ------------------------------------------------------------------ countdown

COUNTDOWN_PROMPT = ("Using the numbers {numbers}, create an equation that equals {target}. You can use basic "
                    "arithmetic operations (+, -, *, /) and each number must be used exactly once.")


def make_countdown(rng: np.random.Generator, num_numbers: Sequence[int] | int = (3, 4), min_number: int = 1,
                   max_number: int = 99, max_target: int = 999) -> tuple[tuple, dict]:
    """Numbers and a target reachable with + - * / using every number once.

    The target comes from a random expression over a permutation of the numbers
    (integer, positive intermediate results); that expression is kept in the
    `solution` column. The answer is the target, as a string.
    """
    counts = [num_numbers] if isinstance(num_numbers, int) else list(num_numbers)
    for _ in range(1000):
        n = int(counts[int(rng.integers(len(counts)))])
        numbers = [int(x) for x in rng.integers(min_number, max_number + 1, size=n)]
        order = [int(i) for i in rng.permutation(n)]
        value, expr = Fraction(numbers[order[0]]), str(numbers[order[0]])
        ok = True
        for i in order[1:]:
            x = numbers[i]
            choices = ["+", "-", "*"] + (["/"] if x != 0 and value % x == 0 else [])
            op = choices[int(rng.integers(len(choices)))]
            value = {"+": value + x, "-": value - x, "*": value * x, "/": value / x if x else value}[op]
            expr = f"({expr}) {op} {x}" if op in "*/" and any(c in expr for c in "+-") else f"{expr} {op} {x}"
            if value <= 0 or value.denominator != 1:
                ok = False
                break
        if ok and 1 <= value <= max_target:
            target = int(value)
            row = {"prompt": COUNTDOWN_PROMPT.format(numbers=numbers, target=target), "answer": str(target),
                   "numbers": numbers, "target": target, "solution": expr}
            return (tuple(sorted(numbers)), target), row
    raise DataError(  # pragma: no cover
        "countdown: could not draw a problem; widen the number range or raise max_target")


_ALLOWED_BINOPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b,
                   ast.Mult: lambda a, b: a * b, ast.Div: lambda a, b: a / b}


def verify_countdown(equation: str, numbers: Sequence[int], target: int | str, *, use_all: bool = True,
                     max_length: int = 256) -> bool:
    """True when `equation` uses each of `numbers` once and evaluates to `target`.

    Safe: the text is parsed with `ast` and only integer literals, + - * / and
    parentheses are accepted (no names, calls, powers or unary operators); it is
    evaluated exactly with fractions. A trailing `= target` is allowed, and so
    are the symbols x, × and ÷. With `use_all=False` a subset of the numbers,
    each at most once, is enough.
    """
    if not isinstance(equation, str) or len(equation) > max_length:
        return False
    text = equation.strip().replace("×", "*").replace("÷", "/").replace("x", "*").replace("X", "*")
    if "=" in text:
        text, _, rhs = text.partition("=")
        if rhs.strip() and rhs.strip() != str(target).strip():
            return False
    if not re.fullmatch(r"[\d\s+\-*/()]+", text or "x"):
        return False
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError):
        return False
    used: list[int] = []

    def ev(node) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and type(node.value) is int:
            used.append(node.value)
            return Fraction(node.value)
        if isinstance(node, ast.BinOp) and type(node.op) in _ALLOWED_BINOPS:
            return _ALLOWED_BINOPS[type(node.op)](ev(node.left), ev(node.right))
        raise ValueError("not allowed")

    try:
        value = ev(tree)
    except (ValueError, ZeroDivisionError):
        return False
    pool = sorted(int(n) for n in numbers)
    if use_all:
        if sorted(used) != pool:
            return False
    else:
        for n in used:
            if n not in pool:
                return False
            pool.remove(n)
    try:
        return value == Fraction(str(target).strip())
    except (ValueError, ZeroDivisionError):
        return False


TASKS: dict[str, Callable[..., tuple[tuple, dict]]] = {"arithmetic": make_arithmetic, "countdown": make_countdown}


def builtin_dataset(name: str, split: str, seed: int, size: int, options: Optional[dict[str, Any]] = None) -> Dataset:
    if name not in TASKS:
        raise DataError(f"unknown built-in task {name!r}; choose from {', '.join(TASKS)}")
    return ProceduralDataset(name, TASKS[name], split, seed, size, options)
