"""`python -m retool_jax.model_tour`: a small random Qwen3 on the CPU, exported to a Hugging Face folder, loaded
back, and decoded greedily from a real Qwen3 chat prompt; then one code-interpreter call through the sandbox."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "runs/model_tour"
  c.seed = 0
  c.model = ml_collections.ConfigDict(
    dict(
      hidden_size=128,
      intermediate_size=384,
      num_hidden_layers=4,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=32,
      tie_word_embeddings=True,
    )
  )
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
  c.prompt = "What is 2**10? Use the code interpreter."
  c.max_new_tokens = 24
  c.tool_code = "import sympy\nprint(2**10, sympy.factorint(2**10))"
  return c
