"""What one RL step does (`RLConfig`, read from a run config's `rl` group) and DAPO's overlong punishment."""

from __future__ import annotations

import dataclasses
from typing import Any

from retool_jax.fields import dataclass_kwargs
from retool_jax.train.losses import PolicyLossConfig

ALGORITHMS = ("grpo", "dr_grpo", "rloo", "ppo")
PARTIAL_ROLLOUTS = ("finish", "continue")


@dataclasses.dataclass(frozen=True)
class OverlongConfig:
  """DAPO's soft overlong punishment on the number of response tokens (disabled when `cache_len` is 0)."""

  max_len: int = 0
  cache_len: int = 0
  penalty: float = 1.0


@dataclasses.dataclass(frozen=True)
class RLConfig:
  """What one RL step does.

  Attributes:
    algorithm: `grpo` (group mean/std advantages), `dr_grpo` (group mean only), `rloo` (leave-one-out) or
      `ppo` (a critic and GAE; see `retool_jax.train.value_head`).
    num_prompts / group_size: prompts per step and samples per prompt.
    num_minibatches / num_epochs: optimizer updates per rollout batch are `num_minibatches * num_epochs`.
    loss: the clipped policy-gradient objective (`PolicyLossConfig`: clip_low / clip_high, dual_clip,
      aggregation, kl_coef / kl_estimator (KL to the reference as a loss), entropy_coef, tis_cap).
    kl_reward_coef: PPO's KL-to-reference penalty folded into the per-token rewards (k1), or 0.
    dynamic_sampling: DAPO: drop groups whose rewards are all equal and sample more prompts until
      `num_prompts` informative groups are found or `max_sampling_rounds` rounds have run.
    overlong: DAPO's soft overlong punishment.
    gamma / lam: GAE discount and trace decay (PPO).
    logprob_chunk: time chunk of the log-prob computation (bounds the logits memory).
    micro_batch_size: rows per forward / backward pass of the log-prob passes and the updates (gradients are
      accumulated over a minibatch's micro-batches: the same update, less activation memory); 0 = whole
      batches. Must divide the minibatch.
    length_multiple: padded lengths are bucketed to multiples of this.
    seed: sampling seeds and minibatch shuffling.
    max_staleness: how many policy versions the rollouts may run ahead of the trainer (`K`). 0: the
      synchronous step (rollout, then updates). K >= 1: a producer samples batches while the trainer
      updates; a batch started on weights of step `v` trains at a step `<= v + K` (older ones are dropped
      and counted). One process only.
    partial_rollouts: with K >= 1, what a trajectory in flight does when new weights arrive: `finish` on the
      version it started with (every turn pinned to it), or `continue` on the newest weights (its KV kept; its
      tokens then span versions). The loss's importance ratio uses the engine's per-token log-probs either way.
  """

  algorithm: str = "grpo"
  num_prompts: int = 32
  group_size: int = 8
  num_minibatches: int = 1
  num_epochs: int = 1
  loss: PolicyLossConfig = PolicyLossConfig()
  kl_reward_coef: float = 0.0
  dynamic_sampling: bool = False
  max_sampling_rounds: int = 4
  overlong: OverlongConfig = OverlongConfig()
  gamma: float = 1.0
  lam: float = 1.0
  logprob_chunk: int = 256
  micro_batch_size: int = 0
  length_multiple: int = 64
  seed: int = 0
  max_staleness: int = 0
  partial_rollouts: str = "finish"

  def __post_init__(self):
    if self.algorithm not in ALGORITHMS:
      raise ValueError(f"rl.algorithm={self.algorithm!r}; expected one of {ALGORITHMS}")
    for name in (
      "num_prompts",
      "group_size",
      "num_minibatches",
      "num_epochs",
      "max_sampling_rounds",
      "logprob_chunk",
      "length_multiple",
    ):
      if getattr(self, name) < 1:
        raise ValueError(f"rl.{name}={getattr(self, name)} must be >= 1")
    if self.algorithm == "rloo" and self.group_size < 2:
      raise ValueError("rl.algorithm='rloo' needs rl.group_size >= 2")
    if (self.num_prompts * self.group_size) % self.num_minibatches:
      raise ValueError(
        f"rl.num_prompts * rl.group_size = {self.num_prompts * self.group_size} does not split "
        f"into rl.num_minibatches={self.num_minibatches}"
      )
    if self.micro_batch_size < 0 or self.micro_batch_size and self.minibatch_size % self.micro_batch_size:
      raise ValueError(
        f"rl.micro_batch_size={self.micro_batch_size} must divide the minibatch of "
        f"{self.minibatch_size} rows (rl.num_prompts * rl.group_size / rl.num_minibatches), or be 0"
      )
    if self.max_staleness < 0:
      raise ValueError(f"rl.max_staleness={self.max_staleness} must be >= 0")
    if self.partial_rollouts not in PARTIAL_ROLLOUTS:
      raise ValueError(f"rl.partial_rollouts={self.partial_rollouts!r}; expected one of {PARTIAL_ROLLOUTS}")
    if self.kl_reward_coef < 0:
      raise ValueError(f"rl.kl_reward_coef={self.kl_reward_coef} must be >= 0")
    if self.kl_reward_coef > 0 and self.algorithm != "ppo":
      raise ValueError(
        "rl.kl_reward_coef (KL as a reward penalty) needs rl.algorithm='ppo'; use rl.loss.kl_coef for a KL loss"
      )

  @property
  def batch_size(self) -> int:
    return self.num_prompts * self.group_size

  @property
  def minibatch_size(self) -> int:
    return self.batch_size // self.num_minibatches

  def micro_batches(self, rows: int) -> int:
    """Micro-batches a pass over `rows` rows takes (1 when they do not split into `micro_batch_size`)."""
    if not self.micro_batch_size or rows <= self.micro_batch_size or rows % self.micro_batch_size:
      return 1
    return rows // self.micro_batch_size

  @property
  def needs_reference(self) -> bool:
    return self.loss.kl_coef > 0 or self.kl_reward_coef > 0

  @classmethod
  def from_config(cls, config: Any) -> "RLConfig":
    """From a `ConfigDict` / mapping; unknown keys (at any level) are errors naming the field."""
    values = dataclass_kwargs(cls, config, "rl")
    if "loss" in values and not isinstance(values["loss"], PolicyLossConfig):
      values["loss"] = PolicyLossConfig(**dataclass_kwargs(PolicyLossConfig, values["loss"], "rl.loss"))
    if "overlong" in values and not isinstance(values["overlong"], OverlongConfig):
      values["overlong"] = OverlongConfig(**dataclass_kwargs(OverlongConfig, values["overlong"], "rl.overlong"))
    return cls(**values)
