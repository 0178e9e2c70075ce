"""Imports sit at the top of a module; one that must wait (an optional or slow library) says why in its noqa."""

import re
from pathlib import Path

import retool_jax

PACKAGE_DIR = Path(retool_jax.__file__).parent
NOQA = re.compile(r"#\s*noqa:\s*PLC0415\b(?P<reason>.*)$")


def lazy_imports(folder: Path) -> list[tuple[str, str, str]]:
  """`(file:line, import statement, reason)` for every `noqa: PLC0415` line under `folder`."""
  found = []
  for path in sorted(folder.rglob("*.py")):
    for n, line in enumerate(path.read_text().splitlines(), 1):
      m = NOQA.search(line)
      if m:
        where = f"{path.relative_to(folder)}:{n}"
        found.append((where, line[: m.start()].strip(), m.group("reason").strip(" ()")))
  return found


def test_the_scan_reads_statement_and_reason(tmp_path):
  (tmp_path / "m.py").write_text(
    "def f():\n  import torch  # noqa: PLC0415  optional heavy dependency\n  from x import y  # noqa: PLC0415\n"
  )
  found = [(stmt, reason) for _, stmt, reason in lazy_imports(tmp_path)]
  assert found == [("import torch", "optional heavy dependency"), ("from x import y", "")]


def test_demo_task_imports_its_project_modules_at_the_top_and_explains_the_rest():
  found = lazy_imports(PACKAGE_DIR / "demo_task")
  project = [f"{where}: {stmt}" for where, stmt, _ in found if re.match(r"(from|import)\s+retool_jax\b", stmt)]
  assert not project, "project modules imported inside functions:\n  " + "\n  ".join(project)
  unexplained = [f"{where}: {stmt}" for where, stmt, reason in found if len(reason) < 10]
  assert not unexplained, "lazy imports without a reason in their noqa:\n  " + "\n  ".join(unexplained)
