"""Direct preference optimisation: the sigmoid DPO loss (beta, label smoothing) on chosen / rejected pairs.

`python -m retool_jax.train --config=configs/dpo_tools.py`. Reference log-probs are computed once before
training (`reference.precompute = True`, the frozen model is then dropped) or on the fly from a frozen copy.
A batch stacks its chosen rows over its rejected rows (`[2B, T]`), so one forward pass scores both sides.
Master weights and AdamW state stay in `model.param_dtype` (float32) while the model computes in `model.dtype`;
with `lora.rank > 0` only adapters train and the frozen base is the reference. A run started again in the same
`workdir` resumes from its latest checkpoint (the reference is always the starting policy).

Pairs are read through the shared `InputPipeline`: reshuffled every epoch by `(seed, epoch)`, each host reading
its own slice of every global batch of `batch_size` pairs, and epochs laid end to end (``carry``) so a run takes
`floor(pairs * num_epochs / batch_size)` updates, all on whole batches. The pipeline's position is saved with
every checkpoint, so a resumed run continues with the very next batch. On device a batch is two global arrays
(chosen rows, rejected rows) laid out along the data axes, stacked as `[2B, T]` inside the jitted step; hosts pad
to one length they all know (per batch on one process, the dataset's longest pair, bucketed, on several).
Precomputed reference log-probs are stored per pair, so any epoch's order selects them by pair index.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx
from jax.experimental import multihost_utils

from retool_jax import sharding as sharding_lib
from retool_jax.assets import QWEN3_TOKENIZER_DIR
from retool_jax.chat import load_tokenizer
from retool_jax.chat.prompt_contract import record_contract
from retool_jax.data.batch import TokenBatch
from retool_jax.data.chat_sft import load_preference_pairs
from retool_jax.data.pipeline import InputPipeline, global_batch
from retool_jax.models.logprobs import token_logprobs
from retool_jax.programs import Program
from retool_jax.train import abstract, build, loop
from retool_jax.train import state as state_lib
from retool_jax.train.losses import dpo_loss, sequence_logp

__all__ = [
  "default_config",
  "dpo_update",
  "num_updates",
  "pack_pairs",
  "pair_logps",
  "pair_pipeline",
  "precompute_reference",
  "split_sides",
  "stack_sides",
  "train",
]


FREE_FORM = ("model.overrides",)  # validated against Qwen3Config instead of the schema


def default_config() -> ml_collections.ConfigDict:
  """Every field the DPO trainer reads, with its default."""
  c = ml_collections.ConfigDict()
  c.trainer = "dpo"
  c.workdir = "runs/dpo"
  c.seed = 0
  c.num_epochs = 1
  c.batch_size = 8  # pairs per update, over all hosts
  c.model = build.model_fields()  # model.checkpoint: the policy DPO starts from
  c.lora = build.lora_fields()
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
  c.optim = build.optim_fields(5e-7)
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=500, keep=3, async_save=True))
  c.log = build.log_fields()
  return c


def pack_pairs(
  pairs: Sequence[tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]],
  *,
  pad_id: int,
  length_multiple: int = 64,
  length: int | None = None,
) -> TokenBatch:
  """`[2B, T]` token rows (chosen rows, then rejected rows), one pair side per row, right-padded.

  `T` is the longest row bucketed to `length_multiple`, or exactly `length` when given.
  """
  if not pairs:
    raise ValueError("pack_pairs needs at least one pair")
  rows = [c for c, _ in pairs] + [r for _, r in pairs]
  longest = max(len(ids) for ids, _ in rows) - 1
  t = length_multiple * max(1, -(-longest // length_multiple)) if length is None else length
  if t < longest:
    raise ValueError(f"pack_pairs: a row of {longest + 1} tokens does not fit length={length}")
  ids = np.full((len(rows), t + 1), pad_id, np.int32)
  mask = np.zeros((len(rows), t + 1), np.float32)
  for i, (row_ids, row_mask) in enumerate(rows):
    ids[i, : len(row_ids)], mask[i, : len(row_mask)] = row_ids, row_mask
  lengths = np.asarray([len(r) - 1 for r, _ in rows])
  segments = (np.arange(t)[None] < lengths[:, None]).astype(np.int32)
  positions = np.broadcast_to(np.arange(t, dtype=np.int32), segments.shape).copy()
  return TokenBatch(ids[:, :-1], ids[:, 1:], mask[:, 1:], segments, positions)


def split_sides(packed: TokenBatch) -> dict[str, TokenBatch]:
  """`pack_pairs` output as `{"chosen": [B, T] rows, "rejected": [B, T] rows}`.

  Each side is then a batch of pairs that can be laid out along the data axes like any other batch.
  """
  half = len(packed) // 2
  return {"chosen": packed.rows(slice(None, half)), "rejected": packed.rows(slice(half, None))}


def stack_sides(sides: Mapping[str, TokenBatch]) -> TokenBatch:
  """The inverse of `split_sides`: chosen rows over rejected rows, `[2B, T]`."""
  return jax.tree.map(lambda c, r: jnp.concatenate([c, r]), sides["chosen"], sides["rejected"])


def pair_pipeline(
  pairs: Sequence[Any],
  *,
  batch_size: int,
  num_epochs: int,
  seed: int,
  process_index: int | None = None,
  process_count: int | None = None,
) -> InputPipeline:
  """The training order: `batch_size` pairs per global batch (this host's slice of each), reshuffled each epoch
  by `(seed, epoch)`, epochs end to end (``carry``); read `num_updates(...)` batches, all of them whole."""
  return InputPipeline(
    pairs,
    global_batch_size=batch_size,
    seed=seed,
    remainder="carry",
    num_epochs=num_epochs,
    process_index=process_index,
    process_count=process_count,
    collate=list,
  )


def num_updates(num_pairs: int, batch_size: int, num_epochs: int) -> int:
  """Optimizer updates of a run: the whole global batches in `num_epochs` passes over `num_pairs` pairs."""
  return num_pairs * num_epochs // batch_size


def pair_logps(
  model: Any, batch: TokenBatch | Mapping[str, TokenBatch], *, chunk_size: int
) -> tuple[jax.Array, jax.Array]:
  """Sequence log-probs `(chosen_B, rejected_B)` of the assistant tokens of a `pack_pairs` batch, or of its
  `split_sides` form."""
  if not isinstance(batch, TokenBatch):
    batch = stack_sides(batch)
  out = token_logprobs(
    model,
    batch.input_ids_BT,
    batch.targets_BT,
    positions=batch.positions_BT,
    segment_ids=batch.segment_ids_BT,
    chunk_size=chunk_size,
  )
  seq = sequence_logp(out.logprobs_BT, batch.loss_mask_BT)
  half = seq.shape[0] // 2
  return seq[:half], seq[half:]


@functools.partial(jax.jit, static_argnames=("chunk_size",))
def _reference_logps(graphdef, params, batch, *, chunk_size: int):
  return pair_logps(nnx.merge(graphdef, params), batch, chunk_size=chunk_size)


def precompute_reference(
  state: state_lib.TrainState, batches: Sequence[TokenBatch], *, chunk_size: int
) -> list[tuple[np.ndarray, np.ndarray]]:
  """Reference `(chosen_B, rejected_B)` log-probs of every batch under the state's current (frozen) weights."""
  return [
    tuple(
      np.asarray(x)
      for x in _reference_logps(
        state.graphdef, state.model_params(), jax.tree.map(jnp.asarray, b), chunk_size=chunk_size
      )
    )
    for b in batches
  ]


@functools.partial(jax.jit, static_argnames=("beta", "label_smoothing", "chunk_size"), donate_argnames=("state",))
def dpo_update(
  state: state_lib.TrainState,
  batch: TokenBatch | Mapping[str, TokenBatch],
  ref_chosen_B: jax.Array,
  ref_rejected_B: jax.Array,
  *,
  beta: float,
  label_smoothing: float,
  chunk_size: int,
):
  """One optimizer step on the sigmoid DPO loss of `batch` (`pack_pairs` layout, or its `split_sides` form)."""

  def loss_fn(trainable):
    chosen_B, rejected_B = pair_logps(state.model(trainable), batch, chunk_size=chunk_size)
    return dpo_loss(chosen_B, rejected_B, ref_chosen_B, ref_rejected_B, beta=beta, label_smoothing=label_smoothing)

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
  return state.apply_gradients(grads), dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads))


