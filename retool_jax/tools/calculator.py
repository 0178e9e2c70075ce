"""Exact arithmetic from the AST (no eval): integers, fractions, and sympy for roots and constants."""

from __future__ import annotations

import ast
import math
import operator
from typing import Any

from retool_jax.tools.base import ToolResult, tool

MAX_EXPONENT = 10_000
MAX_DIGITS = 5_000
MAX_FACTORIAL = 5_000


class CalcError(ValueError):
  """An expression the calculator refuses, with a reason the model can read."""


def _sympy():
  import sympy  # noqa: PLC0415  (imported on first use: it is slow to load)

  return sympy


def _constants() -> dict[str, Any]:
  sp = _sympy()
  return {"pi": sp.pi, "e": sp.E, "E": sp.E, "tau": 2 * sp.pi, "oo": sp.oo, "inf": sp.oo, "I": sp.I}


def _functions() -> dict[str, Any]:
  sp = _sympy()

  def factorial(n):
    if not (n.is_integer and 0 <= n <= MAX_FACTORIAL):
      raise CalcError(f"factorial needs an integer in [0, {MAX_FACTORIAL}], got {n}")
    return sp.factorial(n)

  return {
    "sqrt": sp.sqrt,
    "cbrt": sp.cbrt,
    "root": sp.root,
    "exp": sp.exp,
    "log": sp.log,
    "ln": sp.log,
    "log2": lambda x: sp.log(x, 2),
    "log10": lambda x: sp.log(x, 10),
    "sin": sp.sin,
    "cos": sp.cos,
    "tan": sp.tan,
    "asin": sp.asin,
    "acos": sp.acos,
    "atan": sp.atan,
    "sinh": sp.sinh,
    "cosh": sp.cosh,
    "tanh": sp.tanh,
    "abs": sp.Abs,
    "floor": sp.floor,
    "ceil": sp.ceiling,
    "factorial": factorial,
    "gcd": sp.gcd,
    "lcm": sp.lcm,
    "binomial": sp.binomial,
    "comb": sp.binomial,
    "perm": lambda n, k: sp.ff(n, k),
    "min": sp.Min,
    "max": sp.Max,
    "round": lambda x, n=0: sp.Float(round(float(x), int(n))) if n else sp.Integer(round(float(x))),
    "mod": sp.Mod,
    "isprime": sp.isprime,
    "rational": sp.Rational,
  }


_BINARY = {
  ast.Add: operator.add,
  ast.Sub: operator.sub,
  ast.Mult: operator.mul,
  ast.Div: operator.truediv,
  ast.FloorDiv: operator.floordiv,
  ast.Mod: operator.mod,
}


def _check_size(value: Any) -> Any:
  sp = _sympy()
  if isinstance(value, sp.Rational):
    for part in (value.p, value.q):
      if part and math.log10(abs(part)) > MAX_DIGITS:
        raise CalcError(f"the result has more than {MAX_DIGITS} digits")
  return value


def evaluate(expression: str) -> Any:
  """The exact value of an arithmetic expression (a sympy number)."""
  sp = _sympy()
  expression = expression.replace("^", "**").replace("×", "*").replace("÷", "/")
  try:
    tree = ast.parse(expression.strip(), mode="eval")
  except SyntaxError as e:
    raise CalcError(f"cannot parse the expression at column {e.offset}: {e.msg}") from None
  constants, functions = _constants(), _functions()

  def ev(node: ast.AST) -> Any:
    if isinstance(node, ast.Expression):
      return ev(node.body)
    if isinstance(node, ast.Constant):
      if isinstance(node.value, bool) or not isinstance(node.value, (int, float)):
        raise CalcError(f"unsupported literal {node.value!r}")
      return sp.Integer(node.value) if isinstance(node.value, int) else sp.Rational(repr(node.value))
    if isinstance(node, ast.Name):
      if node.id not in constants:
        raise CalcError(f"unknown name {node.id!r}; constants: {', '.join(sorted(constants))}")
      return constants[node.id]
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
      value = ev(node.operand)
      return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
      left, right = ev(node.left), ev(node.right)
      if isinstance(node.op, ast.Pow):
        if right.is_number and abs(right) > MAX_EXPONENT and abs(left) != 1:
          raise CalcError(f"exponent {right} is larger than {MAX_EXPONENT}")
        if left.is_Rational and right.is_Integer and abs(left) not in (0, 1):
          digits = abs(int(right)) * max(math.log10(abs(part)) for part in (left.p, left.q))
          if digits > MAX_DIGITS:  # refused before computing it
            raise CalcError(f"the result has more than {MAX_DIGITS} digits")
        return _check_size(left**right)
      if type(node.op) not in _BINARY:
        raise CalcError(f"unsupported operator {type(node.op).__name__}")
      if isinstance(node.op, (ast.Div, ast.FloorDiv, ast.Mod)) and right == 0:
        raise CalcError("division by zero")
      return _check_size(_BINARY[type(node.op)](left, right))
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.keywords:
      if node.func.id not in functions:
        raise CalcError(f"unknown function {node.func.id!r}; functions: {', '.join(sorted(functions))}")
      return _check_size(functions[node.func.id](*[ev(a) for a in node.args]))
    raise CalcError(f"unsupported syntax: {ast.unparse(node)!r}")

  return ev(tree)


def format_value(value: Any) -> str:
  sp = _sympy()
  exact = sp.nsimplify(value) if isinstance(value, sp.Float) else sp.simplify(value)
  text = str(exact)
  if isinstance(exact, sp.Integer):
    return text
  if exact.is_number and exact.is_finite:
    approx = str(sp.N(exact, 15))
    if "." in approx:
      mantissa, _, exponent = approx.partition("e" if "e" in approx else "E")
      approx = mantissa.rstrip("0").rstrip(".") + (f"e{exponent}" if exponent else "")
    if approx != text:
      return f"{text} ≈ {approx}"
  return text


@tool
def calculator(expression: str) -> str | ToolResult:
  """Evaluate an arithmetic expression exactly (integers and fractions stay exact; sqrt, log, trig, pi, e,
  factorial, gcd, binomial supported). Use ** or ^ for powers.

  Args:
      expression: the arithmetic expression, e.g. "2**100 / 6 + sqrt(8)"
  """
  try:
    return format_value(evaluate(expression))
  except CalcError as e:
    return ToolResult(f"Error: {e}", False, "error")
  except (TypeError, ValueError, ArithmeticError) as e:
    return ToolResult(f"Error: {type(e).__name__}: {e}", False, "error")
