"""Static analysis from the AST (analyze_code) and error diagnosis (used by debug_code)."""

from __future__ import annotations

import ast
import builtins
import difflib
import re
from typing import Literal

from retool_jax.tools.base import tool

# Calls worth a warning, by dotted name after import aliases are resolved.
RISKY_CALLS = {
  "eval": "evaluates a string as code",
  "exec": "executes a string as code",
  "compile": "compiles a string to code",
  "__import__": "imports a module by name at run time",
  "os.system": "runs a shell command",
  "os.popen": "runs a shell command",
  "os.remove": "deletes a file",
  "os.unlink": "deletes a file",
  "os.rmdir": "deletes a directory",
  "os.kill": "sends a signal to a process",
  "os.fork": "creates a process",
  "os.exec": "replaces the process",
  "shutil.rmtree": "deletes a directory tree",
  "subprocess.run": "runs an external program",
  "subprocess.call": "runs an external program",
  "subprocess.Popen": "runs an external program",
  "subprocess.check_output": "runs an external program",
  "subprocess.check_call": "runs an external program",
  "pickle.load": "unpickling can run arbitrary code",
  "pickle.loads": "unpickling can run arbitrary code",
  "marshal.loads": "loads code objects",
  "yaml.load": "may construct arbitrary objects without SafeLoader",
  "socket.socket": "opens a network socket",
  "urllib.request.urlopen": "accesses the network",
  "requests.get": "accesses the network",
  "requests.post": "accesses the network",
  "ctypes.CDLL": "loads native code",
  "input": "waits for interactive input",
}
RISKY_MODULES = {
  "os",
  "subprocess",
  "socket",
  "ctypes",
  "pickle",
  "marshal",
  "shutil",
  "sys",
  "importlib",
  "multiprocessing",
  "threading",
  "signal",
  "resource",
}
_BRANCHES = (
  ast.If,
  ast.For,
  ast.AsyncFor,
  ast.While,
  ast.IfExp,
  ast.ExceptHandler,
  ast.Assert,
  ast.With,
  ast.AsyncWith,
)


def syntax_report(code: str) -> str:
  try:
    ast.parse(code)
  except SyntaxError as e:
    lines = [f"SyntaxError at line {e.lineno}, column {e.offset}: {e.msg}"]
    if e.text:
      lines.append("    " + e.text.rstrip("\n"))
      if e.offset:
        lines.append("    " + " " * (e.offset - 1) + "^")
    return "\n".join(lines)
  return "No syntax errors."


def _dotted(node: ast.AST) -> str | None:
  if isinstance(node, ast.Name):
    return node.id
  if isinstance(node, ast.Attribute):
    base = _dotted(node.value)
    return f"{base}.{node.attr}" if base else None
  return None


def security_report(tree: ast.Module) -> list[str]:
  aliases: dict[str, str] = {}
  findings: list[tuple[int, str]] = []
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      for a in node.names:
        aliases[a.asname or a.name.partition(".")[0]] = a.name if a.asname else a.name.partition(".")[0]
        if a.name.partition(".")[0] in RISKY_MODULES:
          findings.append((node.lineno, f"imports {a.name}"))
    elif isinstance(node, ast.ImportFrom) and node.module:
      for a in node.names:
        aliases[a.asname or a.name] = f"{node.module}.{a.name}"
      if node.module.partition(".")[0] in RISKY_MODULES:
        findings.append((node.lineno, f"imports from {node.module}"))
  for node in ast.walk(tree):
    if not isinstance(node, ast.Call):
      continue
    name = _dotted(node.func)
    if name is None:
      continue
    head, _, rest = name.partition(".")
    resolved = aliases.get(head, head) + (f".{rest}" if rest else "")
    reason = RISKY_CALLS.get(resolved) or next(
      (why for prefix, why in RISKY_CALLS.items() if prefix.endswith(".exec") and resolved.startswith(prefix)),
      None,
    )
    if reason:
      findings.append((node.lineno, f"call to {resolved}: {reason}"))
    elif resolved == "open" and _writes(node):
      findings.append((node.lineno, "open(...) for writing: modifies files"))
    elif (
      resolved in ("getattr", "setattr")
      and len(node.args) > 1
      and isinstance(node.args[1], ast.Constant)
      and str(node.args[1].value).startswith("__")
    ):
      findings.append((node.lineno, f"{resolved} of a dunder attribute: reflection around restrictions"))
  return [f"line {line}: {text}" for line, text in sorted(set(findings))]


def _writes(call: ast.Call) -> bool:
  mode = call.args[1] if len(call.args) > 1 else next((k.value for k in call.keywords if k.arg == "mode"), None)
  return isinstance(mode, ast.Constant) and isinstance(mode.value, str) and any(c in mode.value for c in "wax+")


def cyclomatic(node: ast.AST) -> int:
  """McCabe complexity: one plus the decision points, not counting nested functions or classes."""
  score = 1
  stack = list(ast.iter_child_nodes(node))
  while stack:
    child = stack.pop()
    if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
      continue
    if isinstance(child, _BRANCHES):
      score += 1
    elif isinstance(child, ast.BoolOp):
      score += len(child.values) - 1
    elif isinstance(child, ast.comprehension):
      score += 1 + len(child.ifs)
    elif isinstance(child, ast.match_case):
      score += 1
    stack.extend(ast.iter_child_nodes(child))
  return score


def _grade(score: int) -> str:
  return "low" if score <= 5 else "moderate" if score <= 10 else "high" if score <= 20 else "very high"


