"""Reinforcement learning with tool-using rollouts: GRPO, Dr. GRPO, RLOO and DAPO (and PPO with a critic).

One step: roll out `num_prompts x group_size` trajectories with the configured engine (tools run in the
sandbox while the model decodes) -> score them (verified correctness kept apart from the shaped reward) ->
advantages -> `num_epochs x num_minibatches` clipped policy-gradient updates, with the old log-probs
recomputed by the trainer -> weight sync to the engine (in memory for the embedded engine, the disk protocol
for SGLang).

On several hosts each host rolls out and scores its own share of the prompts (its slice of the prompt
`InputPipeline`, whole groups), then the hosts exchange their trajectories (`multihost.gather_rows`), so every
host builds the same global batch, in host order, and computes group advantages and updates on it. On one
process nothing is exchanged.

    trainer = RLTrainer(RLConfig.from_config(config.rl), state, engine=engine, tokenizer=tokenizer,
                        tools=tools, multiturn=MultiTurnConfig(...), reward_fn=get_reward("retool"),
                        prompts=batches)
    for _ in range(steps):
      metrics = trainer.step()
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from retool_jax.data.batch import FIELDS
from retool_jax.data.pipeline import InputPipeline
from retool_jax.models.logprobs import token_logprobs
from retool_jax.rollout import MultiTurnConfig
from retool_jax.rollout.scoring import metrics_of_stats, rollout_and_score, rollout_stats
from retool_jax.train import advantages as adv_lib
from retool_jax.train import dapo, microbatch, multihost, rl_agent, rl_async
from retool_jax.train.losses import PolicyLossConfig, policy_loss
from retool_jax.train.rl_batch import minibatch_indices, pack_rollouts
from retool_jax.train.rl_config import RLConfig
from retool_jax.train.state import TrainState

# ---- jitted pieces ----------------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("temperature", "chunk", "with_entropy", "micro_batches"))
def policy_logprobs(
  state: TrainState,
  batch: Mapping[str, jax.Array],
  *,
  temperature: float,
  chunk: int,
  with_entropy: bool = False,
  micro_batches: int = 1,
):
  """Per-token log-probs (and entropies) of the targets under the state's current weights, computed
  `micro_batches` row groups at a time."""
  model = state.model()

  def run(mb):
    out = token_logprobs(
      model,
      mb["input_ids_BT"],
      mb["targets_BT"],
      positions=mb["positions_BT"],
      segment_ids=mb["segment_ids_BT"],
      temperature=temperature,
      chunk_size=chunk,
      with_entropy=with_entropy,
    )
    return out.logprobs_BT, out.entropy_BT

  inputs = {k: batch[k] for k in FIELDS if k != "loss_mask_BT"}
  return microbatch.map_rows(run, inputs, micro_batches)


@functools.partial(
  jax.jit, static_argnames=("loss_config", "temperature", "chunk", "micro_batches"), donate_argnames=("state",)
)
def policy_update(
  state: TrainState,
  batch: Mapping[str, jax.Array],
  *,
  loss_config: PolicyLossConfig,
  temperature: float,
  chunk: int,
  micro_batches: int = 1,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the clipped policy-gradient loss of `batch`.

  With `micro_batches > 1` the gradient is accumulated over that many row groups, each normalised by the
  whole batch's token (or sequence) count, so the update equals the one-pass update; the ratio / clip metrics
  are then means over the micro-batches (`ratio_max` their maximum, the losses their sum).
  """
  mask_BT = batch["loss_mask_BT"]
  num_tokens = num_seqs = None
  if micro_batches > 1:
    num_tokens = jnp.maximum(jnp.sum(mask_BT > 0), 1).astype(jnp.float32)
    num_seqs = jnp.maximum(jnp.sum(jnp.any(mask_BT > 0, axis=1)), 1).astype(jnp.float32)

  def loss_fn(trainable, mb):
    out = token_logprobs(
      state.model(trainable),
      mb["input_ids_BT"],
      mb["targets_BT"],
      positions=mb["positions_BT"],
      segment_ids=mb["segment_ids_BT"],
      temperature=temperature,
      chunk_size=chunk,
      with_entropy=True,
    )
    return policy_loss(
      out.logprobs_BT,
      mb["old_logp_BT"],
      mb["adv_BT"],
      mb["loss_mask_BT"],
      loss_config,
      ref_logp_BT=mb.get("ref_logp_BT"),
      entropy_BT=out.entropy_BT,
      rollout_logp_BT=mb["rollout_logp_BT"],
      num_tokens=num_tokens,
      num_seqs=num_seqs,
    )

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if micro_batches == 1:
    (loss, metrics), grads = grad_fn(state.trainable, batch)
  else:

    def body(carry, mb):
      (loss, metrics), grads = grad_fn(state.trainable, microbatch.constrain_rows(mb))
      acc_grads, acc_loss = carry
      return (jax.tree.map(jnp.add, acc_grads, grads), acc_loss + loss), metrics

    zeros = (jax.tree.map(jnp.zeros_like, state.trainable), jnp.zeros((), jnp.float32))
    (grads, loss), per_mb = jax.lax.scan(body, zeros, microbatch.split_rows(dict(batch), micro_batches))
    reduce = {"ratio_max": jnp.max, "pg_loss": jnp.sum, "kl_loss": jnp.sum}  # partial losses add up
    metrics = {k: reduce.get(k, jnp.mean)(v) for k, v in per_mb.items()}
  metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))
  return state.apply_gradients(grads), metrics


