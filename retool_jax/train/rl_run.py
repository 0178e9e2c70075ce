"""`python -m retool_jax.train --config=configs/retool_qwen3_4b_rl.py`: an RL run from a config.

Builds the policy (a checkpoint, or a random preset for smoke tests), the engine (embedded, or an SGLang server
when `engine.sglang_url` is set), per-trajectory interpreter sessions, the reward and the prompt stream, then
runs `RLTrainer` steps with metrics and checkpoints in `workdir`.

Prompts come from the shared `InputPipeline` (`prompt_pipeline`): reshuffled every pass by `(seed, pass)`,
passes end to end, `rl.num_prompts` per sampling round over all hosts, each host rolling out its own slice.

Checkpoints are numbered by RL step and hold the policy (and, for PPO, the critic under `critic_checkpoints/`)
with its optimizer state, RNG and the prompt pipeline's position. A run started again in the same `workdir`
resumes from the latest step both hold: the reference model is rebuilt from `model.checkpoint`, the engine gets
the restored weights, and the prompt pipeline and sampling seeds continue where they were, so the resumed run
logs the metrics an uninterrupted one would (wall-clock figures aside).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from retool_jax import sharding as sharding_lib
from retool_jax.assets import QWEN3_TOKENIZER_DIR
from retool_jax.chat import load_tokenizer, render_ids
from retool_jax.chat.prompt_contract import record_rl_contract
from retool_jax.data.math_datasets import load_math
from retool_jax.data.pipeline import InputPipeline
from retool_jax.models.qwen3 import Qwen3
from retool_jax.programs import Program
from retool_jax.rewards import get_reward
from retool_jax.rollout import JaxEngine, MultiTurnConfig, SGLangEngine
from retool_jax.rollout.engine_programs import engine_programs
from retool_jax.rollout.multiturn import TOOL_MODES, tools_for
from retool_jax.rollout.sglang_engine import SGLangOptions
from retool_jax.train import abstract, build, loop, multihost, value_head
from retool_jax.train import rl as rl_lib
from retool_jax.train import state as state_lib
from retool_jax.train.rl import RLTrainer
from retool_jax.train.rl_agent import split_agent
from retool_jax.train.rl_batch import bucket_length
from retool_jax.train.rl_config import RLConfig
from retool_jax.train.value_head import Critic, CriticConfig, ValueModel, create_critic_state

FREE_FORM = ("rl", "rollout", "model.overrides")  # checked by RLConfig / MultiTurnConfig / Qwen3Config


def default_config() -> ml_collections.ConfigDict:
  """Every field an RL run reads, with its default."""
  c = ml_collections.ConfigDict()
  c.trainer = "rl"
  c.workdir = "runs/rl"
  c.seed = 0
  c.num_steps = 100  # RL steps (one rollout batch each)
  c.model = build.model_fields()  # checkpoint / preset / overrides / dtypes / remat, as for SFT
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # math problems (json / jsonl / parquet), e.g. DAPO-Math-17k
  c.data.prompt_style = "retool"  # raw | retool (see retool_jax.data.prompts)
  c.data.limit = 0
  c.data.tokenizer = ""  # "" = the packaged Qwen3 tokenizer
  c.engine = ml_collections.ConfigDict()
  c.engine.sglang_url = ""  # "" = the embedded JAX engine
  c.engine.sync_dir = ""  # SGLang: weights go to <sync_dir>/weight_v<step>; "" = <workdir>/weight_sync
  c.engine.sync_dtype = "bfloat16"  # SGLang: dtype of the synced weights
  c.engine.max_batch_size = 256
  c.engine.decode_chunk = 32
  c.engine.kv_cache_gib = 0.0  # embedded: KV memory per device for slots and kept prefixes; 0 = sized by the slots
  c.engine.prefix_pool = -1  # embedded: rows of kept prefixes beyond the slots; -1 = what kv_cache_gib leaves
  c.reward = "retool"  # a registered reward name, "module:function", or a weighted sum "retool + 0.5 * format"
  # interpreter: a sandboxed session per trajectory (state kept between its calls) | interpreter_stateless: every
  # call in a fresh sandboxed interpreter (no session start-up per trajectory) | none (no tool schema in the prompt)
  c.tools = "interpreter"
  c.tools_in_prompt = True  # False: the tools run, their schemas stay out of the prompt (the bare problem)
  c.rollout = ml_collections.ConfigDict()  # MultiTurnConfig fields
  c.rl = ml_collections.ConfigDict()  # RLConfig fields
  c.reference = ml_collections.ConfigDict(dict(offload=False))  # offload: park it in host memory between uses
  c.optim = build.optim_fields(1e-6, weight_decay=0.01)
  c.lora = build.lora_fields()  # rank 0 = full fine-tuning; else only adapters train (merged on export)
  # PPO only (rl.algorithm="ppo"): a value model built like the policy (same checkpoint / preset) plus a head.
  c.critic = ml_collections.ConfigDict()
  c.critic.clip_value = 0.2  # value clipping around the rollout-time values; 0 = unclipped
  c.critic.whiten_advantages = True
  c.critic.head_init_scale = 0.0  # 0 = a zero-initialised value head
  c.critic.optim = build.optim_fields(1e-5, weight_decay=0.01)
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=20, keep=3, async_save=True))  # every N RL steps
  c.log = build.log_fields()
  return c


def build_critic(c: ml_collections.ConfigDict, mesh: Any, total_updates: int) -> Any:
  """The PPO critic: a second copy of the policy's backbone with a value head, and its own AdamW."""
  backbone = build.build_model(c.model, mesh, c.seed)
  value_model = ValueModel(backbone, rngs=nnx.Rngs(c.seed + 1), init_scale=c.critic.head_init_scale)
  tx, _ = state_lib.make_optimizer(c.critic.optim.to_dict(), total_updates)
  state = create_critic_state(value_model, tx, jax.random.key(c.seed + 1), mesh)
  config = CriticConfig(clip_value=c.critic.clip_value or None, whiten_advantages=c.critic.whiten_advantages)
  return Critic(state, config)


