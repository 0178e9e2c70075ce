"""Which sandbox backend runs and why: bubblewrap wherever the interpreter and the project live, a precise
reason when it cannot run, a logged choice for ``auto`` and a loud failure for an explicit ``bwrap``."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import pytest

import retool_jax
from retool_jax.sandbox import BwrapBackend, Sandbox, backends, pool, probe_bwrap, run_python

BWRAP = probe_bwrap()
needs_bwrap = pytest.mark.skipif(BWRAP.kind in ("missing", "namespaces"), reason=f"bwrap: {BWRAP.reason}")
PROJECT = Path(retool_jax.__file__).resolve().parent.parent


def fake_bwrap(directory: Path, body: str) -> str:
  path = directory / "bwrap"
  path.write_text("#!/bin/sh\n" + textwrap.dedent(body))
  path.chmod(0o755)
  return str(path)


@pytest.fixture
def no_bwrap_on_path(monkeypatch, tmp_path):
  """A PATH without bubblewrap, and a fresh probe and log memory."""
  empty = tmp_path / "empty-bin"
  empty.mkdir()
  monkeypatch.setenv("PATH", str(empty))
  monkeypatch.setattr(backends, "_logged", set())
  monkeypatch.setattr(pool, "_DEFAULT", None)
  backends._probe_bwrap.cache_clear()
  yield str(empty)
  backends._probe_bwrap.cache_clear()


# -- the probe says which of its three reasons holds ----------------------------------------


def test_probe_reports_missing_bubblewrap(tmp_path):
  probe = BwrapBackend(str(tmp_path / "no-such-bwrap")).probe()
  assert (probe.kind, probe.ok) == ("missing", False)
  assert "bubblewrap is not installed" in probe.reason and "no-such-bwrap" in probe.reason


def test_probe_reports_namespaces_refused_by_the_kernel(tmp_path):
  kernel_says = "bwrap: No permissions to creating new namespace, likely because the kernel does not allow it"
  exe = fake_bwrap(tmp_path, f'echo "{kernel_says}" >&2\nexit 1\n')
  probe = BwrapBackend(exe).probe()
  assert probe.kind == "namespaces"
  assert probe.reason == f"the kernel refuses the namespaces bubblewrap needs: {kernel_says}"


def test_probe_reports_an_interpreter_that_cannot_start_inside(tmp_path):
  # Namespaces work (the bare probe succeeds), but starting the worker fails the way a hidden venv did.
  exe = fake_bwrap(
    tmp_path,
    """\
    case "$*" in
      *worker.py*) echo "bwrap: execvp /tmp/x/.venv/bin/python: No such file or directory" >&2; exit 1;;
      *) exit 0;;
    esac
    """,
  )
  probe = BwrapBackend(exe).probe()
  assert probe.kind == "interpreter"
  assert "bubblewrap runs, but" in probe.reason and sys.executable in probe.reason
  assert probe.reason.endswith("bwrap: execvp /tmp/x/.venv/bin/python: No such file or directory")
  assert "namespaces" not in probe.reason  # not blamed on the kernel


# -- auto says what it chose; an explicit bwrap never falls back ---------------------------


def test_auto_without_bubblewrap_warns_once_with_the_reason(no_bwrap_on_path, caplog):
  caplog.set_level(logging.INFO, logger="retool_jax.sandbox")
  for _ in range(2):
    sb = Sandbox("auto", max_workers=1, warm_workers=0, preload=())
    try:
      assert sb.backend_name == "process"
      assert "NOT isolated" in sb.backend_reason and "bubblewrap is not installed" in sb.backend_reason
      assert sb.run("print(6 * 7)").output == "42\n"
    finally:
      sb.close()
  records = [r for r in caplog.records if r.name == "retool_jax.sandbox"]
  assert len(records) == 1, [r.getMessage() for r in records]
  assert records[0].levelno == logging.WARNING
  assert records[0].getMessage().startswith("sandbox backend: process (auto: NOT isolated")
  assert "RETOOL_SANDBOX_BACKEND=bwrap" in records[0].getMessage()


def test_explicit_bwrap_fails_loudly_instead_of_falling_back(no_bwrap_on_path, monkeypatch):
  with pytest.raises(RuntimeError, match="'bwrap' was requested but cannot run here: bubblewrap is not installed"):
    Sandbox("bwrap", max_workers=1, warm_workers=0, preload=())
  monkeypatch.setenv("RETOOL_SANDBOX_BACKEND", "bwrap")
  with pytest.raises(RuntimeError, match="bubblewrap is not installed"):
    run_python("print(1)")
  assert pool._DEFAULT is None  # nothing was started on the process backend


@needs_bwrap
def test_auto_with_bubblewrap_logs_its_choice(monkeypatch, caplog):
  monkeypatch.setattr(backends, "_logged", set())
  caplog.set_level(logging.INFO, logger="retool_jax.sandbox")
  sb = Sandbox("auto", max_workers=1, warm_workers=0, preload=())
  sb.close()
  assert sb.backend_name == "bwrap"
  messages = [r.getMessage() for r in caplog.records if r.name == "retool_jax.sandbox"]
  assert messages == [f"sandbox backend: bwrap ({sb.backend_reason})"]
  assert "no network" in sb.backend_reason


def _run_demo_main(env: dict[str, str]) -> subprocess.CompletedProcess:
  """The demo's entry point with the training replaced by a stub: only its start-up runs."""
  code = (
    "import sys\nfrom absl import app\nimport retool_jax.demo as demo\n"
    "demo.run_demo = lambda config: {'sft': {}, 'rl': {}, 'timings': {}, 'by_hand_commands': [], 'next_commands': []}\n"
    "app.run(demo.main, argv=['demo'])\n"
  )
  return subprocess.run(
    [sys.executable, "-c", code], env=env, cwd=PROJECT, capture_output=True, text=True, timeout=300, check=False
  )


