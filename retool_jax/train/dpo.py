"""Direct preference optimisation: the sigmoid DPO loss (beta, label smoothing) on chosen / rejected pairs.

`python -m retool_jax.train --config=configs/dpo_tools.py`. Reference log-probs are computed once before
training (`reference.precompute = True`, the frozen model is then dropped) or on the fly from a frozen copy.
A batch stacks its chosen rows over its rejected rows (`[2B, T]`), so one forward pass scores both sides.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from retool_jax.models.logprobs import token_logprobs
from retool_jax.train import state as state_lib
from retool_jax.train.losses import dpo_loss, sequence_logp

__all__ = ["default_config", "pack_pairs", "pair_logps", "dpo_update", "precompute_reference", "train"]


def default_config() -> ml_collections.ConfigDict:
  """Every field the DPO trainer reads, with its default."""
  c = ml_collections.ConfigDict()
  c.trainer = "dpo"
  c.workdir = "runs/dpo"
  c.seed = 0
  c.num_epochs = 1
  c.batch_size = 8  # pairs per update
  c.model = ml_collections.ConfigDict()
  c.model.checkpoint = ""  # Orbax (retool_jax layout) or Hugging Face folder
  c.model.dtype = "bfloat16"
  c.model.param_dtype = "float32"
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))
  c.data = ml_collections.ConfigDict()
  c.data.path = ""  # json / jsonl / parquet rows {"prompt", "chosen", "rejected"[, "tools"]}
  c.data.tokenizer = ""  # "" = the packaged Qwen3 tokenizer
  c.data.enable_thinking = True
  c.data.limit = 0
  c.data.max_length = 4096  # longer pairs are dropped
  c.loss = ml_collections.ConfigDict()
  c.loss.beta = 0.1
  c.loss.label_smoothing = 0.0  # conservative DPO: the preference label is flipped with this probability
  c.loss.chunk_size = 512
  c.reference = ml_collections.ConfigDict()
  c.reference.precompute = True  # score the reference once before training, then free it
  c.optim = ml_collections.ConfigDict(
    dict(
      schedule="constant",
      learning_rate=5e-7,
      warmup_steps=0,
      decay_steps=0,
      end_lr_factor=0.0,
      b1=0.9,
      b2=0.999,
      eps=1e-8,
      weight_decay=0.0,
      grad_clip_norm=1.0,
    )
  )
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True))
  c.log = ml_collections.ConfigDict(dict(every_steps=1, tensorboard=True))
  return c


def pack_pairs(
  pairs: Sequence[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]],
  *,
  pad_id: int,
  length_multiple: int = 64,
) -> dict[str, np.ndarray]:
  """`[2B, T]` arrays (chosen rows, then rejected rows): inputs, targets, target loss mask, attention mask."""
  if not pairs:
    raise ValueError("pack_pairs needs at least one pair")
  rows = [c for c, _ in pairs] + [r for _, r in pairs]
  longest = max(len(ids) for ids, _ in rows) - 1
  t = length_multiple * max(1, -(-longest // length_multiple))
  ids = np.full((len(rows), t + 1), pad_id, np.int32)
  mask = np.zeros((len(rows), t + 1), np.float32)
  for i, (row_ids, row_mask) in enumerate(rows):
    ids[i, : len(row_ids)], mask[i, : len(row_mask)] = row_ids, row_mask
  lengths = np.asarray([len(r) - 1 for r, _ in rows])
  return {
    "input_ids_BT": ids[:, :-1],
    "targets_BT": ids[:, 1:],
    "mask_BT": mask[:, 1:],
    "attention_mask_BT": (np.arange(t)[None] < lengths[:, None]).astype(np.int32),
  }


def pair_logps(model: Any, batch: dict[str, jax.Array], *, chunk_size: int) -> tuple[jax.Array, jax.Array]:
  """Sequence log-probs `(chosen_B, rejected_B)` of the assistant tokens."""
  out = token_logprobs(
    model,
    batch["input_ids_BT"],
    batch["targets_BT"],
    attention_mask=batch["attention_mask_BT"],
    chunk_size=chunk_size,
  )
  seq = sequence_logp(out.logprobs_BT, batch["mask_BT"])
  half = seq.shape[0] // 2
  return seq[:half], seq[half:]


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _reference_logps(graphdef, params, batch, *, chunk_size: int):
  from flax import nnx  # noqa: PLC0415

  return pair_logps(nnx.merge(graphdef, params), batch, chunk_size=chunk_size)


def precompute_reference(
  state: state_lib.TrainState, batches: Sequence[dict[str, np.ndarray]], *, chunk_size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
  """Reference `(chosen_B, rejected_B)` log-probs of every batch under the state's current (frozen) weights."""
  return [
    tuple(
      np.asarray(x)
      for x in _reference_logps(
        state.graphdef, state.model_params(), {k: jnp.asarray(v) for k, v in b.items()}, chunk_size=chunk_size
      )
    )
    for b in batches
  ]


