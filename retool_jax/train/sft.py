"""Supervised fine-tuning: masked next-token loss on packed conversations (the ReTool cold start).

The loss is the mean negative log-likelihood over the trained tokens of the whole global batch: every
micro-batch adds `sum(nll * mask) / N` with `N` the loss-token count of the global batch, so gradient
accumulation gives the same update as one large batch. Packed rows keep examples apart with segment ids.

    python -m retool_jax.train --config=configs/retool_qwen3_4b_sft.py --config.data.path=retool_sft.jsonl
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from retool_jax import sharding as sharding_lib
from retool_jax.assets import QWEN3_TOKENIZER_DIR
from retool_jax.chat import load_tokenizer
from retool_jax.chat.prompt_contract import record_sft_contract
from retool_jax.data import load_chat_sft, load_retool_sft
from retool_jax.data.batch import FIELDS, TokenBatch
from retool_jax.data.io import field, read_rows
from retool_jax.data.packing import PackedRows, pack_sequences
from retool_jax.data.pipeline import InputPipeline, global_batch
from retool_jax.models.logprobs import token_logprobs
from retool_jax.models.qwen3 import Qwen3
from retool_jax.programs import Program
from retool_jax.train import abstract, build, loop, losses
from retool_jax.train import state as state_lib

DATA_FORMATS = ("retool_sft", "chat", "tokens", "synthetic")
FREE_FORM = ("model.overrides",)  # validated against Qwen3Config instead of the schema


def default_config() -> ml_collections.ConfigDict:
  """Every field the SFT trainer reads, with its default; configs start from this and override."""
  c = ml_collections.ConfigDict()
  c.trainer = "sft"
  c.workdir = "runs/sft"  # metrics.jsonl, tensorboard/, checkpoints/
  c.seed = 0  # model init, LoRA init, data order
  c.num_steps = 0  # optimizer updates; 0: `data.num_epochs` epochs
  c.grad_accum_steps = 1  # micro-batches per update (global_batch_size must divide evenly)

  c.model = build.model_fields()
  c.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1, expert=1))

  c.data = ml_collections.ConfigDict()
  c.data.format = "retool_sft"  # retool_sft | chat | tokens ({"input_ids", "loss_mask"} rows) | synthetic
  c.data.path = ""  # json / jsonl / parquet
  c.data.eval_path = ""  # same format; "" = hold out `eval_holdout` training examples
  c.data.eval_holdout = 0
  c.data.style = "inline"  # retool_sft: inline (ReTool tags) | tool_calls (native tool calls)
  c.data.tokenizer = ""  # tokenizer folder; "" = the packaged Qwen3 tokenizer
  c.data.enable_thinking = True
  c.data.limit = 0  # read at most this many rows (0 = all)
  c.data.seq_len = 4096  # packed row length
  c.data.overflow = "truncate"  # longer examples: truncate | drop | error
  c.data.global_batch_size = 8  # packed rows per update, over all hosts
  c.data.shuffle = True
  c.data.num_epochs = 1  # used when num_steps == 0
  c.data.synthetic_examples = 256  # synthetic: arithmetic token sequences for smoke tests
  c.data.synthetic_vocab = 256

  c.optim = build.optim_fields(1e-5, schedule="warmup_cosine")
  c.lora = build.lora_fields()

  c.loss = ml_collections.ConfigDict()
  c.loss.chunk_size = 512  # time chunk of the log-prob computation (peak logits memory)
  c.loss.router_aux_coef = 0.0  # MoE load-balancing loss weight

  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 0  # 0 = only at the end (when there is eval data)
  c.eval.max_batches = 0  # 0 = the whole eval set

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 500
  c.checkpoint.keep = 3
  c.checkpoint.async_save = True

  c.log = build.log_fields()
  return c


# ---- data ---------------------------------------------------------------------------------------


def synthetic_examples(
  n: int, vocab: int, seed: int, min_len: int = 8, max_len: int = 48
) -> list[tuple[np.ndarray, np.ndarray]]:
  """Arithmetic sequences `(start + k * t) % vocab`: the first 3 tokens are the prompt, the rest is learnable."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n):
    length = int(rng.integers(min_len, max_len + 1))
    start, stride = int(rng.integers(0, vocab)), int(rng.integers(1, 8))
    ids = (start + stride * np.arange(length)) % vocab
    mask = np.ones(length, np.int32)
    mask[:3] = 0
    out.append((ids.astype(np.int32), mask))
  return out


