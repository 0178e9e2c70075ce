"""The recipe builders the shipped configs share: the tiny smoke-test models and runs, the ReTool rollout, the
large-model block, and the ReTool GRPO and DPO recipes the TPU configs refine.

A config file (`--config=configs/NAME.py`) is `from retool_jax import recipes` plus what it changes.
"""

import ml_collections

from retool_jax.train.dpo import default_config as dpo_default
from retool_jax.train.rl_run import default_config as rl_default
from retool_jax.train.sft import default_config as sft_default

# 27 DAPO-Math-17k prompts in the repository's fixtures; a run points `data.path` at the full set.
DAPO_FIXTURE = "../shared/fixtures/dapo_math_17k/dapo_math_17k_slime_format.first27.jsonl"
SFT_4B_CHECKPOINT = "runs/retool_qwen3_4b_sft/checkpoints"  # the ReTool SFT of Qwen3-4B
QWEN3_VOCAB = 151936  # the Qwen3 tokenizer's vocabulary (embedding rows)


def tiny_qwen3(vocab_size: int, hidden_size: int, num_attention_heads: int) -> ml_collections.ConfigDict:
  """A random 2-layer Qwen3 (16-wide heads, 2 query heads per key/value head, 2x MLP) for the CPU."""
  return ml_collections.ConfigDict(
    dict(
      vocab_size=vocab_size,
      hidden_size=hidden_size,
      intermediate_size=2 * hidden_size,
      num_hidden_layers=2,
      num_attention_heads=num_attention_heads,
      num_key_value_heads=num_attention_heads // 2,
      head_dim=16,
      tie_word_embeddings=True,
    )
  )


def tiny_sft(workdir: str) -> ml_collections.ConfigDict:
  """The SFT trainer's defaults with a tiny model in float32 (exact on the CPU; training runs use bfloat16)."""
  c = sft_default()
  c.workdir = workdir
  c.model.overrides = tiny_qwen3(vocab_size=256, hidden_size=64, num_attention_heads=4)
  c.model.dtype = "float32"
  return c


def tiny_rl(workdir: str) -> ml_collections.ConfigDict:
  """Two RL steps of a tiny Qwen3 (the Qwen3 vocabulary, so the real tokenizer and chat format) on 8 DAPO
  fixture prompts with real sandboxed tools; the caller sets `rl`."""
  c = rl_default()
  c.workdir = workdir
  c.num_steps = 2
  c.model.overrides = tiny_qwen3(vocab_size=QWEN3_VOCAB, hidden_size=32, num_attention_heads=2)
  c.model.dtype = "float32"
  c.data.path = DAPO_FIXTURE
  c.data.limit = 8
  c.rollout = ml_collections.ConfigDict(
    dict(max_context=3072, max_turns=2, max_new_tokens=16, call_formats=("code",))
  )
  c.engine.max_batch_size = 8
  c.optim.learning_rate = 1e-4
  c.checkpoint.every_steps = 1
  c.log.tensorboard = False
  return c


def retool_rollout(max_response_tokens: int) -> ml_collections.ConfigDict:
  """ReTool's multi-turn rollouts: up to 16 turns and 16 interpreter calls at temperature 1.0."""
  return ml_collections.ConfigDict(
    dict(
      max_context=1024 + max_response_tokens,  # prompt (<= 1024) + the response
      max_response_tokens=max_response_tokens,  # every turn and interpreter output after the prompt
      max_turns=16,
      max_tool_calls=16,
      max_observation_tokens=1024,
      temperature=1.0,
      top_p=1.0,
      call_formats=("code",),
    )
  )


def large_model(model: ml_collections.ConfigDict, preset: str) -> None:
  """Float32 master weights, bfloat16 compute, full remat and splash attention for a Qwen3 `preset`."""
  model.param_dtype = "float32"
  model.dtype = "bfloat16"
  model.remat = "full"
  model.preset = preset  # the checkpoint's architecture: `retool_jax.aot` checks the recipe without it
  model.attention_impl = "auto"  # splash attention on TPU, cuDNN on GPU: no [T, S] scores in memory


def fsdp_mesh() -> ml_collections.ConfigDict:
  """Every device on the `fsdp` axis: weights, optimizer state and batch rows sharded over all of them."""
  return ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))


def retool_grpo(workdir: str, checkpoint: str, preset: str) -> ml_collections.ConfigDict:
  """The public ReTool RL recipe: GRPO with lr 1e-6 constant, 32 prompts x 8 samples, clip 0.2 / 0.28, no KL
  term, truncated importance sampling capped at 2; temperature 1.0, 8192 response tokens over at most 16 turns,
  strict boxed answers with tool-use shaping. The model is `preset` on an all-`fsdp` mesh."""
  c = rl_default()
  c.workdir = workdir
  c.num_steps = 400
  c.model.checkpoint = checkpoint
  large_model(c.model, preset)
  c.model.scan_layers = True  # one decoder layer compiled, scanned over the stack
  c.mesh = fsdp_mesh()
  c.data.path = DAPO_FIXTURE  # the full set in a run
  c.data.prompt_style = "retool"
  c.reward = "retool(strict=True)"  # strict \boxed{} inside <answer>; wrong after k calls: min(-0.6, -1 + 0.1 k)
  c.rollout = retool_rollout(max_response_tokens=8192)
  c.rl = ml_collections.ConfigDict(
    dict(
      algorithm="grpo",
      num_prompts=32,
      group_size=8,
      num_minibatches=4,
      num_epochs=1,
      loss=dict(
        clip_low=0.2, clip_high=0.28, aggregation="token_mean", kl_coef=0.0, entropy_coef=0.0, tis_cap=2.0
      ),
      logprob_chunk=1024,
      micro_batch_size=32,  # rows per forward / backward pass (8 per chip on v5p-8); gradients accumulate
      length_multiple=512,
    )
  )
  c.engine.max_batch_size = 64  # rows decoded together: a 9216-token KV cache for 64 rows is 21 GiB per chip (4B)
  c.optim.learning_rate = 1e-6
  c.optim.schedule = "constant"
  c.optim.weight_decay = 0.1
  c.checkpoint.every_steps = 20
  return c


def tool_dpo(workdir: str) -> ml_collections.ConfigDict:
  """DPO from the ReTool SFT model on tool-use preference pairs: one epoch of 32-pair updates, beta 0.1, lr 5e-7
  with a 10-step warm-up and cosine decay; reference log-probs computed once before training."""
  c = dpo_default()
  c.workdir = workdir
  c.model.checkpoint = SFT_4B_CHECKPOINT
  c.data.path = "data/tool_preferences.jsonl"
  c.data.max_length = 8192  # longer pairs are dropped
  c.batch_size = 32
  c.num_epochs = 1
  c.loss.beta = 0.1
  c.loss.label_smoothing = 0.0
  c.reference.precompute = True  # no second model stays in memory during training
  c.optim.learning_rate = 5e-7
  c.optim.schedule = "warmup_cosine"
  c.optim.warmup_steps = 10
  return c