def test_demo_prints_the_backend_and_honours_an_explicit_bwrap(no_bwrap_on_path):
  env = dict(os.environ, PYTHONPATH=str(PROJECT), JAX_PLATFORMS="cpu")
  env.pop("RETOOL_SANDBOX_BACKEND", None)
  proc = _run_demo_main(env)
  assert proc.returncode == 0, proc.stderr[-2000:]
  first = proc.stdout.splitlines()[0]
  assert first.startswith("sandbox backend: process (auto: NOT isolated"), proc.stdout
  assert "bubblewrap is not installed" in first
  proc = _run_demo_main(dict(env, RETOOL_SANDBOX_BACKEND="bwrap"))
  assert proc.returncode != 0
  assert "'bwrap' was requested but cannot run here: bubblewrap is not installed" in proc.stderr
  assert "sandbox backend:" not in proc.stdout


# -- an interpreter and a project under /tmp -------------------------------------------------

_UNDER_TMP_SCRIPT = """\
import json, os, sys
import retool_jax.sandbox as sbm
from retool_jax.sandbox import Sandbox

root = sys.argv[1]
sb = Sandbox("bwrap", max_workers=1, preload=("numpy",))
try:
    out = {
        "executable": sys.executable,
        "package": sbm.__file__,
        "bound": list(sb.backend.bound_private),
        "numpy": sb.run("import numpy\\nprint(int(numpy.arange(4).sum()))").output,
        "secret": sb.run_command(f"cat {root}/secret.txt").output,
        "left": sb.run_command(f"touch {root}/left {root}/venv/left; ls -A {root}").output,
        "after": sb.run_command(f"ls -A {root}").output,
        "session": sb.session(policy=None).run("import sys\\nprint(sys.prefix)").output,
    }
finally:
    sb.close()
print(json.dumps(out))
"""


@needs_bwrap
@pytest.mark.parametrize("layout", ["symlinks", "copies"])
def test_interpreter_and_project_under_tmp(layout):
  root = tempfile.mkdtemp(prefix="retool-under-tmp-", dir="/tmp")
  try:
    venv = os.path.join(root, "venv")
    flags = ["--without-pip"] + (["--copies"] if layout == "copies" else [])
    subprocess.run([sys.executable, "-m", "venv", *flags, venv], check=True, capture_output=True, timeout=120)
    python = os.path.join(venv, "bin", "python")
    # The new venv sees this interpreter's packages (numpy for the worker's preload) through a .pth file.
    site = subprocess.run(
      [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
      check=True,
      capture_output=True,
      text=True,
    ).stdout.strip()
    packages = [p for p in backends._isolated_sys_path() if p.endswith(("site-packages", "dist-packages"))]
    Path(site, "host_packages.pth").write_text("".join(p + "\n" for p in packages))
    checkout = os.path.join(root, "checkout")
    shutil.copytree(
      PROJECT / "retool_jax",
      os.path.join(checkout, "retool_jax"),
      ignore=shutil.ignore_patterns("__pycache__", "assets"),
    )
    Path(root, "secret.txt").write_text("top secret")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "RETOOL_SANDBOX"))}
    env["PYTHONPATH"] = checkout
    proc = subprocess.run(
      [python, "-c", _UNDER_TMP_SCRIPT, root],
      cwd=checkout,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.splitlines()[-1])
    assert out["executable"] == python and out["package"].startswith(checkout + "/")
    assert venv in out["bound"] and os.path.join(checkout, "retool_jax", "sandbox") in out["bound"]
    assert out["numpy"] == "6\n"
    assert out["session"] == f"{venv}\n"
    # Only what the interpreter needs is bound, read-only; the rest of the folder stays hidden.
    assert "No such file or directory" in out["secret"] and "top secret" not in out["secret"]
    assert "venv/left': Read-only file system" in out["left"]
    assert out["left"].splitlines()[-3:] == ["checkout", "left", "venv"]
    # What the call wrote next to the bound paths is gone before the next call, and never reached the host.
    assert out["after"].splitlines() == ["checkout", "venv"]
    assert sorted(os.listdir(root)) == ["checkout", "secret.txt", "venv"]
    assert not os.path.exists(os.path.join(venv, "left"))
  finally:
    shutil.rmtree(root, ignore_errors=True)