def load_tokenizer_of(data: ml_collections.ConfigDict) -> Any:
  """The tokenizer of `data` (`data.tokenizer`, else the packaged Qwen3 tokenizer)."""
  return load_tokenizer(data.tokenizer or QWEN3_TOKENIZER_DIR)


def pad_id_of(tokenizer: Any) -> int:
  """The tokenizer's padding id (its end-of-text id when it names no pad token)."""
  pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
  if pad is None:
    raise ValueError(f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has neither a pad nor an EOS id")
  return int(pad)


def load_examples(
  data: ml_collections.ConfigDict, path: str, seed: int, tokenizer: Any = None
) -> list[tuple[np.ndarray, np.ndarray]]:
  """`(ids, loss_mask)` pairs from `path` in `data.format` (`tokenizer`: default `load_tokenizer_of(data)`)."""
  limit = data.limit or None
  if data.format == "synthetic":
    return synthetic_examples(data.synthetic_examples, data.synthetic_vocab, seed)
  if not path:
    raise ValueError(f"data.path is empty; data.format={data.format!r} reads a json/jsonl/parquet file")
  if data.format == "tokens":
    out = []
    for i, row in enumerate(read_rows(path, limit=limit)):
      where = f"{path}: row {i}"
      ids, mask = (
        np.asarray(field(row, "input_ids", where, list), np.int32),
        np.asarray(field(row, "loss_mask", where, list), np.int32),
      )
      if ids.shape != mask.shape:
        raise ValueError(f"{where}: {ids.size} input_ids but {mask.size} loss_mask bits")
      out.append((ids, mask))
    return out
  if data.format == "retool_sft":
    examples = load_retool_sft(path, style=data.style, limit=limit)
  elif data.format == "chat":
    examples = load_chat_sft(path, limit=limit)
  else:
    raise ValueError(f"data.format={data.format!r}; expected one of {DATA_FORMATS}")
  tok = tokenizer if tokenizer is not None else load_tokenizer_of(data)
  return [ex.encode(tok, enable_thinking=data.enable_thinking) for ex in examples]


def build_datasets(data: ml_collections.ConfigDict, seed: int) -> tuple[PackedRows, PackedRows | None]:
  """Packed training rows and packed eval rows (or None), padded with the tokenizer's pad id (0 for synthetic
  sequences)."""
  tokenizer = None if data.format == "synthetic" else load_tokenizer_of(data)
  pad_id = 0 if tokenizer is None else pad_id_of(tokenizer)
  examples = load_examples(data, data.path, seed, tokenizer)
  eval_examples = None
  if data.eval_path or data.format == "synthetic" and data.eval_holdout:
    eval_examples = load_examples(data, data.eval_path, seed + 1, tokenizer)[: data.eval_holdout or None]
  elif data.eval_holdout:
    if data.eval_holdout >= len(examples):
      raise ValueError(f"data.eval_holdout={data.eval_holdout} leaves no training examples (have {len(examples)})")
    examples, eval_examples = examples[: -data.eval_holdout], examples[-data.eval_holdout :]
  pack = lambda exs: pack_sequences(exs, data.seq_len, pad_id=pad_id, overflow=data.overflow)  # noqa: E731
  train = pack(examples)
  if len(train) == 0:
    raise ValueError(f"{data.path or data.format}: no example has a trained token")
  return train, (pack(eval_examples) if eval_examples else None)


def _device_batch(batch, mesh) -> TokenBatch:
  """A pipeline batch of packed rows on the mesh, its padding slots out of the loss."""
  rows = dict(batch.examples)
  rows["loss_mask_BT"] = rows["loss_mask_BT"] * batch.mask[:, None].astype(rows["loss_mask_BT"].dtype)
  return global_batch(TokenBatch.of(rows), sharding_lib.data_sharding(mesh))


# ---- steps --------------------------------------------------------------------------------------


def sft_loss(
  model: Qwen3,
  batch: TokenBatch,
  normaliser: jax.Array,
  *,
  chunk_size: int,
  router_aux_coef: float = 0.0,
  aux_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`sum(nll * loss_mask) / normaliser` plus the weighted router loss; metrics hold the first term alone."""
  out = token_logprobs(
    model,
    batch.input_ids_BT,
    batch.targets_BT,
    positions=batch.positions_BT,
    segment_ids=batch.segment_ids_BT,
    chunk_size=chunk_size,
  )
  nll, _ = losses.sft_loss(out.logprobs_BT, batch.loss_mask_BT, num_tokens=normaliser)
  aux = out.router_aux_loss if out.router_aux_loss is not None else jnp.zeros((), jnp.float32)
  loss = nll + router_aux_coef * aux_weight * aux if router_aux_coef else nll
  return loss, {"nll": nll, "router_aux_loss": aux}


def _microbatches(batch: TokenBatch, n: int) -> TokenBatch:
  """`[G, ...]` -> `[n, G/n, ...]` taking every n-th row, so each micro-batch stays spread over the mesh."""

  def split(x):
    if x.shape[0] % n:
      raise ValueError(f"global batch of {x.shape[0]} rows does not split into grad_accum_steps={n}")
    return x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1)

  return jax.tree.map(split, batch)


def make_train_step(
  schedule: optax.Schedule,
  *,
  grad_accum_steps: int,
  chunk_size: int,
  router_aux_coef: float = 0.0,
  is_moe: bool = False,
):
  """`(state, batch) -> (state, metrics)`: one optimizer update on a global batch."""

  def step(state: state_lib.TrainState, batch: TokenBatch):
    normaliser = jnp.maximum(batch.num_loss_tokens(), 1).astype(jnp.float32)

    def grads_of(trainable, mb):
      def loss_fn(t):
        return sft_loss(
          state.model(t),
          mb,
          normaliser,
          chunk_size=chunk_size,
          router_aux_coef=router_aux_coef,
          aux_weight=1.0 / grad_accum_steps,
        )

      return jax.grad(loss_fn, has_aux=True)(trainable)

    if grad_accum_steps == 1:
      grads, aux = grads_of(state.trainable, batch)
    else:

      def body(carry, mb):
        mb = jax.tree.map(lambda x: sharding_lib.constrain(x, ("batch", "length")), mb)
        g, a = grads_of(state.trainable, mb)
        return jax.tree.map(jnp.add, carry, (g, a)), None

      zeros = jax.tree.map(
        jnp.zeros_like, (state.trainable, {"nll": jnp.zeros(()), "router_aux_loss": jnp.zeros(())})
      )
      (grads, aux), _ = jax.lax.scan(body, zeros, _microbatches(batch, grad_accum_steps))
      aux = {**aux, "router_aux_loss": aux["router_aux_loss"] / grad_accum_steps}
    metrics = {
      "loss": aux["nll"],
      "grad_norm": optax.tree.norm(grads),
      "learning_rate": schedule(state.step),
      "loss_tokens": normaliser,
      "tokens": jnp.sum(batch.segment_ids_BT > 0).astype(jnp.float32),
    }
    if is_moe:
      metrics["router_aux_loss"] = aux["router_aux_loss"]
    return state.apply_gradients(grads), metrics

  return step


def make_eval_step(*, chunk_size: int):
  """`(state, batch) -> (nll_sum, loss_tokens)` for one eval batch."""

  def step(state: state_lib.TrainState, batch):
    _, aux = sft_loss(state.model(), batch, jnp.ones(()), chunk_size=chunk_size)
    return aux["nll"], batch.num_loss_tokens().astype(jnp.float32)

  return step


def jit_steps(config: ml_collections.ConfigDict, shardings: state_lib.TrainState, schedule, mesh, *, is_moe: bool):
  """`(train_step, eval_step)` jitted with the state's and the batch's shardings, as `train` runs them."""
  batch_shardings = TokenBatch(*(sharding_lib.data_sharding(mesh) for _ in FIELDS))
  train_step = jax.jit(
    make_train_step(
      schedule,
      grad_accum_steps=config.grad_accum_steps,
      chunk_size=config.loss.chunk_size,
      router_aux_coef=config.loss.router_aux_coef,
      is_moe=is_moe,
    ),
    in_shardings=(shardings, batch_shardings),
    out_shardings=(shardings, None),
    donate_argnums=0,
  )
  eval_step = jax.jit(make_eval_step(chunk_size=config.loss.chunk_size), in_shardings=(shardings, batch_shardings))
  return train_step, eval_step


def programs(config: ml_collections.ConfigDict, mesh) -> list[Program]:
  """The programs an SFT run of `config` executes on `mesh` (abstract arguments; see `retool_jax.aot`)."""
  cfg = abstract.model_config(config.model)
  tx, schedule = state_lib.make_optimizer(config.optim, max(config.num_steps, config.optim.warmup_steps + 1))
  model = abstract.abstract_model(cfg, mesh)
  state, shardings = abstract.abstract_train_state(model, tx, mesh, lora_config=build.lora_config(config.lora))
  train_step, eval_step = jit_steps(config, shardings, schedule, mesh, is_moe=cfg.is_moe)
  rows = abstract.batch((config.data.global_batch_size, config.data.seq_len), jnp.int32, mesh)
  batch = TokenBatch(*(rows for _ in FIELDS))
  return [
    Program("sft/train_step", train_step, (state, batch)),
    Program("sft/eval_step", eval_step, (state, batch)),
  ]


def evaluate(eval_fn, state, rows: PackedRows, mesh, global_batch_size: int, max_batches: int = 0) -> float:
  """Mean nll over every trained token of the eval rows."""
  pipeline = InputPipeline(rows, global_batch_size=global_batch_size, shuffle=False, num_epochs=1)
  nll, count = 0.0, 0.0
  for i, batch in enumerate(pipeline):
    if max_batches and i >= max_batches:
      break
    n, c = jax.device_get(eval_fn(state, _device_batch(batch, mesh)))
    nll, count = nll + float(n), count + float(c)
  return nll / max(count, 1.0)


# ---- run ----------------------------------------------------------------------------------------


def train(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Runs (or resumes) SFT as `config` says; returns the last logged metrics."""
  mesh = sharding_lib.make_mesh(**config.mesh)
  data = config.data
  batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
  if data.global_batch_size % (config.grad_accum_steps * batch_shards):
    raise ValueError(
      f"data.global_batch_size={data.global_batch_size} must be a multiple of grad_accum_steps="
      f"{config.grad_accum_steps} x {batch_shards} batch shards (mesh data x fsdp)"
    )
  rows, eval_rows = build_datasets(data, config.seed)
  pipeline = InputPipeline(rows, global_batch_size=data.global_batch_size, seed=config.seed, shuffle=data.shuffle)
  num_steps = config.num_steps or data.num_epochs * pipeline.steps_per_epoch()

  model = build.build_model(config.model, mesh, config.seed)
  cfg = model.config
  tx, schedule = state_lib.make_optimizer(config.optim, num_steps)
  root = jax.random.key(config.seed)
  state, shardings = state_lib.create_train_state(
    model,
    tx,
    jax.random.fold_in(root, 1),
    mesh,
    lora_config=build.lora_config(config.lora),
    lora_rng=jax.random.fold_in(root, 2),
  )
  del model
  train_step, eval_step = jit_steps(config, shardings, schedule, mesh, is_moe=cfg.is_moe)
  held = {"state": state}

  def step() -> dict[str, float]:
    held["state"], metrics = train_step(held["state"], _device_batch(next(pipeline), mesh))
    return {k: float(v) for k, v in jax.device_get(metrics).items()}

  def evaluate_now() -> dict[str, float]:
    loss = evaluate(eval_step, held["state"], eval_rows, mesh, data.global_batch_size, config.eval.max_batches)
    return {"eval_loss": loss}

  task = loop.Task(
    name="sft",
    num_steps=num_steps,
    model_config=cfg,
    step=step,
    saved=[loop.Saved("checkpoints", lambda: held["state"], lambda s: held.update(state=s), shardings)],
    position=pipeline.state,
    restore=lambda record, _: pipeline.restore(record["data"]),
    evaluate=evaluate_now if eval_rows is not None else None,
    eval_every=config.eval.every_steps,
    log_every=config.log.every_steps,
    progress={"loss": ("loss", ".4f"), "lr": ("learning_rate", ".2e"), "tok_s": ("perf/tokens_per_s", ".0f")},
  )
  return loop.run(config, task, mesh, contract=lambda workdir: record_sft_contract(workdir, data))
