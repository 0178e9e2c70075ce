"""Imports point down: no import cycle between modules of `retool_jax`, and no module importing a higher layer.

Every `import` counts, at the top of a module and inside its functions. `__main__` modules are entry points
and may import anything. A module-level `__getattr__` (PEP 562) that resolves a published name on first use
imports after both modules have loaded, so it is no edge of the cycle checks (it must still point down).
"""

from __future__ import annotations

import ast
from pathlib import Path

import retool_jax

PACKAGE_DIR = Path(retool_jax.__file__).parent

# Bottom -> top; a module may import only its own layer or lower. Keys are module names relative to
# `retool_jax` (a package covers its submodules); the longest matching key wins.
LAYERS = {
  "": 0,  # the package root (`retool_jax/__init__.py`)
  "fields": 0,
  "sharding": 0,
  "topologies": 0,
  "programs": 0,
  "progress": 0,
  "quiet": 0,
  "assets": 0,
  "models": 1,
  "checkpoint": 2,
  "chat": 2,
  "sandbox": 2,
  "rewards": 2,
  "tools": 2,
  "data": 2,
  "rollout": 3,
  "train": 4,
  "serve": 4,  # the OpenAI-compatible server over the engines; RL rollouts of OpenAI-client agents use it
  "serve.cli": 5,
  "serve.__main__": 5,
  "evaluate": 5,
  "chat_cli": 5,
  "demo": 5,
  "demo_task": 5,
  "aot": 5,
  "convert": 5,
  "model_tour": 5,
  "plot": 5,
  "recipes": 5,  # the configs' shared builders, over the trainers' defaults
}


def module_files() -> dict[str, Path]:
  """`retool_jax.x.y` -> its source file, for every module of the package."""
  files = {}
  for path in sorted(PACKAGE_DIR.rglob("*.py")):
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    if parts[-1] == "__init__":
      parts = parts[:-1]
    files[".".join(parts)] = path
  return files


def _absolute(module: str, is_package: bool, node: ast.ImportFrom) -> str:
  """The absolute module name of a (possibly relative) `from ... import`."""
  if node.level == 0:
    return node.module or ""
  base = module.split(".")
  if not is_package:
    base = base[:-1]
  base = base[: len(base) - (node.level - 1)]
  return ".".join(base + ([node.module] if node.module else []))


def lazy_alias_nodes(tree: ast.Module) -> set[int]:
  """The ids of the nodes inside a module-level `def __getattr__`."""
  return {
    id(node)
    for top in tree.body
    if isinstance(top, ast.FunctionDef) and top.name == "__getattr__"
    for node in ast.walk(top)
  }


def imported_modules(module: str, path: Path, modules: set[str], lazy_aliases: bool = True) -> dict[str, int]:
  """The `retool_jax` modules `module` imports, each with the line of its first import (`lazy_aliases=False`:
  without the imports of a module-level `__getattr__`)."""
  tree = ast.parse(path.read_text(), filename=str(path))
  found: dict[str, int] = {}
  skipped = set() if lazy_aliases else lazy_alias_nodes(tree)

  def add(name: str, line: int) -> None:
    # `import a.b.c` of a name that is not a module (an attribute) counts as its closest enclosing module.
    while name and name not in modules:
      name = name.rpartition(".")[0]
    if name and name != module:
      found.setdefault(name, line)

  for node in ast.walk(tree):
    if id(node) in skipped:
      continue
    if isinstance(node, ast.Import):
      for alias in node.names:
        if alias.name.split(".")[0] == "retool_jax":
          add(alias.name, node.lineno)
    elif isinstance(node, ast.ImportFrom):
      source = _absolute(module, path.name == "__init__.py", node)
      if source.split(".")[0] != "retool_jax":
        continue
      for alias in node.names:
        sub = f"{source}.{alias.name}"
        add(sub if sub in modules else source, node.lineno)
  return found


def import_graph(lazy_aliases: bool = False) -> tuple[dict[str, Path], dict[str, dict[str, int]]]:
  files = module_files()
  names = set(files)
  return files, {m: imported_modules(m, p, names, lazy_aliases) for m, p in files.items()}


