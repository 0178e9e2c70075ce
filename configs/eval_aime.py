"""Evaluation on AIME 2024: 16 samples per problem at temperature 1.0 with the ReTool prompt and code tool.

    python -m retool_jax.evaluate --config=configs/eval_aime.py --config.model.checkpoint=runs/retool_qwen3_4b_rl/...
    python -m retool_jax.evaluate --config=configs/eval_aime.py --config.engine.sglang_url=http://127.0.0.1:30080
    python -m retool_jax.evaluate --config=configs/eval_aime.py:tiny   # a random 2-layer model, for smoke tests

Other sets: `--config.data.path=../shared/fixtures/math500/test.jsonl` (MATH-500) or `.../gsm8k/test.jsonl`.
"""

import ml_collections

from retool_jax.evaluate import default_config


def get_config(variant: str = "") -> ml_collections.ConfigDict:
  c = default_config()
  c.workdir = "runs/eval_aime2024"
  c.model.checkpoint = "runs/retool_qwen3_4b_rl/checkpoints"
  c.model.dtype = "bfloat16"
  c.data.path = "../shared/fixtures/aime2024/test.jsonl"
  c.data.prompt_style = "retool"
  c.reward = "retool"
  c.rollout = ml_collections.ConfigDict(
    dict(
      max_context=17408,  # prompt (<= 1024) + the response
      max_response_tokens=16384,
      max_turns=16,
      max_tool_calls=16,
      max_observation_tokens=1024,
      temperature=1.0,
      top_p=1.0,
      call_formats=("code",),
    )
  )
  c.eval.num_samples = 16
  c.eval.pass_k = (1, 4, 16)
  if variant == "tiny":
    c.workdir = "runs/eval_tiny"
    c.model.checkpoint = ""
    c.model.overrides = ml_collections.ConfigDict(
      dict(
        vocab_size=151936,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        tie_word_embeddings=True,
      )
    )
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
