"""The train state every trainer shares: model parameters, optimizer, step and RNG, sharded over the mesh.

`TrainState` is a pytree: `jax.jit` takes it with the shardings `state_shardings` returns and donates it. The
model is rebuilt from `(graphdef, params)` inside the traced step (`state.model(trainable)`), so gradients are
taken with respect to a plain dict. With LoRA, `params` holds the frozen base weights and `lora` the trained
adapters; the optimizer state always covers exactly the trained tree (`state.trainable`).

Precision: parameters and optimizer state are float32 masters; the model computes in its config's `dtype`
(bfloat16 for training runs), casting weights per use.
"""

from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx, struct
from jax.sharding import NamedSharding, PartitionSpec

from retool_jax import sharding as sharding_lib
from retool_jax.models.logprobs import TokenLogprobs, token_logprobs
from retool_jax.train import lora as lora_lib
from retool_jax.train import microbatch

PureDict = dict[str, Any]
SCHEDULES = ("constant", "warmup_cosine", "warmup_linear")
_NO_DECAY = re.compile(r"(^|/)([^/]*norm[^/]*|[^/]*bias)(/|$)")


# ---- optimizer ------------------------------------------------------------------------------------


def make_schedule(optim: Mapping[str, Any], total_steps: int) -> optax.Schedule:
  """Learning rate by step: `constant`, or linear warmup then cosine / linear decay to `end_lr_factor * lr`.

  `decay_steps` (warmup included) defaults to `total_steps` when 0.
  """
  kind, lr = optim["schedule"], float(optim["learning_rate"])
  warmup = int(optim.get("warmup_steps", 0))
  decay = int(optim.get("decay_steps", 0)) or total_steps
  end = lr * float(optim.get("end_lr_factor", 0.0))
  if kind not in SCHEDULES:
    raise ValueError(f"optim.schedule={kind!r}; expected one of {SCHEDULES}")
  if kind == "constant":
    if not warmup:
      return optax.constant_schedule(lr)
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), optax.constant_schedule(lr)], [warmup])
  if decay <= warmup:
    raise ValueError(f"optim.decay_steps={decay} must exceed optim.warmup_steps={warmup}")
  if kind == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(0.0, lr, warmup, decay, end)
  return optax.join_schedules(
    [optax.linear_schedule(0.0, lr, warmup), optax.linear_schedule(lr, end, decay - warmup)], [warmup]
  )


def decay_mask(params: PureDict) -> PureDict:
  """True for weights that take weight decay; norms and biases are spared."""

  def decays(path, _):
    name = "/".join(str(getattr(k, "key", k)) for k in path)
    return not _NO_DECAY.search(name)

  return jax.tree_util.tree_map_with_path(decays, params)


