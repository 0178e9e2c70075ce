"""`python -m retool_jax.train --config=configs/retool_qwen3_4b_rl.py`: an RL run from a config.

Builds the policy (a checkpoint, or a random preset for smoke tests), the engine (embedded, or an SGLang server
when `engine.sglang_url` is set), per-trajectory interpreter sessions, the reward and the prompt stream, then
runs `RLTrainer` steps with metrics and checkpoints in `workdir`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np

from retool_jax.train import sft
from retool_jax.train.rl import RLConfig, RLTrainer

FREE_FORM = ("rl", "rollout", "model.overrides")  # checked by RLConfig / MultiTurnConfig / Qwen3Config


def default_config() -> ml_collections.ConfigDict:
  """Every field an RL run reads, with its default."""
  c = ml_collections.ConfigDict()
  c.trainer = "rl"
  c.workdir = "runs/rl"
  c.seed = 0
  c.num_steps = 100  # RL steps (one rollout batch each)
  c.model = sft.default_config().model  # checkpoint / preset / overrides / dtypes / remat, as for SFT
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # math problems (json / jsonl / parquet), e.g. DAPO-Math-17k
  c.data.prompt_style = "retool"  # raw | retool (see retool_jax.data.prompts)
  c.data.limit = 0
  c.data.tokenizer = ""  # "" = the packaged Qwen3 tokenizer
  c.engine = ml_collections.ConfigDict()
  c.engine.sglang_url = ""  # "" = the embedded JAX engine
  c.engine.max_batch_size = 256
  c.engine.decode_chunk = 32
  c.reward = "retool"  # a registered reward name or "module:function"
  c.rollout = ml_collections.ConfigDict()  # MultiTurnConfig fields
  c.rl = ml_collections.ConfigDict()  # RLConfig fields
  c.reference = ml_collections.ConfigDict(dict(offload=False))
  c.optim = _optim(1e-6)
  # PPO only (rl.algorithm="ppo"): a value model built like the policy (same checkpoint / preset) plus a head.
  c.critic = ml_collections.ConfigDict()
  c.critic.clip_value = 0.2  # value clipping around the rollout-time values; 0 = unclipped
  c.critic.whiten_advantages = True
  c.critic.head_init_scale = 0.0  # 0 = a zero-initialised value head
  c.critic.optim = _optim(1e-5)
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=20, keep=3, async_save=True))
  c.log = ml_collections.ConfigDict(dict(tensorboard=True))
  return c


def _optim(learning_rate: float) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      schedule="constant",
      learning_rate=learning_rate,
      warmup_steps=0,
      decay_steps=0,
      end_lr_factor=0.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.01,
      grad_clip_norm=1.0,
    )
  )


def build_critic(c: ml_collections.ConfigDict, mesh: Any, total_updates: int) -> Any:
  """The PPO critic: a second copy of the policy's backbone with a value head, and its own AdamW."""
  from flax import nnx  # noqa: PLC0415

  from retool_jax.train import state as state_lib  # noqa: PLC0415
  from retool_jax.train.value_head import Critic, CriticConfig, ValueModel, create_critic_state  # noqa: PLC0415

  backbone = sft.build_model(c.model, mesh, c.seed)
  value_model = ValueModel(backbone, rngs=nnx.Rngs(c.seed + 1), init_scale=c.critic.head_init_scale)
  tx, _ = state_lib.make_optimizer(c.critic.optim.to_dict(), total_updates)
  state = create_critic_state(value_model, tx, jax.random.key(c.seed + 1), mesh)
  config = CriticConfig(clip_value=c.critic.clip_value or None, whiten_advantages=c.critic.whiten_advantages)
  return Critic(state, config)


def _prompt_batches(examples: list[Any], size: int, seed: int):
  rng = np.random.default_rng(seed)
  while True:
    for i in rng.permutation(len(examples)):
      yield [{"prompt": examples[i].prompt, "answer": examples[i].ground_truth}]


def train(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Runs `config.num_steps` RL steps; returns the last step's metrics."""
  from retool_jax import sharding as sharding_lib  # noqa: PLC0415
  from retool_jax.assets import QWEN3_TOKENIZER_DIR  # noqa: PLC0415
  from retool_jax.chat import load_tokenizer  # noqa: PLC0415
  from retool_jax.data.math_datasets import load_math  # noqa: PLC0415
  from retool_jax.rewards import get_reward  # noqa: PLC0415
  from retool_jax.rollout import JaxEngine, MultiTurnConfig, SGLangEngine  # noqa: PLC0415
  from retool_jax.rollout.multiturn import session_tools  # noqa: PLC0415
  from retool_jax.sandbox import default_sandbox  # noqa: PLC0415
  from retool_jax.train import state as state_lib  # noqa: PLC0415
  from retool_jax.train.checkpointing import Checkpointer  # noqa: PLC0415
  from retool_jax.train.metrics import MetricsWriter  # noqa: PLC0415

  c = config
  rl = RLConfig.from_config(c.rl)
  multiturn = MultiTurnConfig.from_config(c.rollout)
  if not c.data.path:
    raise ValueError("config.data.path is empty: RL needs prompts with answers")
  tokenizer = load_tokenizer(c.data.tokenizer or QWEN3_TOKENIZER_DIR)
  examples = load_math(c.data.path, prompt_style=c.data.prompt_style, limit=c.data.limit or None)
  mesh = sharding_lib.make_mesh(**c.mesh.to_dict())
  model = sft.build_model(c.model, mesh, c.seed)
  updates = c.num_steps * rl.num_minibatches * rl.num_epochs
  tx, _ = state_lib.make_optimizer(c.optim.to_dict(), updates)
  state, shardings = state_lib.create_train_state(model, tx, jax.random.key(c.seed), mesh)
  reference = state_lib.make_reference(float(rl.needs_reference), state, shardings, offload=c.reference.offload)
  critic = build_critic(c, mesh, updates) if rl.algorithm == "ppo" else None
  if c.engine.sglang_url:
    engine = SGLangEngine(c.engine.sglang_url, model_config=model.config)
  else:
    engine = JaxEngine(
      model,
      tokenizer=tokenizer,
      max_length=multiturn.max_context,
      max_batch_size=c.engine.max_batch_size,
      decode_chunk=c.engine.decode_chunk,
      seed=c.seed,
    )
  trainer = RLTrainer(
    rl,
    state,
    engine=engine,
    tokenizer=tokenizer,
    tools=session_tools(default_sandbox()),
    multiturn=multiturn,
    reward_fn=get_reward(c.reward),
    prompts=_prompt_batches(examples, rl.num_prompts, c.seed),
    reference=reference,
    critic=critic,
  )

  def checkpointer(name: str) -> Checkpointer:
    cc = c.checkpoint
    return Checkpointer(Path(c.workdir) / name, save_every=cc.every_steps, keep=cc.keep, async_save=cc.async_save)

  ckpt = checkpointer("checkpoints")
  critic_ckpt = checkpointer("critic_checkpoints") if critic is not None else None
  metrics: dict[str, Any] = {}
  with MetricsWriter(c.workdir, tensorboard=c.log.tensorboard) as writer:
    for step in range(1, c.num_steps + 1):
      metrics = trainer.step()
      writer.write(step, metrics)
      ckpt.save(trainer.state, model.config, extra={"rl_step": step}, force=step == c.num_steps)
      if critic is not None:
        critic_ckpt.save(critic.state, model.config, extra={"rl_step": step}, force=step == c.num_steps)
  ckpt.close()
  if critic_ckpt is not None:
    critic_ckpt.close()
  trainer.close()
  return metrics
