"""Tiny random Hugging Face Qwen3 models for parity tests (built locally, never downloaded)."""

from __future__ import annotations

import torch
from transformers import Qwen3Config as HFQwen3Config
from transformers import Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

TINY_CONFIGS = {
  "dense_tied_mqa_hd12": dict(
    model_type="qwen3",
    vocab_size=96,
    hidden_size=48,
    intermediate_size=80,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=12,
    tie_word_embeddings=True,
  ),
  "dense_untied_gqa2": dict(
    model_type="qwen3",
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    tie_word_embeddings=False,
    rope_theta=5e6,
  ),
  "dense_mha4_bias": dict(
    model_type="qwen3",
    vocab_size=80,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    head_dim=8,
    tie_word_embeddings=False,
    attention_bias=True,
  ),
  "moe_8x2": dict(
    model_type="qwen3_moe",
    vocab_size=96,
    hidden_size=32,
    intermediate_size=64,
    moe_intermediate_size=24,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=8,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=True,
    tie_word_embeddings=False,
  ),
  "moe_mixed_layers": dict(
    model_type="qwen3_moe",
    vocab_size=64,
    hidden_size=32,
    intermediate_size=40,
    moe_intermediate_size=16,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=10,
    num_experts=8,
    num_experts_per_tok=2,
    norm_topk_prob=False,
    decoder_sparse_step=1,
    mlp_only_layers=[0, 2],
    tie_word_embeddings=True,
  ),
}


def make_hf_model(name: str, seed: int = 0):
  """A tiny HF model with random weights, including non-trivial norm weights and biases."""
  kw = dict(TINY_CONFIGS[name])
  model_type = kw.pop("model_type")
  theta = kw.pop("rope_theta", 1e6)
  torch.manual_seed(seed)
  common = dict(
    rope_parameters={"rope_type": "default", "rope_theta": theta},
    max_position_embeddings=512,
    attn_implementation="eager",
  )
  if model_type == "qwen3":
    model = Qwen3ForCausalLM(HFQwen3Config(**kw, **common))
  else:
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**kw, **common))
  with torch.no_grad():
    for name_, p in model.named_parameters():
      if name_.endswith("norm.weight") or name_.endswith("layernorm.weight"):
        p.copy_(1.0 + 0.3 * torch.randn_like(p))
      elif name_.endswith(".bias"):
        p.copy_(0.1 * torch.randn_like(p))
      else:
        p.copy_(0.15 * torch.randn_like(p))
  return model.eval().float()


def save_hf_model(name: str, path, seed: int = 0, **save_kwargs):
  model = make_hf_model(name, seed)
  model.save_pretrained(path, **save_kwargs)
  return model