def make_optimizer(
  optim: Mapping[str, Any], total_steps: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """AdamW with global-norm clipping (`grad_clip_norm` 0 disables it) and the decay mask above."""
  schedule = make_schedule(optim, total_steps)
  parts = []
  if float(optim.get("grad_clip_norm", 0.0)) > 0:
    parts.append(optax.clip_by_global_norm(float(optim["grad_clip_norm"])))
  parts.append(
    optax.adamw(
      schedule,
      b1=float(optim.get("b1", 0.9)),
      b2=float(optim.get("b2", 0.999)),
      eps=float(optim.get("eps", 1e-8)),
      weight_decay=float(optim.get("weight_decay", 0.0)),
      mask=decay_mask,
    )
  )
  return optax.chain(*parts), schedule


# ---- state ----------------------------------------------------------------------------------------


@struct.dataclass
class TrainState:
  """Parameters, optimizer state, step and RNG of one trained model (a pytree; the rest is static)."""

  step: jax.Array  # int32 scalar: optimizer updates applied so far
  params: PureDict  # the model's parameters (frozen base weights when `lora` is set)
  opt_state: optax.OptState  # over `trainable`
  rng: jax.Array  # typed PRNG key, split by trainers that sample
  lora: PureDict | None = None  # LoRA adapters, the only trained tree when present
  graphdef: nnx.GraphDef = struct.field(pytree_node=False, default=None)
  tx: optax.GradientTransformation = struct.field(pytree_node=False, default=None)
  lora_config: lora_lib.LoraConfig | None = struct.field(pytree_node=False, default=None)

  @classmethod
  def create(
    cls,
    model: nnx.Module,
    tx: optax.GradientTransformation,
    rng: jax.Array,
    *,
    lora_config: lora_lib.LoraConfig | None = None,
    lora_rng: jax.Array | None = None,
  ) -> "TrainState":
    """Eager constructor for small models; `create_train_state` builds straight onto the mesh."""
    graphdef, state = nnx.split(model, nnx.Param)
    params = nnx.to_pure_dict(state)
    lora = None
    if lora_config is not None:
      lora = lora_lib.init_lora(params, lora_config, lora_rng if lora_rng is not None else jax.random.key(0))
    trainable = lora if lora is not None else params
    return cls(
      step=jnp.zeros((), jnp.int32),
      params=params,
      opt_state=tx.init(trainable),
      rng=rng,
      lora=lora,
      graphdef=graphdef,
      tx=tx,
      lora_config=lora_config,
    )

  @property
  def trainable(self) -> PureDict:
    return self.lora if self.lora is not None else self.params

  def model_params(self, trainable: PureDict | None = None) -> PureDict:
    """Full model weights for `trainable` (default: the current ones), adapters applied."""
    trainable = self.trainable if trainable is None else trainable
    if self.lora is None:
      return trainable
    return lora_lib.apply_lora(self.params, trainable, self.lora_config)

  def model(self, trainable: PureDict | None = None) -> nnx.Module:
    """The NNX model with `trainable` in place (traceable, so losses can differentiate through it)."""
    return nnx.merge(self.graphdef, self.model_params(trainable))

  def apply_gradients(self, grads: PureDict) -> "TrainState":
    updates, opt_state = self.tx.update(grads, self.opt_state, self.trainable)
    trainable = optax.apply_updates(self.trainable, updates)
    replaced = dict(lora=trainable) if self.lora is not None else dict(params=trainable)
    return self.replace(step=self.step + 1, opt_state=opt_state, **replaced)


def _replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def param_shardings(model: nnx.Module, mesh) -> PureDict:
  """NamedShardings of the model's parameters, from their logical `axes` metadata."""
  return nnx.to_pure_dict(sharding_lib.state_shardings(nnx.state(model, nnx.Param), mesh))


def state_shardings(state: TrainState, mesh, params: PureDict) -> TrainState:
  """A TrainState of NamedShardings: parameters by the logical-axis table (`params`), optimizer moments
  like the tree they track, adapters, step and RNG replicated."""
  rep = _replicated(mesh)
  lora = None if state.lora is None else jax.tree.map(lambda _: rep, state.lora)
  trainable = lora if lora is not None else params
  opt = optax.tree_map_params(
    state.tx, lambda _, s: s, state.opt_state, trainable, transform_non_params=lambda _: rep
  )
  return state.replace(step=rep, params=params, opt_state=opt, rng=rep, lora=lora)


def create_train_state(
  model: nnx.Module,
  tx: optax.GradientTransformation,
  rng: jax.Array,
  mesh,
  *,
  lora_config: lora_lib.LoraConfig | None = None,
  lora_rng: jax.Array | None = None,
) -> tuple[TrainState, TrainState]:
  """The state on `mesh` (optimizer state initialised in place, sharded like its parameters) and its shardings.

  `model` must already live on the mesh (`sharding.create_sharded` or `checkpoint.load(path, mesh)`).
  """
  abstract = jax.eval_shape(
    lambda m: TrainState.create(m, tx, rng, lora_config=lora_config, lora_rng=lora_rng), model
  )
  shardings = state_shardings(abstract, mesh, param_shardings(model, mesh))
  params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

  def init(params):
    lora = None
    if lora_config is not None:
      lora = lora_lib.init_lora(params, lora_config, lora_rng if lora_rng is not None else jax.random.key(0))
    return tx.init(lora if lora is not None else params), lora

  with jax.set_mesh(mesh):
    opt_state, lora = jax.jit(init, out_shardings=(shardings.opt_state, shardings.lora))(params)
  state = abstract.replace(
    step=jax.device_put(jnp.zeros((), jnp.int32), shardings.step),
    params=params,
    opt_state=opt_state,
    rng=jax.device_put(rng, shardings.rng),
    lora=lora,
  )
  return state, shardings


def abstract_with_shardings(abstract: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs carrying shardings (restore targets)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


# ---- frozen reference model ----------------------------------------------------------------------


class ReferenceModel:
  """A frozen copy of the policy for KL penalties, on the same mesh; optionally parked in host memory.

  Build it with `make_reference`, which returns None when the penalty coefficient is 0, so no memory or compute
  is spent on it. With `offload=True` the weights live in pinned host memory (plain numpy where the backend has
  none) between uses and are moved onto the devices for each `logprobs` call.
  """

  def __init__(self, graphdef: nnx.GraphDef, params: PureDict, shardings: PureDict, *, offload: bool = False):
    self.graphdef, self.shardings, self.offload = graphdef, shardings, offload
    self.params = self._to_host(params) if offload else params
    self._fn = jax.jit(self._logprobs, static_argnames=("temperature", "chunk_size", "micro_batches"))

  def _to_host(self, params: PureDict) -> PureDict:
    try:
      host = jax.tree.map(lambda s: s.with_memory_kind("pinned_host"), self.shardings)
      return jax.device_put(params, host)
    except (ValueError, RuntimeError, NotImplementedError):
      return jax.device_get(params)

  def device_params(self) -> PureDict:
    return jax.device_put(self.params, self.shardings) if self.offload else self.params

  def _logprobs(
    self,
    params,
    input_ids,
    targets,
    positions,
    segment_ids,
    attention_mask,
    *,
    temperature,
    chunk_size,
    micro_batches=1,
  ):
    model = nnx.merge(self.graphdef, params)
    rows = dict(input_ids=input_ids, targets=targets)
    rows.update(
      {
        k: v
        for k, v in dict(positions=positions, segment_ids=segment_ids, mask=attention_mask).items()
        if v is not None
      }
    )

    def run(mb):
      return token_logprobs(
        model,
        mb["input_ids"],
        mb["targets"],
        positions=mb.get("positions"),
        segment_ids=mb.get("segment_ids"),
        attention_mask=mb.get("mask"),
        temperature=temperature,
        chunk_size=chunk_size,
      )

    return microbatch.map_rows(run, rows, micro_batches)

  def logprobs(
    self,
    input_ids_BT,
    targets_BT,
    *,
    positions=None,
    segment_ids=None,
    attention_mask=None,
    temperature: float = 1.0,
    chunk_size: int = 256,
    micro_batches: int = 1,
  ) -> TokenLogprobs:
    """Log-probs of the targets under the frozen weights, `micro_batches` row groups at a time."""
    return self._fn(
      self.device_params(),
      input_ids_BT,
      targets_BT,
      positions,
      segment_ids,
      attention_mask,
      temperature=temperature,
      chunk_size=chunk_size,
      micro_batches=micro_batches,
    )


def make_reference(
  coef: float, state: TrainState, shardings: TrainState, *, offload: bool = False
) -> ReferenceModel | None:
  """The reference policy: a frozen copy of the state's current weights (for LoRA, of the frozen base).

  Returns None when `coef == 0`: the reference model is then never built. The weights are copied even under
  LoRA, where they equal the policy's base: the update steps donate the whole state, base included, so the
  reference cannot share its buffers (with `offload=True` the copy lives in host memory).
  """
  if coef == 0:
    return None
  params = jax.tree.map(jnp.copy, state.params)
  return ReferenceModel(state.graphdef, params, shardings.params, offload=offload)
