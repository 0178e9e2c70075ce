"""Evaluation on AIME 2024: 16 samples per problem at temperature 1.0 with the ReTool prompt and code tool.

    python -m retool_jax.evaluate --config=configs/eval_aime.py --config.model.checkpoint=runs/retool_qwen3_4b_rl/...
    python -m retool_jax.evaluate --config=configs/eval_aime.py --config.engine.sglang_url=http://127.0.0.1:30080
    python -m retool_jax.evaluate --config=configs/eval_aime.py:tiny   # a random 2-layer model, for smoke tests

Other sets: `--config.data.path=../shared/fixtures/math500/test.jsonl` (MATH-500) or `.../gsm8k/test.jsonl`.
"""

import ml_collections

from retool_jax import recipes
from retool_jax.evaluate import default_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = default_config()
  c.workdir = "runs/eval_aime2024"
  c.model.checkpoint = "runs/retool_qwen3_4b_rl/checkpoints"
  c.model.dtype = "bfloat16"
  c.data.path = "../shared/fixtures/aime2024/test.jsonl"
  c.data.prompt_style = "retool"
  c.reward = "retool"
  c.rollout = recipes.retool_rollout(max_response_tokens=16384)
  c.eval.num_samples = 16
  c.eval.pass_k = (1, 4, 16)
  if variant == "tiny":
    c.workdir = "runs/eval_tiny"
    c.model.checkpoint = ""
    c.model.overrides = recipes.tiny_qwen3(vocab_size=recipes.QWEN3_VOCAB, hidden_size=32, num_attention_heads=2)
    c.model.dtype = "float32"
    c.data.limit = 2
    c.rollout = ml_collections.ConfigDict(
      dict(max_context=2048, max_turns=2, max_new_tokens=8, call_formats=("code",))
    )
    c.engine.max_batch_size = 8
    c.eval.num_samples = 2
    c.eval.pass_k = (1, 2)
  elif variant:
    raise ValueError(f"configs/eval_aime.py: unknown variant {variant!r}; expected '' or 'tiny'")
  return c
