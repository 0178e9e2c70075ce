"""Progress in logs: plain lines, bounded in number, with tqdm's figures; the live bar stays on a terminal."""

import io
import re
import subprocess
import sys
from pathlib import Path

from tqdm.auto import tqdm

import retool_jax
from retool_jax.progress import LineProgress, progress_bar

PACKAGE_DIR = Path(retool_jax.__file__).parent


class Terminal(io.StringIO):
  def isatty(self):
    return True


def run_bar(file, steps=500, **kwargs):
  with progress_bar(steps, desc="sft", file=file, **kwargs) as bar:
    for step in range(1, steps + 1):
      bar.set_postfix({"loss": format(1 / step, ".4f")}, refresh=False)
      bar.update(1)
  return file.getvalue()


def test_a_log_gets_a_bounded_number_of_plain_lines_with_the_figures():
  out = run_bar(io.StringIO())
  lines = out.splitlines()
  assert "\r" not in out and "\x1b" not in out
  assert 2 <= len(lines) <= 21, lines  # every 25 steps of 500, the last one included
  assert lines[-1].startswith("sft: 100% 500/500 [") and lines[-1].endswith(", loss=0.0020]")
  assert re.fullmatch(r"sft:   5% 25/500 \[\S+<\S+, .*it/s, loss=0\.0400\]", lines[0]), lines[0]


def test_lines_follow_the_step_or_the_clock_and_a_resumed_bar_starts_where_it_was(monkeypatch):
  clock = iter(range(0, 10_000, 100))  # each look at the clock: 100 s later
  monkeypatch.setattr("retool_jax.progress.time.monotonic", lambda: next(clock))
  out = io.StringIO()
  bar = LineProgress(1000, desc="rl", initial=990, file=out, every_steps=500, every_s=150)
  bar.update(1)  # 100 s: nothing due yet
  bar.update(1)  # 200 s: a minute and a half have passed
  bar.close()
  lines = out.getvalue().splitlines()
  assert [line.split(" [")[0] for line in lines] == ["rl:  99% 992/1000"]


def test_a_terminal_gets_the_live_tqdm_bar():
  out = Terminal()
  bar = progress_bar(10, desc="sft", file=out)
  assert isinstance(bar, tqdm)
  bar.update(10)
  bar.close()
  assert "\r" in out.getvalue()


def test_disabled_prints_nothing():
  assert run_bar(io.StringIO(), disable=True) == ""


def test_a_piped_process_logs_plain_lines():
  code = (
    "from retool_jax.progress import progress_bar\n"
    "with progress_bar(500, desc='demo') as bar:\n"
    "  for _ in range(500):\n"
    "    bar.update(1)\n"
  )
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  assert "\r" not in done.stderr and 2 <= len(done.stderr.splitlines()) <= 21
  assert done.stderr.splitlines()[-1].startswith("demo: 100% 500/500")


def test_every_bar_of_the_package_goes_through_progress_bar():
  users = [
    str(p.relative_to(PACKAGE_DIR))
    for p in PACKAGE_DIR.rglob("*.py")
    if re.search(r"^\s*(from|import) tqdm", p.read_text(), re.M)
  ]
  assert users == ["progress.py"]
