"""A tiny SFT run on the CPU in seconds: a 2-layer Qwen3 learning synthetic arithmetic token sequences.

    python -m retool_jax.train --config=configs/sft_tiny.py --config.workdir=/tmp/sft_tiny

Point it at real data with `--config.data.format=retool_sft --config.data.path=FILE` (the Qwen3 tokenizer then
needs `--config.model.overrides.vocab_size=151936`).
"""

import ml_collections

from retool_jax import recipes


def get_config() -> ml_collections.ConfigDict:
  c = recipes.tiny_sft("runs/sft_tiny")
  c.num_steps = 40
  c.data.format = "synthetic"
  c.data.synthetic_vocab = 256
  c.data.synthetic_examples = 256
  c.data.eval_holdout = 32
  c.data.seq_len = 64
  c.data.global_batch_size = 8
  c.optim.schedule = "warmup_cosine"
  c.optim.learning_rate = 3e-3
  c.optim.warmup_steps = 4
  c.optim.weight_decay = 0.01
  c.loss.chunk_size = 32
  c.eval.every_steps = 10
  c.checkpoint.every_steps = 10
  c.checkpoint.keep = 2
  return c
