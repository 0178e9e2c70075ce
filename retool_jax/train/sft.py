"""Supervised fine-tuning: masked next-token loss on packed conversations (the ReTool cold start).

The loss is the mean negative log-likelihood over the trained tokens of the whole global batch: every
micro-batch adds `sum(nll * mask) / N` with `N` the loss-token count of the global batch, so gradient
accumulation gives the same update as one large batch. Packed rows keep examples apart with segment ids.

    python -m retool_jax.train --config=configs/retool_qwen3_4b_sft.py --config.data.path=retool_sft.jsonl
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from retool_jax import sharding as sharding_lib
from retool_jax.chat.prompt_contract import record_sft_contract
from retool_jax.data.packing import PACKED_FIELDS, PackedRows, pack_sequences
from retool_jax.data.pipeline import InputPipeline, global_batch
from retool_jax.fields import check_fields, field_names
from retool_jax.models.logprobs import token_logprobs
from retool_jax.models.qwen3 import Qwen3
from retool_jax.models.qwen3_config import Qwen3Config, preset
from retool_jax.programs import Program
from retool_jax.train import lora as lora_lib
from retool_jax.train import losses
from retool_jax.train import state as state_lib
from retool_jax.train.checkpointing import Checkpointer
from retool_jax.train.metrics import MetricsWriter

DATA_FORMATS = ("retool_sft", "chat", "tokens", "synthetic")
EXECUTION_FIELDS = ("param_dtype", "dtype", "remat", "scan_layers", "attention_impl", "moe_impl")
EXECUTION = ("param_dtype", "dtype", "remat", "scan_layers", "attention_impl")  # config.model fields
FREE_FORM = ("model.overrides",)  # validated against Qwen3Config instead of the schema
_DEFAULT_ATTENTION = Qwen3Config.__dataclass_fields__["attention_impl"].default


def default_config() -> ml_collections.ConfigDict:
  """Every field the SFT trainer reads, with its default; configs start from this and override."""
  c = ml_collections.ConfigDict()
  c.trainer = "sft"
  c.workdir = "runs/sft"  # metrics.jsonl, tensorboard/, checkpoints/
  c.seed = 0  # model init, LoRA init, data order
  c.num_steps = 0  # optimizer updates; 0: `data.num_epochs` epochs
  c.grad_accum_steps = 1  # micro-batches per update (global_batch_size must divide evenly)

  c.model = ml_collections.ConfigDict()
  c.model.checkpoint = ""  # Orbax (retool_jax layout) or Hugging Face folder; "" = random init
  c.model.preset = ""  # Qwen3 size for random init ("0.6B", "4B", ...); "" = `overrides` only
  c.model.overrides = ml_collections.ConfigDict()  # Qwen3Config fields (architecture for random init)
  c.model.param_dtype = "float32"  # master weights and optimizer state
  c.model.dtype = "bfloat16"  # compute
  c.model.remat = "none"  # none | full | dots | dots_with_no_batch_dims | attention_out
  c.model.scan_layers = False
  c.model.attention_impl = (
    _DEFAULT_ATTENTION  # auto (splash on TPU, cuDNN on GPU, blockwise elsewhere) | xla | ...
  )

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

  c.optim = ml_collections.ConfigDict()
  c.optim.schedule = "warmup_cosine"  # constant | warmup_cosine | warmup_linear
  c.optim.learning_rate = 1e-5
  c.optim.warmup_steps = 0
  c.optim.decay_steps = 0  # warmup included; 0 = num_steps
  c.optim.end_lr_factor = 0.0  # final lr = end_lr_factor * learning_rate
  c.optim.b1 = 0.9
  c.optim.b2 = 0.999
  c.optim.eps = 1e-8
  c.optim.weight_decay = 0.0  # AdamW; norms and biases are never decayed
  c.optim.grad_clip_norm = 1.0  # global-norm clipping; 0 = off

  c.lora = ml_collections.ConfigDict()
  c.lora.rank = 0  # 0 = full fine-tuning
  c.lora.alpha = 16.0
  c.lora.targets = "q,k,v,o,gate,up,down"

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

  c.log = ml_collections.ConfigDict()
  c.log.every_steps = 1
  c.log.tensorboard = True
  c.log.progress = True
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


def load_examples(data: ml_collections.ConfigDict, path: str, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
  """`(ids, loss_mask)` pairs from `path` in `data.format`."""
  limit = data.limit or None
  if data.format == "synthetic":
    return synthetic_examples(data.synthetic_examples, data.synthetic_vocab, seed)
  if not path:
    raise ValueError(f"data.path is empty; data.format={data.format!r} reads a json/jsonl/parquet file")
  if data.format == "tokens":
    from retool_jax.data.io import field, read_rows

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
  from retool_jax.assets import QWEN3_TOKENIZER_DIR
  from retool_jax.chat import load_tokenizer
  from retool_jax.data import load_chat_sft, load_retool_sft

  tok = load_tokenizer(data.tokenizer or QWEN3_TOKENIZER_DIR)
  if data.format == "retool_sft":
    examples = load_retool_sft(path, style=data.style, limit=limit)
  elif data.format == "chat":
    examples = load_chat_sft(path, limit=limit)
  else:
    raise ValueError(f"data.format={data.format!r}; expected one of {DATA_FORMATS}")
  return [ex.encode(tok, enable_thinking=data.enable_thinking) for ex in examples]


def _pad_id(tokenizer_dir: str) -> int:
  """The padding id of the data's tokenizer (`data.tokenizer`, "" = the packaged Qwen3 one)."""
  from retool_jax.assets import QWEN3_TOKENIZER_DIR
  from retool_jax.chat import load_tokenizer

  tok = load_tokenizer(tokenizer_dir or QWEN3_TOKENIZER_DIR)
  return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


