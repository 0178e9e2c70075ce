"""Evaluation of the CPU demo's checkpoints on its held-out problems (run `make demo` first).

    python -m retool_jax.evaluate --config=configs/eval_demo.py        # after RL
    python -m retool_jax.evaluate --config=configs/eval_demo.py:sft    # after SFT

The demo model was trained on plain prompts with its own character-level tokenizer and the ReTool `<code>`
format, so the prompts are rendered without a tool schema block and the demo's rollout limits are kept.
"""

import ml_collections

from retool_jax.evaluate import default_config

RUN = "runs/demo_cpu"  # the demo's config.workdir


def get_config(variant: str = "rl") -> ml_collections.ConfigDict:
  if variant not in ("rl", "sft"):
    raise ValueError(f"configs/eval_demo.py: unknown variant {variant!r}; expected 'rl' or 'sft'")
  c = default_config()
  c.workdir = f"{RUN}/eval_{variant}"
  c.model.checkpoint = f"{RUN}/{variant}/checkpoints"
  c.data.path = f"{RUN}/heldout.jsonl"
  c.data.tokenizer = f"{RUN}/tokenizer"
  c.data.prompt_style = "raw"
  c.tools_in_prompt = False
  c.reward = "retool"
  c.rollout = ml_collections.ConfigDict(
    dict(
      max_context=128, max_turns=4, max_tool_calls=2, max_new_tokens=32, call_formats=("code",), temperature=1.0
    )
  )
  c.engine.max_batch_size = 64
  c.engine.decode_chunk = 16
  c.eval.num_samples = 4
  c.eval.pass_k = (1, 2, 4)
  return c
