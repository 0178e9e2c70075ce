"""Start-up output: no transformers advice about a missing PyTorch, no libtpu hostname warnings on a CPU host."""

import importlib.util
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from flax import nnx

from retool_jax.checkpoint import save
from retool_jax.demo_task.tokenizer import VOCAB_SIZE, build_tokenizer, save_tokenizer
from retool_jax.models.qwen3 import Qwen3
from tiny_qwen3 import tiny_config

REPO = Path(__file__).resolve().parents[1]
NO_TORCH = "import sys\nsys.modules['torch'] = None  # `import torch` fails; find_spec says it is absent\n"
NOISE = ("PyTorch was not found", "TPU_WORKER_HOSTNAMES", "TPU_ACCELERATOR_TYPE", "hostname")


def env_without_torch(tmp_path: Path) -> dict[str, str]:
  site = tmp_path / "site"
  site.mkdir()
  (site / "sitecustomize.py").write_text(NO_TORCH)
  env = {k: v for k, v in os.environ.items() if not k.startswith("TPU_")}
  env.update(PYTHONPATH=os.pathsep.join([str(site), str(REPO), str(REPO / "tests")]), JAX_PLATFORMS="cpu")
  return env


def test_the_chat_starts_without_noise_where_torch_is_absent(tmp_path):
  cfg = tiny_config(vocab_size=VOCAB_SIZE, max_position_embeddings=128)
  save(tmp_path / "ckpt", Qwen3(cfg, rngs=nnx.Rngs(0)), cfg)
  save_tokenizer(build_tokenizer(), tmp_path / "tok")
  env = env_without_torch(tmp_path)
  probe = [sys.executable, "-c", "import transformers, sys; print(sys.modules['torch'])"]
  assert subprocess.run(probe, env=env, capture_output=True, text=True, check=True).stdout == "None\n"
  argv = [
    "--checkpoint",
    str(tmp_path / "ckpt"),
    "--tokenizer",
    str(tmp_path / "tok"),
    "--max-new-tokens",
    "2",
    "--no-tools-in-prompt",
  ]
  done = subprocess.run(
    [sys.executable, "-m", "retool_jax.chat", *argv, "--no-confirm"],
    input="hi\n/exit\n",
    capture_output=True,
    text=True,
    env=env,
    timeout=240,
  )
  assert done.returncode == 0, done.stderr
  assert "you> " in done.stdout  # it got as far as the conversation
  out = done.stdout + done.stderr
  assert not [n for n in NOISE if n in out], out


def test_other_transformers_messages_still_pass(caplog):
  import transformers  # noqa: F401, PLC0415  loads transformers' logger with the package's filter on it

  logger = logging.getLogger("transformers")
  with caplog.at_level(logging.WARNING, logger="transformers"):
    logger.warning("PyTorch was not found. Models won't be available")
    logger.warning("a tokenizer file is missing")
  assert [r.getMessage() for r in caplog.records] == ["a tokenizer file is missing"]


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu (the `aot` extra)")
def test_libtpu_compiles_for_a_slice_without_hostname_warnings_on_a_cpu_host(tmp_path):
  code = "from retool_jax import topologies\nprint(len(topologies.devices(topologies.get('v5p-8'))))\n"
  env = env_without_torch(tmp_path)
  done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=240)
  assert done.returncode == 0 and done.stdout.split() == ["4"], done.stderr
  assert not [n for n in NOISE if n in done.stderr], done.stderr
