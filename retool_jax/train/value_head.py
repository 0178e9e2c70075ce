"""PPO's critic: a Qwen3 backbone with a scalar value head, its own optimizer, GAE advantages and value updates.

The value of position `t` is read from the backbone's final hidden state there, the state from which the policy
samples target `t`, so values line up with `mask_BT`. Only policy tokens are time steps: `gae` skips prompt,
tool-output and padding tokens. The sequence reward lands on the last policy token, optionally minus
`kl_reward_coef * (log pi_old - log pi_ref)` on every policy token.

    critic = Critic(create_critic_state(value_model, tx, rng), CriticConfig(clip_value=0.2))
    trainer = RLTrainer(RLConfig(algorithm="ppo", ...), state, critic=critic, ...)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from retool_jax import sharding as sharding_lib
from retool_jax.models.qwen3 import Qwen3
from retool_jax.train import advantages as adv_lib
from retool_jax.train import microbatch
from retool_jax.train.losses import value_loss
from retool_jax.train.masked import masked_mean, masked_var
from retool_jax.train.state import TrainState, create_train_state

CRITIC_INPUTS = ("input_ids_BT", "segment_ids_BT", "positions_BT", "loss_mask_BT")


class ValueModel(nnx.Module):
  """`V(s_t)` for every position: a Qwen3 backbone's final hidden states projected by a `[hidden] -> 1` head."""

  def __init__(self, backbone: Qwen3, *, rngs: nnx.Rngs, init_scale: float = 0.0):
    self.backbone = backbone
    d = backbone.config.hidden_size
    kernel = init_scale * jax.random.normal(rngs.params(), (d,), jnp.float32) / np.sqrt(d)
    self.value_kernel = nnx.Param(kernel.astype(backbone.config.jnp_param_dtype), axes=("embed",))
    self.value_bias = nnx.Param(jnp.zeros((), backbone.config.jnp_param_dtype))

  def __call__(
    self, input_ids_BT: jax.Array, segment_ids_BT: jax.Array | None = None, positions_BT: jax.Array | None = None
  ) -> jax.Array:
    """Values `[B, T]` in float32."""
    h_BTD = self.backbone.forward(input_ids_BT, positions_BT, segment_ids_BT).hidden_BTD
    w_D = self.value_kernel[...].astype(h_BTD.dtype)
    v_BT = jnp.einsum("btd,d->bt", h_BTD, w_D, preferred_element_type=jnp.float32)
    return v_BT + self.value_bias[...].astype(jnp.float32)


@dataclasses.dataclass(frozen=True)
class CriticConfig:
  """How the critic trains and shapes advantages.

  Attributes:
    clip_value: PPO value clipping around the rollout-time values (`None` or <= 0: unclipped).
    whiten_advantages: scale the GAE advantages to zero mean / unit variance over the batch's policy tokens.
  """

  clip_value: float | None = 0.2
  whiten_advantages: bool = True

  @classmethod
  def from_config(cls, config: Any) -> "CriticConfig":
    values = dict(config.to_dict() if hasattr(config, "to_dict") else config)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
      raise ValueError(f"unknown critic field(s) {unknown}; expected some of {sorted(names)}")
    return cls(**values)


@functools.partial(jax.jit, static_argnames=("micro_batches",))
def critic_values(state: TrainState, batch: Mapping[str, jax.Array], *, micro_batches: int = 1) -> jax.Array:
  """The critic's values `[B, T]` under its current weights, `micro_batches` row groups at a time."""
  model = state.model()
  inputs = {k: batch[k] for k in ("input_ids_BT", "segment_ids_BT", "positions_BT")}
  return microbatch.map_rows(
    lambda mb: model(mb["input_ids_BT"], mb["segment_ids_BT"], mb["positions_BT"]), inputs, micro_batches
  )