def layer_of(module: str) -> int:
  rel = module.removeprefix("retool_jax").removeprefix(".")
  parts = rel.split(".") if rel else []
  for n in range(len(parts), -1, -1):
    key = ".".join(parts[:n])
    if key in LAYERS:
      return LAYERS[key]
  raise KeyError(module)


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
  """The strongly connected components with more than one module (Tarjan), each sorted."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  components: list[list[str]] = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        components.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return components


def test_every_module_has_a_layer():
  files = module_files()
  missing = []
  for module in files:
    try:
      layer_of(module)
    except KeyError:
      missing.append(module)
  assert not missing, f"modules with no entry in LAYERS (add them to tests/test_layering.py): {missing}"


def test_graph_sees_imports_inside_functions(tmp_path):
  source = tmp_path / "mod.py"
  source.write_text(
    "import retool_jax.fields\ndef f():\n  from retool_jax.models import qwen3\n  from . import x\n"
  )
  modules = {"retool_jax.fields", "retool_jax.models", "retool_jax.models.qwen3", "retool_jax.chat.x"}
  found = imported_modules("retool_jax.chat.mod", source, modules)
  assert found == {"retool_jax.fields": 1, "retool_jax.models.qwen3": 3, "retool_jax.chat.x": 4}


def test_graph_leaves_out_lazy_aliases_only_for_cycles(tmp_path):
  source = tmp_path / "mod.py"
  source.write_text(
    "def __getattr__(name):\n  from retool_jax.models import qwen3\n  return qwen3\n"
    "def f():\n  import retool_jax.fields\n"
  )
  modules = {"retool_jax.fields", "retool_jax.models", "retool_jax.models.qwen3"}
  assert imported_modules("retool_jax.chat.mod", source, modules, lazy_aliases=False) == {"retool_jax.fields": 5}
  assert imported_modules("retool_jax.chat.mod", source, modules) == {
    "retool_jax.models.qwen3": 2,
    "retool_jax.fields": 5,
  }


def test_cycle_finder_reports_a_cycle():
  graph = {"a": {"b": 1}, "b": {"c": 1}, "c": {"a": 1}, "d": {"a": 1}}
  assert find_cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
  _, graph = import_graph()
  cycles = find_cycles(graph)
  lines = []
  for component in cycles:
    members = set(component)
    edges = [f"{m} -> {d} (line {graph[m][d]})" for m in component for d in sorted(graph[m]) if d in members]
    lines.append("cycle among " + ", ".join(component) + ":\n    " + "\n    ".join(edges))
  assert not cycles, "import cycles between modules:\n  " + "\n  ".join(lines)


def package_of(module: str) -> str:
  """`retool_jax.chat.parse` -> `retool_jax.chat`; a top-level module is its own package."""
  return ".".join(module.split(".")[:2])


def test_no_import_cycles_between_packages():
  _, graph = import_graph()
  packages: dict[str, dict[str, str]] = {}
  for module, imports in graph.items():
    if module.rpartition(".")[2] == "__main__":
      continue
    edges = packages.setdefault(package_of(module), {})
    for dep in imports:
      if package_of(dep) != package_of(module):
        edges.setdefault(package_of(dep), f"{module} -> {dep}")
        packages.setdefault(package_of(dep), {})
  cycles = find_cycles(packages)
  lines = [
    ", ".join(c) + ": " + "; ".join(packages[a][b] for a in c for b in packages[a] if b in c) for c in cycles
  ]
  assert not cycles, "import cycles between packages:\n  " + "\n  ".join(lines)


def test_imports_point_down():
  files, graph = import_graph(lazy_aliases=True)
  offenders = []
  for module, imports in sorted(graph.items()):
    if module.rpartition(".")[2] == "__main__":
      continue
    own = layer_of(module)
    for dep, line in sorted(imports.items()):
      if layer_of(dep) > own:
        rel = files[module].relative_to(PACKAGE_DIR.parent)
        offenders.append(f"{rel}:{line}: {module} (L{own}) imports {dep} (L{layer_of(dep)})")
  assert not offenders, "imports of a higher layer:\n  " + "\n  ".join(offenders)
