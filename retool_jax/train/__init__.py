"""Trainers and the pieces they share (train state, LoRA, checkpoints, metrics), chosen by `config.trainer`.

A trainer is a module with `default_config() -> ConfigDict` (every field it reads, documented, with defaults;
also the schema configs are checked against), `train(config) -> dict`, and optionally `FREE_FORM`, the dotted
paths of sub-configs it validates itself. Register new trainers in `TRAINERS`.
"""

from __future__ import annotations

import difflib
import importlib
from types import ModuleType
from typing import Iterable

import ml_collections

# config.trainer -> module; every trainer shares the train state, checkpointing and metrics.
TRAINERS: dict[str, str] = {
  "sft": "retool_jax.train.sft",
  "rl": "retool_jax.train.rl_run",
  "dpo": "retool_jax.train.dpo",
}


def get_trainer(name: str) -> ModuleType:
  """The trainer module registered as `name`."""
  if name not in TRAINERS:
    raise ValueError(f"config.trainer={name!r} is not a registered trainer; known: {sorted(TRAINERS)}")
  return importlib.import_module(TRAINERS[name])


def _type_ok(value, default) -> bool:
  if default is None or value is None:
    return True
  if isinstance(default, bool) or isinstance(value, bool):
    return isinstance(value, bool) and isinstance(default, bool)
  if isinstance(default, float):
    return isinstance(value, (int, float))
  if isinstance(default, (tuple, list)):
    return isinstance(value, (tuple, list))
  return isinstance(value, type(default))


def validate_config(
  config: ml_collections.ConfigDict,
  schema: ml_collections.ConfigDict,
  *,
  free_form: Iterable[str] = (),
  prefix: str = "config",
) -> None:
  """Raises ValueError naming the first unknown, missing or mistyped field of `config` against `schema`."""
  free = set(free_form)
  for key in config.keys():
    path = f"{prefix}.{key}"
    if key not in schema:
      close = difflib.get_close_matches(key, list(schema.keys()), n=1)
      hint = f"; did you mean {prefix}.{close[0]}?" if close else ""
      raise ValueError(f"{path}: unknown field{hint} (known: {', '.join(sorted(schema.keys()))})")
    value, default = config[key], schema[key]
    if isinstance(default, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ValueError(f"{path}: expected a group of fields, got {type(value).__name__} {value!r}")
      if path.removeprefix("config.") not in free:
        validate_config(value, default, free_form=free, prefix=path)
    elif not _type_ok(value, default):
      raise ValueError(f"{path}: expected {type(default).__name__}, got {type(value).__name__} {value!r}")
  missing = [k for k in schema.keys() if k not in config]
  if missing:
    raise ValueError(f"{prefix}: missing field(s) {', '.join(f'{prefix}.{k}' for k in missing)}")


def check_config(config: ml_collections.ConfigDict) -> ModuleType:
  """Validates `config` against its trainer's schema and returns the trainer module."""
  if "trainer" not in config:
    raise ValueError(f"config has no 'trainer' field; set it to one of {sorted(TRAINERS)}")
  trainer = get_trainer(config.trainer)
  validate_config(config, trainer.default_config(), free_form=getattr(trainer, "FREE_FORM", ()))
  return trainer


def run(config: ml_collections.ConfigDict) -> dict:
  """What `python -m retool_jax.train --config=...` does once flags are parsed: checks `config` against its
  trainer's schema, then trains; returns the trainer's result (its last metrics)."""
  return check_config(config).train(config)
