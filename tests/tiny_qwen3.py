"""A one-layer, 32-wide Qwen3 config for fast trainer tests (a 128-token vocabulary fits the demo tokenizer)."""

from retool_jax.models.qwen3 import Qwen3Config


def tiny_config(**overrides) -> Qwen3Config:
  fields = dict(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=1,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=16,
    tie_word_embeddings=True,
    max_position_embeddings=256,
  )
  return Qwen3Config(**{**fields, **overrides})
