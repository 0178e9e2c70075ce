"""The module policy: an import allow-list checked on the AST (and again at run time).

The policy is defence in depth. Isolation comes from the backend (namespaces, limits);
the policy gives the model an early, readable reason for an import it may not use.
"""

from __future__ import annotations

import ast
import dataclasses

DEFAULT_ALLOWED = frozenset(
  {
    # the core set
    "math",
    "cmath",
    "fractions",
    "decimal",
    "itertools",
    "functools",
    "collections",
    "heapq",
    "bisect",
    "re",
    "string",
    "statistics",
    "random",
    "datetime",
    "numpy",
    "sympy",
    "scipy",
    # pure helpers with no access to the host
    "operator",
    "copy",
    "json",
    "typing",
    "dataclasses",
    "enum",
    "numbers",
    "array",
    "time",
    "textwrap",
    "pprint",
    "unicodedata",
    "abc",
    "contextlib",
    "calendar",
    "hashlib",
    "base64",
    "binascii",
    "struct",
    "mpmath",
    "__future__",
    "traceback",
    "warnings",
    "typing_extensions",
    "graphlib",
    "difflib",
    "zlib",
  }
)


@dataclasses.dataclass(frozen=True)
class Violation:
  module: str
  line: int
  reason: str


@dataclasses.dataclass(frozen=True)
class ModulePolicy:
  """Which top-level modules code may import. ``from x import y`` checks ``x``."""

  allowed: frozenset[str] = DEFAULT_ALLOWED

  def with_modules(self, *names: str) -> ModulePolicy:
    return ModulePolicy(self.allowed | frozenset(names))

  def without_modules(self, *names: str) -> ModulePolicy:
    return ModulePolicy(self.allowed - frozenset(names))

  def check(self, code: str) -> Violation | None:
    """The first violation in ``code``, or ``None``. Code that does not parse passes
    (the interpreter reports the syntax error with its line)."""
    try:
      tree = ast.parse(code)
    except (SyntaxError, ValueError):
      return None
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name.partition(".")[0] not in self.allowed:
            return Violation(alias.name, node.lineno, "module not in the allow-list")
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          shown = "." * node.level + (node.module or "")
          return Violation(shown, node.lineno, "relative imports are not allowed")
        if (node.module or "").partition(".")[0] not in self.allowed:
          return Violation(node.module or "", node.lineno, "module not in the allow-list")
      elif isinstance(node, ast.Name) and node.id == "__import__":
        return Violation("__import__", node.lineno, "dynamic imports are not allowed")
    return None

  def message(self, violation: Violation) -> str:
    """What the model reads when a call is refused."""
    return (
      f"ImportError: import of '{violation.module}' (line {violation.line}) is blocked by the "
      f"sandbox policy: {violation.reason}.\nAllowed modules: {', '.join(sorted(self.allowed))}\n"
    )


DEFAULT_POLICY = ModulePolicy()
