"""The ``calculator`` tool: evaluate an arithmetic expression safely (no ``eval``).

Only numbers, ``+ - * / // % **`` (small exponents) and parentheses are accepted, walked as a
Python AST; anything else is an error string the model sees as the tool result, as a real tool
would return it. Like a pocket calculator it ignores what follows ``=`` (small models like to
write their own guess of the result into the expression).
"""
from __future__ import annotations

import ast
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


def _eval(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _eval(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        left, right = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(right) > 10:
            raise ValueError("exponent too large")
        return _OPS[type(node.op)](left, right)
    raise ValueError(f"unsupported syntax: {type(node).__name__}")


def calculate(expression: str) -> str:
    """The tool result text: the value (integers without ``.0``) or ``error: ...``."""
    if not isinstance(expression, str) or not expression.strip():
        return "error: empty expression"
    if len(expression) > MAX_LEN:
        return "error: expression too long"
    expression = expression.split("=")[0]  # "37 * 52 = ?" or a guessed result: evaluate the left side
    try:
        value = _eval(ast.parse(expression.replace("^", "**").replace("x", "*"), mode="eval").body)
    except ZeroDivisionError:
        return "error: division by zero"
    except (SyntaxError, ValueError, TypeError, OverflowError) as exc:
        return f"error: {exc}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return str(round(value, 6) if isinstance(value, float) else value)
