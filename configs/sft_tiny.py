"""A tiny SFT run on the CPU in seconds: a 2-layer Qwen3 learning synthetic arithmetic token sequences.

    python -m retool_jax.train --config=configs/sft_tiny.py --config.workdir=/tmp/sft_tiny

Point it at real data with `--config.data.format=retool_sft --config.data.path=FILE` (the Qwen3 tokenizer then
needs `--config.model.overrides.vocab_size=151936`).
"""

from retool_jax.train.sft import default_config


def get_config():
  c = default_config()
  c.workdir = "runs/sft_tiny"
  c.num_steps = 40
  c.model.overrides = dict(
    vocab_size=256,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=True,
  )
  c.model.dtype = "float32"  # exact on the CPU; training runs use bfloat16
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
