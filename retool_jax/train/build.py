"""What every trainer builds the same way: the model (random init or a checkpoint, onto the mesh), LoRA, and the
config groups that describe them (`model_fields`, `lora_fields`, `optim_fields`).

    model = build_model(config.model, mesh, config.seed)
    state, shardings = state_lib.create_train_state(model, tx, rng, mesh, lora_config=lora_config(config.lora))
"""

from __future__ import annotations

from pathlib import Path

import ml_collections
from flax import nnx

from retool_jax import sharding as sharding_lib
from retool_jax.checkpoint import layout
from retool_jax.fields import check_fields, field_names
from retool_jax.models.qwen3 import Qwen3
from retool_jax.models.qwen3_config import Qwen3Config, preset
from retool_jax.models.qwen3_hf import load_hf
from retool_jax.train import lora as lora_lib

EXECUTION_FIELDS = ("param_dtype", "dtype", "remat", "scan_layers", "attention_impl", "moe_impl")
EXECUTION = ("param_dtype", "dtype", "remat", "scan_layers", "attention_impl")  # config.model fields
_DEFAULT_ATTENTION = Qwen3Config.__dataclass_fields__["attention_impl"].default


def model_fields() -> ml_collections.ConfigDict:
  """The `config.model` group every trainer (and the evaluator) reads, with its defaults."""
  m = ml_collections.ConfigDict()
  m.checkpoint = ""  # Orbax (retool_jax layout, or a trainer's checkpoints folder) or Hugging Face folder
  m.preset = ""  # Qwen3 size for random init ("0.6B", "4B", ...); "" = `overrides` only
  m.overrides = ml_collections.ConfigDict()  # Qwen3Config fields (architecture for random init)
  m.param_dtype = "float32"  # master weights and optimizer state
  m.dtype = "bfloat16"  # compute
  m.remat = "none"  # none | full | dots | dots_with_no_batch_dims | attention_out
  m.scan_layers = False
  m.attention_impl = _DEFAULT_ATTENTION  # auto (splash on TPU, cuDNN on GPU, blockwise elsewhere) | xla | ...
  return m


def lora_fields() -> ml_collections.ConfigDict:
  """The `config.lora` group: rank 0 = full fine-tuning; else only adapters train (merged on export)."""
  return ml_collections.ConfigDict(dict(rank=0, alpha=16.0, targets="q,k,v,o,gate,up,down"))


def log_fields() -> ml_collections.ConfigDict:
  """The `log` group every trainer reads (`train/loop.py`)."""
  g = ml_collections.ConfigDict()
  g.every_steps = 1  # steps between logged records (the last step is always logged)
  g.tensorboard = True  # tensorboard/ event files beside metrics.jsonl
  g.progress = True  # a progress bar: live on a terminal, plain lines in a log
  g.curves = True  # curves.png (every metric against the step) at the end of the run
  return g


def optim_fields(
  learning_rate: float, *, schedule: str = "constant", weight_decay: float = 0.0
) -> ml_collections.ConfigDict:
  """An optimizer group (`state.make_optimizer`): AdamW with a learning-rate schedule and global-norm clipping."""
  o = ml_collections.ConfigDict()
  o.schedule = schedule  # constant | warmup_cosine | warmup_linear
  o.learning_rate = learning_rate
  o.warmup_steps = 0
  o.decay_steps = 0  # warmup included; 0 = the run's updates
  o.end_lr_factor = 0.0  # final lr = end_lr_factor * learning_rate
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.weight_decay = weight_decay  # norms and biases are never decayed
  o.grad_clip_norm = 1.0  # 0 = off
  return o


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
    loaded = load_hf(path, dtype=m.param_dtype, mesh=mesh)
  else:
    loaded = layout.load(path, mesh, dtype=m.param_dtype)
  execution = {k: m[k] for k in EXECUTION if k in m}
  cfg = loaded.config.replace(**{**execution, **dict(m.overrides)})
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Qwen3(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(loaded))


def lora_config(c: ml_collections.ConfigDict) -> lora_lib.LoraConfig | None:
  """The `LoraConfig` of a `config.lora` group (None for rank 0: full fine-tuning)."""
  if not c.rank:
    return None
  targets = tuple(t.strip() for t in c.targets.split(",") if t.strip())
  return lora_lib.LoraConfig(rank=c.rank, alpha=c.alpha, targets=targets)
