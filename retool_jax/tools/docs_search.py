"""Offline, ranked search over the installed Python's standard-library documentation.

The index holds every public module, class, function and method of the standard library with its
signature and docstring summary: pure-Python modules are read from their source with the AST
(nothing is imported), compiled modules (``math``, ``itertools``, builtins, ...) are introspected.
It is built on first use and cached under ``$XDG_CACHE_HOME/retool_jax``.
"""

from __future__ import annotations

import ast
import collections
import functools
import importlib
import inspect
import json
import math
import os
import re
import sys
import sysconfig
from pathlib import Path

from retool_jax.tools.base import ToolResult, tool

_SKIP_DIRS = {
  "test",
  "tests",
  "idlelib",
  "site-packages",
  "dist-packages",
  "__pycache__",
  "lib2to3",
  "turtledemo",
  "ensurepip",
  "tkinter",
  "config-3",
  "pydoc_data",
}
_SKIP_MODULES = {"antigravity", "this", "readline", "__phello__", "__hello__"}
_SUMMARY_CHARS = 400
_TOKEN = re.compile(r"[a-z0-9]+")


def _summary(doc: str | None) -> str:
  text = inspect.cleandoc(doc or "").split("\n\n")[0].replace("\n", " ").strip()
  return text[:_SUMMARY_CHARS]


def _entries_from_source(module: str, path: Path) -> list[dict]:
  try:
    tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
  except (SyntaxError, ValueError, OSError):
    return []
  entries = [{"name": module, "kind": "module", "signature": "", "doc": _summary(ast.get_docstring(tree))}]

  def visit(body, prefix):
    for node in body:
      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and not node.name.startswith("_"):
        qual = f"{prefix}.{node.name}"
        sig = f"({ast.unparse(node.args)})" if not isinstance(node, ast.ClassDef) else ""
        kind = "class" if isinstance(node, ast.ClassDef) else "function"
        entries.append({"name": qual, "kind": kind, "signature": sig, "doc": _summary(ast.get_docstring(node))})
        if isinstance(node, ast.ClassDef):
          visit(node.body, qual)

  visit(tree.body, module)
  return entries


def _entries_from_object(module: str) -> list[dict]:
  try:
    mod = importlib.import_module(module)
  except Exception:  # noqa: BLE001  (a module that cannot load on this platform has no docs here)
    return []
  entries = (
    []
    if module == "builtins"
    else [{"name": module, "kind": "module", "signature": "", "doc": _summary(mod.__doc__)}]
  )
  for name, obj in list(vars(mod).items()):
    if name.startswith("_") or not (callable(obj) and getattr(obj, "__doc__", None)):
      continue
    qual = name if module == "builtins" else f"{module}.{name}"
    try:
      sig = str(inspect.signature(obj))
    except (TypeError, ValueError):
      sig = ""
    entries.append(
      {
        "name": qual,
        "kind": "class" if isinstance(obj, type) else "function",
        "signature": sig,
        "doc": _summary(obj.__doc__),
      }
    )
  return entries


def build_entries() -> list[dict]:
  stdlib = Path(sysconfig.get_paths()["stdlib"])
  entries: list[dict] = []
  for root, dirs, files in os.walk(stdlib):
    dirs[:] = sorted(d for d in dirs if d not in _SKIP_DIRS and not d.startswith(("_", "config-")))
    rel = Path(root).relative_to(stdlib)
    for f in sorted(files):
      if not f.endswith(".py") or (f.startswith("_") and f != "__init__.py"):
        continue
      parts = [*rel.parts, f[:-3]] if f != "__init__.py" else list(rel.parts)
      if not parts or parts[0] in _SKIP_MODULES or any(p.startswith("_") for p in parts):
        continue
      entries += _entries_from_source(".".join(parts), Path(root) / f)
  dynload = stdlib / "lib-dynload"
  compiled = set(sys.builtin_module_names)
  if dynload.is_dir():
    compiled |= {f.split(".")[0] for f in os.listdir(dynload) if f.endswith(".so")}
  known = {e["name"] for e in entries}
  for module in sorted(compiled):
    if not module.startswith("_") and module not in _SKIP_MODULES | {"builtins"} and module not in known:
      entries += _entries_from_object(module)
  return entries + _entries_from_object("builtins")


def _tokens(text: str) -> list[str]:
  return _TOKEN.findall(text.lower().replace("_", " "))


class DocIndex:
  """BM25 over name (weighted) and summary of each entry."""

  def __init__(self, entries: list[dict]):
    self.entries = entries
    self.docs = [collections.Counter(_tokens(e["name"]) * 3 + _tokens(e["doc"])) for e in entries]
    self.lengths = [sum(d.values()) for d in self.docs]
    self.avg = sum(self.lengths) / max(1, len(self.lengths))
    df = collections.Counter(t for d in self.docs for t in d)
    n = len(self.docs)
    self.idf = {t: math.log(1 + (n - c + 0.5) / (c + 0.5)) for t, c in df.items()}
    self.postings: dict[str, list[int]] = collections.defaultdict(list)
    for i, d in enumerate(self.docs):
      for t in d:
        self.postings[t].append(i)

  def search(self, query: str, k: int = 5) -> list[dict]:
    terms = _tokens(query)
    scores: dict[int, float] = collections.defaultdict(float)
    for t in set(terms):
      for i in self.postings.get(t, ()):
        tf = self.docs[i][t]
        norm = tf + 1.2 * (0.25 + 0.75 * self.lengths[i] / self.avg)
        scores[i] += self.idf[t] * tf * 2.2 / norm
    wanted = query.strip().lower()
    for i in list(scores):
      name = self.entries[i]["name"].lower()
      if name == wanted or name.rsplit(".", 1)[-1] == wanted:
        scores[i] += 10.0
      if self.entries[i]["kind"] == "module" and name in terms:
        scores[i] += 3.0
      scores[i] -= 0.1 * name.count(".")  # prefer public top-level API
    ranked = sorted(scores, key=lambda i: (-scores[i], self.entries[i]["name"]))
    return [self.entries[i] for i in ranked[:k]]


def _cache_path() -> Path:
  base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "retool_jax"
  version = ".".join(map(str, sys.version_info[:3]))
  return base / f"stdlib_docs-{version}-{sys.implementation.cache_tag}.json"


@functools.lru_cache(maxsize=1)
def stdlib_index() -> DocIndex:
  path = _cache_path()
  try:
    entries = json.loads(path.read_text())
  except (OSError, ValueError):
    entries = build_entries()
    try:
      path.parent.mkdir(parents=True, exist_ok=True)
      tmp = path.with_suffix(f".{os.getpid()}.tmp")
      tmp.write_text(json.dumps(entries))
      tmp.replace(path)
    except OSError:
      pass  # a read-only home only costs the rebuild next time
  return DocIndex(entries)


def format_hits(hits: list[dict]) -> str:
  lines = []
  for rank, e in enumerate(hits, 1):
    lines.append(f"{rank}. {e['name']}{e['signature']}  [{e['kind']}]")
    if e["doc"]:
      lines.append(f"   {e['doc']}")
  return "\n".join(lines)


@tool
def search_docs(query: str) -> str | ToolResult:
  """Search the Python standard-library documentation (offline) and return the best matching modules,
  functions and classes with their signatures and summaries.

  Args:
      query: what to look for, e.g. "greatest common divisor" or "itertools.combinations"
  """
  if not query.strip():
    return ToolResult("Error: the query is empty", False, "error")
  hits = stdlib_index().search(query)
  return format_hits(hits) if hits else f"No documentation matches {query!r}."