def prompt_item(example: Any) -> dict[str, Any]:
  """What `RLTrainer` samples from: the prompt and the answer the reward checks against."""
  return {"prompt": example.prompt, "answer": example.ground_truth}


def prompt_pipeline(
  examples: Sequence[Any],
  *,
  num_prompts: int,
  seed: int,
  process_index: int | None = None,
  process_count: int | None = None,
) -> InputPipeline:
  """The prompts, `num_prompts` per draw over all hosts (this host's slice of each), without end: a fresh
  shuffle by `(seed, pass)` each pass, passes laid end to end (``carry``) so every draw is whole."""
  if not examples:
    raise ValueError("no prompts to train on")
  return InputPipeline(
    examples,
    global_batch_size=num_prompts,
    seed=seed,
    remainder="carry",
    num_epochs=None,
    process_index=process_index,
    process_count=process_count,
    transform=prompt_item,
    collate=list,
  )


TOOLS = TOOL_MODES


def engine_memory(engine: ml_collections.ConfigDict) -> dict[str, Any]:
  """The embedded engine's KV budget and kept-prefix pool from `config.engine` (unset: the engine's defaults)."""
  return dict(
    kv_cache_gib=engine.kv_cache_gib or None, prefix_pool=None if engine.prefix_pool < 0 else engine.prefix_pool
  )