def build_datasets(data: ml_collections.ConfigDict, seed: int) -> tuple[PackedRows, PackedRows | None]:
  """Packed training rows and packed eval rows (or None)."""
  pad_id = 0 if data.format == "synthetic" else _pad_id(data.tokenizer)
  examples = load_examples(data, data.path, seed)
  eval_examples = None
  if data.eval_path or data.format == "synthetic" and data.eval_holdout:
    eval_examples = load_examples(data, data.eval_path, seed + 1)[: data.eval_holdout or None]
  elif data.eval_holdout:
    if data.eval_holdout >= len(examples):
      raise ValueError(f"data.eval_holdout={data.eval_holdout} leaves no training examples (have {len(examples)})")
    examples, eval_examples = examples[: -data.eval_holdout], examples[-data.eval_holdout :]
  pack = lambda exs: pack_sequences(exs, data.seq_len, pad_id=pad_id, overflow=data.overflow)  # noqa: E731
  train = pack(examples)
  if len(train) == 0:
    raise ValueError(f"{data.path or data.format}: no example has a trained token")
  return train, (pack(eval_examples) if eval_examples else None)


def _device_batch(batch, mesh) -> dict[str, jax.Array]:
  rows = dict(batch.examples)
  rows["loss_mask"] = rows["loss_mask"] * batch.mask[:, None].astype(rows["loss_mask"].dtype)  # padding slots
  return global_batch(rows, sharding_lib.data_sharding(mesh))


# ---- model --------------------------------------------------------------------------------------


def model_config(m: ml_collections.ConfigDict) -> Qwen3Config | None:
  """The Qwen3Config for random init (None when loading `m.checkpoint`)."""
  execution = {k: m[k] for k in EXECUTION if k in m}
  overrides = dict(m.overrides)
  check_fields(overrides, field_names(Qwen3Config), "model.overrides (Qwen3Config)")
  if not (m.checkpoint or m.preset or overrides):
    raise ValueError(
      "model: set model.checkpoint (a Qwen3 Hugging Face or Orbax folder), or model.preset / "
      "model.overrides for a randomly initialised model"
    )
  if m.checkpoint:
    arch = set(overrides) - set(EXECUTION_FIELDS)
    if arch:
      raise ValueError(
        f"model.overrides {sorted(arch)} change the architecture of model.checkpoint={m.checkpoint}"
      )
    return None
  try:
    fields = {**execution, **overrides}
    return preset(m.preset, **fields) if m.preset else Qwen3Config(**fields)
  except TypeError as e:
    raise ValueError(
      f"model: without model.checkpoint or model.preset, model.overrides must give the whole architecture ({e})"
    ) from None


