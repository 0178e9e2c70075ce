"""tpu_pod.sh's detached runs: the commands `run --detach`, `logs`, `status` and `stop` print with --dry-run, and
the same commands run against a stand-in `gcloud` that executes each worker's command on this machine."""

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "tpu_pod.sh"
POD = ("--name", "pod", "--zone", "us-east5-a")

# Records its argv and fails: a dry run must not call it.
RECORDING_GCLOUD = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$GCLOUD_CALLS"
exit 1
"""

# `gcloud compute tpus tpu-vm ssh NAME ... --worker=W --command CMD`: runs CMD with `bash -c` once per worker
# (FAKE_WORKERS of them for --worker=all) in $HOME, with TPU_WORKER_ID set as on a pod.
LOCAL_GCLOUD = """#!/usr/bin/env bash
worker="" command=""
while [ $# -gt 0 ]; do
  case "$1" in
    --worker=*) worker="${1#--worker=}" ;;
    --command) command="$2"; shift ;;
  esac
  shift
done
if [ "$worker" = all ]; then workers="$(seq 0 $((FAKE_WORKERS - 1)))"; else workers="$worker"; fi
status=0
for w in $workers; do
  (cd "$HOME" && TPU_WORKER_ID="$w" bash -c "$command") || status=$?
done
exit "$status"
"""


def fake_gcloud(tmp_path: Path, body: str) -> dict[str, str]:
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "gcloud").write_text(body)
  (bin_dir / "gcloud").chmod(0o755)
  env = {k: v for k, v in os.environ.items() if k != "TPU_WORKER_ID"}
  return {**env, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TMPDIR": str(tmp_path)}


@pytest.fixture
def dry(tmp_path):
  """Runs tpu_pod.sh with --dry-run; returns the printed commands, each as its argv."""
  calls = tmp_path / "gcloud_calls"
  env = {**fake_gcloud(tmp_path, RECORDING_GCLOUD), "GCLOUD_CALLS": str(calls)}

  def dry(*args: str, ok: bool = True) -> list[list[str]] | subprocess.CompletedProcess:
    r = subprocess.run(
      ["bash", str(SCRIPT), args[0], "--dry-run", *args[1:]], capture_output=True, text=True, timeout=10, env=env
    )
    assert not calls.exists(), "a dry run called gcloud: " + calls.read_text()
    if not ok:
      return r
    assert r.returncode == 0, r.stderr
    return [shlex.split(line) for line in r.stdout.splitlines() if line.strip()]

  return dry


def remote(argv: list[str]) -> str:
  """The --command of a printed `gcloud ... ssh` command, after checking it targets the pod."""
  assert argv[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
  assert argv[argv.index("--zone") + 1] == "us-east5-a"
  return argv[argv.index("--command") + 1]


def workers(argv: list[str]) -> str:
  [selection] = [a for a in argv if a.startswith("--worker=")]
  return selection.removeprefix("--worker=")


# ---- dry runs ---------------------------------------------------------------------------------------


def test_detached_run_starts_the_program_under_setsid_nohup_with_a_log_per_worker(dry):
  program = ["python3", "-m", "retool_jax.train", "--config=configs/my run.py", "--note=it's"]
  *setup, start = dry("run", "--detach", "--run-name", "exp1", "--log-dir", "logs/pod", *POD, "--", *program)
  assert [c[0] for c in setup] == ["tar", "gcloud", "gcloud", "gcloud"]  # ship and install, as without --detach
  assert workers(start) == "all"
  code = remote(start)
  assert 'dir="$HOME/logs/pod"' in code and "run=exp1" in code and 'base="$dir/$run-worker-$i"' in code
  assert "TPU_WORKER_ID" in code and "agent-worker-number" in code  # each worker names its own log
  launch = code.split("; ")
  [line] = [s for s in launch if s.startswith("setsid nohup ")]
  # the program's argv survives both rounds of quoting; output and stdin are detached from the ssh session
  words = shlex.split(line)
  assert words[:5] == ["setsid", "nohup", "bash", "-c", "$wrapper"] and words[5] == "$base"
  assert words[6 : 6 + len(program)] == program
  assert words[6 + len(program) :] == [
    ">",
    "$base.log",
    "2>&1",
    "<",
    "/dev/null",
    "&",
    "echo",
    "$!",
    ">",
    "$base.pid",
  ]
  assert "cd retool_jax || exit 1" in launch
  assert 'echo $? > "$0.exit"' in code  # the wrapper records the exit code
  assert '[ ! -e "$base.log" ]' in code  # a run name is never reused


def test_detached_run_gets_a_fresh_name_by_default(dry):
  [start] = dry("run", "--detach", "--no-ship", "--no-install", *POD, "--", "true")
  [name] = re.findall(r"run=(\S+?);", remote(start))
  assert re.fullmatch(r"run-\d{8}-\d{6}", name)


def test_logs_tails_one_worker_or_all(dry):
  [one] = dry("logs", *POD, "--worker", "3", "--lines", "20", "--run-name", "exp1")
  assert workers(one) == "3"
  code = remote(one)
  assert "run=exp1" in code and code.endswith('tail -n 20 "$base.log"')

  [every] = dry("logs", *POD, "--worker", "all", "--follow")
  assert workers(every) == "all"
  code = remote(every)
  assert 'run="$(cat "$dir/latest" 2>/dev/null)"' in code  # no --run-name: the latest run
  assert 'tail -n 100 -f "$base.log" | awk -v p="[worker $i] "' in code

  [default] = dry("logs", *POD)
  assert workers(default) == "0"


def test_status_reads_the_pid_and_exit_code_files_on_every_worker(dry):
  [status] = dry("status", *POD, "--run-name", "exp1")
  assert workers(status) == "all"
  code = remote(status)
  assert 'cat "$base.exit"' in code and 'kill -0 "$(cat "$base.pid")"' in code


def test_stop_signals_the_process_group_then_confirms(dry):
  [stop] = dry("stop", *POD, "--run-name", "exp1")
  assert workers(stop) == "all"
  code = remote(stop)
  assert "run=exp1" in code and 'kill -TERM -- "-$pg"' in code and 'kill -KILL -- "-$pg"' in code
  assert ".retool_jax_run.pid" not in code  # a named detached run only
  [stop] = dry("stop", *POD)
  code = remote(stop)
  assert code.startswith("if [ -f ~/.retool_jax_run.pid ]")  # the foreground run, then the latest detached one
  assert 'kill -TERM -- "-$pg"' in code


@pytest.mark.parametrize(
  "args, message",
  [
    (("logs", *POD, "--run-name", "a/b"), "--run-name 'a/b' may only hold"),
    (("status", *POD, "--log-dir", "$(x)"), "--log-dir '$(x)' may only hold"),
    (("logs", *POD, "--lines", "many"), "--lines must be a non-negative integer"),
    (("ssh", *POD, "--worker", "all"), "--worker must be a non-negative integer"),
  ],
)
def test_bad_options_are_refused(dry, args, message):
  r = dry(*args, ok=False)
  assert r.returncode == 2 and message in r.stderr and r.stdout == ""


# ---- against a stand-in gcloud that runs the workers' commands here ---------------------------------


def alive(pid: int) -> bool:
  try:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


@pytest.fixture
def pod(tmp_path):
  """Runs tpu_pod.sh against two workers sharing tmp_path/home; kills what is left of their runs at the end."""
  home = tmp_path / "home"
  (home / "code").mkdir(parents=True)
  env = {**fake_gcloud(tmp_path, LOCAL_GCLOUD), "HOME": str(home), "FAKE_WORKERS": "2"}

  def pod(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=10, env=env)

  pod.home = home
  yield pod
  for pid_file in home.glob("retool_jax_logs/*.pid"):
    try:
      os.killpg(int(pid_file.read_text()), signal.SIGKILL)
    except (ProcessLookupError, ValueError):
      pass


def wait_for(predicate, timeout: float = 5.0) -> bool:
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if predicate():
      return True
    time.sleep(0.05)
  return predicate()


def test_detached_run_outlives_the_launcher_and_reports_its_exit_code(pod):
  local = ("--no-ship", "--no-install", "--remote-dir", "code", *POD)
  program = 'echo "hello from $TPU_WORKER_ID in $PWD"; while [ ! -f "$HOME/go" ]; do sleep 0.05; done; exit 3'
  t0 = time.monotonic()
  r = pod("run", "--detach", "--run-name", "demo", *local, "--", "bash", "-c", program)
  assert r.returncode == 0, r.stderr
  assert time.monotonic() - t0 < 5  # returns while the program still waits for its go
  assert "worker 0: started demo" in r.stdout and "worker 1: started demo" in r.stdout

  status = pod("status", *POD, "--run-name", "demo").stdout
  assert "worker 0: demo running" in status and "worker 1: demo running" in status
  assert wait_for(lambda: "hello" in (pod.home / "retool_jax_logs/demo-worker-1.log").read_text())
  logs = pod("logs", *POD, "--worker", "1", "--run-name", "demo")
  assert logs.stdout == f"hello from 1 in {pod.home / 'code'}\n"

  (pod.home / "go").touch()
  assert wait_for(lambda: pod("status", *POD).stdout.count("demo exited with code 3") == 2)
  logs = pod("logs", *POD, "--worker", "all").stdout.splitlines()
  assert sorted(logs) == [f"[worker {i}] hello from {i} in {pod.home / 'code'}" for i in (0, 1)]

  again = pod("run", "--detach", "--run-name", "demo", *local, "--", "true")
  assert again.returncode != 0 and "run demo exists" in again.stderr


def test_stop_ends_a_sleeping_detached_run_on_every_worker(pod):
  local = ("--no-ship", "--no-install", "--remote-dir", "code", *POD)
  program = 'echo $$ > "$HOME/sleeper-$TPU_WORKER_ID"; exec sleep 60'
  r = pod("run", "--detach", *local, "--", "bash", "-c", program)  # the default name becomes the latest run
  assert r.returncode == 0, r.stderr
  sleepers = [pod.home / f"sleeper-{i}" for i in (0, 1)]
  assert wait_for(lambda: all(p.exists() and p.read_text().strip() for p in sleepers))
  pids = [int(p.read_text()) for p in sleepers]
  assert all(alive(pid) for pid in pids)
  assert pod("status", *POD).stdout.count(" running (process group ") == 2

  t0 = time.monotonic()
  stop = pod("stop", *POD)
  assert stop.returncode == 0, stop.stderr
  assert re.findall(r"worker (\d): stopped run-", stop.stdout) == ["0", "1"]
  assert time.monotonic() - t0 < 5
  assert wait_for(lambda: not any(alive(pid) for pid in pids))
  assert pod("status", *POD).stdout.count(" exited with code 143") == 2  # ended by SIGTERM
  assert "is not running" in pod("stop", *POD).stdout
