"""Scoring: labels compared normalised, equations by value (parsed with `ast`, never `eval`), accuracy over a split."""

from __future__ import annotations

import ast
import math
import operator

from stepwise.task_model import Task


def normalize(text: str) -> str:
    return " ".join(text.lower().strip().strip(".").split())


_OPERATORS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_UNARY = {ast.USub: operator.neg, ast.UAdd: operator.pos}


def evaluate_equation(expression: str) -> float | None:
    """Value of an arithmetic expression, or None for anything that is not one (names, calls,
    division by zero, overflow). Parses with `ast`, never `eval`."""
    text = expression.replace("×", "*").replace("÷", "/").replace("−", "-").replace(",", "").replace("$", "").strip()
    if not text or len(text) > 200:
        return None
    try:
        return _evaluate(ast.parse(text, mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError):
        return None


def _evaluate(node: ast.AST) -> float:
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_evaluate(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow) and (abs(right) > 64 or abs(left) > 1e6):
            raise OverflowError("exponent too large")
        result = _OPERATORS[type(node.op)](left, right)
        if isinstance(result, complex) or not math.isfinite(result):
            raise ValueError("not a real number")
        return result
    raise ValueError(f"not arithmetic: {type(node).__name__}")


def is_correct(task: Task, prediction: str, gold: str) -> bool:
    if task.answer_style == "equation":
        predicted, expected = evaluate_equation(prediction), evaluate_equation(gold)
        return (
            predicted is not None
            and expected is not None
            and math.isclose(predicted, expected, rel_tol=1e-4, abs_tol=1e-4)
        )
    return normalize(prediction) == normalize(gold)


def accuracy(task: Task, predictions: list[str], golds: list[str]) -> float:
    if len(predictions) != len(golds):
        raise ValueError(f"{len(predictions)} predictions for {len(golds)} gold labels")
    if not golds:
        return 0.0
    return sum(is_correct(task, p, g) for p, g in zip(predictions, golds, strict=True)) / len(golds)