def build_model(m: ml_collections.ConfigDict, mesh, seed: int) -> Qwen3:
  """Random init straight onto the mesh, or a checkpoint loaded onto it, with the config's dtypes and remat."""
  cfg = model_config(m)
  if cfg is not None:
    return sharding_lib.create_sharded(lambda: Qwen3(cfg, rngs=nnx.Rngs(seed)), mesh)
  path = Path(m.checkpoint)
  if (path / "config.json").exists():
    from retool_jax.models.qwen3_hf import load_hf

    loaded = load_hf(path, dtype=m.param_dtype, mesh=mesh)
  else:
    from retool_jax.checkpoint import layout

    loaded = layout.load(path, mesh, dtype=m.param_dtype)
  execution = {k: m[k] for k in EXECUTION if k in m}
  cfg = loaded.config.replace(**{**execution, **dict(m.overrides)})
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(loaded))


def lora_config(c: ml_collections.ConfigDict) -> lora_lib.LoraConfig | None:
  if not c.rank:
    return None
  targets = tuple(t.strip() for t in c.targets.split(",") if t.strip())
  return lora_lib.LoraConfig(rank=c.rank, alpha=c.alpha, targets=targets)


# ---- steps --------------------------------------------------------------------------------------


def sft_loss(
  model: Qwen3,
  batch: dict[str, jax.Array],
  normaliser: jax.Array,
  *,
  chunk_size: int,
  router_aux_coef: float = 0.0,
  aux_weight: float = 1.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """`sum(nll * loss_mask) / normaliser` plus the weighted router loss; metrics hold the first term alone."""
  out = token_logprobs(
    model,
    batch["input_ids"],
    batch["targets"],
    positions=batch["positions"],
    segment_ids=batch["segment_ids"],
    chunk_size=chunk_size,
  )
  nll, _ = losses.sft_loss(out.logprobs_BT, batch["loss_mask"], num_tokens=normaliser)
  aux = out.router_aux_loss if out.router_aux_loss is not None else jnp.zeros((), jnp.float32)
  loss = nll + router_aux_coef * aux_weight * aux if router_aux_coef else nll
  return loss, {"nll": nll, "router_aux_loss": aux}


def _microbatches(batch: dict[str, jax.Array], n: int) -> dict[str, jax.Array]:
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

  def step(state: state_lib.TrainState, batch: dict[str, jax.Array]):
    normaliser = jnp.maximum(jnp.sum(batch["loss_mask"] > 0), 1).astype(jnp.float32)

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
      "tokens": jnp.sum(batch["segment_ids"] > 0).astype(jnp.float32),
    }
    if is_moe:
      metrics["router_aux_loss"] = aux["router_aux_loss"]
    return state.apply_gradients(grads), metrics

  return step


def make_eval_step(*, chunk_size: int):
  """`(state, batch) -> (nll_sum, loss_tokens)` for one eval batch."""

  def step(state: state_lib.TrainState, batch):
    _, aux = sft_loss(state.model(), batch, jnp.ones(()), chunk_size=chunk_size)
    return aux["nll"], jnp.sum(batch["loss_mask"] > 0).astype(jnp.float32)

  return step