# ---- the trainer ------------------------------------------------------------------------------------

PromptBatch = Sequence[Mapping[str, Any]]  # items with "prompt" (ids or chat messages) and "answer"


class RLTrainer:
  """Runs RL steps; owns the train state, the engine's weight version and an event loop for the rollouts.

  Args:
    config: the `RLConfig`.
    state: the policy's `TrainState`.
    engine: a `JaxEngine` or `SGLangEngine` (anything with `generate` / `update_weights`).
    tokenizer: the policy's tokenizer.
    tools: a tool registry or per-trajectory factory for `generate_multiturn`.
    multiturn: limits and sampling of the rollouts (its `temperature` is also the trainer's).
    reward_fn: `fn(response, ground_truth, info) -> RewardResult`.
    prompts: an `InputPipeline` of prompt items (`prompt` and `answer`) with `global_batch_size ==
      num_prompts`, read one global batch (this host's slice) per sampling round, whose `state()` is part of
      `position()`; or any iterator of prompt batches, regrouped into this host's `num_prompts / hosts`.
    reference: a `ReferenceModel` (needed when the config uses a KL term).
    critic: a `Critic` (needed for PPO).
    step_count: RL steps already taken (a resumed run's; default: derived from the state's optimizer step).
      Sampling seeds and minibatch orders are functions of `(config.seed, step)`, so a resumed run draws what
      an uninterrupted one would, given `prompts` restored to the position it had saved.
    gather: how hosts exchange their trajectories (see `multihost`); default `process_allgather` on a
      multi-process run and nothing on one process.
    agent: a user's agent drives the rollouts instead of the framework's multi-turn loop (`rl_agent`).
  """

  def __init__(
    self,
    config: RLConfig,
    state: TrainState,
    *,
    engine: Any,
    tokenizer: Any,
    tools: Any,
    multiturn: MultiTurnConfig,
    reward_fn: Any,
    prompts: InputPipeline | Iterator[PromptBatch],
    reference: Any = None,
    critic: Any = None,
    pad_id: int | None = None,
    step_count: int | None = None,
    gather: multihost.Gather | None = None,
    agent: rl_agent.AgentSpec | None = None,
  ):
    if config.needs_reference and reference is None:
      raise ValueError(
        "the RL config uses a KL term (rl.loss.kl_coef or rl.kl_reward_coef) but no reference model was given"
      )
    if config.algorithm == "ppo" and critic is None:
      raise ValueError("rl.algorithm='ppo' needs a critic")
    self.config, self.state, self.engine = config, state, engine
    self.tokenizer, self.tools, self.reward_fn = tokenizer, tools, reward_fn
    self.multiturn = multiturn
    self.agent = agent
    self.reference, self.critic = reference, critic
    self.pad_id = tokenizer.pad_token_id if pad_id is None else pad_id
    self.pipeline = prompts if isinstance(prompts, InputPipeline) else None
    if self.pipeline is not None:
      if self.pipeline.global_batch_size != config.num_prompts:
        raise ValueError(
          f"the prompt pipeline's global_batch_size={self.pipeline.global_batch_size} is not "
          f"rl.num_prompts={config.num_prompts}"
        )
      self._host, self._hosts = self.pipeline.process_index, self.pipeline.process_count
      self._prompts = (batch.examples for batch in self.pipeline)
    else:
      self._host, self._hosts = jax.process_index(), jax.process_count()
      if config.num_prompts % self._hosts:
        raise ValueError(f"rl.num_prompts={config.num_prompts} does not split over {self._hosts} hosts")
      self._prompts = _regroup(prompts, config.num_prompts // self._hosts)
    self._gather = gather if gather is not None else multihost.default_gather()
    self._mesh = multihost.mesh_of(state.params) if jax.process_count() > 1 else None
    self._loop = asyncio.new_event_loop()
    if step_count is None:
      step_count = int(jax.device_get(state.step)) // (config.num_minibatches * config.num_epochs)
    self.step_count = step_count
    self.prompts_used = 0  # prompts drawn by this trainer, over all hosts
    if config.max_staleness > 0 and jax.process_count() > 1:
      raise ValueError("rl.max_staleness > 0 (asynchronous RL) runs on one process; set it to 0 on several")
    self._producer: rl_async.RolloutProducer | None = None
    self._consumed_position: dict[str, Any] = {}
    self.dropped_batches = 0  # sampled batches older than max_staleness when their turn came
    self.replayed_batches = 0  # batches in flight when a resumed run was saved, sampled again
    self._trainer_busy_s = 0.0
    self._async_started = 0.0

  def position(self) -> dict[str, int]:
    """Where the run is (what a checkpoint needs to resume exactly): RL steps taken, prompts drawn and, with a
    prompt pipeline, its `state()`."""
    position = {"rl_step": self.step_count, "prompts_used": self.prompts_used}
    if self._producer is not None:  # the producer reads ahead: the data stands after the batches trained on
      return position | self._consumed_position | {"async_drawn": self._producer.drawn}
    return position | self.pipeline.state() if self.pipeline is not None else position

  def close(self) -> None:
    """Stops the rollout producer and what the rollouts left running on the trainer's event loop (e.g. the
    engine's batcher)."""
    if self._producer is not None:
      self._producer.stop()
    pending = asyncio.all_tasks(self._loop)
    for task in pending:
      task.cancel()

    async def drain():
      await asyncio.gather(*pending, return_exceptions=True)

    self._loop.run_until_complete(drain())
    self._loop.close()

  # -- rollout ---------------------------------------------------------------------------------------

  async def _sample_groups(
    self, items: PromptBatch, round_: int, index: int, **rollout: Any
  ) -> tuple[list, list, list[str]]:
    """Rolls out `group_size` trajectories per prompt of this host's slice, for batch `index` (the RL step it is
    drawn for). Trajectory `k` of the prompt in global slot `s` (host `h` of `P` holds slots `h, h + P, ...`)
    samples with seeds derived from `(seed, index, round, s * group_size + k)` alone, so the tokens do not
    depend on the number of hosts. `rollout` overrides `MultiTurnConfig` fields (weight pinning)."""
    g = self.config.group_size
    seed = self.config.seed + 7919 * (index * self.config.max_sampling_rounds + round_)
    base = (seed * 1000 * len(items) * self._hosts * g) % (2**31)
    answers = [str(it["answer"]) for it in items for _ in range(g)]

    def group(j: int) -> MultiTurnConfig:  # trajectory k of the group samples with base + 1000 * (s * g + k)
      return dataclasses.replace(self.multiturn, seed=base + 1000 * (self._host + self._hosts * j) * g, **rollout)

    if self._hosts == 1:  # one call: trajectory i of the batch is trajectory i of the global batch
      calls = [([it["prompt"] for it in items for _ in range(g)], answers, group(0))]
    else:
      calls = [([it["prompt"]] * g, answers[j * g : (j + 1) * g], group(j)) for j, it in enumerate(items)]

    def score(prompts, ans, mt):
      if self.agent is not None:
        return rl_agent.agent_rollout_and_score(
          self.agent, self.engine, prompts, ans, self.tools, mt, self.reward_fn, self.tokenizer
        )
      return rollout_and_score(self.engine, prompts, ans, self.tools, mt, self.reward_fn, self.tokenizer)

    done = await asyncio.gather(*(score(prompts, ans, mt) for prompts, ans, mt in calls))
    rollouts = [r for ro, _ in done for r in ro]
    results = [r for _, res in done for r in res]
    return rollouts, results, answers

  def _collect(self) -> tuple[list, np.ndarray, dict[str, float]]:
    """`_collect_batch` for this step, run to its end."""
    rollouts, rewards, stats, drawn = self._loop.run_until_complete(self._collect_batch(self.step_count))
    self.prompts_used += drawn
    return rollouts, rewards, stats

  async def _collect_batch(self, index: int, **rollout: Any) -> tuple[list, np.ndarray, dict[str, float], int]:
    """Trajectories of whole groups of batch `index` and their training rewards (with dynamic sampling, only
    informative groups), the rollout metrics, and the prompts drawn (over all hosts); on several hosts, every
    host's trajectories, in the order one host would hold them (by sampling round, then global prompt slot)."""
    c, g = self.config, self.config.group_size
    rollouts, rewards, stats = [], [], {}
    all_stats, slots, all_slots = [], [], []
    drawn = 0
    for round_ in range(c.max_sampling_rounds if c.dynamic_sampling else 1):
      items = next(self._prompts)
      drawn += len(items) * self._hosts
      ro, res, _ = await self._sample_groups(items, round_, index, **rollout)
      slot = np.repeat(round_ * c.num_prompts + self._host + self._hosts * np.arange(len(items)), g)
      all_stats.append(rollout_stats(ro, res))
      all_slots.append(slot)
      r = self._training_rewards(ro, res)
      if c.dynamic_sampling:
        keep = np.repeat(dapo.informative_groups(r, g), g)
        ro, r, slot = [x for x, k in zip(ro, keep) if k], r[keep], slot[keep]
      rollouts += ro
      rewards.append(r)
      slots.append(slot)
      stats["sampling_rounds"] = round_ + 1
      kept = len(rollouts) if self._gather is None else multihost.global_sum(len(rollouts), self._gather)
      if kept >= c.batch_size:  # every host takes the same decision
        break
    rewards = np.concatenate(rewards)
    all_stats = {k: np.concatenate([s[k] for s in all_stats]) for k in all_stats[0]}
    if self._gather is not None:
      rollouts, rewards, all_stats = self._gather_hosts(
        rollouts, rewards, np.concatenate(slots), all_stats, np.concatenate(all_slots)
      )
    rewards, rollouts = rewards[: c.batch_size], rollouts[: c.batch_size]
    stats.update(metrics_of_stats(all_stats))
    if c.dynamic_sampling:
      stats["kept_fraction"] = len(rollouts) / max(len(all_stats["reward"]), 1)
    return rollouts, rewards, stats, drawn

  def _gather_hosts(
    self,
    rollouts: Sequence[Any],
    rewards: np.ndarray,
    slots: np.ndarray,
    stats: dict[str, np.ndarray],
    stats_slots: np.ndarray,
  ) -> tuple[list, np.ndarray, dict[str, np.ndarray]]:
    """Every host's trajectories (whole groups), training rewards and rollout figures, ordered by `slots`
    (each row's sampling round and global prompt slot; stable, so a group keeps its order)."""
    fields = {
      "ids": multihost.Ragged.from_rows([r.ids for r in rollouts], np.int32),
      "loss_mask": multihost.Ragged.from_rows([r.loss_mask for r in rollouts], np.float32),
      "logprobs": multihost.Ragged.from_rows([r.logprobs for r in rollouts], np.float32),
      "reward": rewards,
      "slot": slots.astype(np.int64),
    }
    rows = multihost.gather_rows(fields, self._gather)
    trajectories = [
      GatheredRollout(ids, mask, logp)
      for ids, mask, logp in zip(rows["ids"].rows(), rows["loss_mask"].rows(), rows["logprobs"].rows())
    ]
    order = np.argsort(rows["slot"], kind="stable")
    gathered = multihost.gather_rows({**stats, "_slot": stats_slots.astype(np.int64)}, self._gather)
    stats_order = np.argsort(gathered.pop("_slot"), kind="stable")
    return (
      [trajectories[i] for i in order],
      rows["reward"][order],
      {k: v[stats_order] for k, v in gathered.items()},
    )

  def _training_rewards(self, rollouts: Sequence[Any], results: Sequence[Any]) -> np.ndarray:
    r = np.asarray([x.reward for x in results], np.float64)
    o = self.config.overlong
    if o.cache_len > 0:
      r = r + dapo.overlong_penalty(
        [sum(x.loss_mask) for x in rollouts], o.max_len, o.cache_len, penalty=o.penalty
      )
    return r

  # -- advantages ------------------------------------------------------------------------------------

  def _place(self, arrays: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """Host arrays, the same on every host, on device: as they are on one process, replicated global arrays
    over the policy's mesh on several."""
    if self._mesh is None:
      return {k: jnp.asarray(v) for k, v in arrays.items()}
    return multihost.replicate(arrays, self._mesh)

  def _advantages(self, rewards: np.ndarray, batch: dict[str, jax.Array]) -> tuple[jax.Array, dict[str, Any]]:
    c = self.config
    if self._mesh is not None:
      rewards = self._place({"rewards": rewards.astype(np.float32)})["rewards"]
    if c.algorithm == "ppo":
      return self.critic.advantages(rewards, batch, c)
    if c.algorithm == "rloo":
      adv_B = adv_lib.rloo_advantages(rewards, c.group_size)
    else:
      adv_B = adv_lib.grpo_advantages(rewards, c.group_size, normalize_std=c.algorithm == "grpo")
    return adv_lib.broadcast_to_tokens(adv_B, batch["loss_mask_BT"]), {}

  # -- one step --------------------------------------------------------------------------------------

  def step(self) -> dict[str, float]:
    """One rollout batch and its updates; returns the step's metrics."""
    if self.config.max_staleness > 0:
      return self._async_step()
    t0 = time.perf_counter()
    rollouts, rewards, metrics = self._collect()
    return self._train(rollouts, rewards, metrics, t0)

  def _train(self, rollouts: list, rewards: np.ndarray, metrics: dict[str, float], t0: float) -> dict[str, float]:
    """The updates of one rollout batch (sampled since `t0`) and the weight sync; returns the step's metrics."""
    c, temperature = self.config, self.multiturn.temperature
    if len(rollouts) < c.group_size:
      metrics.update({"skipped": 1.0, "time/rollout": time.perf_counter() - t0})
      self.step_count += 1
      if self._producer is not None:
        self.sync_weights()  # the same weights under the new version: the producer may go on
      return metrics
    n = len(rollouts)
    packed = pack_rollouts(rollouts, pad_id=self.pad_id, length_multiple=c.length_multiple)
    batch = self._place(packed.arrays())
    t1 = time.perf_counter()

    batch["old_logp_BT"], _ = policy_logprobs(
      self.state, batch, temperature=temperature, chunk=c.logprob_chunk, micro_batches=c.micro_batches(n)
    )
    if self.reference is not None:
      batch["ref_logp_BT"] = self.reference.logprobs(
        batch["input_ids_BT"],
        batch["targets_BT"],
        positions=batch["positions_BT"],
        segment_ids=batch["segment_ids_BT"],
        temperature=temperature,
        chunk_size=c.logprob_chunk,
        micro_batches=c.micro_batches(n),
      ).logprobs_BT
    batch["adv_BT"], critic_batch = self._advantages(rewards, batch)
    jax.block_until_ready(batch["adv_BT"])
    t2 = time.perf_counter()

    if self.reference is not None and c.loss.kl_coef == 0:
      batch.pop("ref_logp_BT")  # a reward penalty only: the loss does not need it
    update_metrics = []
    order_rng = np.random.default_rng((c.seed, self.step_count))
    for _ in range(c.num_epochs):
      for rows in minibatch_indices(n, c.num_minibatches if n == c.batch_size else 1, order_rng):
        mb = {k: v[rows] for k, v in batch.items()}
        self.state, m = policy_update(
          self.state,
          mb,
          loss_config=c.loss,
          temperature=temperature,
          chunk=c.logprob_chunk,
          micro_batches=c.micro_batches(len(rows)),
        )
        if self.critic is not None:
          critic_rows = {k: v[rows] for k, v in critic_batch.items()}
          m = dict(m, **self.critic.update(critic_rows, micro_batches=c.micro_batches(len(rows))))
        update_metrics.append(m)
    update_metrics = jax.device_get(update_metrics)
    t3 = time.perf_counter()

    self.step_count += 1
    self.sync_weights()
    t4 = time.perf_counter()

    for key in update_metrics[0]:
      metrics[key] = float(np.mean([m[key] for m in update_metrics]))
    tokens = float(np.sum(packed.tokens.segment_ids_BT > 0))
    metrics.update(
      {
        "train_reward_mean": float(rewards.mean()),
        "batch_size": float(n),
        "time/rollout": t1 - t0,
        "time/reference": t2 - t1,
        "time/train": t3 - t2,
        "time/sync": t4 - t3,
        "perf/step_time_s": t4 - t0,
        "perf/tokens_per_s": tokens / (t4 - t0),
        "perf/train_tokens_per_s": c.num_epochs * tokens / max(t3 - t2, 1e-9),
      }
    )
    return metrics

  def sync_weights(self) -> None:
    """Sends the current weights (adapters merged) to the engine as a model, versioned by the RL step."""
    update = self.engine.update_weights(self.state.model(), version=self.step_count)
    if self._producer is None:
      self._loop.run_until_complete(update)
      return
    self._producer.run(update)  # on the producer's loop, between two of its decode chunks
    self._producer.advance(self.step_count)

  # -- asynchronous steps (rl.max_staleness >= 1) -----------------------------------------------------

  def _start_producer(self) -> None:
    c = self.config
    holds_versions = hasattr(self.engine, "keep_versions")  # the embedded engine; SGLang serves one version
    if holds_versions:
      # pinned trajectories wait between turns (tool calls) while K newer versions arrive; following ones
      # finish their current chunk on the version before
      held = c.max_staleness + 2 if c.partial_rollouts == "finish" else 2
      self.engine.keep_versions = max(self.engine.keep_versions, held)
      self.sync_weights()  # the engine's own copy (the trainer's buffers are donated by its updates)

    def weights(version: int) -> dict[str, Any]:  # which weights a batch started on `version` samples with
      if not holds_versions:
        return {}  # every turn runs on what the server holds
      return {"weight_version": version} if c.partial_rollouts == "finish" else {"follow_updates": True}

    async def sample(index: int, version: int):
      result = await self._collect_batch(index, **weights(version))
      return result, self.pipeline.state() if self.pipeline is not None else {}

    self._consumed_position = self.pipeline.state() if self.pipeline is not None else {}
    self._producer = rl_async.RolloutProducer(
      self._loop, sample, max_staleness=c.max_staleness, first_index=self.step_count, version=self.step_count
    )
    self._async_started = time.perf_counter()

  def _async_step(self) -> dict[str, float]:
    """Takes the next sampled batch no older than `max_staleness` versions and trains on it."""
    c = self.config
    if self._producer is None:
      self._start_producer()
    t0 = time.perf_counter()
    while True:
      produced = self._producer.get()
      rollouts, rewards, metrics, drawn = produced.result
      self.prompts_used += drawn
      self._consumed_position = produced.position
      if self.step_count - produced.version <= c.max_staleness:
        break
      self.dropped_batches += 1
    wait = time.perf_counter() - t0
    metrics.update(self._staleness_metrics(rollouts, produced.version))
    metrics = self._train(rollouts, rewards, metrics, t0)
    self._trainer_busy_s += time.perf_counter() - t0 - wait
    elapsed = max(time.perf_counter() - self._async_started, 1e-9)
    metrics.update(
      {
        "async/wait_s": wait,
        "async/dropped_batches": float(self.dropped_batches),
        "async/replayed_batches": float(self.replayed_batches),
        "async/producer_busy": self._producer.busy_fraction(),
        "async/trainer_busy": self._trainer_busy_s / elapsed,
      }
    )
    return metrics

  def _staleness_metrics(self, rollouts: Sequence[Any], version: int) -> dict[str, float]:
    """How old the batch's tokens are when it trains: each token's staleness is the updates made since the
    weights that sampled it (the batch's start version where the engine does not label tokens)."""
    step, k = self.step_count, self.config.max_staleness
    ages = []
    for r in rollouts:
      versions = getattr(r, "token_versions", None) or []
      known = [v for v in versions if isinstance(v, int) and not isinstance(v, bool)]
      ages += [step - v for v in known] if len(known) == len(versions) and known else [step - version]
    ages = np.asarray(ages, np.float64)
    metrics = {
      "async/staleness_mean": float(ages.mean()),
      "async/staleness_max": float(ages.max()),
      "async/off_policy_token_frac": float(np.mean(ages > 0)),
    }
    for age in range(k + 1):
      metrics[f"async/staleness_{age}"] = float(np.mean(ages == age))
    return metrics


@dataclasses.dataclass(frozen=True)
class GatheredRollout:
  """What a policy update needs of a rollout another host sent: tokens, loss mask, engine log-probs."""

  ids: np.ndarray
  loss_mask: np.ndarray
  logprobs: np.ndarray


def _regroup(batches: Iterator[PromptBatch], size: int) -> Iterator[list[Mapping[str, Any]]]:
  """Re-chunks an iterator of prompt batches into lists of exactly `size` items."""
  buffer: list[Mapping[str, Any]] = []
  for items in batches:
    buffer.extend(items)
    while len(buffer) >= size:
      yield buffer[:size]
      buffer = buffer[size:]
  raise ValueError(f"the prompt source ran out ({len(buffer)} prompts left, {size} needed per batch)")
