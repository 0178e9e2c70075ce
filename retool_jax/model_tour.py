"""A tour of the model stack: a random Qwen3 with the real vocabulary on a mesh, HF export and reload, greedy
decoding of a real chat prompt with the KV cache, and one sandboxed tool call.

    python -m retool_jax.model_tour [--config=configs/model_tour.py] [--config.max_new_tokens=64]
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
from absl import app
from flax import nnx
from ml_collections import config_flags

from retool_jax import sharding
from retool_jax.assets import QWEN3_TOKENIZER_DIR
from retool_jax.chat import load_tokenizer, render_ids
from retool_jax.checkpoint.hf_export import write_hf
from retool_jax.models import qwen3, qwen3_hf
from retool_jax.models.generate import greedy_generate
from retool_jax.tools import run_python

_CONFIG = config_flags.DEFINE_config_file(
  "config", os.path.join(os.path.dirname(__file__), "..", "configs", "model_tour.py"), "Tour configuration."
)


def main(_):
  cfg = _CONFIG.value
  tokenizer = load_tokenizer(QWEN3_TOKENIZER_DIR)
  model_cfg = qwen3.Qwen3Config(vocab_size=len(tokenizer), **cfg.model.to_dict())
  mesh = sharding.make_mesh(**cfg.mesh.to_dict())
  print(f"devices: {jax.devices()}; mesh {dict(mesh.shape)}")
  print(f"model: random Qwen3 with {model_cfg.num_params() / 1e6:.1f}M parameters")
  model = sharding.create_sharded(lambda: qwen3.Qwen3(model_cfg, rngs=nnx.Rngs(cfg.seed)), mesh)

  hf_dir = os.path.join(cfg.workdir, "hf")
  write_hf(model, None, hf_dir, tokenizer=QWEN3_TOKENIZER_DIR, overwrite=True)
  loaded = qwen3_hf.load_hf(hf_dir, mesh=mesh)
  probe = jnp.asarray([tokenizer.encode("round trip")])
  diff = float(jnp.abs(loaded(probe) - model(probe)).max())
  print(f"exported to {hf_dir} and loaded back: max |logit difference| = {diff:.2e}")

  prompt_ids = render_ids(tokenizer, [{"role": "user", "content": cfg.prompt}], add_generation_prompt=True)
  t0 = time.perf_counter()
  out = greedy_generate(loaded, [prompt_ids], cfg.max_new_tokens, eos_token_ids=[tokenizer.eos_token_id])[0]
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  greedy_generate(loaded, [prompt_ids], cfg.max_new_tokens, eos_token_ids=[tokenizer.eos_token_id])
  again = time.perf_counter() - t0
  print(f"prompt ({len(prompt_ids)} tokens): {tokenizer.decode(prompt_ids)!r}")
  print(f"greedy continuation (random weights): {tokenizer.decode(out)!r}")
  print(
    f"decode: {len(out)} tokens, {first:.2f}s with compilation, {again:.3f}s compiled "
    f"({len(out) / again:,.0f} tokens/s)"
  )

  res = run_python(cfg.tool_code, timeout_s=10, memory_mb=1024)
  print(f"code_interpreter: status={res.status} output={res.output.strip()!r}")


if __name__ == "__main__":
  app.run(main)
