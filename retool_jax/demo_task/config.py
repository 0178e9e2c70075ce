"""The demo's settings, and the product configs its phases run with, derived from them.

    demo = demo_config()                      # workdir, seeds, sizes (configs/demo_cpu.py)
    sft_config(demo)                          # trainer="sft" (configs/demo_sft.py)
    rl_config(demo)                           # trainer="rl"  (configs/demo_rl.py)
    eval_config(demo, "rl")                   # retool_jax.evaluate (configs/eval_demo.py)

Every path of a run lives under `demo.workdir` (`DemoFiles`); the data step (`retool_jax.demo_task.data`) writes
the tokenizer and the data files the SFT and RL configs read.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections

from retool_jax.demo_task.tokenizer import EOS_TOKEN, PAD_TOKEN, VOCAB_SIZE, token_id
from retool_jax.evaluate import default_config
from retool_jax.train import get_trainer

DEFAULT_WORKDIR = "runs/demo_cpu"
EVAL_SEED_OFFSET = 12345  # held-out sampling seeds differ from training's


@dataclasses.dataclass(frozen=True)
class DemoFiles:
  """Where a demo run keeps its data and phases."""

  workdir: Path

  @property
  def tokenizer(self) -> Path:
    return self.workdir / "tokenizer"

  @property
  def sft_data(self) -> Path:  # {input_ids, loss_mask} rows: the SFT trainer's `tokens` format
    return self.workdir / "data" / "sft_tokens.jsonl"

  @property
  def rl_problems(self) -> Path:  # {problem, answer, unique_id} rows, read by `retool_jax.data.load_math`
    return self.workdir / "data" / "rl_problems.jsonl"

  @property
  def heldout(self) -> Path:
    return self.workdir / "heldout.jsonl"

  @property
  def data_summary(self) -> Path:
    return self.workdir / "data" / "summary.json"

  def phase(self, name: str) -> Path:
    """The run folder of phase `name` (sft, rl, eval_sft, eval_rl)."""
    return self.workdir / name


def demo_config(workdir: str = DEFAULT_WORKDIR) -> ml_collections.ConfigDict:
  """The demo's settings: one source for the seeds and sizes of every phase."""
  c = ml_collections.ConfigDict()
  c.workdir = workdir  # tokenizer, data, checkpoints, metrics, curves, results.json
  c.seed = 0
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
      epochs=6,  # SFT steps: epochs * num_examples // batch_size
      batch_size=32,
      seq_len=72,  # the longest trajectory (70 tokens) rounded up to 8: one trajectory per row
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
  c.engine = ml_collections.ConfigDict(dict(max_batch_size=64, decode_chunk=16))  # the embedded engine
  # Reward: the ReTool reward (verified correctness; wrong answers after tool calls shaped up to -0.6) plus a
  # format term (1 for a closed <answer>\boxed{..}</answer> with every tag closed and no truncation, else 0).
  c.reward = "retool + 0.5 * format"
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
      max_staleness=0,  # 1 or 2: rollouts run ahead of the updates (see README, asynchronous RL)
      partial_rollouts="finish",
    )
  )
  c.rl_optim = ml_collections.ConfigDict(
    dict(learning_rate=3e-4, schedule="constant", weight_decay=0.0, grad_clip_norm=1.0)
  )
  # Held-out evaluation: `samples` responses per problem at `temperature` (avg@samples is the accuracy).
  c.eval = ml_collections.ConfigDict(dict(num_problems=128, samples=2, temperature=1.0))
  c.progress = True  # the trainers' progress bars
  return c


def sft_steps(demo: ml_collections.ConfigDict) -> int:
  return demo.sft.epochs * demo.sft.num_examples // demo.sft.batch_size


def model_overrides(demo: ml_collections.ConfigDict) -> dict:
  """The whole Qwen3Config of the from-scratch model: `demo.model` and the demo tokenizer's vocabulary."""
  return dict(
    demo.model.to_dict(),
    vocab_size=VOCAB_SIZE,
    bos_token_id=None,
    eos_token_id=token_id(EOS_TOKEN),
    pad_token_id=token_id(PAD_TOKEN),
  )


def _finish(c: ml_collections.ConfigDict, demo: ml_collections.ConfigDict, steps: int) -> None:
  c.model.dtype = "float32"  # a 0.6M-parameter model on a CPU: float32 is the fast path
  c.checkpoint.update(every_steps=steps, keep=1, async_save=False)  # the end of the phase only
  c.log.update(tensorboard=False, progress=demo.progress)


def sft_config(demo: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The SFT trainer's config: the from-scratch model on the teacher's executed trajectories."""
  files = DemoFiles(Path(demo.workdir))
  c = get_trainer("sft").default_config()
  c.workdir = str(files.phase("sft"))
  c.seed = demo.seed
  c.num_steps = sft_steps(demo)
  c.model.overrides = ml_collections.ConfigDict(model_overrides(demo))
  c.data.update(
    format="tokens",
    path=str(files.sft_data),
    tokenizer=str(files.tokenizer),
    seq_len=demo.sft.seq_len,
    overflow="error",  # a longer trajectory says so instead of losing its answer
    global_batch_size=demo.sft.batch_size,
  )
  c.optim.update(demo.sft.optim.to_dict())
  c.log.every_steps = demo.sft.log_every
  _finish(c, demo, c.num_steps)
  return c


def rl_config(demo: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The RL trainer's config: GRPO from the SFT checkpoint with sandboxed interpreter calls."""
  files = DemoFiles(Path(demo.workdir))
  c = get_trainer("rl").default_config()
  c.workdir = str(files.phase("rl"))
  c.seed = demo.seed
  c.num_steps = demo.rl_steps
  c.model.checkpoint = str(files.phase("sft") / "checkpoints")
  c.data.update(path=str(files.rl_problems), prompt_style="raw", tokenizer=str(files.tokenizer))
  c.engine.update(demo.engine.to_dict())
  c.reward = demo.reward
  c.tools = "interpreter_stateless"  # one call per trajectory: no interpreter session to start for each
  c.tools_in_prompt = False  # the bare question; the model learned the <code> format from its SFT data
  c.rollout = ml_collections.ConfigDict(demo.rollout.to_dict())
  c.rl = ml_collections.ConfigDict(demo.rl.to_dict())
  c.optim.update(demo.rl_optim.to_dict())
  _finish(c, demo, demo.rl_steps)
  return c


def eval_config(demo: ml_collections.ConfigDict, variant: str = "rl") -> ml_collections.ConfigDict:
  """`retool_jax.evaluate`'s config for the `variant` ("sft" or "rl") checkpoint on the held-out problems."""
  if variant not in ("rl", "sft"):
    raise ValueError(f"unknown variant {variant!r}; expected 'rl' or 'sft'")
  files = DemoFiles(Path(demo.workdir))
  c = default_config()
  c.workdir = str(files.phase(f"eval_{variant}"))
  c.seed = demo.seed + EVAL_SEED_OFFSET
  c.model.checkpoint = str(files.phase(variant) / "checkpoints")
  c.model.dtype = "float32"
  c.data.update(path=str(files.heldout), tokenizer=str(files.tokenizer), prompt_style="raw")
  c.tools = "interpreter_stateless"  # as in RL: one call per trajectory, no session to start for each
  c.tools_in_prompt = False
  c.reward = demo.reward
  c.rollout = ml_collections.ConfigDict(dict(demo.rollout.to_dict(), temperature=demo.eval.temperature))
  c.engine.update(demo.engine.to_dict())
  c.eval.num_samples = demo.eval.samples
  c.eval.pass_k = tuple(sorted({1, demo.eval.samples}))
  return c