def complexity_report(tree: ast.Module) -> list[str]:
  rows = [f"<module>: {cyclomatic(tree)} ({_grade(cyclomatic(tree))})"]
  for node in ast.walk(tree):
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
      score = cyclomatic(node)
      rows.append(f"{node.name} (line {node.lineno}): {score} ({_grade(score)})")
  return rows


@tool
def analyze_code(code: str, analysis_type: Literal["syntax", "security", "complexity"] = "syntax") -> str:
  """Analyze Python code without running it: syntax errors with line numbers, risky calls, or cyclomatic
  complexity per function.

  Args:
      code: the Python source to analyze
      analysis_type: which analysis to run
  """
  syntax = syntax_report(code)
  if analysis_type == "syntax" or syntax != "No syntax errors.":
    return syntax
  tree = ast.parse(code)
  if analysis_type == "security":
    findings = security_report(tree)
    return "\n".join(["Security findings:", *findings]) if findings else "No risky calls or imports found."
  return "\n".join(
    ["Cyclomatic complexity (1-5 low, 6-10 moderate, 11-20 high, >20 very high):", *complexity_report(tree)]
  )


# -- diagnosis -----------------------------------------------------------------------------

_CAUSES = {
  "ZeroDivisionError": "a division or modulo by zero; check the divisor before dividing",
  "IndexError": "an index past the end of a sequence; check the length and off-by-one bounds",
  "KeyError": "a missing dictionary key; use .get() or check membership first",
  "RecursionError": "recursion too deep; add or fix the base case, or iterate instead",
  "TypeError": "a value of the wrong type for this operation",
  "ValueError": "a value of the right type but an invalid content",
  "AttributeError": "the object has no such attribute; check its type and the attribute name",
  "ImportError": "the module or name cannot be imported here",
  "ModuleNotFoundError": "the module is not installed or not allowed in the sandbox",
  "UnboundLocalError": "a local variable is read before it is assigned in this function",
  "OverflowError": "a float result is too large; use integers or fractions for exact values",
  "AssertionError": "an assertion in the code did not hold",
  "StopIteration": "next() on an exhausted iterator",
  "FileNotFoundError": "the file does not exist in the working directory",
  "PermissionError": "the sandbox does not allow this operation",
  "MemoryError": "the data is too large for the memory limit; use a smaller or lazier approach",
}


def _names_in(code: str) -> set[str]:
  try:
    tree = ast.parse(code)
  except SyntaxError:
    return set()
  names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
  names |= {n.name for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
  names |= {a.arg for n in ast.walk(tree) if isinstance(n, ast.arguments) for a in n.args}
  return names


def _cause(exc_type: str, message: str, code: str) -> str:
  if exc_type == "NameError":
    m = re.search(r"name '(\w+)' is not defined", message)
    if m:
      candidates = (_names_in(code) | set(dir(builtins))) - {m.group(1)}
      close = difflib.get_close_matches(m.group(1), candidates, n=1)
      hint = f"; did you mean {close[0]!r}?" if close else "; define or import it before use"
      return f"the name {m.group(1)!r} is used before it is defined{hint}"
  if exc_type == "TypeError":
    if "unsupported operand" in message:
      return "an operator applied to incompatible types; convert the operands first"
    if "not callable" in message:
      return "a value is called like a function; a variable may shadow a function name"
    if "argument" in message:
      return "a function is called with the wrong number or names of arguments"
    if "not subscriptable" in message:
      return "indexing into a value that is not a sequence or mapping"
  return _CAUSES.get(exc_type, "see the exception message")


def _locate(text: str) -> tuple[int | None, str, str]:
  """(line in the user's code, exception type, message) from a traceback or error text."""
  lines = re.findall(r'File "<cell[^"]*>", line (\d+)', text) or re.findall(r"\bline (\d+)", text)
  line = int(lines[-1]) if lines else None
  exc = re.findall(r"^(\w+(?:Error|Exception|Exit|Interrupt|Iteration))\b:?\s*(.*)$", text, re.M)
  exc_type, message = exc[-1] if exc else ("", text.strip().splitlines()[-1] if text.strip() else "")
  return line, exc_type, message


def diagnose(code: str, error: str, status: str, output: str) -> str:
  """Explains a failure: the rerun's status, the failing line and the likely cause."""
  source = code.splitlines()
  if status == "ok":
    head = "The code ran without an error this time."
    if not error.strip():
      return head + f"\nOutput:\n{output.strip() or '(no output)'}"
    text, head = error, head + " Diagnosis of the error you reported:"
  elif status == "timeout":
    loops = (
      [n.lineno for n in ast.walk(ast.parse(code)) if isinstance(n, ast.While)]
      if syntax_report(code) == "No syntax errors."
      else []
    )
    where = f" (while loop at line {loops[0]})" if loops else ""
    return (
      "The rerun timed out: the code runs too long, most likely an infinite loop or a search that is "
      f"too large{where}. Bound the loop or use a closed-form / smarter method.\n{output.strip()}"
    )
  elif status == "policy":
    return "The rerun was refused by the sandbox policy: " + output.strip()
  else:
    text, head = output, f"The rerun failed ({status})."
  line, exc_type, message = _locate(text)
  parts = [head]
  if line is not None and 1 <= line <= len(source):
    parts.append(f"Failing line {line}: {source[line - 1].strip()}")
  if exc_type:
    parts.append(f"Error: {exc_type}: {message}".rstrip(": "))
    cause = _cause(exc_type, message, code)
    parts.append(f"Likely cause: {cause}" + ("" if cause.endswith("?") else "."))
  elif message:
    parts.append(f"Error: {message}")
  return "\n".join(parts)
