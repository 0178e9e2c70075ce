"""`retool_jax.models.qwen3.load_hf`, the published name of the Hugging Face loader, is `qwen3_hf.load_hf`."""

import subprocess
import sys

import jax
import numpy as np
from flax import nnx

from hf_models import save_hf_model
from retool_jax.models import qwen3, qwen3_hf


def test_qwen3_load_hf_is_the_loader_and_loads_the_same_model(tmp_path):
  save_hf_model("dense_tied_mqa_hd12", tmp_path / "hf")
  assert qwen3.load_hf is qwen3_hf.load_hf and "load_hf" in dir(qwen3)
  a, b = qwen3.load_hf(tmp_path / "hf"), qwen3_hf.load_hf(tmp_path / "hf")
  assert isinstance(a, qwen3.Qwen3) and a.config == b.config
  leaves_a, leaves_b = jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  ids = np.arange(6, dtype=np.int32)[None]
  np.testing.assert_array_equal(np.asarray(a(ids)), np.asarray(b(ids)))


def test_the_name_resolves_in_a_fresh_process_and_others_still_raise():
  code = (
    "from retool_jax.models import qwen3\n"
    "import sys\n"
    "print(qwen3.load_hf.__module__)\n"
    "try:\n  qwen3.no_such_name\nexcept AttributeError as e:\n  print('AttributeError', e)\n"
  )
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
  assert out[0] == "retool_jax.models.qwen3_hf"
  assert out[1] == "AttributeError module 'retool_jax.models.qwen3' has no attribute 'no_such_name'"
