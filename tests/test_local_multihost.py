"""`launch/local_multihost.sh`: the environment each process gets, prefixed output, a failing process stops the
others and fails the launch, and bad arguments are named."""

import os
import shlex
import subprocess
import time
from pathlib import Path

import pytest

LAUNCHER = Path(__file__).resolve().parents[1] / "launch" / "local_multihost.sh"


def launch(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
  env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "COORDINATOR_PORT", "DEVICES_PER_PROCESS")}
  return subprocess.run(["bash", str(LAUNCHER), *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_dry_run_prints_one_command_per_process_with_its_environment():
  r = launch(
    "--dry-run", "--port", "4321", "--devices-per-process", "2", "3", "--", "python", "-m", "x", "--a=b c"
  )
  assert r.returncode == 0, r.stderr
  lines = [shlex.split(line) for line in r.stdout.splitlines()]
  assert len(lines) == 3
  for i, argv in enumerate(lines):
    assert argv[0] == "env" and argv[-4:] == ["python", "-m", "x", "--a=b c"]
    env = dict(a.split("=", 1) for a in argv[1:-4])
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:4321" and env["JAX_NUM_PROCESSES"] == "3"
    assert env["JAX_PROCESS_ID"] == str(i) and env["JAX_PLATFORMS"] == "cpu"
    assert env["JAX_CPU_COLLECTIVES_IMPLEMENTATION"] == "gloo"
    assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=2"


def test_processes_run_with_prefixed_output_on_a_free_port():
  script = (
    'echo "out $JAX_PROCESS_ID of $JAX_NUM_PROCESSES at $JAX_COORDINATOR_ADDRESS"; echo "err $JAX_PROCESS_ID" >&2'
  )
  r = launch("2", "--", "bash", "-c", script)
  assert r.returncode == 0, r.stderr
  out = sorted(r.stdout.splitlines())
  assert [line.split(" at ")[0] for line in out] == ["[p0] out 0 of 2", "[p1] out 1 of 2"]
  host, port = out[0].split(" at ")[1].split(":")
  assert host == "127.0.0.1" and 0 < int(port) < 65536 and out[1].endswith(f":{port}")  # one coordinator
  assert sorted(r.stderr.splitlines()) == ["[p0] err 0", "[p1] err 1"]


def test_a_failing_process_stops_the_others_and_fails_the_launch():
  script = '[ "$JAX_PROCESS_ID" = 1 ] && exit 7; sleep 60'
  t0 = time.monotonic()
  r = launch("3", "--", "bash", "-c", script)
  assert r.returncode == 7
  assert time.monotonic() - t0 < 30  # the sleeping processes were stopped, not waited for
  assert "exited with status 7; stopping the others" in r.stderr


@pytest.mark.parametrize(
  "args, message",
  [
    ((), "missing the number of processes"),
    (("two", "--", "true"), "must be a positive integer, got 'two'"),
    (("2", "true"), "expected -- before the command"),
    (("2", "--"), "missing the command after --"),
    (("--devices-per-process", "0", "2", "--", "true"), "--devices-per-process must be a positive integer"),
    (("--frobnicate", "2", "--", "true"), "unknown option --frobnicate"),
  ],
)
def test_bad_arguments_are_named(args, message):
  r = launch(*args)
  assert r.returncode == 2 and message in r.stderr, r.stderr