@functools.partial(jax.jit, static_argnames=("beta", "label_smoothing", "chunk_size"), donate_argnames=("state",))
def dpo_update(
  state: state_lib.TrainState,
  batch: dict[str, jax.Array],
  ref_chosen_B: jax.Array,
  ref_rejected_B: jax.Array,
  *,
  beta: float,
  label_smoothing: float,
  chunk_size: int,
):
  """One optimizer step on the sigmoid DPO loss of `batch`."""

  def loss_fn(trainable):
    chosen_B, rejected_B = pair_logps(state.model(trainable), batch, chunk_size=chunk_size)
    return dpo_loss(chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, beta=beta, label_smoothing=label_smoothing)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
  return state.apply_gradients(grads), dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))


def train(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Runs DPO as `config` says; returns the last logged metrics."""
  from retool_jax import sharding as sharding_lib  # noqa: PLC0415
  from retool_jax.assets import QWEN3_TOKENIZER_DIR  # noqa: PLC0415
  from retool_jax.chat import load_tokenizer  # noqa: PLC0415
  from retool_jax.checkpoint import load as load_checkpoint  # noqa: PLC0415
  from retool_jax.data.chat_sft import load_preference_pairs  # noqa: PLC0415
  from retool_jax.train.checkpointing import Checkpointer  # noqa: PLC0415
  from retool_jax.train.metrics import MetricsWriter  # noqa: PLC0415

  c = config
  if not c.data.path:
    raise ValueError("config.data.path is empty: DPO needs preference pairs")
  if not c.model.checkpoint:
    raise ValueError("config.model.checkpoint is empty: DPO starts from a trained policy")
  tokenizer = load_tokenizer(c.data.tokenizer or QWEN3_TOKENIZER_DIR)
  encoded = [
    p.encode(tokenizer, enable_thinking=c.data.enable_thinking)
    for p in load_preference_pairs(c.data.path, limit=c.data.limit or None)
  ]
  encoded = [e for e in encoded if max(len(e[0][0]), len(e[1][0])) <= c.data.max_length]
  if len(encoded) < c.batch_size:
    raise ValueError(
      f"{c.data.path}: {len(encoded)} pairs fit data.max_length={c.data.max_length}, fewer than "
      f"batch_size={c.batch_size}"
    )
  mesh = sharding_lib.make_mesh(**c.mesh.to_dict())
  model = load_checkpoint(c.model.checkpoint, mesh=mesh, dtype=c.model.dtype)
  steps_per_epoch = len(encoded) // c.batch_size
  total = steps_per_epoch * c.num_epochs
  tx, _ = state_lib.make_optimizer(c.optim.to_dict(), total)
  state, shardings = state_lib.create_train_state(model, tx, jax.random.key(c.seed), mesh)
  rng = np.random.default_rng(c.seed)
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  epochs = [
    [
      pack_pairs([encoded[i] for i in order[s * c.batch_size : (s + 1) * c.batch_size]], pad_id=pad)
      for s in range(steps_per_epoch)
    ]
    for order in (rng.permutation(len(encoded)) for _ in range(c.num_epochs))
  ]
  reference = None
  if c.reference.precompute:
    refs = [precompute_reference(state, e, chunk_size=c.loss.chunk_size) for e in epochs]
  else:
    reference = state_lib.make_reference(1.0, state, shardings)
  ckpt = Checkpointer(
    Path(c.workdir) / "checkpoints",
    save_every=c.checkpoint.every_steps,
    keep=c.checkpoint.keep,
    async_save=c.checkpoint.async_save,
  )
  last: dict[str, Any] = {}
  with MetricsWriter(c.workdir, tensorboard=c.log.tensorboard) as writer:
    for e, batches in enumerate(epochs):
      for s, batch in enumerate(batches):
        t0 = time.perf_counter()
        dev = {k: jnp.asarray(v) for k, v in batch.items()}
        if reference is None:
          ref_c, ref_r = refs[e][s]
        else:
          ref_c, ref_r = _reference_logps(
            state.graphdef, reference.device_params(), dev, chunk_size=c.loss.chunk_size
          )
        state, m = dpo_update(
          state,
          dev,
          jnp.asarray(ref_c),
          jnp.asarray(ref_r),
          beta=c.loss.beta,
          label_smoothing=c.loss.label_smoothing,
          chunk_size=c.loss.chunk_size,
        )
        step = int(state.step)
        if step % c.log.every_steps == 0 or step == total:
          last = {k: float(v) for k, v in jax.device_get(m).items()}
          last["perf/step_time"] = time.perf_counter() - t0
          writer.write(step, last)
        ckpt.save(state, model.config, force=step == total)
  ckpt.close()
  return last
