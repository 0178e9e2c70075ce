"""The SGLang launch scripts: the commands their dry runs print and their errors (shellcheck: test_launch_scripts)."""

import shlex
import subprocess
from pathlib import Path

LAUNCH = Path(__file__).resolve().parents[1] / "launch"


def run(script, *args):
  return subprocess.run(["bash", str(LAUNCH / script), *args], capture_output=True, text=True, timeout=30)


def test_server_dry_run_prints_the_rl_flags():
  r = run(
    "sglang_server.sh",
    "--model-path",
    "/ckpt/my model",
    "--tp",
    "2",
    "--mem-fraction-static",
    "0.7",
    "--context-length",
    "16384",
    "--host",
    "0.0.0.0",
    "--port",
    "31000",
    "--random-seed",
    "7",
    "--enable-deterministic-inference",
    "--dry-run",
    "--",
    "--dtype",
    "bfloat16",
  )
  assert r.returncode == 0, r.stderr
  argv = shlex.split(r.stdout)
  assert argv[:3] == ["python3", "-m", "sglang.launch_server"]
  flags = dict(zip(argv[3::2], argv[4::2]))
  assert flags["--model-path"] == "/ckpt/my model" and flags["--tp"] == "2"
  assert flags["--mem-fraction-static"] == "0.7" and flags["--context-length"] == "16384"
  assert flags["--host"] == "0.0.0.0" and flags["--port"] == "31000" and flags["--random-seed"] == "7"
  assert "--enable-deterministic-inference" in argv and argv[-2:] == ["--dtype", "bfloat16"]


def test_server_defaults_and_errors():
  argv = shlex.split(run("sglang_server.sh", "--model-path", "/m", "--dry-run").stdout)
  assert "--enable-deterministic-inference" not in argv and "--context-length" not in argv
  assert argv[argv.index("--host") + 1] == "127.0.0.1" and argv[argv.index("--port") + 1] == "30000"
  missing = run("sglang_server.sh", "--dry-run")
  assert missing.returncode == 2 and "--model-path is required" in missing.stderr
  bad = run("sglang_server.sh", "--model-path", "/m", "--tp", "two", "--dry-run")
  assert bad.returncode == 2 and "--tp must be a non-negative integer, got 'two'" in bad.stderr
  unknown = run("sglang_server.sh", "--model-path", "/m", "--tpp", "2")
  assert unknown.returncode == 2 and "unknown argument '--tpp'" in unknown.stderr
  assert run("sglang_server.sh", "--model-path").returncode == 2


def test_router_dry_run_and_errors():
  r = run(
    "sglang_router.sh",
    "--worker-urls",
    "http://10.0.0.1:30000",
    "http://10.0.0.2:30000",
    "--policy",
    "round_robin",
    "--port",
    "30080",
    "--dry-run",
  )
  assert r.returncode == 0, r.stderr
  argv = shlex.split(r.stdout)
  assert argv[:3] == ["python3", "-m", "sglang_router.launch_router"]
  i = argv.index("--worker-urls")
  assert argv[i + 1 : i + 3] == ["http://10.0.0.1:30000", "http://10.0.0.2:30000"]
  assert argv[argv.index("--policy") + 1] == "round_robin" and argv[argv.index("--port") + 1] == "30080"
  assert "at least one URL" in run("sglang_router.sh", "--dry-run").stderr
  assert "must start with http" in run("sglang_router.sh", "--worker-urls", "10.0.0.1:1", "--dry-run").stderr
  assert "unknown --policy" in run("sglang_router.sh", "--worker-urls", "http://a:1", "--policy", "x").stderr
