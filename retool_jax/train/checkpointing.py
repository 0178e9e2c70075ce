"""Training checkpoints: an asynchronous Orbax `CheckpointManager` saving every N steps and keeping the last K.

Each step folder is a `retool_jax.checkpoint` layout plus the training items, so `checkpoint.load` and
`python -m retool_jax.convert --to hf` read a training run directly:

    <workdir>/checkpoints/<step>/params     full model weights (LoRA adapters merged in), a pure dict
                                 config     the model config record
                                 opt_state  optimizer state (sharded like what it tracks)
                                 lora       LoRA adapters, when training them
                                 train      JSON: step, RNG key data, data-pipeline position, extras

Writes go to a temporary folder renamed on completion, so a run killed at any moment leaves only whole
checkpoints; `latest_step` sees only those. With LoRA the frozen base weights are not restored from `params`
(which hold the merged weights): the trainer rebuilds the base as it did at the start.
"""

from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

from retool_jax.checkpoint.layout import CONFIG_ITEM, PARAMS_ITEM, absolute, config_record
from retool_jax.models.qwen3_config import Qwen3Config
from retool_jax.train.multihost import barrier, host_to_global
from retool_jax.train.state import TrainState, abstract_with_shardings

OPT_ITEM, LORA_ITEM, TRAIN_ITEM = "opt_state", "lora", "train"


def _restore_args(shardings: Any, abstract: Any) -> Any:
  return jax.tree.map(
    lambda a, s: ocp.ArrayRestoreArgs(sharding=s, dtype=a.dtype, global_shape=a.shape), abstract, shardings
  )


class Checkpointer:
  """Saves and restores `TrainState`s (plus the data position and extras) under `directory`."""

  def __init__(self, directory: str | os.PathLike, *, save_every: int, keep: int = 3, async_save: bool = True):
    self.directory = absolute(directory)  # gs://... stays a URL
    self.save_every = save_every
    options = ocp.CheckpointManagerOptions(
      save_interval_steps=save_every, max_to_keep=keep, enable_async_checkpointing=async_save, create=True
    )
    handlers = {
      PARAMS_ITEM: ocp.PyTreeCheckpointHandler(),
      CONFIG_ITEM: ocp.JsonCheckpointHandler(),
      OPT_ITEM: ocp.StandardCheckpointHandler(),
      LORA_ITEM: ocp.StandardCheckpointHandler(),
      TRAIN_ITEM: ocp.JsonCheckpointHandler(),
    }
    barrier("checkpointer")  # Orbax's first step is a collective: meet before it
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def delete_after(self, step: int | None) -> None:
    """Deletes the checkpoints of steps after `step` (all of them for None), e.g. ones a resume replays."""
    for s in self.all_steps():
      if step is None or s > step:
        self.manager.delete(s)

  def save(
    self,
    state: TrainState,
    model_config: Qwen3Config,
    *,
    data_state: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    force: bool = False,
    step: int | None = None,
  ) -> bool:
    """Starts saving `state` if its step is due (every `save_every`) or `force`; returns whether it did.

    Checkpoints are numbered by `step`, by default the state's optimizer step (an RL run numbers them by RL
    step, which may take several updates); the optimizer step is always recorded in the `train` item.
    """
    updates = int(jax.device_get(state.step))
    step = updates if step is None else int(step)
    if not (force or self.manager.should_save(step)):
      return False
    train = {
      "step": updates,
      "rng": np.asarray(jax.random.key_data(state.rng)).tolist(),
      "rng_impl": str(jax.random.key_impl(state.rng)),
      "data": dict(data_state or {}),
      "extra": dict(extra or {}),
    }
    items = {
      PARAMS_ITEM: ocp.args.PyTreeSave(state.model_params()),
      CONFIG_ITEM: ocp.args.JsonSave(config_record(model_config)),
      OPT_ITEM: ocp.args.StandardSave(state.opt_state),
      TRAIN_ITEM: ocp.args.JsonSave(train),
    }
    if state.lora is not None:
      items[LORA_ITEM] = ocp.args.StandardSave(state.lora)
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def restore(
    self, state: TrainState, shardings: TrainState | None = None, step: int | None = None
  ) -> tuple[TrainState, dict[str, Any]]:
    """Restores step `step` (default: the latest) into the structure of `state`, placed by `shardings`
    (default: where the arrays of `state` are).

    Returns the restored state and the `train` record (`step`: optimizer updates, `data`, `extra`). `state`
    supplies the static parts and, under LoRA, the frozen base weights.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if shardings is None:
      shardings = jax.tree.map(lambda a: a.sharding, state)
    abstract = jax.eval_shape(lambda s: s, state)
    items = {
      OPT_ITEM: ocp.args.StandardRestore(abstract_with_shardings(abstract.opt_state, shardings.opt_state)),
      TRAIN_ITEM: ocp.args.JsonRestore(),
    }
    if state.lora is not None:
      items[LORA_ITEM] = ocp.args.StandardRestore(abstract_with_shardings(abstract.lora, shardings.lora))
    else:
      items[PARAMS_ITEM] = ocp.args.PyTreeRestore(
        item=abstract.params, restore_args=_restore_args(shardings.params, abstract.params)
      )
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    train = dict(restored[TRAIN_ITEM])
    key_data = np.asarray(train["rng"], dtype=np.uint32)
    rng = host_to_global(jax.random.wrap_key_data(key_data, impl=train.get("rng_impl") or None), shardings.rng)
    new = state.replace(
      step=host_to_global(np.int32(train["step"]), shardings.step),
      rng=rng,
      opt_state=restored[OPT_ITEM],
      params=state.params if state.lora is not None else restored[PARAMS_ITEM],
      lora=restored[LORA_ITEM] if state.lora is not None else None,
    )
    return new, train

  def record(self, step: int | None = None) -> dict[str, Any]:
    """The `train` record of step `step` (default: the latest) alone: optimizer step, data position, extras."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    restored = self.manager.restore(step, args=ocp.args.Composite(**{TRAIN_ITEM: ocp.args.JsonRestore()}))
    return dict(restored[TRAIN_ITEM])

  def wait(self) -> None:
    """Blocks until pending asynchronous saves are on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