def _to_host(x: jax.Array) -> np.ndarray:
  """The whole value of a global array, on every host."""
  if x.is_fully_addressable:
    return np.asarray(x)
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def _batch_placer(mesh: jax.sharding.Mesh, global_rows: int) -> Callable[[Any], Any]:
  """Places this host's `[B, ...]` arrays as global `[G, ...]` arrays along the data axes (`global_batch`).

  On one process a batch the data axes do not divide is replicated instead (several hosts need them to divide).
  """
  shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if global_rows % shards and jax.process_count() > 1:
    raise ValueError(
      f"batch_size={global_rows} must be a multiple of the {shards} batch shards (mesh data x fsdp) on several hosts"
    )

  def sharding(ndim: int) -> jax.sharding.Sharding:
    if global_rows % shards:
      return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    return sharding_lib.data_sharding(mesh, ndim)

  return lambda tree: jax.tree.map(
    lambda x: global_batch(x, sharding(np.ndim(x))), tree, is_leaf=lambda x: isinstance(x, np.ndarray)
  )


def _precompute_by_pair(
  state: state_lib.TrainState,
  pairs: Sequence[Any],
  place: Callable[[Any], Any],
  *,
  batch_size: int,
  pad_id: int,
  length: int | None,
  chunk_size: int,
) -> tuple[np.ndarray, np.ndarray]:
  """Reference log-probs `(chosen_N, rejected_N)` of every pair, indexed like `pairs` (each host scores its slice)."""
  pipeline = InputPipeline(pairs, global_batch_size=batch_size, shuffle=False, num_epochs=1, collate=list)
  chosen, rejected = np.zeros(len(pairs), np.float32), np.zeros(len(pairs), np.float32)
  for batch in pipeline:
    sides = place(split_sides(pack_pairs(batch.examples, pad_id=pad_id, length=length)))
    index = place(np.where(batch.mask, batch.indices, -1).astype(np.int32))  # -1: a padding slot
    c, r = _reference_logps(state.graphdef, state.model_params(), sides, chunk_size=chunk_size)
    c, r, index = _to_host(c), _to_host(r), _to_host(index)
    keep = index >= 0
    chosen[index[keep]], rejected[index[keep]] = c[keep], r[keep]
  return chosen, rejected