def jit_steps(config: ml_collections.ConfigDict, shardings: state_lib.TrainState, schedule, mesh, *, is_moe: bool):
  """`(train_step, eval_step)` jitted with the state's and the batch's shardings, as `train` runs them."""
  batch_shardings = {k: sharding_lib.data_sharding(mesh) for k in PACKED_FIELDS}
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
  from retool_jax.train import abstract  # noqa: PLC0415

  cfg = abstract.model_config(config.model)
  tx, schedule = state_lib.make_optimizer(config.optim, max(config.num_steps, config.optim.warmup_steps + 1))
  model = abstract.abstract_model(cfg, mesh)
  state, shardings = abstract.abstract_train_state(model, tx, mesh, lora_config=lora_config(config.lora))
  train_step, eval_step = jit_steps(config, shardings, schedule, mesh, is_moe=cfg.is_moe)
  rows = abstract.batch((config.data.global_batch_size, config.data.seq_len), jnp.int32, mesh)
  batch = {k: rows for k in PACKED_FIELDS}
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


# ---- loop ---------------------------------------------------------------------------------------


def _progress(total: int, initial: int, enabled: bool):
  from tqdm.auto import tqdm

  return tqdm(
    total=total, initial=initial, disable=not enabled or jax.process_index() != 0, desc="sft", dynamic_ncols=True
  )


def _batches(pipeline: InputPipeline, mesh) -> Iterator[tuple[dict, dict]]:
  for batch in pipeline:
    yield _device_batch(batch, mesh), pipeline.state()


def train(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Runs (or resumes) SFT as `config` says; returns the last logged metrics."""
  workdir = Path(config.workdir)
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

  model = build_model(config.model, mesh, config.seed)
  cfg = model.config
  tx, schedule = state_lib.make_optimizer(config.optim, num_steps)
  root = jax.random.key(config.seed)
  state, shardings = state_lib.create_train_state(
    model,
    tx,
    jax.random.fold_in(root, 1),
    mesh,
    lora_config=lora_config(config.lora),
    lora_rng=jax.random.fold_in(root, 2),
  )
  del model

  ckpt = Checkpointer(
    workdir / "checkpoints",
    save_every=config.checkpoint.every_steps,
    keep=config.checkpoint.keep,
    async_save=config.checkpoint.async_save,
  )
  start = ckpt.latest_step()
  if start is not None:
    state, record = ckpt.restore(state, shardings, start)
    pipeline.restore(record["data"])
  start = start or 0
  if jax.process_index() == 0:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")
    record_sft_contract(workdir, config.data)

  train_step, eval_step = jit_steps(config, shardings, schedule, mesh, is_moe=cfg.is_moe)

  last: dict[str, Any] = {}
  bar = _progress(num_steps, start, config.log.progress)
  batches = _batches(pipeline, mesh)
  with (
    MetricsWriter(workdir, resume_step=start if start else None, tensorboard=config.log.tensorboard) as writer,
    jax.set_mesh(mesh),
  ):
    for step in range(start + 1, num_steps + 1):
      t0 = time.perf_counter()
      batch, data_state = next(batches)
      state, metrics = train_step(state, batch)
      metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
      elapsed = time.perf_counter() - t0
      metrics["perf/step_time_s"] = elapsed
      metrics["perf/tokens_per_s"] = metrics["tokens"] / elapsed
      if eval_rows is not None and (
        step == num_steps or config.eval.every_steps and step % config.eval.every_steps == 0
      ):
        metrics["eval_loss"] = evaluate(
          eval_step, state, eval_rows, mesh, data.global_batch_size, config.eval.max_batches
        )
      if step % config.log.every_steps == 0 or step == num_steps:
        writer.write(step, metrics)
        last = {"step": step, **metrics}
      ckpt.save(state, cfg, data_state=data_state, force=step == num_steps)
      bar.update(1)
      bar.set_postfix(
        loss=f"{metrics['loss']:.4f}",
        lr=f"{metrics['learning_rate']:.2e}",
        tok_s=f"{metrics['perf/tokens_per_s']:.0f}",
      )
  bar.close()
  ckpt.close()
  if jax.process_index() == 0:
    (workdir / "summary.json").write_text(json.dumps(last, indent=2) + "\n")
  return last
