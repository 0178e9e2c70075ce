"""Evaluation of the CPU demo's checkpoints on its held-out problems (run `make demo` first).

    python -m retool_jax.evaluate --config=configs/eval_demo.py              # after RL
    python -m retool_jax.evaluate --config=configs/eval_demo.py:sft          # after SFT
    python -m retool_jax.evaluate --config=configs/eval_demo.py:rl,/tmp/demo # another run folder

The demo model was trained on plain prompts with its own character-level tokenizer and the ReTool `<code>`
format, so the prompts are rendered without a tool schema block and the demo's rollout limits are kept; the
samples per problem and their seeds are the ones `make demo` reports. Settings: `configs/demo_cpu.py`.
"""

import ml_collections

from retool_jax.demo_task.config import DEFAULT_WORKDIR, demo_config, eval_config


def get_config(arg: str = "rl") -> ml_collections.ConfigDict:
  variant, _, workdir = arg.partition(",")
  if variant not in ("rl", "sft"):
    raise ValueError(f"configs/eval_demo.py: unknown variant {variant!r}; expected 'rl' or 'sft'")
  return eval_config(demo_config(workdir or DEFAULT_WORKDIR), variant)