def programs(config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> list[Any]:
  """The programs a DPO run of `config` executes on `mesh`, with abstract arguments (see `retool_jax.aot`):
  the reference log-probs of a batch and one update, at `batch_size` pairs of `data.max_length` tokens."""

  c = config
  cfg = abstract.model_config(c.model)
  tx, _ = state_lib.make_optimizer(c.optim.to_dict(), c.optim.warmup_steps + 1)
  state, _ = abstract.abstract_train_state(
    abstract.abstract_model(cfg, mesh), tx, mesh, lora_config=build.lora_config(c.lora)
  )
  t = 64 * -(-(c.data.max_length - 1) // 64)

  def side():
    ints = abstract.batch((c.batch_size, t), jnp.int32, mesh)
    return TokenBatch(ints, ints, abstract.batch((c.batch_size, t), jnp.float32, mesh), ints, ints)

  sides = {"chosen": side(), "rejected": side()}
  ref = abstract.batch((c.batch_size,), jnp.float32, mesh)
  chunk = c.loss.chunk_size
  return [
    Program(
      "dpo/reference_logps", _reference_logps, (state.graphdef, state.params, sides), dict(chunk_size=chunk)
    ),
    Program(
      "dpo/update",
      dpo_update,
      (state, sides, ref, ref),
      dict(beta=c.loss.beta, label_smoothing=c.loss.label_smoothing, chunk_size=chunk),
    ),
  ]


def train(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Runs DPO as `config` says; returns the last logged metrics."""
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
  model = build.build_model(c.model, mesh, c.seed)
  pipeline = pair_pipeline(encoded, batch_size=c.batch_size, num_epochs=c.num_epochs, seed=c.seed)
  total = num_updates(len(encoded), c.batch_size, c.num_epochs)
  tx, _ = state_lib.make_optimizer(c.optim.to_dict(), total)
  root = jax.random.key(c.seed)
  state, shardings = state_lib.create_train_state(
    model, tx, root, mesh, lora_config=build.lora_config(c.lora), lora_rng=jax.random.fold_in(root, 2)
  )
  del model
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  length = None  # one process: each batch bucketed to its longest row
  if jax.process_count() > 1:  # every host pads to the same length, computed from the pairs all of them hold
    longest = max(len(ids) for pair in encoded for ids, _ in pair) - 1
    length = 64 * -(-longest // 64)
  place = _batch_placer(mesh, c.batch_size)
  reference = refs = None  # scored from the starting policy, before any restore
  if c.reference.precompute:
    with jax.set_mesh(mesh):
      refs = _precompute_by_pair(
        state, encoded, place, batch_size=c.batch_size, pad_id=pad, length=length, chunk_size=c.loss.chunk_size
      )
  else:
    reference = state_lib.make_reference(1.0, state, shardings)
  held = {"state": state}

  def step() -> dict[str, float]:
    batch = next(pipeline)  # whole: only a run's unfinished last batch would hold padding, and it is never read
    sides = place(split_sides(pack_pairs(batch.examples, pad_id=pad, length=length)))
    if refs is not None:
      ref_c, ref_r = place((refs[0][batch.indices], refs[1][batch.indices]))
    else:
      ref_c, ref_r = _reference_logps(
        state.graphdef, reference.device_params(), sides, chunk_size=c.loss.chunk_size
      )
    held["state"], metrics = dpo_update(
      held["state"],
      sides,
      ref_c,
      ref_r,
      beta=c.loss.beta,
      label_smoothing=c.loss.label_smoothing,
      chunk_size=c.loss.chunk_size,
    )
    return {k: float(v) for k, v in jax.device_get(metrics).items()}

  task = loop.Task(
    name="dpo",
    num_steps=total,
    model_config=state.model().config,
    step=step,
    saved=[loop.Saved("checkpoints", lambda: held["state"], lambda s: held.update(state=s), shardings)],
    position=pipeline.state,
    restore=lambda record, _: pipeline.restore(record["data"]),
    log_every=c.log.every_steps,
    progress={"loss": ("loss", ".4f"), "acc": ("reward_accuracy", ".2f")},
  )

  def contract(workdir: Path) -> None:
    record_contract(workdir, c.data.tokenizer or QWEN3_TOKENIZER_DIR, enable_thinking=c.data.enable_thinking)

  return loop.run(c, task, mesh, contract=contract)
