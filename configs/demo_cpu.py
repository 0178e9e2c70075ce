"""The CPU demo (`make demo`): SFT a tiny from-scratch Qwen3 on executed tool-use trajectories of a synthetic
arithmetic task, then GRPO it with real sandboxed interpreter calls on the embedded engine.

    python -m retool_jax.demo --config=configs/demo_cpu.py
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.workdir = "runs/demo_cpu"  # tokenizer, checkpoints, metrics, curves, results.json
  c.seed = 0
  c.log_every = 5  # RL steps between progress lines
  # A Qwen3-architecture model trained from scratch (the vocabulary comes from the task's tokenizer).
  c.model = ml_collections.ConfigDict(
    dict(
      hidden_size=128,
      intermediate_size=384,
      num_hidden_layers=3,
      num_attention_heads=4,
      num_key_value_heads=2,
      head_dim=32,
      tie_word_embeddings=True,
      max_position_embeddings=128,
    )
  )
  # The SFT teacher: calls the interpreter with probability tool_rate, else answers from a mental estimate;
  # copies the interpreter's output with one wrong digit with probability slip_rate.
  c.teacher = ml_collections.ConfigDict(dict(tool_rate=0.6, slip_rate=0.25))
  c.sft = ml_collections.ConfigDict(
    dict(
      num_examples=2048,
      epochs=6,
      batch_size=32,
      log_every=10,
      optim=dict(
        learning_rate=5e-3,
        schedule="warmup_cosine",
        warmup_steps=20,
        weight_decay=0.0,
        grad_clip_norm=1.0,
        end_lr_factor=0.1,
      ),
    )
  )
  # Multi-turn rollouts: ReTool <code> calls, <interpreter> observations, Qwen3 chat format.
  c.rollout = ml_collections.ConfigDict(
    dict(
      max_context=128, max_turns=4, max_tool_calls=2, max_new_tokens=32, call_formats=("code",), temperature=1.0
    )
  )
  # The embedded engine: one 64-row batch shape; requests arriving within batch_window_s share a batch (turns
  # after a tool call arrive as the sandbox returns).
  c.engine = ml_collections.ConfigDict(dict(max_batch_size=64, decode_chunk=16, batch_window_s=0.2))
  # Reward: the ReTool reward (verified correctness; wrong answers after tool calls shaped up to -0.6) plus a
  # format term (1 for a closed <answer>\boxed{..}</answer> with every tag closed and no truncation, else 0).
  c.reward = ml_collections.ConfigDict({"retool": 1.0, "format": 0.5})
  c.rl_steps = 50
  c.rl = ml_collections.ConfigDict(
    dict(
      algorithm="grpo",
      num_prompts=8,
      group_size=8,
      num_minibatches=2,
      num_epochs=1,
      loss=dict(clip_low=0.2, clip_high=0.28, aggregation="token_mean"),
      length_multiple=32,
    )
  )
  c.rl_optim = ml_collections.ConfigDict(dict(learning_rate=3e-4, schedule="constant", grad_clip_norm=1.0))
  # Held-out evaluation: `samples` responses per problem at `temperature` (pass@1 estimated over the samples).
  c.eval = ml_collections.ConfigDict(dict(num_problems=128, samples=2, temperature=1.0))
  return c