def prompt_length(multiturn: Any) -> int:
  """The longest first-turn prompt a run sends the engine: the context left after the response budget."""
  if multiturn.max_response_tokens:
    return max(1, multiturn.max_context - multiturn.max_response_tokens)
  return max(1, multiturn.max_context // 8)


def programs(config: ml_collections.ConfigDict, mesh: Any) -> list[Any]:
  """The programs an RL run of `config` executes on `mesh`, with abstract arguments (see `retool_jax.aot`):
  the policy's log-probs over a rollout batch, the reference's (with a KL term), one policy update per
  minibatch, PPO's critic values and update, and the embedded engine's first-turn prefill and decode.

  Rollout batches are padded to the context limit (`rollout.max_context`, bucketed to `rl.length_multiple`),
  the longest a run sees."""
  c = config
  rl = RLConfig.from_config(c.rl)
  rollout, agent = split_agent(c.rollout)
  multiturn = MultiTurnConfig.from_config(rollout)
  cfg = abstract.model_config(c.model)
  updates = max(c.num_steps * rl.num_minibatches * rl.num_epochs, c.optim.warmup_steps + 1)
  tx, _ = state_lib.make_optimizer(c.optim.to_dict(), updates)
  model = abstract.abstract_model(cfg, mesh)
  state, shardings = abstract.abstract_train_state(model, tx, mesh, lora_config=build.lora_config(c.lora))
  t = bucket_length(multiturn.max_context - 1, rl.length_multiple)
  n, m = rl.batch_size, rl.minibatch_size

  def rows(b: int, *names_dtypes: tuple[str, Any]) -> dict[str, Any]:
    return {name: abstract.batch((b, t), dtype, mesh) for name, dtype in names_dtypes}

  inputs = (("input_ids_BT", jnp.int32), ("targets_BT", jnp.int32))
  inputs += (("segment_ids_BT", jnp.int32), ("positions_BT", jnp.int32))
  floats = ("loss_mask_BT", "rollout_logp_BT", "old_logp_BT", "adv_BT")
  if rl.loss.kl_coef > 0:
    floats += ("ref_logp_BT",)
  temperature = float(multiturn.temperature)
  # What stays on the devices through a step: the policy's state, the engine's weights, reference and critic.
  critic_state = None
  if rl.algorithm == "ppo":
    head = c.critic.head_init_scale
    critic_model = abstract.abstract_module(
      lambda: value_head.ValueModel(Qwen3(cfg, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(1), init_scale=head), mesh
    )
    ctx, _ = state_lib.make_optimizer(c.critic.optim.to_dict(), max(updates, c.critic.optim.warmup_steps + 1))
    critic_state, _ = abstract.abstract_train_state(critic_model, ctx, mesh)
  held = {
    "policy": state,
    "engine": None if c.engine.sglang_url else nnx.split(model)[1],
    "reference": state.params if rl.needs_reference and not c.reference.offload else None,
    "critic": critic_state,
  }

  def others(own: str) -> tuple[Any, ...]:
    return tuple(v for k, v in held.items() if k != own and v is not None)

  out = [
    Program(
      "rl/policy_logprobs",
      rl_lib.policy_logprobs,
      (state, rows(n, *inputs)),
      dict(temperature=temperature, chunk=rl.logprob_chunk, micro_batches=rl.micro_batches(n)),
      others("policy"),
    )
  ]
  if rl.needs_reference:
    reference = state_lib.ReferenceModel(state.graphdef, state.params, shardings.params)
    full = rows(n, *inputs)
    out.append(
      Program(
        "rl/reference_logprobs",
        reference._fn,
        (
          state.params,
          full["input_ids_BT"],
          full["targets_BT"],
          full["positions_BT"],
          full["segment_ids_BT"],
          None,
        ),
        dict(temperature=temperature, chunk_size=rl.logprob_chunk, micro_batches=rl.micro_batches(n)),
        others("reference"),
      )
    )
  out.append(
    Program(
      "rl/policy_update",
      rl_lib.policy_update,
      (state, rows(m, *inputs, *((f, jnp.float32) for f in floats))),
      dict(
        loss_config=rl.loss, temperature=temperature, chunk=rl.logprob_chunk, micro_batches=rl.micro_batches(m)
      ),
      others("policy"),
    )
  )
  if critic_state is not None:
    critic_inputs = (("input_ids_BT", jnp.int32), ("segment_ids_BT", jnp.int32), ("positions_BT", jnp.int32))
    critic_floats = (("loss_mask_BT", jnp.float32), ("old_values_BT", jnp.float32), ("returns_BT", jnp.float32))
    clip = abstract.batch((), jnp.float32, mesh, sharded=False)
    out += [
      Program(
        "ppo/critic_values",
        value_head.critic_values,
        (critic_state, rows(n, *critic_inputs)),
        dict(micro_batches=rl.micro_batches(n)),
        others("critic"),
      ),
      Program(
        "ppo/critic_update",
        value_head.critic_update,
        (critic_state, rows(m, *critic_inputs, *critic_floats), clip),
        dict(micro_batches=rl.micro_batches(m)),
        others("critic"),
      ),
    ]
  if not c.engine.sglang_url:
    prompt = prompt_length(multiturn)
    budget = [multiturn.max_context - prompt, multiturn.max_new_tokens, multiturn.max_response_tokens]
    out += engine_programs(
      model,
      mesh,
      max_batch_size=min(c.engine.max_batch_size, n),
      prompt_len=prompt,
      max_length=prompt + min(b for b in budget if b),
      decode_chunk=c.engine.decode_chunk,
      num_stop_ids=1 + len(multiturn.stop_token_ids),
      **engine_memory(c.engine),
      resident=others("engine"),
    )
  return out


def train(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Runs `config.num_steps` RL steps; returns the last step's metrics."""
  c = config
  rl = RLConfig.from_config(c.rl)
  rollout, agent = split_agent(c.rollout)
  multiturn = MultiTurnConfig.from_config(rollout)
  if not c.data.path:
    raise ValueError("config.data.path is empty: RL needs prompts with answers")
  if c.tools not in TOOLS:
    raise ValueError(f"config.tools={c.tools!r}; expected one of {TOOLS}")
  workdir = Path(c.workdir)
  tokenizer = load_tokenizer(c.data.tokenizer or QWEN3_TOKENIZER_DIR)
  examples = load_math(c.data.path, prompt_style=c.data.prompt_style, limit=c.data.limit or None)
  if not c.tools_in_prompt:  # rendered here, so the rollouts do not add the tools' schemas
    thinking = multiturn.enable_thinking
    examples = [
      dataclasses.replace(e, prompt=render_ids(tokenizer, e.prompt, enable_thinking=thinking)) for e in examples
    ]
  if rl.num_prompts % jax.process_count():
    raise ValueError(f"rl.num_prompts={rl.num_prompts} must be a multiple of the {jax.process_count()} hosts")
  prompts = prompt_pipeline(examples, num_prompts=rl.num_prompts, seed=c.seed)
  mesh = sharding_lib.make_mesh(**c.mesh.to_dict())
  model = build.build_model(c.model, mesh, c.seed)
  updates = c.num_steps * rl.num_minibatches * rl.num_epochs
  tx, _ = state_lib.make_optimizer(c.optim.to_dict(), updates)
  root = jax.random.key(c.seed)
  state, shardings = state_lib.create_train_state(
    model, tx, root, mesh, lora_config=build.lora_config(c.lora), lora_rng=jax.random.fold_in(root, 2)
  )
  # the reference is the starting policy: built before any restore
  reference = state_lib.make_reference(float(rl.needs_reference), state, shardings, offload=c.reference.offload)
  critic = build_critic(c, mesh, updates) if rl.algorithm == "ppo" else None

  if c.engine.sglang_url:
    sync_dir = c.engine.sync_dir or str((workdir / "weight_sync").absolute())  # the server must read it
    options = SGLangOptions(sync_dir=sync_dir, sync_dtype=c.engine.sync_dtype)
    engine = SGLangEngine(c.engine.sglang_url, model_config=model.config, options=options)
    asyncio.run(engine.start())  # waits for the server; checks that it serves the policy's architecture
  else:

    def embedded(policy):
      return JaxEngine(
        policy,
        tokenizer=tokenizer,
        max_length=multiturn.max_context,
        max_batch_size=c.engine.max_batch_size,
        decode_chunk=c.engine.decode_chunk,
        seed=c.seed,
        **engine_memory(c.engine),
      )

    # several processes: one engine per process, on its own devices, generating its share of the prompts
    engine = embedded(model) if jax.process_count() == 1 else multihost.ProcessLocalEngine(embedded, model, mesh)
  trainer = RLTrainer(
    rl,
    state,
    engine=engine,
    tokenizer=tokenizer,
    tools=tools_for(c.tools),
    multiturn=multiturn,
    reward_fn=get_reward(c.reward),
    prompts=prompts,
    reference=reference,
    critic=critic,
    step_count=0,
    agent=agent,
  )

  def restore(record: dict[str, Any], start: int) -> None:
    prompts.restore(record["data"])
    trainer.step_count = start
    trainer.prompts_used = int(record["data"].get("prompts_used", 0))
    # an asynchronous run's batches in flight at the save are sampled again from the saved position: counted
    trainer.replayed_batches = max(int(record["data"].get("async_drawn", start)) - start, 0)
    trainer.sync_weights()  # the engine starts from the restored policy

  saved = [loop.Saved("checkpoints", lambda: trainer.state, lambda s: setattr(trainer, "state", s), shardings)]
  if critic is not None:
    saved.append(loop.Saved("critic_checkpoints", lambda: critic.state, lambda s: setattr(critic, "state", s)))
  task = loop.Task(
    name=f"rl:{rl.algorithm}",
    num_steps=c.num_steps,
    model_config=model.config,
    step=trainer.step,
    saved=saved,
    position=trainer.position,
    restore=restore,
    log_every=c.log.every_steps,
    progress={
      "reward": ("reward_mean", "+.3f"),
      "acc": ("accuracy", ".3f"),
      "tools": ("tool_calls_per_traj", ".2f"),
      "len": ("response_length", ".0f"),
    },
    close=trainer.close,
  )
  return loop.run(c, task, mesh, contract=lambda workdir: record_rl_contract(workdir, c, multiturn))