@functools.partial(jax.jit, donate_argnames=("state",), static_argnames=("micro_batches",))
def critic_update(
  state: TrainState, batch: Mapping[str, jax.Array], clip_value: jax.Array, *, micro_batches: int = 1
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on the clipped value loss of `batch` (`old_values_BT`, `returns_BT` and the inputs);
  `clip_value = inf` leaves it unclipped. With `micro_batches > 1` gradients are accumulated over row groups,
  each normalised by the whole batch's token count (the same update); metrics are micro-batch means
  (`vf_loss` their sum)."""
  num_tokens = None
  if micro_batches > 1:
    num_tokens = jnp.maximum(jnp.sum(batch["loss_mask_BT"] > 0), 1).astype(jnp.float32)

  def loss_fn(trainable, mb):
    v_BT = state.model(trainable)(mb["input_ids_BT"], mb["segment_ids_BT"], mb["positions_BT"])
    loss, metrics = value_loss(
      v_BT, mb["old_values_BT"], mb["returns_BT"], mb["loss_mask_BT"], clip_value=clip_value, num_tokens=num_tokens
    )
    return loss, dict(metrics, values_mean=masked_mean(v_BT, mb["loss_mask_BT"]))

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
  if micro_batches == 1:
    (_, metrics), grads = grad_fn(state.trainable, batch)
  else:

    def body(acc, mb):
      (_, metrics), grads = grad_fn(state.trainable, microbatch.constrain_rows(mb))
      return jax.tree.map(jnp.add, acc, grads), metrics

    grads, per_mb = jax.lax.scan(
      body, jax.tree.map(jnp.zeros_like, state.trainable), microbatch.split_rows(dict(batch), micro_batches)
    )
    metrics = {k: jnp.sum(v) if k == "vf_loss" else jnp.mean(v) for k, v in per_mb.items()}
  metrics = dict(metrics, vf_grad_norm=optax.tree.norm(grads))
  return state.apply_gradients(grads), metrics


@functools.partial(jax.jit, static_argnames=("gamma", "lam", "kl_coef", "whiten"))
def ppo_advantages(
  rewards_B: jax.Array,
  values_BT: jax.Array,
  mask_BT: jax.Array,
  kl_BT: jax.Array | None,
  *,
  gamma: float,
  lam: float,
  kl_coef: float,
  whiten: bool,
) -> tuple[jax.Array, jax.Array]:
  """`(advantages_BT, returns_BT)`: token rewards (KL penalty folded in when `kl_BT` is given), GAE, whitening."""
  rewards_BT = adv_lib.token_rewards(rewards_B, mask_BT, kl_BT=kl_BT, kl_coef=kl_coef)
  adv_BT, returns_BT = adv_lib.gae(rewards_BT, values_BT, mask_BT, gamma=gamma, lam=lam)
  if whiten:
    adv_BT = adv_lib.whiten(adv_BT, mask_BT)
  return adv_BT, returns_BT


def explained_variance(values_BT: jax.Array, returns_BT: jax.Array, mask_BT: jax.Array) -> jax.Array:
  """`1 - Var(R - V) / Var(R)` over the policy tokens (1: perfect values, <= 0: no better than a constant)."""
  return 1.0 - masked_var(returns_BT - values_BT, mask_BT) / (masked_var(returns_BT, mask_BT) + 1e-8)


class Critic:
  """Owns the critic's train state; `RLTrainer` calls `advantages` once per rollout batch and `update` per
  policy minibatch (same rows, same epochs).

  Args:
    state: a `TrainState` over a `ValueModel` (see `create_critic_state`).
    config: the `CriticConfig`.
  """

  def __init__(self, state: TrainState, config: CriticConfig = CriticConfig()):
    self.state, self.config = state, config
    self.last_metrics: dict[str, float] = {}

  def values(self, batch: Mapping[str, jax.Array], micro_batches: int = 1) -> jax.Array:
    return critic_values(self.state, batch, micro_batches=micro_batches)

  def advantages(
    self, rewards_B: np.ndarray, batch: Mapping[str, jax.Array], rl: Any
  ) -> tuple[jax.Array, dict[str, jax.Array]]:
    """GAE advantages of the rollout batch and the rows `update` trains on (inputs, old values, returns).

    `rl` is the `RLConfig` (`gamma`, `lam`, `kl_reward_coef`); a KL reward penalty reads `batch["old_logp_BT"]`
    and `batch["ref_logp_BT"]`.
    """
    mask_BT = batch["loss_mask_BT"]
    values_BT = self.values(batch, rl.micro_batches(mask_BT.shape[0]))
    kl_BT = None
    if rl.kl_reward_coef > 0:
      if "ref_logp_BT" not in batch:
        raise ValueError("rl.kl_reward_coef > 0 needs the reference log-probs (batch['ref_logp_BT'])")
      kl_BT = batch["old_logp_BT"] - batch["ref_logp_BT"]
    adv_BT, returns_BT = ppo_advantages(
      jnp.asarray(rewards_B, jnp.float32),
      values_BT,
      mask_BT,
      kl_BT,
      gamma=float(rl.gamma),
      lam=float(rl.lam),
      kl_coef=float(rl.kl_reward_coef),
      whiten=self.config.whiten_advantages,
    )
    self.last_metrics = {
      "values_rollout_mean": masked_mean(values_BT, mask_BT),
      "returns_mean": masked_mean(returns_BT, mask_BT),
      "vf_explained_var": explained_variance(values_BT, returns_BT, mask_BT),
    }
    if kl_BT is not None:
      self.last_metrics["kl_reward"] = masked_mean(kl_BT, mask_BT)
    critic_batch = {k: batch[k] for k in CRITIC_INPUTS}
    critic_batch.update(old_values_BT=values_BT, returns_BT=returns_BT)
    return adv_BT, critic_batch

  def update(self, batch: Mapping[str, jax.Array], micro_batches: int = 1) -> dict[str, jax.Array]:
    """One critic step on a minibatch of the rows `advantages` returned (accumulated over `micro_batches` row
    groups); returns its metrics."""
    clip = self.config.clip_value if self.config.clip_value and self.config.clip_value > 0 else np.inf
    self.state, metrics = critic_update(self.state, batch, jnp.float32(clip), micro_batches=micro_batches)
    return dict(metrics, **self.last_metrics)


def create_critic_state(
  value_model: ValueModel, tx: optax.GradientTransformation, rng: jax.Array, mesh: Any = None
) -> TrainState:
  """The critic's train state: on `mesh` (sharded like the policy) when given, else eagerly on the default device."""
  if mesh is None:
    return TrainState.create(value_model, tx, rng)
  params = nnx.state(value_model, nnx.Param)
  nnx.update(value_model, jax.device_put(params, sharding_lib.state_shardings(params, mesh)))  # the new head
  return create_train_state(value_model, tx, rng, mesh)[0]
