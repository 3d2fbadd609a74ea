"""The ``calculator`` tool: evaluate an arithmetic expression safely (no ``eval``).

Only numbers, ``+ - * / // % **`` (small exponents) and parentheses are accepted, walked as a
Python AST; anything else is an error string the model sees as the tool result, as a real tool
would return it. Like a pocket calculator it ignores what follows ``=`` (small models like to
write their own guess of the result into the expression).

Every number, intermediate or final, is bounded by ``10 ** MAX_DIGITS``, and the bound is checked
from the operands' magnitudes *before* an operation runs: CPython's big-int ``pow`` and ``*`` hold
the GIL, so ``((9**10)**10)**10...`` computed first and checked after would stop every thread of
the trainer (the rollout-timeout supervisor included) for minutes. Within the bound the most
expensive operation is a 100-digit number to the 10th power, microseconds of work.
"""
from __future__ import annotations

import ast
import math
import operator

TOOL = {"type": "function", "function": {
    "name": "calculator",
    "description": "Evaluate an arithmetic expression, e.g. 12 * (3 + 4). Returns the number.",
    "parameters": {"type": "object",
                   "properties": {"expression": {"type": "string",
                                                 "description": "numbers and + - * / ( )"}},
                   "required": ["expression"]}}}

_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
        ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod,
        ast.Pow: operator.pow}
MAX_LEN = 200
MAX_EXPONENT = 10
MAX_DIGITS = 100
"""Largest result magnitude accepted, as a power of ten (``|value| <= 1e100``), for every
intermediate too; far beyond any arithmetic word problem, and small enough to compute instantly."""


def _log10(value: float) -> float:
    return math.log10(abs(value)) if value else -math.inf


def _log10_bound(op: type, left: float, right: float) -> float:
    """An upper bound on ``log10 |left op right|`` from the operands alone (nothing computed)."""
    a, b = _log10(left), _log10(right)
    if op in (ast.Add, ast.Sub):
        return max(a, b) + math.log10(2)
    if op is ast.Mult:
        return a + b
    if op in (ast.Div, ast.FloorDiv):  # b == 0 raises in the operation; a // b's + 1 at the bound
        # is left to the check of the result
        return max(a - b, 0.0) if right else -math.inf
    if op is ast.Mod:
        return b
    return right * a if left else -math.inf  # Pow; 0 ** -1 raises ZeroDivisionError in pow


def _bounded(value: float, what: str) -> float:
    if isinstance(value, complex):
        raise ValueError(f"{what} is not a real number")
    if not _log10(value) <= MAX_DIGITS:  # also catches inf and nan
        raise ValueError(f"{what} too large (limit 1e{MAX_DIGITS})")
    return value


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return _bounded(node.value, "number")
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > MAX_EXPONENT:
            raise ValueError("exponent too large")
        if not _log10_bound(type(node.op), left, right) <= MAX_DIGITS:
            raise ValueError(f"result too large (limit 1e{MAX_DIGITS})")
        return _bounded(_OPS[type(node.op)](left, right), "result")
    raise ValueError(f"unsupported syntax: {type(node).__name__}")


def calculate(expression: str) -> str:
    """The tool result text: the value (integers without ``.0``) or ``error: ...``; never raises
    for any string, since the model writes it and a tool result is all the model can be shown."""
    if not isinstance(expression, str) or not expression.strip():
        return "error: empty expression"
    if len(expression) > MAX_LEN:
        return "error: expression too long"
    expression = expression.split("=")[0]  # "37 * 52 = ?" or a guessed result: evaluate the left side
    try:
        value = _eval(ast.parse(expression.replace("^", "**").replace("x", "*"), mode="eval").body)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        return str(round(value, 6) if isinstance(value, float) else value)
    except ZeroDivisionError:
        return "error: division by zero"
    except RecursionError:
        return "error: expression nested too deeply"
    except (SyntaxError, ValueError, TypeError, OverflowError, MemoryError) as exc:
        return f"error: {exc}"
