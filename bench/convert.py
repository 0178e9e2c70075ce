"""Checkpoint conversion benchmark: throughput and peak host memory of the streaming converters.

Writes a random ~2 GB Qwen3 (bfloat16) Hugging Face checkpoint, then in fresh processes measures
  * streaming HF -> Orbax (`python -m retool_jax.convert --from hf`) and Orbax -> HF (`--to hf`),
  * the baseline: `load_hf` of the whole model followed by `retool_jax.checkpoint.save` (all in memory),
  * a raw file copy of the safetensors (the disk's speed),
and prints throughput, peak RSS against the goal (2 x largest tensor + 1 GB) and ratios to the baselines.

    python bench/convert.py [--layers 40] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

from retool_jax.models.qwen3_config import Qwen3Config
from retool_jax.models.qwen3_hf import hf_shapes
from retool_jax.models.safetensors_io import write_sharded

CONFIG = dict(
  model_type="qwen3",
  architectures=["Qwen3ForCausalLM"],
  vocab_size=151936,
  hidden_size=1024,
  intermediate_size=3072,
  num_attention_heads=16,
  num_key_value_heads=8,
  head_dim=128,
  tie_word_embeddings=False,
  rms_norm_eps=1e-6,
  rope_theta=1e6,
  max_position_embeddings=40960,
  torch_dtype="bfloat16",
  bos_token_id=151643,
  eos_token_id=151645,
)

# Peak RSS is the child's VmHWM: unlike ru_maxrss it is not inherited from the parent across fork + exec.
CHILD = r"""
import json, sys, time
start = time.perf_counter()
exec(sys.argv[1])
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print("RESULT " + json.dumps({"seconds": time.perf_counter() - start, "peak_rss": hwm * 1024}))
"""


def write_random_checkpoint(path: str, layers: int) -> tuple[int, int]:
  """A random bf16 Qwen3 checkpoint, generated and written one tensor at a time; (bytes, largest tensor)."""
  os.makedirs(path)
  hf = {**CONFIG, "num_hidden_layers": layers}
  shapes = hf_shapes(Qwen3Config.from_hf(hf))
  dtype = np.dtype(ml_dtypes.bfloat16)
  rng = np.random.default_rng(0)

  def tensors():
    for key, shape in shapes.items():
      yield key, (0.02 * rng.standard_normal(shape, dtype=np.float32)).astype(dtype)

  write_sharded(path, [(k, s, dtype) for k, s in shapes.items()], tensors(), max_shard_bytes=1 << 30)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(hf, f)
  sizes = [int(np.prod(s)) * dtype.itemsize for s in shapes.values()]
  return sum(sizes), max(sizes)


def measure(code: str) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  out = subprocess.run([sys.executable, "-c", CHILD, code], capture_output=True, text=True, env=env)
  if out.returncode:
    raise RuntimeError(out.stderr[-3000:])
  return json.loads(out.stdout.split("RESULT ", 1)[1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--layers", type=int, default=40, help="decoder layers (40 gives ~1.9 GB)")
  parser.add_argument("--keep", help="keep the files under this folder instead of a temporary one")
  args = parser.parse_args()
  root = args.keep or tempfile.mkdtemp(prefix="retool_convert_bench_")
  src, orbax, hf_out, base, copy = (os.path.join(root, n) for n in ("hf", "orbax", "hf_out", "baseline", "copy"))
  try:
    total, largest = write_random_checkpoint(src, args.layers)
    gb = total / 1e9
    print(f"checkpoint: {gb:.2f} GB bf16, largest tensor {largest / 1e6:.0f} MB, {src}")

    os.makedirs(copy)
    t = time.perf_counter()
    for name in os.listdir(src):
      shutil.copyfile(os.path.join(src, name), os.path.join(copy, name))
    copy_s = time.perf_counter() - t
    shutil.rmtree(copy)

    to_orbax = measure(
      f"from retool_jax.convert import main; main(['--from', 'hf', '--src', {src!r}, "
      f"'--dst', {orbax!r}, '--no-progress'])"
    )
    to_hf = measure(
      f"from retool_jax.convert import main; main(['--to', 'hf', '--src', {orbax!r}, "
      f"'--dst', {hf_out!r}, '--no-progress'])"
    )
    baseline = measure(
      f"from retool_jax.models import qwen3_hf; from retool_jax import checkpoint; "
      f"m = qwen3_hf.load_hf({src!r}); checkpoint.save({base!r}, m, m.config)"
    )

    goal = 2 * largest + (1 << 30)
    print(f"{'':28s}{'seconds':>9s}{'GB/s':>8s}{'peak RSS GB':>13s}")
    rows = [
      ("raw file copy (baseline)", copy_s, None),
      ("load_hf + save (baseline)", baseline["seconds"], baseline["peak_rss"]),
      ("streaming HF -> Orbax", to_orbax["seconds"], to_orbax["peak_rss"]),
      ("streaming Orbax -> HF", to_hf["seconds"], to_hf["peak_rss"]),
    ]
    for name, s, rss in rows:
      print(f"{name:28s}{s:9.1f}{gb / s:8.2f}{'' if rss is None else f'{rss / 1e9:13.2f}'}")
    print(
      f"peak RSS goal (2 x largest tensor + 1 GiB): {goal / 1e9:.2f} GB; HF -> Orbax "
      f"{'meets' if to_orbax['peak_rss'] <= goal else 'MISSES'} it, Orbax -> HF "
      f"{'meets' if to_hf['peak_rss'] <= goal else 'MISSES'} it"
    )
    print(
      f"HF -> Orbax vs load_hf + save: {baseline['seconds'] / to_orbax['seconds']:.2f}x speed, "
      f"{to_orbax['peak_rss'] / baseline['peak_rss']:.2f}x peak RSS; "
      f"vs raw copy: {copy_s / to_orbax['seconds']:.2f}x speed"
    )
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
  main()
